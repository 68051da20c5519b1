"""gpu_annotate: the describe step on vLLM (``ray.data.llm``, ``coral.annotate.vllm``) vs the hf engine,
generated tokens/s at a fixed number of new tokens (random weights write gibberish). Without a CUDA GPU or
vLLM the hf engine is measured and the part recorded as skipped."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_annotate
from benchmarks.common import PeakRSS, write_result, write_status
from benchmarks.gpu.part import main, qwen, start_ray
from benchmarks.gpu.sizes import Size
from coral import schemas as S
from coral.annotate.steps import PAIR_ID, Describe
from coral.catalog.generate import generate_table
from coral.config import AnnotateConfig, CatalogConfig


def run(size: Size, work: Path, out: Path) -> None:
    base = str(qwen(size, work))
    images = generate_table(CatalogConfig(num_groups=16, image_size=size.describe_px), range(16))
    step = Describe(AnnotateConfig(), images.select([S.ID, S.IMAGE]))
    ids = images.column(S.ID).to_pylist()
    rows = [
        {PAIR_ID: f"pair{i:05d}", S.QUERY_ID: ids[i % len(ids)], S.TARGET_ID: ids[(i + 1) % len(ids)]}
        for i in range(max(size.hf_prompts, size.vllm_prompts))
    ]
    prompts = [step.prompt(r) for r in rows[: size.hf_prompts]]
    with PeakRSS() as mem:
        hf = bench_annotate.hf_rate(base, prompts, size.new_tokens, size.gen_batch, size.device, size.dtype)
    common = dict(
        out_dir=out,
        step="describe: two images a prompt (coral.annotate.prompts.describe_prompt)",
        new_tokens=size.new_tokens,
        hf=hf,
        device=size.device,
        dtype=size.dtype,
        peak_rss_gib=mem.peak_gib,
        peak_gpu_gib=hf["peak_gpu_gib"],
    )
    reason = None
    if size.device != "cuda":
        reason = "vLLM needs a CUDA GPU (the tiny size runs on the CPU); the hf engine was measured"
    else:
        try:
            import vllm  # not at the top: optional (pip install .[vllm]), heavy, on a GPU only
        except Exception as e:  # any import failure: a missing or broken install
            reason = f"vllm is not importable ({type(e).__name__}: {e}); pip install .[vllm]"
    if reason:
        write_status("gpu_annotate", "skipped", reason, **common)
        return
    start_ray()
    v = bench_annotate.vllm_rate(base, step, rows[: size.vllm_prompts], size.new_tokens, size.dtype)
    common["peak_gpu_gib"] = max(x for x in (hf["peak_gpu_gib"], v["peak_gpu_gib"], 0) if x is not None)
    write_result(
        "gpu_annotate",
        value=v["tokens_per_s"] or v["whole_run_tokens_per_s"],
        unit=f"generated tokens/s, vLLM through ray.data.llm, {size.new_tokens} new tokens a prompt"
        " (steady: the blocks after the first)",
        baseline={
            "what": "the hf engine (transformers generate), batched, in this process",
            "value": hf["tokens_per_s"],
        },
        goal={"bar": 3.0, "direction": "higher", "meaning": "vLLM >= 3x the hf engine's generated tokens/s"},
        vllm={**v, "version": vllm.__version__},
        **common,
    )


if __name__ == "__main__":
    main("annotate", run)
