"""Training curves: each loss term, the learning rate, the gradient norm and samples/s every
``train.log_every`` optimizer steps, as TensorBoard event files and, when configured, to MLflow.

Rank 0 writes the event files into a local folder that travels inside every checkpoint (``tensorboard/``):
a restarted or resumed run brings the earlier curves back and appends to them, and the train stage copies
the final folder to ``<run_root>/train/tensorboard/<model>`` (``tensorboard --logdir <run_root>/train``).
"""

from __future__ import annotations

import os
import shutil

FOLDER = "tensorboard"


class Curves:
    def __init__(self, folder: str, mlflow_uri: str = "", experiment: str = "coral", run_name: str = ""):
        from tensorboardX import SummaryWriter

        self.folder = folder
        self.writer = SummaryWriter(folder, flush_secs=30)
        self.mlflow = None
        if mlflow_uri:
            try:
                import mlflow
            except ImportError as e:
                raise RuntimeError(
                    "train.mlflow_tracking_uri is set but mlflow is not installed: pip install mlflow"
                ) from e
            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.set_experiment(experiment)
            mlflow.start_run(run_name=run_name or None)
            self.mlflow = mlflow

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"train/{name}", value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in values.items() if v is not None}, step=step)

    def save(self, checkpoint_dir: str) -> None:
        """Flush, and copy the event files into a checkpoint being written."""
        self.writer.flush()
        shutil.copytree(self.folder, os.path.join(checkpoint_dir, FOLDER), dirs_exist_ok=True)

    def close(self) -> None:
        self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def restore(checkpoint_dir: str, folder: str) -> None:
    """The curves a checkpoint carries, back into the local folder before writing on."""
    src = os.path.join(checkpoint_dir, FOLDER)
    if os.path.isdir(src):
        shutil.copytree(src, folder, dirs_exist_ok=True)


def read(folder: str) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in ``folder``: {tag: {step: value}} (a later file wins a step)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for name in sorted(os.listdir(folder)):
        if "tfevents" not in name:
            continue
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        at = 0
        while at + 12 <= len(data):  # TFRecord: length, its crc, the record, its crc
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out
