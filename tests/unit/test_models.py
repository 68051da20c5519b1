import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from coral import schemas as S
from coral import storage
from coral.catalog import draw
from coral.config import EncoderConfig
from coral.errors import ConfigError
from coral.models import loader
from coral.models.encoders import ImageEncoder, decode_image


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
    [("clip", "clip"), ("dinov2", "dinov2"), ("qwen2_vl", "qwen2_vl"), ("qwen2_5_vl", "qwen2_5_vl")],
)
def test_tiny_models_round_trip_through_from_pretrained(tiny_models, name, kind):
    assert loader.model_type(str(tiny_models[name])) == kind
    a = loader.load_model(str(tiny_models[name]))
    b = loader.load_model(str(tiny_models[name]))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sum(p.numel() for p in a.parameters()) < 2_000_000


def test_rebuild_is_seeded(tiny_models, tmp_path):
    from coral.models.tiny import build_all

    again = build_all(tmp_path, ("dinov2",))["dinov2"]
    a = loader.load_model(str(tiny_models["dinov2"])).state_dict()
    b = loader.load_model(str(again)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind,model,dim", [("clip_image", "clip", 32), ("dinov2", "dinov2", 64)])
def test_image_encoders_return_unit_float32(tiny_models, kind, model, dim):
    enc = ImageEncoder(EncoderConfig(kind=kind, model=str(tiny_models[model]), device="cpu"))
    emb = enc.encode(images(3))
    assert emb.shape == (3, dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(emb[0], emb[1])  # different images, different vectors
    np.testing.assert_allclose(enc.encode(images(1)), emb[:1], rtol=1e-4, atol=1e-5)  # batch-independent


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


def test_decode_image_rejects_garbage():
    assert decode_image(draw.png_bytes(images(1)[0])).mode == "RGB"
    with pytest.raises(ValueError, match="undecodable image"):
        decode_image(b"not an image")


def test_embed_batch_writes_rejected_rows_with_reason(tiny_models, tmp_path):
    from coral.stages.embed import EmbedBatch

    rejected = storage.resolve(str(tmp_path / "rejected"))
    fn = EmbedBatch(EncoderConfig(name="v", model=str(tiny_models["clip"]), device="cpu"), rejected)
    good = [draw.png_bytes(im) for im in images(2)]
    batch = pa.table({S.ID: ["a", "bad", "b"], S.IMAGE: [good[0], b"\x89PNG broken", good[1]]})
    out = fn(batch)
    assert out.schema.equals(S.embed_schema("v")) and out.column(S.ID).to_pylist() == ["a", "b"]
    files = storage.list_files(rejected, ".parquet")
    assert len(files) == 1
    rej = pq.read_table(files[0]).to_pylist()
    assert rej == [{S.ID: "bad", S.REASON: "undecodable image: UnidentifiedImageError"}]
    fn(batch)  # a retried batch overwrites its own rejected file instead of adding one
    assert len(storage.list_files(rejected, ".parquet")) == 1


@pytest.mark.gpu
def test_image_encoder_bf16_on_gpu_matches_cpu(tiny_models):
    ref = str(tiny_models["clip"])
    cpu = ImageEncoder(EncoderConfig(model=ref, device="cpu")).encode(images(3))
    gpu = ImageEncoder(EncoderConfig(model=ref, device="cuda", dtype="bfloat16")).encode(images(3))
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    assert (gpu * cpu).sum(axis=1).min() > 0.98  # bf16 on GPU stays close to fp32 on CPU
