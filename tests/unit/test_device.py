"""Every batch reaches a model on the model's device (``coral.device.to_model``): each retriever's train
step, the validation probe, the index / evaluate / serve embedder, the embed stage's encoders and the hf
annotation engine run with their weights on another device (``tests.devices``), where a CPU tensor meeting
a weight raises, as it does on a GPU."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from coral import schemas as S
from coral.annotate.engines import HFEngine
from coral.catalog import lookup
from coral.config import EncoderConfig, EngineConfig, TrainConfig
from coral.device import placement, to_model
from coral.models import encoders, loader, retrievers
from coral.models.coral import CoralHeads
from coral.search.embedder import Embedder
from coral.train import loop, step
from tests.devices import DeviceMixup, Elsewhere, OnDevice, elsewhere
from tests.unit.models.test_loader import images

pytestmark = pytest.mark.timeout(120)
BASE = {"mmret_clip": "clip", "mmret_mllm": "qwen2_vl", "coral": "qwen2_vl"}


def products():
    pics = [*images(3), images(1, px=48)[0]]
    ids = ["p0", "p1", "p2", "p3"]
    return lookup.Products(
        dict(zip(ids, ["red mug", "", "striped hat", "wooden lamp"], strict=True)),
        dict(zip(ids, pics, strict=True)).get,
    )


ROWS = [
    {
        S.QUERY_ID: f"q{i}",
        S.QUERY_TEXT: f"the same {S.IMAGE_SLOT} in blue",
        S.QUERY_IMAGE_IDS: [f"p{i}"],
        S.POSITIVE_IDS: [f"p{i + 1}"],
        S.HARD_NEGATIVE_IDS: ["p3", "p0"][: 2 - i],
    }
    for i in range(2)
]


def one_step(kind: str, ref: str, move: bool) -> tuple[dict, torch.nn.Module]:
    torch.manual_seed(0)
    model = loader.load_model(ref).train()
    retriever = retrievers.make(kind, loader.load_processor(ref))
    heads = CoralHeads(model.config.text_config.hidden_size) if kind == "coral" else None
    special = set(retriever.processor.tokenizer.all_special_ids)
    examples = step.featurize(retriever, ROWS, products(), 2)
    if move:
        elsewhere(model)
        if heads is not None:
            elsewhere(heads)
    with Elsewhere() if move else torch.enable_grad():
        out = step.losses(
            model, retriever, examples, 2, TrainConfig(), heads, special, torch.Generator().manual_seed(1)
        )
        out["loss"].backward()
    return {k: float(v.detach()) for k, v in out.items()}, model


@pytest.mark.parametrize("kind", ["mmret_clip", "mmret_mllm", "coral"])
def test_one_train_step_of_each_retriever_keeps_to_the_model_device(kind, tiny_models):
    ref = str(tiny_models[BASE[kind]])
    moved, model = one_step(kind, ref, move=True)
    plain, _ = one_step(kind, ref, move=False)
    assert set(moved) == set(plain) and all(math.isfinite(v) for v in moved.values())
    for k in plain:  # the same step: nothing but the device bookkeeping differs
        assert moved[k] == pytest.approx(plain[k], rel=1e-4, abs=1e-6), k
    assert all(isinstance(p, OnDevice) for p in model.parameters())
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert sum(g is not None for g in grads) > len(grads) // 2


@pytest.mark.parametrize("kind", ["mmret_clip", "coral"])
def test_the_validation_probe_runs_on_the_model_device(kind, tiny_models):
    ref = str(tiny_models[BASE[kind]])
    model = elsewhere(loader.load_model(ref))
    retriever = retrievers.make(kind, loader.load_processor(ref))
    with Elsewhere():
        scores = step.validate(model, retriever, ROWS, ["p1", "p2", "p3"], products())
        probe = loop.probe(model, retriever, ROWS, ["p1", "p2"], products())
    assert scores["queries"] == 2 and 0 <= scores["MRR@10"] <= 1
    assert np.asarray(probe["queries"]).shape[0] == 2


def test_the_index_evaluate_and_serve_embedder_runs_on_the_model_device(tiny_models):
    embedder = Embedder(str(tiny_models["qwen2_vl"]), "coral", device="cpu")
    plain = embedder([embedder.retriever.candidate("red mug", images(1)[0])])
    elsewhere(embedder.model)
    with Elsewhere():
        out = embedder([embedder.retriever.candidate("red mug", images(1)[0])])
    assert type(out) is np.ndarray and out.dtype == np.float32
    np.testing.assert_allclose(out, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "model", "inputs"),
    [
        ("clip_image", "clip", lambda: images(2)),
        ("clip_text", "clip", lambda: ["a red mug", "a hat"]),
        ("dinov2", "dinov2", lambda: images(2)),
    ],
)
def test_the_embed_stage_encoders_run_on_the_model_device(kind, model, inputs, tiny_models):
    enc = encoders.build(EncoderConfig(kind=kind, model=str(tiny_models[model]), device="cpu"))
    elsewhere(enc.model)
    with Elsewhere():
        out = enc.encode(inputs())
    assert out.shape[0] == 2 and np.isfinite(out).all()


@pytest.mark.parametrize("model", ["qwen2_vl", "qwen2"])
def test_the_hf_annotation_engine_generates_on_the_model_device(model, tiny_models):
    engine = HFEngine(EngineConfig(model=str(tiny_models[model]), max_new_tokens=4, device="cpu"))
    elsewhere(engine.model)
    parts = [{"type": "text", "text": "Describe the change."}]
    if engine.vlm:
        buf = io.BytesIO()
        images(1)[0].save(buf, "PNG")
        parts = [{"type": "image", "image": buf.getvalue()}, *parts]
    with Elsewhere():
        out = engine.generate([[{"role": "user", "content": parts}]] * 2)
    assert len(out) == 2


def test_a_cpu_batch_meeting_weights_elsewhere_raises(tiny_models):
    """The check itself: what today's GPU would refuse, it refuses (an embedding lookup included)."""
    ref = str(tiny_models["qwen2_vl"])
    model = elsewhere(loader.load_model(ref))
    retriever = retrievers.make("coral", loader.load_processor(ref))
    batch = retriever.collate([retriever.candidate("red mug", images(1)[0])])
    with Elsewhere(), pytest.raises(DeviceMixup, match="embedding"):
        model.model.get_input_embeddings()(batch["input_ids"])
    with Elsewhere():
        moved = to_model(batch, model)
        assert all(isinstance(v, OnDevice) for v in moved.values())
        assert moved["pixel_values"].dtype == placement(model)[1] and moved["input_ids"].dtype == torch.long
        with pytest.raises(DeviceMixup, match="numpy"):
            moved["pixel_values"].numpy()
        assert moved["input_ids"].cpu().numpy().shape == tuple(batch["input_ids"].shape)
