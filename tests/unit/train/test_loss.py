"""InfoNCE against a naive reference, and the gathered two-worker loss and gradients against one process
on the concatenated batch; the embedding heads against their formulas."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from coral import schemas as S
from coral.models.heads import fuse, last_token
from coral.train import step
from coral.train.loss import gather_ids, info_nce

B, K, D_IN, D, T = 3, 2, 8, 4, 0.05  # queries per worker, hard negatives, sizes, temperature


def data(workers: int = 2):
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(workers * B, D_IN, generator=g)
    xc = torch.randn(workers * B * (K + 1), D_IN, generator=g)
    return xq, xc


def encoder() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D)


def naive(q: torch.Tensor, c: torch.Tensor, temperature: float) -> torch.Tensor:
    """-log(exp(q.pos / t) / sum over every candidate of exp(q.c / t)), averaged, one query at a time."""
    losses = []
    per = c.shape[0] // q.shape[0]
    for i in range(q.shape[0]):
        scores = torch.stack([torch.dot(q[i], c[j]) / temperature for j in range(c.shape[0])])
        losses.append(-(scores[i * per] - torch.logsumexp(scores, dim=0)))
    return torch.stack(losses).mean()


def test_info_nce_equals_the_naive_reference_with_hard_negatives():
    xq, xc = data(1)
    model = encoder()
    q, c = F.normalize(model(xq), dim=-1), F.normalize(model(xc), dim=-1)
    torch.testing.assert_close(info_nce(q, c, T), naive(q, c, T))
    with pytest.raises(ValueError, match="B \\* \\(K \\+ 1\\)"):
        info_nce(q, c[:-1], T)


def _worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    # rendezvous through a file: no port picked ahead of time that another process could take meanwhile
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    xq, xc = data(2)
    model = encoder()
    q = F.normalize(model(xq[rank * B : (rank + 1) * B]), dim=-1)
    c = F.normalize(model(xc[rank * B * (K + 1) : (rank + 1) * B * (K + 1)]), dim=-1)
    loss = info_nce(q, c, T)
    loss.backward()
    for p in model.parameters():  # what DeepSpeed / DDP do: average the workers' gradients
        dist.all_reduce(p.grad)
        p.grad /= 2
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    ids = gather_ids(torch.arange(3) + 10 * rank)
    if rank == 0:
        torch.save({"loss": mean_loss / 2, "grads": [p.grad for p in model.parameters()], "ids": ids}, out)
    dist.barrier()  # neither side closes its connection while the other still uses it
    # leave without running gloo's destructors: their threads can abort the process at teardown
    # ("terminate called without an active exception"), after the work is done and saved
    os._exit(0)


@pytest.mark.timeout(120)
def test_two_gathered_workers_equal_one_process_on_the_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "two.pt")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    two = torch.load(out)
    xq, xc = data(2)
    model = encoder()
    # one process, the concatenated batch: query i's positive at i * (K + 1) among all candidates
    loss = info_nce(F.normalize(model(xq), dim=-1), F.normalize(model(xc), dim=-1), T)
    loss.backward()
    torch.testing.assert_close(two["loss"], loss.detach())
    assert two["ids"].tolist() == [0, 1, 2, 10, 11, 12]  # every worker's ids, in rank order
    for got, want in zip(two["grads"], [p.grad for p in model.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fusion_is_the_normalised_sum_and_single_parts_are_normalised_alone():
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    has_text = torch.tensor([True, True, False, True])
    has_image = torch.tensor([True, False, True, True])
    out = fuse(text, image, has_text, has_image)
    torch.testing.assert_close(out[0], F.normalize(text[0] + image[0], dim=0))
    torch.testing.assert_close(out[1], F.normalize(text[1], dim=0))  # text only
    torch.testing.assert_close(out[2], F.normalize(image[2], dim=0))  # image only
    torch.testing.assert_close(fuse(text, None), F.normalize(text, dim=-1))
    with pytest.raises(ValueError):
        fuse(None, None)


def test_last_token_under_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(last_token(hidden, left), F.normalize(hidden[:, -1], dim=-1))
    torch.testing.assert_close(last_token(hidden, right)[0], F.normalize(hidden[0, 1], dim=0))
    torch.testing.assert_close(last_token(hidden, right)[1], F.normalize(hidden[1, 3], dim=0))


def test_left_out_logits_are_the_naive_loss_without_those_candidates():
    xq, xc = data(1)
    model = encoder()
    q, c = F.normalize(model(xq), dim=-1), F.normalize(model(xc), dim=-1)
    exclude = torch.zeros(B, B * (K + 1), dtype=torch.bool)
    exclude[0, 4] = True  # query 0 leaves out candidate 4 (another query's hard negative, say)
    got = info_nce(q, c, T, exclude)
    keep = [j for j in range(B * (K + 1)) if j != 4]
    first = -(q[0] @ c[0] / T - torch.logsumexp(q[0] @ c[keep].T / T, dim=0))
    assert not torch.isnan(got)
    others = [-(q[i] @ c[i * (K + 1)] / T - torch.logsumexp(q[i] @ c.T / T, 0)) for i in range(1, B)]
    manual = (first + sum(others)) / B  # the other queries keep every candidate
    torch.testing.assert_close(got, manual)


def test_a_positive_is_never_a_negative_of_its_own_query():
    rows = [
        {S.POSITIVE_IDS: ["a", "b"], S.HARD_NEGATIVE_IDS: ["b", "x"]},  # b is a positive too
        {S.POSITIVE_IDS: ["c"], S.HARD_NEGATIVE_IDS: []},  # no negatives of its own
        {S.POSITIVE_IDS: ["x"], S.HARD_NEGATIVE_IDS: ["a"]},
    ]
    cands = step.candidates(rows, 2)
    assert cands == ["a", "x", "x", "c", "c", "c", "x", "a", "a"]
    examples = [
        {"candidate_ids": cands[i * 3 : (i + 1) * 3], "positive_ids": r[S.POSITIVE_IDS]}
        for i, r in enumerate(rows)
    ]
    out = step.false_negatives(examples, 2)
    assert out.shape == (3, 9)
    assert out[0].nonzero().flatten().tolist() == [7, 8]  # "a" as the third query's negatives, not slot 0
    assert out[1].nonzero().flatten().tolist() == [4, 5]  # its own positive filling its negative slots
    assert out[2].nonzero().flatten().tolist() == [1, 2]  # "x" as the first query's negatives
