"""Batch statistics over the global batch under DDP: the task losses (the CCC above all) computed from every rank's
sums equal, with their gradients, one process's on the same global batch. Two gloo processes on the CPU."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mtanet.losses import GlobalBatch, SumWeighting, ccc_loss, task_losses

WORLD = 2
BATCH = 12  # the global batch; each rank takes every WORLD-th row, as TaskBalancedBatchSampler slices it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch_data() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Features, targets with sentinels and masks; rank 1's slice holds no VA label at all, rank 0's three."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, 5, generator=g)
    va = torch.rand(BATCH, 2, generator=g) * 2 - 1
    va_labeled = torch.zeros(BATCH, dtype=torch.bool)
    va_labeled[[0, 4, 8]] = True  # even rows: rank 0's
    va[~va_labeled] = -5.0
    au = (torch.rand(BATCH, 4, generator=g) < 0.4).float()
    au[[1, 2, 9]] = -1.0
    expr = torch.randint(0, 3, (BATCH,), generator=g)
    expr[[3, 6, 10, 11]] = -1
    targets = {"va": va, "au": au, "expr": expr}
    masks = {"va": va_labeled, "au": au[:, 0] >= 0, "expr": expr >= 0}
    return x, targets, masks


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(5, 8)
        self.va, self.au, self.expr = nn.Linear(8, 2), nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        return {"va": torch.tanh(self.va(h)), "au": self.au(h), "expr": self.expr(h)}


def losses_and_grads(model: nn.Module, x, targets, masks, global_batch=None):
    pred = model(x)
    losses = task_losses(pred, targets, masks, global_batch=global_batch)
    total = SumWeighting(("va", "au", "expr"))(losses)
    total.backward()
    params = model.module if isinstance(model, DistributedDataParallel) else model
    return ({t: float(v.detach()) for t, v in losses.items()},
            {n: p.grad.detach().clone() for n, p in params.named_parameters()})


def rank_main(rank: int, port: int, out: str, global_stats: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, targets, masks = global_batch_data()
        mine = slice(rank, None, WORLD)
        model = DistributedDataParallel(Heads())
        losses, grads = losses_and_grads(model, x[mine], {t: v[mine] for t, v in targets.items()},
                                         {t: v[mine] for t, v in masks.items()},
                                         GlobalBatch.from_process_group() if global_stats else None)
        # the CCC alone in float64, and its gradient with respect to this rank's rows
        pred = torch.rand(BATCH, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
        rows = pred[mine].clone().requires_grad_()
        ccc = ccc_loss(rows, targets["va"][mine].double(), masks["va"][mine],
                       global_batch=GlobalBatch.from_process_group())
        (ccc_grad,) = torch.autograd.grad(ccc, rows)
        torch.save({"losses": losses, "grads": grads, "ccc": float(ccc), "ccc_grad": ccc_grad},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path: Path, global_stats: bool) -> list[dict]:
    out = tmp_path / ("global" if global_stats else "per-rank")
    out.mkdir()
    mp.spawn(rank_main, args=(free_port(), str(out), global_stats), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_global_batch_losses_and_gradients_equal_one_process(tmp_path: Path) -> None:
    x, targets, masks = global_batch_data()
    one_losses, one_grads = losses_and_grads(Heads(), x, targets, masks)
    ranks = run_two_ranks(tmp_path, global_stats=True)
    for rank in ranks:  # every rank holds the global batch's losses, although rank 1 has no VA label
        for task, value in one_losses.items():
            assert abs(rank["losses"][task] - value) < 1e-6, (task, rank["losses"][task], value)
        for name, grad in one_grads.items():  # DDP's averaged gradients: one process's on the whole batch
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)

    # the CCC alone in float64: its value, and (times 1/WORLD, DDP's average) its gradient for each rank's rows
    pred = torch.rand(BATCH, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    pred.requires_grad_()
    ccc = ccc_loss(pred, targets["va"].double(), masks["va"])
    (grad,) = torch.autograd.grad(ccc, pred)
    for r, rank in enumerate(ranks):
        assert abs(rank["ccc"] - float(ccc.detach())) < 1e-12
        torch.testing.assert_close(rank["ccc_grad"] / WORLD, grad[r::WORLD], rtol=1e-9, atol=1e-12)
    assert grad[1::WORLD].abs().sum() == 0 and grad[0::WORLD].abs().sum() > 0  # only labelled rows pull


def test_per_rank_losses_are_another_objective(tmp_path: Path) -> None:
    """What the global statistics fix: each rank's own CCC (rank 1's slice has no VA label) is not the batch's."""
    x, targets, masks = global_batch_data()
    one_losses, one_grads = losses_and_grads(Heads(), x, targets, masks)
    ranks = run_two_ranks(tmp_path, global_stats=False)
    assert ranks[1]["losses"]["va"] == 0.0 != one_losses["va"]
    assert not torch.allclose(ranks[0]["grads"]["va.weight"], one_grads["va.weight"], rtol=1e-3)
