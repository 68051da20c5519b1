"""gpu_train: Coral training steps (``coral.train.step.losses``, the ``coral`` retriever, ``CoralHeads``) on
the Qwen2-VL of the size, bf16, DeepSpeed ZeRO-2 (cluster/deepspeed/zero2.json) on one GPU in a single
process (no Ray Train): tokens/s and MFU (6 x params x tokens/s over the GPU's dense bf16 peak)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_train
from benchmarks.common import write_result
from benchmarks.gpu.part import main, qwen
from benchmarks.gpu.sizes import Size


def run(size: Size, work: Path, out: Path) -> None:
    base = str(qwen(size, work))
    m = bench_train.deepspeed_steps(
        base,
        size.device,
        size.dtype,
        size.train_batch,
        size.train_steps,
        size.train_image_px,
        size.max_image_tokens,
    )
    peak, source = bench_train.peak_tflops(size.device)
    params, vision, seconds = m["params"], m["vision_params"], m["seconds"]
    per_s = m["tokens"] / seconds
    flops = 6 * params * per_s
    by_tower = 6 * ((params - vision) * m["tokens"] + vision * m["patches"]) / seconds
    write_result(
        "gpu_train",
        value=per_s,
        unit="language-model tokens/s (the real tokens, text and visual, of every forward of a step)",
        baseline={
            "what": "tokens/s at the device's dense bf16 peak: peak FLOP/s / (6 x params); the ratio is the MFU",
            "value": round(peak * 1e12 / (6 * params), 3) if peak else None,
        },
        goal={
            "bar": 0.25,
            "direction": "higher",
            "meaning": "MFU >= 25% (a first bar, to revisit once measured)",
        },
        out_dir=out,
        mfu=round(flops / (peak * 1e12), 4) if peak else None,
        mfu_formula="6 * params * tokens / seconds / peak_flops",
        mfu_by_tower=round(by_tower / (peak * 1e12), 4) if peak else None,
        mfu_by_tower_formula=(
            "6 * ((params - vision params) * tokens + vision params * image patches) / seconds / peak_flops"
        ),
        model_tflops=round(flops / 1e12, 3),
        peak_tflops=peak,
        peak_source=source,
        params=params,
        vision_params=vision,
        tokens_per_step=m["tokens"] / size.train_steps,
        patches_per_step=m["patches"] / size.train_steps,
        steps=size.train_steps,
        step_s=round(seconds / size.train_steps, 4),
        batch={
            "queries": size.train_batch,
            "candidates_per_query": bench_train.K + 1,
            "image_px": size.train_image_px,
        },
        loss=round(m["loss"], 4),
        zero_stage=m["zero_stage"],
        device=size.device,
        dtype=size.dtype,
        model={"kind": "qwen2_vl (random init)", **{k: v for k, v in size.qwen.items() if k != "device"}},
        peak_rss_gib=m["peak_rss_gib"],
        peak_gpu_gib=m["peak_gpu_gib"],
    )


if __name__ == "__main__":
    main("train", run)
