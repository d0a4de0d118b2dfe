"""The numbers behind the loss chapter (``notebooks/03_losses.py``).

Three kinds of helpers, all deterministic given their seed:

1. **The paper's equations written out literally** in numpy, float64 (:func:`eq1_cross_entropy`, :func:`eq2_bce`,
   :func:`eq3_ccc`, :func:`eq5_total`), independent of :mod:`mtanet.losses`, so that the chapter can check the
   package against the formulas it claims to implement; plus the closed forms derived in the chapter
   (:func:`ccc_gradient`, :func:`optimal_log_var`, :func:`batch_ccc_expected`).
2. **Small simulations**: MSE versus CCC on hand-made predictors (:func:`example_predictors`,
   :func:`compare_predictors`), the batch-size bias of the CCC (:func:`batch_ccc_bias`), and the relaxation of the
   uncertainty parameters for fixed losses (:func:`relax_log_vars`).
3. **A short two-stage training run** through the package's trainer (:func:`run_weighting_demo`, configured by
   :func:`weighting_demo_config`, its ``log.jsonl`` read by :func:`read_step_log`): the plain sum, then the
   uncertainty weighting of eq. 5, logging every task loss and every learned weight at every step.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.ndimage import gaussian_filter1d
from torch import Tensor
from torch.nn import functional as F

from mtanet.errors import ConfigError
from mtanet.losses import UncertaintyWeighting, stationary_log_var
from mtanet.metrics import ccc
from mtanet.tasks import LABEL_SENTINEL
from mtanet.train import LOG_FILE, TrainConfig, train

#: Kinds of the three tasks in eq. 5: VA is a regression (Gaussian likelihood), AU and EXPR classifications.
DEFAULT_KINDS: dict[str, str] = {"va": "regression", "au": "classification", "expr": "classification"}


# --------------------------------------------------------------------------------------------------------------------
# the paper's equations, literally


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def eq1_cross_entropy(logits: Any, target: Any) -> np.ndarray:
    """Eq. 1 per row, ``-x[class] + log sum_i exp(x_i)``; NaN on unlabeled rows (target -1).

    Args:
        logits: (B, C) class scores.
        target: (B,) class indices, -1 where unlabeled.
    """
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(target).astype(np.int64)
    labeled = t != LABEL_SENTINEL
    out = np.full(len(t), np.nan)
    out[labeled] = -x[labeled, t[labeled]] + _logsumexp(x[labeled])
    return out


def eq2_bce(logits: Any, target: Any) -> np.ndarray:
    """Eq. 2 per row, summed over the K AUs as the paper writes it; NaN on rows with any -1.

    ``-sum_i [y_i log sigmoid(x_i) + (1 - y_i) log(1 - sigmoid(x_i))]``, with ``log sigmoid(x) = -log(1 + e^-x)``
    evaluated stably.
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    labeled = (y != LABEL_SENTINEL).all(axis=1)
    log_sig = -np.logaddexp(0.0, -x)
    log_one_minus_sig = -np.logaddexp(0.0, x)
    per_entry = -(y * log_sig + (1.0 - y) * log_one_minus_sig)
    return np.where(labeled, per_entry.sum(axis=1), np.nan)


def eq3_ccc(x: Any, y: Any) -> float:
    """Eq. 3 with population moments: ``2 s_xy / (s_x^2 + s_y^2 + (mean x - mean y)^2)``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sxy = np.mean((x - x.mean()) * (y - y.mean()))
    return float(2.0 * sxy / (x.var() + y.var() + (x.mean() - y.mean()) ** 2))


def ccc_gradient(x: Any, y: Any) -> np.ndarray:
    """``d rho / d x_i`` of eq. 3 with respect to each prediction ``x_i``.

    With ``D = s_x^2 + s_y^2 + (mean x - mean y)^2`` and population moments over ``n`` rows::

        d rho / d x_i = 2 / (n D) * [(y_i - mean y) - rho (x_i - mean y)]
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    d = x.var() + y.var() + (x.mean() - y.mean()) ** 2
    rho = eq3_ccc(x, y)
    return 2.0 / (n * d) * ((y - y.mean()) - rho * (x - y.mean()))


