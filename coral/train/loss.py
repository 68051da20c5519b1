"""InfoNCE over the global batch (REFERENCE.md sections 3 and 5).

Layout (MegaPairs'): each of the B local queries brings K + 1 candidates, its positive first, so the
positive of local query i sits at candidate index ``i * (K + 1)``. Every worker gathers every worker's
candidates with ``torch.distributed.nn.functional.all_gather`` (autograd flows back to their owners) and
scores its own queries against all of them: the positives and hard negatives of every query are negatives
for the others. Each worker's loss is the mean over its queries; with equal B on every worker, averaging
the workers' gradients (as DeepSpeed and DDP do) gives exactly the gradient of the mean loss over the
concatenated batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every worker in rank order, keeping gradients (same shape on every worker)."""
    rank, size = world()
    if size == 1:
        return t
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t), dim=0)


def gather_ids(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an int tensor (no gradient) from every worker in rank order (same shape on every one)."""
    import torch.distributed as dist

    rank, size = world()
    if size == 1:
        return t
    device = t.device if dist.get_backend() != "nccl" else torch.device("cuda", torch.cuda.current_device())
    parts = [torch.empty_like(t, device=device) for _ in range(size)]
    dist.all_gather(parts, t.to(device))
    return torch.cat(parts).to(t.device)


def info_nce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float = 0.02,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over local queries of -log softmax(q . c / temperature)[positive], over all workers' candidates.

    queries: (B, D) and candidates: (B * (K + 1), D), both L2-normalised, positive of query i at i * (K + 1).
    exclude: (B, W * B * (K + 1)) True for logits left out (a query's other positives: no false negatives).
    """
    b = queries.shape[0]
    if b == 0 or candidates.shape[0] % b:
        raise ValueError(f"{candidates.shape[0]} candidates for {b} queries: need B * (K + 1)")
    per_query = candidates.shape[0] // b
    rank, _ = world()
    everything = gather(candidates)  # (W * B * (K + 1), D)
    logits = queries @ everything.T / temperature  # (B, W * B * (K + 1))
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    targets = (rank * b + torch.arange(b, device=queries.device)) * per_query
    return F.cross_entropy(logits, targets)
