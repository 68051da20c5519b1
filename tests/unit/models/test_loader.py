import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from coral import schemas as S
from coral import storage
from coral.catalog import draw
from coral.config import EncoderConfig
from coral.errors import ConfigError
from coral.images import decode_image
from coral.models import encoders, loader
from coral.stages.embed import EncodeBatch
from coral.testing import corpus
from coral.testing.tiny import build_all


def images(n=3, px=64):
    attrs = {
        "colour": "red",
        "pattern": "striped",
        "size": "large",
        "background": "sky",
        "material": "wood",
        "brand": "Kova",
    }
    return [draw.render(c, attrs, px) for c in ("mug", "hat", "shoe")[:n]]


def test_resolve_paths_and_hub_ids(tiny_models, tmp_path):
    assert loader.resolve(str(tiny_models["clip"])) == str(tiny_models["clip"])
    assert loader.resolve("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    with pytest.raises(ConfigError, match="models/tiny/nothing"):
        loader.resolve("models/tiny/nothing")
    with pytest.raises(ConfigError, match="config.json"):
        loader.model_type(str(tmp_path))


@pytest.mark.parametrize(
    "name,kind",
    [
        ("clip", "clip"),
        ("siglip", "siglip"),
        ("dinov2", "dinov2"),
        ("qwen2_vl", "qwen2_vl"),
        ("qwen2_5_vl", "qwen2_5_vl"),
        ("sentence_transformers", "bert"),
    ],
)
def test_tiny_models_round_trip_through_from_pretrained(tiny_models, name, kind):
    assert loader.model_type(str(tiny_models[name])) == kind
    generic = name == "sentence_transformers"
    a = loader.load_model(str(tiny_models[name]), generic=generic)
    b = loader.load_model(str(tiny_models[name]), generic=generic)
    sa, sb = a.state_dict(), b.state_dict()  # loaded bytes, not computed: bit-equality is the point
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) < 2_000_000


def test_rebuild_is_seeded(tiny_models, tmp_path):
    again = build_all(tmp_path, ("dinov2",), corpus=corpus.project())["dinov2"]
    a = loader.load_model(str(tiny_models["dinov2"])).state_dict()
    b = loader.load_model(str(again)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # one seed, one init order: bit-equal by design


@pytest.mark.parametrize(
    "kind,model,dim,pooling",
    [
        ("clip_image", "clip", 32, "cls"),
        ("clip_image", "siglip", 32, "cls"),
        ("dinov2", "dinov2", 64, "cls"),
        ("dinov2", "dinov2", 64, "mean"),
    ],
)
def test_image_encoders_return_unit_float32(tiny_models, kind, model, dim, pooling):
    enc = encoders.build(
        EncoderConfig(kind=kind, model=str(tiny_models[model]), device="cpu", pooling=pooling)
    )
    emb = enc.encode(images(3))
    assert enc.modality == "image" and emb.shape == (3, dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])  # different images, different vectors
    np.testing.assert_allclose(enc.encode(images(1)), emb[:1], rtol=1e-4, atol=1e-5)  # batch-independent


def test_dinov2_pooling_modes_differ(tiny_models):
    cls, mean = (
        encoders.build(
            EncoderConfig(kind="dinov2", model=str(tiny_models["dinov2"]), device="cpu", pooling=p)
        )
        for p in ("cls", "mean")
    )
    assert not np.allclose(cls.encode(images(2)), mean.encode(images(2)))


@pytest.mark.parametrize(
    "kind,model,dim",
    [
        ("clip_text", "clip", 32),
        ("clip_text", "siglip", 32),
        ("sentence_transformers", "sentence_transformers", 32),
    ],
)
def test_text_encoders_return_unit_float32(tiny_models, kind, model, dim):
    enc = encoders.build(EncoderConfig(kind=kind, model=str(tiny_models[model]), device="cpu"))
    texts = ["a small red mug on a white background", "a large blue striped hat", "x"]
    emb = enc.encode(texts)
    assert enc.modality == "text" and emb.shape == (3, dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    np.testing.assert_allclose(enc.encode(texts[:1]), emb[:1], rtol=1e-4, atol=1e-5)  # padding-independent


def test_sentence_transformers_pooling_is_read_from_the_model_dir(tiny_models, tmp_path):
    import json
    import shutil

    d = tmp_path / "st"
    shutil.copytree(tiny_models["sentence_transformers"], d)
    assert encoders.sentence_transformers_pooling(str(d)) == "mean"
    cfg = json.loads((d / "1_Pooling" / "config.json").read_text())
    cfg.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    assert encoders.sentence_transformers_pooling(str(d)) == "cls"
    cfg.update(pooling_mode_cls_token=False, pooling_mode_lasttoken=True)
    (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="lasttoken"):
        encoders.sentence_transformers_pooling(str(d))


def test_qwen2_vl_processor_and_last_token_embedding(tiny_models):
    ref = str(tiny_models["qwen2_vl"])
    proc, model = loader.load_processor(ref), loader.load_model(ref)
    proc.tokenizer.padding_side = "left"
    msgs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
        for t in ("a", "longer")
    ]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    batch = proc(text=texts, images=images(2), return_tensors="pt", padding=True)
    with torch.inference_mode():
        hidden = model.model(**batch).last_hidden_state[:, -1]  # (B, H)
    assert hidden.shape == (2, model.config.text_config.hidden_size)
    assert torch.isfinite(hidden).all()


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_image_accepts_unusual_but_valid_images():
    rgb = images(1)[0]
    cmyk = decode_image(encoded(rgb.convert("CMYK"), "JPEG"))
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    i16 = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    assert i16.mode.startswith("I;16")
    for out in (cmyk, decode_image(encoded(rgba)), decode_image(encoded(i16)), decode_image(encoded(rgb))):
        assert out.mode == "RGB"
    assert decode_image(encoded(rgba)).getpixel((0, 0)) == (255, 255, 255)
    assert np.asarray(decode_image(encoded(i16))).max() == 255  # rescaled, not clipped to black/white


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty file"),
        (b"not an image", "undecodable image: UnidentifiedImageError"),
        (None, "undecodable image"),  # filled in below: a truncated PNG
    ],
)
def test_decode_image_rejects_bad_bytes_with_reason(data, reason):
    if data is None:
        data = encoded(images(1)[0])[:200]
    with pytest.raises(ValueError, match=reason):
        decode_image(data)


