"""The gpu check's two sizes: ``FULL`` (real model sizes, random weights, on one CUDA GPU) and ``TINY``
(the same code on the CPU, the CI test), and its parts in the order they run."""

from __future__ import annotations

from dataclasses import dataclass, field

PARTS = ("train", "embed", "knn", "serve", "annotate")  # the most uncertain and longest last
# Qwen2-VL-2B-Instruct's config.json: 2.21B parameters (language model 1.54B with the tied embedding,
# vision tower 0.67B); the tokenizer stays the tiny one (its ids are a subset of the vocabulary)
QWEN2_VL_2B = {
    "text": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(
        depth=32,
        embed_dim=1280,
        hidden_size=1536,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Size:
    device: str
    dtype: str
    qwen: dict  # build_qwen's keyword arguments
    train_batch: int  # queries per step, each with its positive and hard negatives
    train_steps: int  # timed, after two warm-up steps
    train_image_px: int
    max_image_tokens: int
    clip: dict
    images: int
    embed_batch: int
    knn_vectors: int
    serve_queries: int  # a multiple of serve_load.ROUND
    hf_prompts: int
    vllm_prompts: int
    new_tokens: int
    gen_batch: int
    describe_px: int
    serve_groups: int  # catalog groups (3 products each) of the served run
    budget_s: float
    limits: dict = field(default_factory=dict)  # seconds per part at most
    # parts at once: one on the GPU (each wants the whole device), two on the CPU at tiny size, where a
    # part is mostly its process starting, importing and bringing up Ray (76 s one by one, 57 s two at a
    # time on 2 cores); parts at once each get a work dir of their own (no shared model build)
    lanes: int = 1


FULL = Size(
    device="cuda",
    dtype="bfloat16",
    qwen=dict(sizes=QWEN2_VL_2B, max_pixels=448 * 448, device="cuda", dtype="bfloat16"),
    train_batch=4,
    train_steps=10,
    train_image_px=280,  # 100 visual tokens an image
    max_image_tokens=256,
    clip=dict(image_size=224, hidden=1024, layers=24, patch=14, intermediate=4096, projection=768),
    images=4096,
    embed_batch=256,
    knn_vectors=1_000_000,
    serve_queries=200,
    hf_prompts=64,
    vllm_prompts=512,
    new_tokens=128,
    gen_batch=16,
    describe_px=336,  # 144 visual tokens an image (two a describe prompt, one a served query)
    serve_groups=100,
    budget_s=480.0,
    limits={"train": 150, "embed": 150, "knn": 120, "serve": 150, "annotate": 240},
)
TINY = Size(
    device="cpu",
    dtype="float32",
    qwen=dict(sizes={"text": {"vocab_size": 2048}}),  # more ids than the tokenizer has, as at full size
    train_batch=2,
    train_steps=2,
    train_image_px=56,
    max_image_tokens=16,
    clip=dict(image_size=64, hidden=64, layers=2, patch=16),
    images=16,
    embed_batch=8,
    knn_vectors=5_000,
    serve_queries=10,
    hf_prompts=4,
    vllm_prompts=0,
    new_tokens=8,
    gen_batch=2,
    describe_px=64,
    serve_groups=20,
    budget_s=240.0,
    limits={"train": 90, "embed": 90, "knn": 60, "serve": 120, "annotate": 60},
    lanes=2,
)
SIZES = {"full": FULL, "tiny": TINY}
