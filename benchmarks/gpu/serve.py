"""gpu_serve: the search route with the size's Qwen2-VL as query encoder on the device, single queries one
at a time over HTTP: p50/p99 vs the same work in this process (``serve_setup``, ``serve_load``)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import PeakGPU, PeakRSS, write_result
from benchmarks.gpu.part import main, qwen, start_ray
from benchmarks.gpu.sizes import Size
from benchmarks.serve_load import ms, sequential
from benchmarks.serve_setup import InProcess, prepare, with_serve
from coral.serve import deploy


def run(size: Size, work: Path, out: Path) -> None:
    start_ray()
    gpus = 1 if size.device == "cuda" else 0
    where = [f"device={size.device}", f"dtype={size.dtype}"]
    extra = (
        f"catalog.image_size={size.describe_px}",  # query and candidate images of a real size
        f"catalog.num_groups={size.serve_groups}",
        *[f"index.{w}" for w in where],
        f"index.num_gpus={gpus}",
        *[f"serve.{w}" for w in where],
        f"serve.encoder.num_gpus={gpus}",
    )
    cfg, queries = prepare(str(work / "serve"), base=str(qwen(size, work)), extra=extra)
    local = InProcess(cfg)

    def measure(url: str) -> dict:
        path = "proxy" if url == deploy.url_of(cfg.serve) else "direct"
        return {"path": path, **sequential({"served": url}, local, queries, size.serve_queries)}

    with PeakRSS() as mem, PeakGPU() as gpu:
        times = with_serve(cfg, measure)
    served, base = ms(times["served"]), ms(times["in_process"])
    write_result(
        "gpu_serve",
        value=served["p50_ms"],
        unit="ms, p50 of single /v1/search queries one at a time over HTTP (one product part each)",
        baseline={
            "what": "in-process call: processor, model on the same device, FAISS search",
            "value": base["p50_ms"],
        },
        goal={
            "bar": 25.0,
            "direction": "lower",
            "meaning": "p50 <= 25 ms (a first bar, to revisit once measured)",
        },
        goal_on="value",
        out_dir=out,
        served=served,
        in_process=base,
        in_process_after_idle=ms(times["in_process_idle"]),
        queries=size.serve_queries,
        path=times["path"],
        device=size.device,
        dtype=size.dtype,
        peak_rss_gib=mem.peak_gib,
        peak_gpu_gib=gpu.peak_gib,
    )


if __name__ == "__main__":
    main("serve", run)
