"""The graph's serve stage: deploys the run's retriever, answers held-out examples over HTTP, writes the
Serve config, shuts down, and runs again every time (serving is an action, not data)."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from coral import graph, manifest, storage
from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_graph_serve_stage_answers_examples_and_shuts_down(trained_run):
    root, cfg = trained_run
    port = free_port()
    config = replace(
        cfg,
        run=replace(cfg.run, stages=(*cfg.run.stages, "serve")),
        serve=replace(cfg.serve, port=port, examples=2, token_env=""),
    )
    rows = graph.run_graph(config)
    assert [r.status for r in rows][-1] == "ran"
    m = manifest.read_complete(storage.resolve(str(root / "serve")))
    examples = m["details"]["examples"]
    assert len(examples) == 2 and all(len(e["top"]) == 3 for e in examples)
    assert m["details"]["url"] == f"http://127.0.0.1:{port}"
    written = (root / "serve" / "serve_config.yaml").read_text()
    assert "coral.serve.app:build" in written and f"port: {port}" in written
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert graph.run_graph(config)[-1].status == "ran"  # serving is an action: never skipped
