"""Run by test_node_loss.py in its own process: a simulated 2-node cluster (plus a spare node) loses the
node running the embed actors mid-stage; the stage must still finish with exactly one row per image.

    python tests/integration/node_loss.py RUN_ROOT

The encoder is a random-init CLIP at 224 px, slow enough on one thread (seconds for 600 images) that the
node is removed while batches are still being encoded.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
from ray.cluster_utils import Cluster

from coral import graph
from coral.config import load_config
from coral.testing.tiny import build_clip


def start_cluster(head_cpus: int, node_cpus: int, slot: str) -> tuple[Cluster, list]:
    """A head and two nodes that can each host the work (custom resource ``slot``): the one it lands on
    is removed, the other is the spare. Connects this process to it."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = [cluster.add_node(num_cpus=node_cpus, resources={slot: 1}) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    return cluster, nodes


def node_running(actor_class: str, nodes: list):
    """The node of ``nodes`` where a live actor of that class runs, or None (GCS view; no dashboard)."""
    for info in ray._private.state.actors().values():
        if actor_class in info["ActorClassName"] and info["State"] == "ALIVE":
            for n in nodes:
                if n.node_id == info["Address"]["NodeID"]:
                    return n
    return None


def main(run_root: str) -> int:
    clip = f"{run_root}-clip"
    build_clip(Path(clip), image_size=224, hidden=128, layers=4, patch=16)
    cluster, workers = start_cluster(2, 2, "encoder_slot")
    cfg = load_config(
        None,
        [
            f"run.run_root={run_root}",
            "run.stages=[catalog, embed]",
            "catalog.num_groups=200",
            "catalog.num_tasks=2",
            f"embed.encoders=[{{name: clip_image, kind: clip_image, model: {clip}, batch_size: 4, num_actors: 1,"
            " resources: {encoder_slot: 1}}]",
        ],
    )
    graph.run_graph(cfg, until="catalog")

    def kill_when_embedding():
        deadline = time.time() + 120
        while time.time() < deadline:
            doomed = node_running("MapWorker", workers)
            if doomed is not None:
                time.sleep(1)  # let it take a few batches
                print("removing the node that runs the encoder actor", flush=True)
                cluster.remove_node(doomed, allow_graceful=False)
                removed.set()
                return
            time.sleep(0.3)
        print("the encoder actor never started on a worker node", flush=True)

    removed = threading.Event()
    killer = threading.Thread(target=kill_when_embedding, daemon=True)
    killer.start()
    (row,) = graph.run_graph(cfg, start="embed")
    if not removed.is_set():
        print("the stage finished before the node was removed", flush=True)
        return 1
    killer.join(timeout=5)
    ids = pq.read_table(f"{run_root}/embed/data").column("id").to_pylist()
    catalog = pq.read_table(f"{run_root}/catalog/data").column("id").to_pylist()
    print(
        f"rows_in={row.rows_in} rows_out={row.rows_out} unique={len(set(ids))} catalog={len(catalog)}",
        flush=True,
    )
    ok = sorted(ids) == sorted(catalog)
    ray.shutdown()
    cluster.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
