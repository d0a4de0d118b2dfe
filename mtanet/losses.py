"""Task losses of the paper (section III-B, eq. 1-5) and loss weightings kept apart from the architecture.

Predictions, targets and masks travel as dicts keyed by task (``"va"``, ``"au"``, ``"expr"``, see
:mod:`mtanet.tasks`). A mask marks the rows that carry a label; rows whose target holds the "no label" sentinel are
never scored, whether or not a mask is given. A batch with no labeled row for a task gives a zero loss that still
belongs to the graph, so ``backward()`` works and nothing turns into NaN.

Every loss weighs rows by their mask (``torch.where`` then sums) instead of selecting them (``pred[mask]``) or
asking ``mask.any()``: both of those read the mask on the host, a GPU synchronisation per call, and the training step
has none outside its logging steps. ``torch.where`` (not a product) keeps a sentinel or a NaN of an unlabeled row out
of the arithmetic, in the forward and the backward pass. The numbers are those of the selected rows up to float
rounding (the sums hold zeros where rows were left out; tested against the boolean-indexed formulas).

Under DistributedDataParallel pass a :class:`GlobalBatch`: each loss is then computed from the sums of every rank's
slice (a differentiable all-reduce), so it is the loss of the whole global batch, equal on every rank, and DDP's
averaged gradients equal one process's on the same global batch (tested on CPU with gloo).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtanet.tasks import LABEL_SENTINEL, TASKS

__all__ = ["GlobalBatch", "va_valid_rows", "ccc_per_dim", "ccc_from_sums", "ccc_loss", "masked_cross_entropy",
           "masked_bce", "task_losses", "LossWeighting", "SumWeighting", "UncertaintyWeighting", "stationary_log_var",
           "make_weighting",
           "expression_class_weights", "au_positive_weights"]


@dataclasses.dataclass(frozen=True)
class GlobalBatch:
    """How the ranks of a DistributedDataParallel job compute batch statistics over the global batch.

    ``all_reduce`` sums a tensor over the ranks and is differentiable: its backward sums the incoming gradients over
    the ranks too. A loss built from all-reduced sums is the global
    batch's loss on every rank; its gradient on rank ``r`` is ``world`` times the global loss's gradient with respect
    to rank ``r``'s rows, and DDP's average over the ranks (a division by ``world``) gives exactly the gradient one
    process computes on the whole batch.

    What stays per rank: BatchNorm's batch statistics. Every BatchNorm layer normalises with the mean and variance of
    its own rank's slice (and updates its running statistics from them); synchronising them (``SyncBatchNorm``) would
    add two all-reduces per BatchNorm layer per step (about 100 in SENet-50, forward and backward) for a statistic
    that is already estimated from a whole slice of images and feature-map positions (32 images x 784 positions in
    the first stage of a 256 batch on 8 GPUs), where a task loss's CCC may see 11 labelled rows. The trainer
    broadcasts rank 0's running statistics at every epoch end, so validation and checkpoints use one set.
    """

    world: int
    all_reduce: Callable[[Tensor], Tensor]

    @classmethod
    def from_process_group(cls) -> GlobalBatch:
        """The default process group's ranks (``torch.distributed`` must be initialised)."""
        import torch.distributed as dist

        return cls(dist.get_world_size(), _SumOverRanks.apply)


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` with a backward: the gradient of a sum over ranks, summed over ranks (what
    ``torch.distributed.nn.functional.all_reduce`` does; that function is deprecated, its successor in
    ``torch.distributed._functional_collectives`` is private)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: D102
        import torch.distributed as dist

        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return _SumOverRanks.apply(grad)


def _zero_like_graph(x: Tensor) -> Tensor:
    # a zero that depends on x: backward() reaches the network (with zero gradient) instead of failing
    return x.sum() * 0.0


def _row_mask(mask: Tensor | None, valid: Tensor, name: str) -> Tensor:
    """Combines an optional caller mask with the rows the target itself marks as labeled."""
    if mask is None:
        return valid
    mask = mask.to(device=valid.device, dtype=torch.bool)
    if mask.shape != valid.shape:
        raise ValueError(f"{name}: mask must have shape {tuple(valid.shape)}, got {tuple(mask.shape)}")
    return mask & valid


# --------------------------------------------------------------------------------------------------------------------
# per-task losses


def va_valid_rows(target: Tensor) -> Tensor:
    """(B,) bool: rows whose VA target is finite and inside [-1, 1] in every column (the sentinel is -5)."""
    t = target if target.dim() > 1 else target.unsqueeze(1)
    return (torch.isfinite(t) & (t >= -1.0) & (t <= 1.0)).all(dim=1)


def ccc_per_dim(pred: Tensor, target: Tensor) -> Tensor:
    """CCC of each column of two (B, D) tensors, population moments (eq. 3).

    The denominator ``var_x + var_y + (mean_x - mean_y)^2`` is zero only when both columns are constant and equal,
    i.e. identical. Only there is it swapped for 1 before dividing (so no 0/0 is ever evaluated, in the forward or
    the backward pass) and the CCC defined as 1, the value :func:`mtanet.metrics.ccc` gives that case. Everywhere else
    the exact formula is used, with no epsilon, so the loss is exactly ``1 - `` the challenge's metric.
    """
    mx, my = pred.mean(dim=0), target.mean(dim=0)
    dx, dy = pred - mx, target - my
    vx, vy = (dx * dx).mean(dim=0), (dy * dy).mean(dim=0)
    cov = (dx * dy).mean(dim=0)
    denom = vx + vy + (mx - my) ** 2
    ok = denom > 0
    # torch.where on the denominator too, not only on the quotient: a 0/0 in the unused branch would still put NaN
    # into the gradient
    quotient = 2.0 * cov / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, quotient, torch.ones_like(quotient))


def ccc_from_sums(sums: Tensor) -> Tensor:
    """CCC of each column from the sums of a set of rows: ``sums`` is (6, D), rows ``n, sum x, sum y, sum x^2,
    sum y^2, sum xy`` (population moments, eq. 3). The same convention as :func:`ccc_per_dim`: a zero denominator
    (both columns constant and equal) gives 1, and ``n = 0`` gives 1 too (the loss is then 0)."""
    n, sx, sy, sxx, syy, sxy = sums.unbind(0)
    n_safe = n.clamp(min=1.0)
    mx, my = sx / n_safe, sy / n_safe
    vx = (sxx / n_safe - mx * mx).clamp(min=0.0)
    vy = (syy / n_safe - my * my).clamp(min=0.0)
    cov = sxy / n_safe - mx * my
    denom = vx + vy + (mx - my) ** 2
    ok = (denom > 0) & (n > 0)
    quotient = 2.0 * cov / torch.where(ok, denom, torch.ones_like(denom))
    return torch.where(ok, quotient, torch.ones_like(quotient))


def ccc_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, *,
             global_batch: GlobalBatch | None = None) -> Tensor:
    """Eq. 4: ``1 - mean over dimensions of CCC``, computed over the labeled rows only.

    Args:
        pred: (B, D) predictions (D = 2: valence, arousal); a (B,) tensor is treated as D = 1.
        target: same shape as ``pred``; a row with NaN or any value outside [-1, 1] is unlabeled.
        mask: optional (B,) bool of labeled rows, combined (AND) with the target's own validity.
        global_batch: under DDP, the CCC of the labeled rows of every rank's slice (see :class:`GlobalBatch`),
            from their all-reduced sums in float64 (the one-pass moments of float32 sums would lose digits).

    Returns:
        Scalar loss in [0, 2]; a zero that carries grad when no row is labeled.
    """
    if pred.shape != target.shape:
        raise ValueError(f"ccc_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.dim() == 1:
        pred, target = pred.unsqueeze(1), target.unsqueeze(1)
    if pred.dim() != 2:
        raise ValueError(f"ccc_loss expects (B, D) tensors, got {tuple(pred.shape)}")
    rows = _row_mask(mask, va_valid_rows(target), "ccc_loss").unsqueeze(1)
    # torch.where, not a product: a sentinel (-5) or NaN of an unlabeled row never reaches the moments
    p = torch.where(rows, pred, 0.0)
    t = torch.where(rows, target.to(pred.dtype), 0.0)
    if global_batch is not None:
        p64, t64, w = p.double(), t.double(), rows.double()
        local = torch.stack([w.sum(0).expand(p.shape[1]), p64.sum(0), t64.sum(0), (p64 * p64).sum(0),
                             (t64 * t64).sum(0), (p64 * t64).sum(0)])
        ccc = ccc_from_sums(global_batch.all_reduce(local))
        return (1.0 - ccc.mean()).to(pred.dtype)
    n = rows.sum(0).to(pred.dtype)  # (1,)
    n_safe = n.clamp(min=1.0)
    mx, my = p.sum(0) / n_safe, t.sum(0) / n_safe
    dx, dy = torch.where(rows, p - mx, 0.0), torch.where(rows, t - my, 0.0)
    vx, vy = (dx * dx).sum(0) / n_safe, (dy * dy).sum(0) / n_safe
    cov = (dx * dy).sum(0) / n_safe
    denom = vx + vy + (mx - my) ** 2
    ok = denom > 0
    quotient = 2.0 * cov / torch.where(ok, denom, torch.ones_like(denom))
    ccc = torch.where(ok, quotient, torch.ones_like(quotient))  # as ccc_per_dim: identical columns give 1
    return torch.where(n[0] > 0, 1.0 - ccc.mean(), _zero_like_graph(pred))


def _mean_of_rows(per_row: Tensor, weight: Tensor, like: Tensor, global_batch: GlobalBatch | None) -> Tensor:
    """``sum(per_row) / sum(weight)`` (rows left out carry 0 in both), over the global batch when given; a zero with
    grad when the weights sum to 0."""
    total, count = per_row.sum(), weight.sum().to(per_row.dtype)
    if global_batch is not None:
        both = global_batch.all_reduce(torch.stack([total, count.detach()]))
        total, count = both[0], both[1]
    return torch.where(count > 0, total / torch.where(count > 0, count, torch.ones_like(count)),
                       _zero_like_graph(like))


def masked_cross_entropy(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, weight: Tensor | None = None, *,
    global_batch: GlobalBatch | None = None
) -> Tensor:
    """Eq. 1, softmax cross entropy averaged over labeled rows.

    Args:
        logits: (B, C) class scores.
        target: (B,) class indices; -1 marks an unlabeled row.
        mask: optional (B,) bool of labeled rows, combined (AND) with ``target != -1``.
        weight: optional (C,) class weights, passed to ``F.cross_entropy`` (whose mean then divides by the summed
            weights of the labeled rows, PyTorch's convention).
        global_batch: under DDP, the mean over the labeled rows of every rank's slice (see :class:`GlobalBatch`).

    Returns:
        Scalar loss; a zero that carries grad when no row is labeled.
    """
    if logits.dim() != 2 or target.dim() != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            "masked_cross_entropy expects logits (B, C) and target (B,), "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    m = _row_mask(mask, target != LABEL_SENTINEL, "masked_cross_entropy")
    safe_target = torch.where(m, target, 0).long()
    per_row = F.cross_entropy(logits, safe_target, weight=weight, reduction="none")  # weight[t] * (eq. 1) per row
    row_weight = m.to(logits.dtype) if weight is None else torch.where(m, weight.to(logits.dtype)[safe_target], 0.0)
    return _mean_of_rows(torch.where(m, per_row, 0.0), row_weight, logits, global_batch)


def masked_bce(
    logits: Tensor, target: Tensor, mask: Tensor | None = None, pos_weight: Tensor | None = None, *,
    global_batch: GlobalBatch | None = None
) -> Tensor:
    """Eq. 2, binary cross entropy with logits, averaged over labeled rows and AUs.

    The paper sums eq. 2 over the AUs; averaging instead only divides the loss by K, a constant the loss weighting
    absorbs, and keeps its scale independent of the edition's number of AUs.

    Args:
        logits: (B, K) AU logits.
        target: (B, K) labels in {0, 1}; a row with any -1 is unlabeled.
        mask: optional (B,) bool of labeled rows, or (B, K) bool of labeled entries; combined (AND) with the target's
            own validity.
        pos_weight: optional (K,) weight of positive examples, passed to ``F.binary_cross_entropy_with_logits``.
        global_batch: under DDP, the mean over the labeled entries of every rank's slice (see :class:`GlobalBatch`).

    Returns:
        Scalar loss; a zero that carries grad when nothing is labeled.
    """
    if logits.shape != target.shape or logits.dim() != 2:
        raise ValueError(f"masked_bce expects two (B, K) tensors, got {tuple(logits.shape)}, {tuple(target.shape)}")
    rows = (target != LABEL_SENTINEL).all(dim=1)
    if mask is not None and mask.dim() == 2:
        m = _row_mask(mask, rows.unsqueeze(1).expand_as(target), "masked_bce")
    else:
        m = _row_mask(mask, rows, "masked_bce").unsqueeze(1).expand_as(target)
    # where, not a product, so that a -1 sentinel never contributes, even as 0 * something
    t = torch.where(m, target.to(logits.dtype), 0.0)
    per_entry = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pos_weight, reduction="none")
    return _mean_of_rows(torch.where(m, per_entry, 0.0), m, logits, global_batch)


def task_losses(
    pred: Mapping[str, Tensor],
    target: Mapping[str, Tensor],
    mask: Mapping[str, Tensor | None] | None = None,
    *,
    au_pos_weight: Tensor | None = None,
    expr_weight: Tensor | None = None,
    skip_empty: bool = False,
    global_batch: GlobalBatch | None = None,
) -> dict[str, Tensor]:
    """The paper's loss of every task present in ``pred``: CCC (va), BCE (au), cross entropy (expr).

    Args:
        pred: head outputs keyed by task: ``va`` (B, 2), ``au`` (B, K) logits, ``expr`` (B, C) logits.
        target: targets keyed by task, with the sentinels of :mod:`mtanet.tasks` on unlabeled rows.
        mask: optional masks keyed by task; a missing key (or ``None``) means "derive from the sentinels".
        au_pos_weight: optional ``pos_weight`` of the AU loss.
        expr_weight: optional class ``weight`` of the EXPR loss.
        skip_empty: leave out tasks with no labeled row in this batch. Useful with :class:`UncertaintyWeighting`,
            whose ``0.5 * s`` term would otherwise keep pulling ``s`` down on batches that have no label for a task.
            It reads the masks on the host (a GPU synchronisation): the trainer does not use it.
        global_batch: under DDP, every loss over the global batch (see :class:`GlobalBatch`).

    Returns:
        ``{task: scalar loss}`` in the order of ``pred``.
    """
    mask = mask or {}
    out: dict[str, Tensor] = {}
    for task, p in pred.items():
        if task not in target:
            raise KeyError(f"task_losses: no target for task {task!r}")
        t, m = target[task], mask.get(task)
        if task == "va":
            loss, labeled = ccc_loss(p, t, m, global_batch=global_batch), _row_mask(m, va_valid_rows(t), "va")
        elif task == "au":
            loss = masked_bce(p, t, m, pos_weight=au_pos_weight, global_batch=global_batch)
            labeled = (t != LABEL_SENTINEL).all(dim=1)
            if m is not None:
                labeled = labeled & (m.bool().any(dim=1) if m.dim() == 2 else m.bool())
        elif task == "expr":
            loss = masked_cross_entropy(p, t, m, weight=expr_weight, global_batch=global_batch)
            labeled = _row_mask(m, t != LABEL_SENTINEL, "expr")
        else:
            raise KeyError(f"task_losses: unknown task {task!r}; known tasks are {TASKS}")
        if skip_empty and not bool(labeled.any()):
            continue
        out[task] = loss
    return out


# --------------------------------------------------------------------------------------------------------------------
# loss weighting


class LossWeighting(nn.Module):
    """Turns ``{task: loss}`` into one scalar; subclasses decide how.

    Args:
        tasks: the tasks this weighting knows; ``forward`` accepts any subset of them.
    """

    def __init__(self, tasks: Iterable[str] = TASKS) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be non-empty and unique, got {self.tasks}")

    def _check(self, losses: Mapping[str, Tensor]) -> None:
        if not losses:
            raise ValueError("no task loss to weight")
        unknown = set(losses) - set(self.tasks)
        if unknown:
            raise KeyError(f"losses for unknown tasks {sorted(unknown)}; this weighting knows {self.tasks}")

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Effective multiplier of each task's loss, for logging."""
        raise NotImplementedError


class SumWeighting(LossWeighting):
    """Plain sum of the task losses (the paper's first training stage); no parameters."""

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        self._check(losses)
        return torch.stack([losses[t] for t in losses]).sum()

    def weights(self) -> dict[str, float]:
        return {t: 1.0 for t in self.tasks}


def stationary_log_var(loss: Any, kind: str) -> Any:
    """The ``s`` that minimises ``c e^{-s} L + s/2`` for a fixed loss ``L``: ``log L`` (regression, ``c = 1/2``) or
    ``log 2L`` (classification, ``c = 1``). Works on floats and numpy arrays."""
    if kind not in UncertaintyWeighting._FACTORS:
        raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
    factor = 2.0 * UncertaintyWeighting._FACTORS[kind]
    return np.log(factor * np.asarray(loss, dtype=np.float64)) if np.ndim(loss) else math.log(factor * float(loss))


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018; paper eq. 5).

    With a learnable ``s_t = log sigma_t^2`` per task (initialised at ``init_log_var``, 0 by default)::

        total = sum_t  c_t * exp(-s_t) * L_t + 0.5 * s_t,   c_t = 0.5 (regression) or 1 (classification)

    which for the default kinds is ``0.5 e^{-s_va} L_va + e^{-s_au} L_au + e^{-s_expr} L_expr + 0.5 (s_va + s_au +
    s_expr)``; ``0.5 s_t = log sigma_t``. For a fixed loss L the total is minimised at ``s = log L`` (regression) and
    ``s = log 2L`` (classification). Only tasks present in the ``losses`` dict contribute, regulariser included.
    The ``log_vars`` parameter must be handed to the optimiser together with the network's.

    Args:
        tasks: task names, in the order of ``log_vars``.
        kinds: ``{task: "regression" | "classification"}``; defaults to regression for ``va``, classification for
            every other task.
        init_log_var: initial value of every ``s_t``.
    """

    _FACTORS = {"regression": 0.5, "classification": 1.0}

    def __init__(
        self,
        tasks: Iterable[str] = TASKS,
        kinds: Mapping[str, str] | None = None,
        init_log_var: float = 0.0,
    ) -> None:
        super().__init__(tasks)
        kinds = dict(kinds or {})
        unknown = set(kinds) - set(self.tasks)
        if unknown:
            raise KeyError(f"kinds given for unknown tasks {sorted(unknown)}")
        self.kinds: dict[str, str] = {}
        for t in self.tasks:
            kind = kinds.get(t, "regression" if t == "va" else "classification")
            if kind not in self._FACTORS:
                raise ValueError(f"kind of task {t!r} must be 'regression' or 'classification', got {kind!r}")
            self.kinds[t] = kind
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init_log_var)))
        # a buffer, so it follows .to(device) and is saved with the module
        self.register_buffer("factors", torch.tensor([self._FACTORS[self.kinds[t]] for t in self.tasks]))
        self._index = {t: i for i, t in enumerate(self.tasks)}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        self._check(losses)
        terms = []
        for t, loss in losses.items():
            s = self.log_vars[self._index[t]]
            terms.append(self.factors[self._index[t]] * torch.exp(-s) * loss + 0.5 * s)
        return torch.stack(terms).sum()

    @torch.no_grad()
    def weights(self) -> dict[str, float]:
        w = self.factors * torch.exp(-self.log_vars)
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def sigmas(self) -> dict[str, float]:
        """``sigma_t = exp(s_t / 2)`` of each task."""
        return {t: float(torch.exp(0.5 * self.log_vars[i])) for i, t in enumerate(self.tasks)}

    def stationary_log_vars(self, losses: Mapping[str, float | None]) -> dict[str, float | None]:
        """Each task's ``s* = log(2 c L)``, where the total is lowest for the fixed loss ``L`` given (``None`` for a
        task whose loss is missing or not positive)."""
        return {t: stationary_log_var(losses[t], self.kinds[t]) if losses.get(t) and losses[t] > 0 else None
                for t in self.tasks}


_WEIGHTINGS: dict[str, type[LossWeighting]] = {"sum": SumWeighting, "uncertainty": UncertaintyWeighting}


def make_weighting(name: str, tasks: Iterable[str] = TASKS, **kwargs) -> LossWeighting:
    """Builds a weighting by name: ``"sum"`` or ``"uncertainty"`` (extra kwargs go to its constructor)."""
    try:
        cls = _WEIGHTINGS[name]
    except KeyError:
        raise ValueError(f"unknown loss weighting {name!r}; choose from {sorted(_WEIGHTINGS)}") from None
    return cls(tasks, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# label weights of the task losses (chosen from the training labels; the paper uses none)


def _soften(weights: np.ndarray, mode: str) -> Tensor:
    """``balanced`` weights as they are, ``sqrt`` their square root (a softer correction), as a float32 tensor."""
    if mode == "sqrt":
        weights = np.sqrt(weights)
    elif mode != "balanced":
        raise ValueError(f"unknown label weighting {mode!r}: choose none, balanced or sqrt")
    return torch.tensor(weights, dtype=torch.float32)


def expression_class_weights(labels: np.ndarray, num_classes: int, mode: str) -> Tensor | None:
    """Class weights for the expression cross entropy, from the labeled training frames.

    ``balanced`` is scikit-learn's ``n / (C * n_c)``; ``sqrt`` its square root (a softer correction); ``none`` gives
    ``None`` (plain eq. 1). A class absent from training gets weight 0: it has no frame to weigh.
    """
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return _soften(np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0), mode)


def au_positive_weights(labels: np.ndarray, mode: str) -> Tensor | None:
    """``pos_weight`` of the AU BCE per AU: negatives / positives on the labeled training frames (``balanced``), its
    square root (``sqrt``), or ``None`` (plain eq. 2). An AU never present in training gets weight 1."""
    if mode == "none":
        return None
    labels = np.asarray(labels, dtype=np.float64)
    positives = labels.sum(axis=0)
    return _soften(np.where(positives > 0, (len(labels) - positives) / np.maximum(positives, 1), 1.0), mode)