def test_decode_image_rejects_oversized_images_before_decoding():
    big = encoded(Image.new("L", (3000, 3000)))  # compresses to a few KB: a small decompression bomb
    with pytest.raises(ValueError, match="image too large: 3000x3000"):
        decode_image(big, max_pixels=1_000_000)


def test_encoders_reject_what_they_cannot_read(tiny_models, tmp_path):
    rejected = storage.resolve(str(tmp_path / "rejected"))
    good = [draw.png_bytes(im) for im in images(2)]
    batch = pa.table(
        {
            S.ID: ["a", "bad", "b", "nocap"],
            S.IMAGE: [good[0], b"\x89PNG broken", good[1], good[0]],
            S.CAPTION: ["red mug", "", "hat", "  "],
            S.SPLIT: ["train"] * 4,
        }
    )
    clip = str(tiny_models["clip"])
    img = EncoderConfig(name="v", model=clip, device="cpu", batch_size=1)  # batches of 1 inside the pool's
    txt = EncoderConfig(name="t", kind="clip_text", model=clip, device="cpu")
    pool = EncodeBatch([img, txt], 10**6, rejected)
    assert pool.encoders[0][0].model is pool.encoders[1][0].model  # one CLIP for both towers
    out = pool(batch)
    assert out.column(S.ID).to_pylist() == ["a", "b"]
    assert out.column_names == [S.ID, S.IMAGE, S.CAPTION, S.SPLIT, "emb_v", "emb_t"]
    assert len(out.column("emb_v")[0].as_py()) == 32 and len(out.column("emb_t")[0].as_py()) == 32
    files = storage.list_files(rejected, ".parquet")
    assert len(files) == 1  # one per batch; "bad" reached only the first encoder
    assert sorted((r for f in files for r in pq.read_table(f).to_pylist()), key=str) == sorted(
        [
            {S.ID: "bad", S.REASON: "undecodable image: UnidentifiedImageError"},
            {S.ID: "nocap", S.REASON: "empty caption"},
        ],
        key=str,
    )
    pool(batch)
    assert len(storage.list_files(rejected, ".parquet")) == 1  # a retried batch overwrites its own file
    alone = EncodeBatch([img], 10**6, rejected)(batch)  # the same vectors as a pool of its own
    assert alone.column(S.ID).to_pylist() == ["a", "b", "nocap"]
    np.testing.assert_allclose(
        np.array(alone.column("emb_v").to_pylist())[:2], np.array(out.column("emb_v").to_pylist()), atol=1e-5
    )


def test_encoders_sharing_a_model_and_placement_share_a_pool():
    a = EncoderConfig(name="a", kind="clip_image", model="m/clip")
    b = EncoderConfig(name="b", kind="clip_text", model="m/clip", batch_size=64)
    c = EncoderConfig(name="c", kind="dinov2", model="m/dino")
    d = EncoderConfig(name="d", kind="clip_text", model="m/clip", num_actors=2)  # placed apart
    e = EncoderConfig(name="e", kind="clip_image", model="m/clip", dtype="bfloat16")
    assert [[x.name for x in p] for p in encoders.shared_pools([a, c, b, d, e])] == [
        ["a", "b"],
        ["c"],
        ["d"],
        ["e"],
    ]


@pytest.mark.gpu
def test_image_encoder_bf16_on_gpu_matches_cpu(tiny_models):
    ref = str(tiny_models["clip"])
    cpu = encoders.build(EncoderConfig(model=ref, device="cpu")).encode(images(3))
    gpu = encoders.build(EncoderConfig(model=ref, device="cuda", dtype="bfloat16")).encode(images(3))
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    assert (gpu * cpu).sum(axis=1).min() > 0.98  # bf16 on GPU stays close to fp32 on CPU