def eq5_total(losses: Mapping[str, float], log_vars: Mapping[str, float],
              kinds: Mapping[str, str] | None = None) -> float:
    """Eq. 5 in the paper's sigma form: ``L/(2 sigma^2) + log sigma`` (regression), ``L/sigma^2 + log sigma``
    (classification), with ``sigma = exp(s / 2)`` for the stored ``s = log sigma^2``, summed over the given tasks."""
    kinds = {**DEFAULT_KINDS, **(kinds or {})}
    total = 0.0
    for task, loss in losses.items():
        sigma = math.exp(0.5 * log_vars[task])
        scale = 2.0 if kinds[task] == "regression" else 1.0
        total += float(loss) / (scale * sigma**2) + math.log(sigma)
    return total


#: The ``s`` that minimises ``c e^{-s} L + s/2`` for a fixed loss ``L`` (the trainer's start and end of eq. 5 use it
#: too): ``optimal_log_var(L, "regression")`` is ``log L``, ``"classification"`` gives ``log 2L``.
optimal_log_var = stationary_log_var


def scaled_softmax_nll(logits: Tensor, target: Tensor, sigma: float) -> tuple[float, float]:
    """Kendall's classification likelihood ``softmax(f / sigma^2)``: its exact mean NLL and the approximation
    ``CE(f) / sigma^2 + log sigma`` that eq. 5 uses (exact only at ``sigma = 1``)."""
    exact = F.cross_entropy(logits / sigma**2, target)
    approx = F.cross_entropy(logits, target) / sigma**2 + math.log(sigma)
    return float(exact), float(approx)


# --------------------------------------------------------------------------------------------------------------------
# MSE against CCC


def example_predictors(y: Any, r: float = 0.4, seed: int = 0, noise_frames: float = 3.0) -> dict[str, np.ndarray]:
    """Hand-made predictions of a target signal ``y``, each with a known flaw.

    A noisy feature ``z`` with correlation exactly ``r`` to ``y`` stands for what a weak model sees; its noise is
    smoothed over ``noise_frames`` frames (a Gaussian filter), as a model's errors on consecutive frames are. From it:

    - ``constant mean``: ``mean(y)`` everywhere, ignoring the signal;
    - ``least squares on z``: the MSE-optimal line ``mean y + beta (z - mean z)``, shrunk towards the mean;
    - ``variance-matched z``: the same signal rescaled to the spread of ``y``;
    - ``half amplitude``: ``mean y + (y - mean y) / 2`` (a scale error);
    - ``shifted by 0.3``: ``y + 0.3`` (a location error).
    """
    y = np.asarray(y, dtype=np.float64)
    if not 0.0 < r < 1.0:
        raise ValueError(f"r must lie in (0, 1), got {r}")
    rng = np.random.default_rng(seed)
    yc = y - y.mean()
    # noise orthogonal to y (in sample) so that corr(z, y) is exactly r on this very sample
    e = rng.standard_normal(y.size)
    if noise_frames > 0:
        e = gaussian_filter1d(e, noise_frames, mode="nearest")
    e -= e.mean()
    e -= (e @ yc) / (yc @ yc) * yc
    e *= yc.std() / e.std()
    z = r * yc + math.sqrt(1.0 - r * r) * e
    beta = np.mean(z * yc) / z.var()
    return {
        "constant mean": np.full_like(y, y.mean()),
        "least squares on z": y.mean() + beta * z,
        "variance-matched z": y.mean() + z * (y.std() / z.std()),
        "half amplitude": y.mean() + 0.5 * yc,
        "shifted by 0.3": y + 0.3,
    }


