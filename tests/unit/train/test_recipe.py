"""The training recipe: each model kind's paper defaults, the learning-rate schedule, LoRA on the vision
tower as well as the language model, Qwen's image-token budget."""

from __future__ import annotations

import pytest

from coral.config import RECIPES, TrainConfig
from coral.models import loader, retrievers
from coral.train.loop import lr_factor, with_lora
from tests.unit.models.test_loader import images


def test_unset_fields_take_the_kinds_paper_recipe_and_set_ones_win():
    clip = TrainConfig(model="mmret_clip")
    assert (clip.lr, clip.temperature, clip.hard_negatives, clip.lora_rank) == (5e-6, 0.02, 4, 0)  # MegaPairs
    mllm = TrainConfig(model="mmret_mllm")
    assert (mllm.lr, mllm.hard_negatives, mllm.lora_rank) == (5e-6, 3, 32)
    assert TrainConfig(model="coral").max_image_tokens == 576 and TrainConfig(model="coral").lora_rank == 0
    assert TrainConfig(model="mmret_mllm", lr=1e-4, lora_rank=0).lr == 1e-4
    assert TrainConfig(model="mmret_mllm", lr=1e-4, lora_rank=0).lora_rank == 0
    assert set(RECIPES) == {"mmret_clip", "mmret_mllm", "coral"}


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_warmup_then_the_schedule(schedule):
    cfg = TrainConfig(steps=100, warmup_ratio=0.1, lr_schedule=schedule)
    f = [lr_factor(s, cfg) for s in range(100)]
    assert all(a < b for a, b in zip(f[:10], f[1:11], strict=True))  # 10 warm-up steps, rising
    assert f[10] == pytest.approx(1.0)
    if schedule == "constant":
        assert f[-1] == pytest.approx(1.0)
    else:
        assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.05
    assert f[55] == pytest.approx({"linear": 0.5, "cosine": 0.5, "constant": 1.0}[schedule], abs=0.02)


def test_lora_reaches_the_vision_tower_and_the_language_model(tiny_models):
    model = loader.load_model(str(tiny_models["qwen2_vl"]))
    trained, wrapper = with_lora(model, TrainConfig(model="mmret_mllm", lora_rank=4))
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(".visual." in n and "attn.qkv" in n for n in names)
    assert any(".visual." in n and "attn.proj" in n for n in names)
    assert any("language_model" in n and "q_proj" in n for n in names)
    assert not any("patch_embed" in n for n in names)  # a Conv3d, not a target


def test_the_image_token_budget_caps_visual_tokens(tiny_models):
    ref = str(tiny_models["qwen2_vl"])
    big = images(1, px=448)[0]
    free = retrievers.make("coral", loader.load_processor(ref), 0).candidate("mug", big)
    capped = retrievers.make("coral", loader.load_processor(ref), 16).candidate("mug", big)
    tokens = [int(f["image_grid_thw"].prod()) // 4 for f in (free, capped)]
    assert tokens[1] <= 16 < tokens[0]
