"""Qwen-VL's multimodal rotary positions (M-RoPE) of a collated batch, computed in numpy.

The model computes them itself when a batch has images (``get_rope_index``), row by row with a dozen small
torch operations per run of text or image: a cost per row that no batch shares (8% of the Serve encoder's
time at 16 clients with the tiny model). The same positions, made here while the batch is collated and
passed to the model as ``position_ids``: a run of text tokens counts on from the row's current position
on all three axes; an image's tokens take (t, h, w) of its merged grid, each offset by the current
position, which then moves on by the larger of the merged height and width. Padding positions are 0, as
the model leaves them. Images only (no video). A test checks them against the model's own, for
Qwen2-VL and Qwen2.5-VL.
"""

from __future__ import annotations

import numpy as np
import torch


def row_positions(types: np.ndarray, grids: np.ndarray, merge: int) -> np.ndarray:
    """(3, n) positions of one row's tokens: ``types`` 0 for text, 1 for an image's tokens; ``grids`` the
    row's images' (t, h, w) patch grids, in order."""
    out = np.empty((3, len(types)), dtype=np.int64)
    cuts = np.flatnonzero(np.diff(types)) + 1
    pos, image = 0, 0
    for start, end in zip([0, *cuts.tolist()], [*cuts.tolist(), len(types)], strict=True):
        if types[start] == 0:
            out[:, start:end] = np.arange(pos, pos + end - start)
            pos += end - start
            continue
        t, h, w = int(grids[image][0]), int(grids[image][1]) // merge, int(grids[image][2]) // merge
        image += 1
        if t * h * w != end - start:
            raise ValueError(f"an image's {end - start} tokens do not fill its grid {t} x {h} x {w}")
        out[:, start:end] = (
            np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")).reshape(3, -1)
            + pos
        )
        pos += max(h, w)
    if image != len(grids):
        raise ValueError(f"a row has {len(grids)} images but {image} runs of image tokens")
    return out


def batch_positions(rows: list[np.ndarray], grids: list[np.ndarray], merge: int) -> torch.Tensor:
    """(3, B, T) positions of left-padded rows (``rows``: each row's unpadded token types)."""
    width = max(len(r) for r in rows)
    out = np.zeros((3, len(rows), width), dtype=np.int64)
    for i, (types, g) in enumerate(zip(rows, grids, strict=True)):
        if len(types):
            out[:, i, width - len(types) :] = row_positions(np.asarray(types), g, merge)
    return torch.from_numpy(out)