def compare_predictors(y: Any, predictions: Mapping[str, Any]) -> pd.DataFrame:
    """MSE, Pearson r, CCC and Lin's bias-correction factor ``C_b`` of each prediction of ``y`` (a row each).

    ``CCC = r * C_b`` with ``C_b = 2 / (v + 1/v + u^2)``, ``v = s_x / s_y`` (scale) and
    ``u = (mean x - mean y) / sqrt(s_x s_y)`` (location); ``r`` is 0 and ``C_b`` NaN for a constant prediction.
    """
    y = np.asarray(y, dtype=np.float64)
    rows = {}
    for name, p in predictions.items():
        p = np.asarray(p, dtype=np.float64)
        constant = p.std() < 1e-12 * max(1.0, abs(p.mean()))
        r = 0.0 if constant else float(np.corrcoef(p, y)[0, 1])
        if constant:
            c_b = math.nan
        else:
            v = p.std() / y.std()
            u = (p.mean() - y.mean()) / math.sqrt(p.std() * y.std())
            c_b = 2.0 / (v + 1.0 / v + u * u)
        rows[name] = {"MSE": float(np.mean((p - y) ** 2)), "Pearson r": r, "C_b": c_b, "CCC": ccc(y, p),
                      "mean": float(p.mean()), "std": float(p.std())}
    return pd.DataFrame(rows).T


# --------------------------------------------------------------------------------------------------------------------
# the batch-size bias of the CCC


def simulation_moments(y_std: float = 0.35, slope: float = 0.6, shift: float = 0.1,
                       noise_std: float = 0.25) -> tuple[float, float, float, float]:
    """``(var_x, var_y, cov, mean_x - mean_y)`` of ``x = slope * y + shift + noise`` and ``y ~ N(0, y_std^2)``, noise
    ``N(0, noise_std^2)``; the defaults are those of :func:`batch_ccc_bias`."""
    var_y = y_std**2
    return slope**2 * var_y + noise_std**2, var_y, slope * var_y, shift


def population_ccc(y_std: float, slope: float, shift: float, noise_std: float) -> float:
    """CCC of ``x = slope * y + shift + noise`` against ``y ~ N(0, y_std^2)``, noise ``N(0, noise_std^2)``."""
    var_x, var_y, cov, d = simulation_moments(y_std, slope, shift, noise_std)
    return 2.0 * cov / (var_x + var_y + d**2)


def batch_ccc_expected(var_x: float, var_y: float, cov: float, mean_diff: float, batch_size: Any,
                       second_order: bool = True) -> Any:
    """Expected CCC of a batch of ``b`` i.i.d. Gaussian pairs, to order ``1/b``.

    The batch CCC is ``N / D`` with ``N = 2 s_xy`` and ``D = s_x^2 + s_y^2 + (mean x - mean y)^2``. Their
    expectations are ``(b-1)/b * 2 cov`` and ``S - 2 cov / b`` (population moments shrink by ``(b-1)/b``, and the
    squared difference of batch means gains ``var(x - y) / b``), whose ratio is ``rho (b - 1) / (b - rho)`` (the
    ``first_order`` part alone, ``second_order=False``). The delta method adds the bias of a ratio of noisy
    quantities, ``(rho Var(D) - Cov(N, D)) / S^2``, with the Gaussian moments::

        b Var(D)    = 2 var_x^2 + 2 var_y^2 + 4 cov^2 + 4 d^2 var(x - y)
        b Cov(N, D) = 4 cov (var_x + var_y)

    (batch means are independent of batch variances for Gaussian data, so ``d`` enters ``Var(D)`` only).
    """
    b = np.asarray(batch_size, dtype=np.float64)
    s = var_x + var_y + mean_diff**2
    rho = 2.0 * cov / s
    out = rho * (b - 1.0) / (b - rho)
    if second_order:
        var_d = 2 * var_x**2 + 2 * var_y**2 + 4 * cov**2 + 4 * mean_diff**2 * (var_x + var_y - 2 * cov)
        cov_nd = 4 * cov * (var_x + var_y)
        out = out + (rho * var_d - cov_nd) / (b * s**2)
    return out


