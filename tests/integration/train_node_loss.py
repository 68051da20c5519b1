"""Run by test_node_loss.py in its own process: a simulated cluster (head + 2 nodes that can each host the
train worker) loses the node running the worker after its third checkpoint; Ray Train restarts the worker
on the spare node from that checkpoint and the stage finishes every step.

    python tests/integration/train_node_loss.py RUN_ROOT TINY_QWEN2_VL
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from node_loss import node_running, start_cluster  # the sibling script (its dir is on sys.path)

from coral import graph, manifest, storage
from coral.config import load_config

STEPS, EVERY = 40, 5


def main(run_root: str, base: str) -> int:
    cluster, nodes = start_cluster(4, 1, "train_slot")
    cfg = load_config(
        None,
        [
            f"run.run_root={run_root}",
            "run.stages=[catalog, merit, train]",
            "catalog.num_groups=200",
            "merit.queries={train: 300, test: 50}",
            "merit.cold_start=false",
            "merit.export=false",
            f"train.base={base}",
            f"train.steps={STEPS}",
            f"train.checkpoint_every={EVERY}",
            "train.batch_size=4",
            "train.num_workers=1",
            "train.validation_queries=0",
            "train.max_failures=2",
            "train.resources={train_slot: 1}",
        ],
    )
    graph.run_graph(cfg, until="merit")
    checkpoints = Path(run_root) / "_checkpoints" / "train"

    def kill_after_first_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline:
            # three checkpoints on storage: the controller has registered the earlier ones (a file alone may be
            # an upload whose report the controller has not taken yet)
            doomed = node_running("RayTrainWorker", nodes)
            if len(list(checkpoints.rglob("state.json"))) >= 3 and doomed is not None:
                print("removing the node that runs the train worker", flush=True)
                cluster.remove_node(doomed, allow_graceful=False)
                removed.set()
                return
            time.sleep(0.2)
        print("no checkpoint, or no train worker on a worker node", flush=True)

    removed = threading.Event()
    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    (row,) = graph.run_graph(cfg, start="train")
    killer.join(timeout=5)
    if not removed.is_set():
        print("the stage finished before the node was removed", flush=True)
        return 1
    m = manifest.read_complete(storage.resolve(run_root).child("train"))
    history = json.loads((Path(run_root) / "train" / "metrics.json").read_text())["history"]
    resumed = m["details"]["resumed_from_step"]
    print(f"steps={m['rows_out']} history={len(history)} resumed_from_step={resumed}", flush=True)
    ok = m["rows_out"] == STEPS and len(history) == STEPS and resumed > 0 and resumed % EVERY == 0
    ray.shutdown()
    cluster.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
