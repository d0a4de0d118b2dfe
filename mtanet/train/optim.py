"""The optimiser of a stage and its learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtanet.losses import LossWeighting
from mtanet.train.config import StageConfig

__all__ = ["OPTIMIZERS", "make_optimizer", "lr_factor"]

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def make_optimizer(stage: StageConfig, model: nn.Module, weighting: LossWeighting, *, momentum: float,
                   lr_log_vars: float | None, fused: bool = False) -> torch.optim.Optimizer:
    """The stage's optimiser; the weighting's parameters (eq. 5's ``s``), if any, are a second group.

    Each group keeps its ``base_lr``, which the schedule (:func:`lr_factor`) scales at every step. ``fused``: torch's
    fused kernels (one launch for all parameters on a GPU), which also skip a step on the device when the
    optimiser's ``found_inf`` attribute is a tensor holding 1 (the trainer's non-finite guard, no host read).
    """
    groups = [{"params": list(model.parameters()), "lr": stage.lr, "weight_decay": stage.weight_decay,
               "base_lr": stage.lr}]
    extra = list(weighting.parameters())
    if extra:
        lr_s = stage.lr if lr_log_vars is None else lr_log_vars
        # no weight decay on s = log sigma^2: it would pull every s towards 0, i.e. back to the plain sum
        groups.append({"params": extra, "lr": lr_s, "weight_decay": 0.0, "base_lr": lr_s})
    cls = OPTIMIZERS[stage.optimizer]
    options = {"fused": True} if fused else {}
    return cls(groups, momentum=momentum, **options) if stage.optimizer == "sgd" else cls(groups, **options)


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of a stage's learning rate at its 0-based ``step`` of ``total``.

    Linear warm-up over ``warmup`` steps, then ``constant`` (1) or ``cosine`` (from 1 down to ``min_ratio`` at the
    last step).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