def _rowwise_ccc(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    mx, my = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
    sxy = ((x - mx) * (y - my)).mean(axis=1)
    denom = x.var(axis=1) + y.var(axis=1) + (mx - my)[:, 0] ** 2
    return 2.0 * sxy / denom


def _rowwise_ccc_torch(x: Tensor, y: Tensor) -> Tensor:
    mx, my = x.mean(dim=1, keepdim=True), y.mean(dim=1, keepdim=True)
    sxy = ((x - mx) * (y - my)).mean(dim=1)
    denom = x.var(dim=1, unbiased=False) + y.var(dim=1, unbiased=False) + (mx - my)[:, 0] ** 2
    return 2.0 * sxy / denom


def batch_ccc_bias(batch_sizes: Iterable[int], n_batches: int, *, y_std: float = 0.35, slope: float = 0.6,
                   shift: float = 0.1, noise_std: float = 0.25, seed: int = 0,
                   max_elements: int = 2_000_000, device: str | torch.device | None = None) -> pd.DataFrame:
    """Monte-Carlo distribution of the batch CCC of a fixed predictor, per batch size.

    Pairs are i.i.d.: ``y ~ N(0, y_std^2)`` and ``x = slope * y + shift + N(0, noise_std^2)``; ``n_batches``
    batches are drawn for each size. Frames of a video are correlated, so real batches drawn from few videos behave
    like smaller i.i.d. batches.

    ``device``: ``None`` draws with numpy on the CPU (the numbers of earlier runs); a torch device (the chapter's
    ``cuda``) draws and reduces there in float64 with a torch generator seeded from ``seed``: other draws, the same
    distribution.

    Returns:
        One row per batch size: ``batch_size``, ``mean``, ``std``, ``q05``, ``q95`` of the batch CCC, ``sem`` (the
        standard error of ``mean``), ``population`` (:func:`population_ccc`), ``first_order`` and ``expected``
        (:func:`batch_ccc_expected` without and with the delta-method term).
    """
    if n_batches < 2:
        raise ValueError(f"n_batches must be at least 2, got {n_batches}")
    rho = population_ccc(y_std, slope, shift, noise_std)
    moments = simulation_moments(y_std, slope, shift, noise_std)
    rng = np.random.default_rng(seed)
    gen = None if device is None else torch.Generator(device=device).manual_seed(seed)
    rows = []
    for b in batch_sizes:
        if b < 2:
            raise ValueError(f"batch sizes must be at least 2, got {b}")
        chunk = max(1, max_elements // b)
        values = []
        for start in range(0, n_batches, chunk):
            m = min(chunk, n_batches - start)
            if gen is not None:
                y = torch.randn((m, b), generator=gen, device=device, dtype=torch.float64) * y_std
                x = slope * y + shift + torch.randn((m, b), generator=gen, device=device, dtype=torch.float64) * \
                    noise_std
                values.append(_rowwise_ccc_torch(x, y).cpu().numpy())
                continue
            y = rng.normal(0.0, y_std, (m, b))
            x = slope * y + shift + rng.normal(0.0, noise_std, (m, b))
            values.append(_rowwise_ccc(x, y))
        v = np.concatenate(values)
        rows.append({"batch_size": int(b), "mean": v.mean(), "std": v.std(), "q05": np.quantile(v, 0.05),
                     "q95": np.quantile(v, 0.95), "sem": v.std(ddof=1) / math.sqrt(v.size), "population": rho,
                     "first_order": float(batch_ccc_expected(*moments, b, second_order=False)),
                     "expected": float(batch_ccc_expected(*moments, b))})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------------
# the uncertainty parameters for fixed losses


def relax_log_vars(losses: Mapping[str, float], steps: int, lr: float,
                   kinds: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Plain gradient descent on :class:`UncertaintyWeighting`'s ``s`` (from 0) with the task losses held fixed.

    Near the optimum the objective's curvature is ``c e^{-s*} L = 1/2`` for either kind, so the distance to ``s*``
    shrinks by a factor ``1 - lr / 2`` per step: a time constant of about ``2 / lr`` steps.

    Returns:
        ``steps + 1`` rows (step 0 is the start), one column ``s_<task>`` per task.
    """
    tasks = tuple(losses)
    weighting = UncertaintyWeighting(tasks, kinds={t: {**DEFAULT_KINDS, **(kinds or {})}[t] for t in tasks}).double()
    fixed = {t: torch.tensor(float(v), dtype=torch.float64) for t, v in losses.items()}
    opt = torch.optim.SGD(weighting.parameters(), lr=lr)
    trace = [weighting.log_vars.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        weighting(fixed).backward()
        opt.step()
        trace.append(weighting.log_vars.detach().clone())
    return pd.DataFrame(torch.stack(trace).numpy(), columns=[f"s_{t}" for t in tasks]).rename_axis("step")


# --------------------------------------------------------------------------------------------------------------------
# a short two-stage training run, through the trainer


def weighting_demo_config(root: str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
                          backbone: str = "seresnet18", image_size: int = 64, feature_dim: int = 256,
                          batch_size: int = 24, steps_sum: int = 10, steps_uncertainty: int = 30,
                          lr_sum: float = 1e-3, lr_finetune: float = 1e-4, lr_log_vars: float = 0.1,
                          momentum: float = 0.0, seed: int = 0, device: str = "cpu", threads: int | None = 2,
                          **config: Any) -> TrainConfig:
    """The :class:`mtanet.train.TrainConfig` of the chapter's demo: the paper's schedule in miniature.

    Stage 1 is ``steps_sum`` steps of the plain sum (Adam, ``lr_sum``, weight decay 1e-3 as in the paper), stage 2
    ``steps_uncertainty`` steps of eq. 5 (SGD, network ``lr_finetune``, weight decay 5e-3 as in the paper;
    the log-variances ``s`` at ``lr_log_vars`` without weight decay, starting at 0 so that they are seen relaxing
    towards ``s*``; the trainer's default starts them at ``s*``). The trainer counts whole epochs and both stages
    share one epoch length, so an epoch is ``gcd(steps_sum, steps_uncertainty)`` steps and each stage lasts exactly
    the steps asked for. No augmentation (the demo shows the weighting, not the data), a step row of ``log.jsonl``
    at every step, validation only after the last epoch, resume checkpoints at epoch ends only, no progress bars.

    Args:
        root: the Aff-Wild2 root (real or synthetic); the trainer reads its train and val splits.
        output_dir: where the run writes ``log.jsonl``, ``metrics.json`` and its checkpoints (must not hold a run).
        config: further :class:`mtanet.train.TrainConfig` keys (they override the ones above).

    Raises:
        ConfigError: a negative step count, both counts 0, or an invalid key or value.
    """
    if steps_sum < 0 or steps_uncertainty < 0:
        raise ConfigError(f"steps_sum and steps_uncertainty must be >= 0, got {steps_sum} and {steps_uncertainty}")
    if steps_sum + steps_uncertainty == 0:
        raise ConfigError("steps_sum and steps_uncertainty are both 0: nothing to train")
    epoch = math.gcd(steps_sum, steps_uncertainty)
    return TrainConfig.from_dict({
        "data_root": str(root), "output_dir": str(output_dir), "backbone": backbone, "image_size": image_size,
        "feature_dim": feature_dim, "batch_size": batch_size, "steps_per_epoch": epoch,
        "stage1_epochs": steps_sum // epoch, "stage1_weighting": "sum", "stage1_optimizer": "adam",
        "stage1_lr": lr_sum, "stage1_weight_decay": 1e-3,
        "stage2_epochs": steps_uncertainty // epoch, "stage2_weighting": "uncertainty", "stage2_optimizer": "sgd",
        "stage2_lr": lr_finetune, "stage2_weight_decay": 5e-3, "lr_log_vars": lr_log_vars, "momentum": momentum,
        # s starts at 0 (the weights 0.5, 1, 1), not at the trainer's default s*: the demo shows eq. 5 relaxing to s*
        "init_log_var": 0.0, "augment": False, "val_every": 0, "log_every": 1, "checkpoint_every": 0, "progress": False,
        "seed": seed, "device": device, "threads": threads, **config})


def read_step_log(path: str | os.PathLike[str], config: TrainConfig) -> pd.DataFrame:
    """The ``"step"`` rows of a run's ``log.jsonl`` as the chapter plots them.

    Columns: ``step`` (the trainer's, from 1), ``stage`` (the stage's weighting, ``"sum"`` or ``"uncertainty"``),
    ``loss_<task>``, ``total`` (the weighted loss the step minimised), ``lr`` (the network's), ``w_<task>`` (the
    effective weights after the step), ``sigma_<task>`` and ``s_<task> = log sigma^2 = 2 ln sigma``; ``s`` and
    ``sigma`` are NaN under the plain sum, where no uncertainty parameter is in use. With ``log_every > 1`` each
    row holds the mean losses of its window.
    """
    tasks = config.tasks
    rows = []
    with open(path, encoding="utf-8") as log:
        for line in log:
            entry = json.loads(line)
            if entry.get("kind") != "step":
                continue
            row: dict[str, Any] = {"step": entry["step"], "stage": config.stages[entry["stage"] - 1].weighting}
            row.update({f"loss_{t}": _number(entry.get(f"loss_{t}")) for t in tasks})
            row.update({"total": _number(entry.get("loss_total")), "lr": _number(entry.get("lr"))})
            row.update({f"w_{t}": _number(entry.get(f"w_{t}")) for t in tasks})
            sigmas = {t: _number(entry.get(f"sigma_{t}")) for t in tasks}
            row.update({f"s_{t}": 2.0 * math.log(v) if v > 0 else math.nan for t, v in sigmas.items()})
            row.update({f"sigma_{t}": v for t, v in sigmas.items()})
            rows.append(row)
    columns = (["step", "stage"] + [f"loss_{t}" for t in tasks] + ["total", "lr"] + [f"w_{t}" for t in tasks]
               + [f"s_{t}" for t in tasks] + [f"sigma_{t}" for t in tasks])
    return pd.DataFrame(rows, columns=columns)


def _number(value: Any) -> float:
    return math.nan if value is None else float(value)


def run_weighting_demo(root: str | os.PathLike[str], *, output_dir: str | os.PathLike[str] | None = None,
                       **settings: Any) -> pd.DataFrame:
    """Train a freshly initialised MTANet with :func:`mtanet.train.train` as :func:`weighting_demo_config` says, and
    return its step log (:func:`read_step_log`): one row per step, every task loss and every learned weight.

    The trainer reads the train and val splits of ``root``; batches come from its task-balanced sampler, so every
    task has labels in every batch. Deterministic given ``seed`` on a given machine and thread count (the trainer
    switches on torch's deterministic algorithms on the CPU).

    Args:
        root: the Aff-Wild2 root.
        output_dir: where the run is kept (it must not hold a run yet); ``None``: a temporary folder, removed
            afterwards.
        settings: keyword arguments of :func:`weighting_demo_config`.
    """
    with tempfile.TemporaryDirectory(prefix="mtanet-weighting-demo-") as tmp:
        out = Path(tmp) / "run" if output_dir is None else Path(output_dir)
        config = weighting_demo_config(root, out, **settings)
        train(config)
        return read_step_log(out / LOG_FILE, config)
