"""The embed stage over a folder of real files, good and bad: every good image is embedded, every bad
one is in rejected/ with its reason, and rows_in = rows_out + rows_rejected."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coral import graph, manifest, storage
from coral import schemas as S
from coral.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_folder(root) -> dict[str, str]:
    """Writes the files; returns {id: expected rejection reason or "" for good}."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    files = {
        "good.png": (save(photo, "PNG"), ""),
        "sub/good.jpg": (save(photo, "JPEG"), ""),
        "cmyk.jpg": (save(photo.convert("CMYK"), "JPEG"), ""),
        "alpha.png": (save(photo.convert("RGBA"), "PNG"), ""),
        "deep.png": (save(Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)), "PNG"), ""),
        "corrupt.jpg": (b"\xff\xd8\xff\xe0 this is not really a jpeg", "undecodable image"),
        "truncated.png": (save(photo, "PNG")[:300], "undecodable image"),
        "empty.png": (b"", "empty file"),
        "bomb.png": (save(Image.new("L", (3000, 3000)), "PNG"), "image too large: 3000x3000"),
    }
    for name, (data, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image extension: ignored")
    return {name.rsplit(".", 1)[0]: reason for name, (_, reason) in files.items()}


def test_folder_of_good_and_bad_images(tmp_path, tiny_models, ray_local):
    """Three encoders: CLIP image, DINOv2 (mean pooling) and a sentence-transformers dir on the captions."""
    expected = make_folder(tmp_path / "images")
    captions = tmp_path / "captions.jsonl"
    expected["sub/good"] = "empty caption"  # a good image whose caption is missing
    captions.write_text(
        "\n".join(json.dumps({"id": i, "caption": f"image {i}"}) for i in expected if i != "sub/good")
    )
    cfg = load_config(
        None,
        [
            f"run.run_root={tmp_path / 'run'}",
            "run.stages=[embed]",
            "embed.source=images",
            f"embed.images.uri={tmp_path / 'images'}",
            f"embed.images.captions={captions}",
            "embed.max_image_pixels=1000000",
            f"embed.encoders=[{{name: clip_image, kind: clip_image, model: {tiny_models['clip']}, batch_size: 4}},"
            f" {{name: dinov2, kind: dinov2, model: {tiny_models['dinov2']}, pooling: mean, batch_size: 4}},"
            f" {{name: caption, kind: sentence_transformers, model: {tiny_models['sentence_transformers']},"
            " batch_size: 4}]",
            "ray.include_dashboard=false",
        ],
    )
    (row,) = graph.run_graph(cfg)
    good = sorted(i for i, reason in expected.items() if not reason)
    bad = {i: reason for i, reason in expected.items() if reason}
    assert (row.rows_in, row.rows_out, row.rows_rejected) == (len(expected), len(good), len(bad))

    emb = pq.read_table(tmp_path / "run" / "embed" / "data")
    assert sorted(emb.column(S.ID).to_pylist()) == good
    for col in ("emb_clip_image", "emb_dinov2", "emb_caption"):
        v = np.array(emb.column(col).to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    rejected = {
        r[S.ID]: r[S.REASON] for r in pq.read_table(tmp_path / "run" / "embed" / "rejected").to_pylist()
    }
    assert set(rejected) == set(bad)
    for i, reason in bad.items():
        assert rejected[i].startswith(reason), (i, rejected[i])
    m = manifest.read_complete(storage.resolve(str(tmp_path / "run" / "embed")))
    assert m["rows_in"] == m["rows_out"] + m["rows_rejected"]
