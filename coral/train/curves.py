"""Training curves: each loss term, the learning rate, the gradient norm and samples/s every
``train.log_every`` optimizer steps, as TensorBoard event files and, when configured, to MLflow.

Rank 0 writes the event files into a local folder that travels inside every checkpoint (``tensorboard/``):
a restarted or resumed run brings the earlier curves back and appends to them, and the train stage copies
the final folder to ``<run_root>/train/tensorboard/<model>`` (``tensorboard --logdir <run_root>/train``).
The stage also draws each loss term of every step and the validation metrics as a PNG (``figure``).
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

import numpy as np

from coral import report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FOLDER = "tensorboard"
LOSSES = {  # the loop's loss terms, in drawing order, and how the legend names them
    "loss": "total",
    "contrastive_loss": "contrastive (InfoNCE)",
    "vision_recon_loss": "vision reconstruction",
    "mlm_loss": "masked language modelling",
}
VALIDATION = ("R@1", "R@5", "R@10", "MRR@10")
LOG_RATIO = 30  # the loss axis turns logarithmic when its largest value is this many times its smallest


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


def smooth(values: list[float], window: int) -> np.ndarray:
    """The running mean over the last ``window`` values (fewer at the start; NaN, a step without the
    term, left out of it)."""
    v = np.asarray(values, dtype=float)
    have = ~np.isnan(v)
    sums = np.cumsum(np.insert(np.where(have, v, 0.0), 0, 0.0))
    counts = np.cumsum(np.insert(have, 0, False))
    at = np.arange(1, len(v) + 1)
    lo = np.maximum(at - window, 0)
    n = counts[at] - counts[lo]
    return np.where(n > 0, (sums[at] - sums[lo]) / np.maximum(n, 1), np.nan)


def figure(history: list[dict], validation: dict, title: str) -> Figure:
    """Each loss term against the step (``history``: the loop's terms of every step, step 1 first; over
    60 steps the raw values faint and their running mean over them); below, when there are any, the
    validation metrics at the start (step 0), at every checkpoint and at the end (``validation``:
    {"start"|"end": {"R@1": ...}, "during": [{"step": 100, "R@1": ...}, ...]})."""
    validation = validation or {}
    points = [(0, validation["start"])] if validation.get("start") else []
    points += [(v["step"], v) for v in validation.get("during", [])]
    points += [(len(history), validation["end"])] if validation.get("end") else []
    fig = report.figure(width=8.0, height=4.8 if points else report.HEIGHT)
    if points:
        top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    else:
        top, bottom = fig.add_subplot(), None
    steps = np.arange(1, len(history) + 1)
    window = max(1, len(history) // 30) if len(history) > 60 else 1
    names = {k: [h.get(k, np.nan) for h in history] for k in LOSSES if any(k in h for h in history)}
    names |= {
        k: [h.get(k, np.nan) for h in history] for k in sorted({k for h in history for k in h} - set(LOSSES))
    }
    label = {k: LOSSES.get(k, k) for k in names}
    same = [k for k in names if k != "loss" and "loss" in names and names[k] == names["loss"]]
    for k in same:  # the total is this one term: one line, not two drawn over each other
        label["loss"] = f"total = {label.pop(k)}"
        del names[k]
    for i, (term, values) in enumerate(names.items()):
        if window > 1:
            top.plot(steps, values, color=f"C{i}", alpha=0.25, linewidth=0.8)
        top.plot(steps, smooth(values, window), color=f"C{i}", label=label[term])
    found = np.array([v for values in names.values() for v in values], dtype=float)
    found = found[~np.isnan(found)]
    log = found.size > 0 and found.min() > 0 and found.max() / found.min() > LOG_RATIO
    if log:  # terms of different sizes (MLM ~ 7, reconstruction ~ 0.03): each visible
        top.set_yscale("log")
    top.set_ylabel("loss (log scale)" if log else "loss")
    top.set_title(title + (f" (running mean of {window} steps)" if window > 1 else ""))
    top.grid(alpha=0.3)
    top.xaxis.get_major_locator().set_params(integer=True)
    if names:  # beside the plot: never over a curve
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if bottom is None:
        top.set_xlabel("step")
        return fig
    for name in VALIDATION:
        got = [(s, v[name]) for s, v in points if name in v]
        if got:
            bottom.plot(
                *zip(*got, strict=True), linestyle="-" if len(got) > 2 else ":", marker="o", label=name
            )
    queries = next((v["queries"] for _, v in points if v.get("queries")), "?")
    bottom.set_ylim(0, 1.05)
    bottom.set_xlabel("step")
    bottom.set_ylabel("validation")
    when = "at the start, every checkpoint and the end" if len(points) > 2 else "at the start and the end"
    bottom.set_title(f"held-out validation {when} ({queries} queries)", fontsize=10)
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return fig


def png(history: list[dict], validation: dict, title: str) -> bytes:
    return report.png(figure(history, validation, title))
