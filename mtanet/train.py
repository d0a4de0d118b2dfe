"""Training and evaluation of MTANet: the paper's two-stage recipe as one resumable, reproducible loop.

The recipe (paper section IV-B, ABAW2020.md section 6), every number a field of :class:`TrainConfig`:

1. **Stage 1**: the plain sum of the task losses, Adam, lr 1e-3, weight decay 1e-3.
2. **Stage 2**: fine-tuning with the uncertainty weighting of eq. 5, SGD (momentum 0.9), lr 1e-4, weight decay 5e-3;
   the log-variances ``s = log sigma^2`` are parameters of this optimiser (without weight decay, which would pull them
   back towards the plain sum).

The learning rate is held constant in each stage by default (the paper gives a rate, no schedule); ``lr_schedule=
"cosine"`` decays each stage to ``min_lr_ratio`` of its rate. Batches come from
:class:`mtanet.data.TaskBalancedBatchSampler`, so every batch holds labels of every trained task despite the
incomplete labels of Aff-Wild2. After each epoch the model is scored on the validation frames that have an image,
with the ABAW 2020 scores of :mod:`mtanet.metrics`.

What a run leaves in its output folder:

- ``config.json``: the run's :class:`TrainConfig`.
- ``log.jsonl``: one JSON object per line, ``kind`` ``"step"`` (every ``log_every`` steps: mean task losses of the
  window ``loss_<task>``, ``loss_total``, ``lr``, effective task weights ``w_<task>``, ``sigma_<task>`` under the
  uncertainty weighting, ``images_per_s``) or ``"epoch"`` (the same over the epoch, plus the validation scores
  ``val_<task>``, ``val_au_tuned``, ``val_mean`` and their full dicts under ``val``).
- ``last.pt``: the resume checkpoint, written atomically every ``checkpoint_every`` steps and at each epoch end:
  model, optimiser, schedule position, loss weighting, sampler position, the RNG states of every rank, the log
  offset, the best scores so far. ``best_va.pt``, ``best_au.pt``, ``best_expr.pt``, ``best_mean.pt``: the model at
  the epoch with the best validation score of that kind, with the tuned AU thresholds.
- ``metrics.json``: final and best validation scores, the per-epoch history, config, versions, git commit,
  hardware and wall times (see :func:`train`).

A run killed at any moment (SIGKILL included) and started again with ``resume=True`` ends with the same weights and
scores as an uninterrupted run on CPU: batches, augmentation and dropout depend only on the seed and the position in
the run (see :class:`FaceAugment`), and everything else that changes is in the checkpoint.

Under ``torchrun --nproc_per_node N`` the same entry point trains with DistributedDataParallel: each rank takes its
slice of the same global batch (``batch_size`` is the global batch), gradients are averaged, rank 0 writes logs and
checkpoints, and validation is split across ranks and gathered on rank 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mtanet.tasks import TASKS

__all__ = [
    "TrainConfig",
    "ConfigError",
    "DeviceUnavailableError",
    "NonFiniteLossError",
    "CheckpointError",
    "FaceAugment",
    "resolve_device",
    "lr_factor",
    "train",
    "Trainer",
    "predict_frames",
    "score_predictions",
    "headline",
    "write_submission",
    "evaluate",
    "add_cli",
]

CHECKPOINT = "last.pt"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
#: The four "best" checkpoints: ``best_<key>.pt`` keeps the model of the epoch with the highest validation ``key``.
BEST_KEYS: tuple[str, ...] = ("va", "au", "expr", "mean")


class ConfigError(ValueError):
    """A :class:`TrainConfig` value or key that is not allowed."""


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist here (never silently replaced by another)."""


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss; raised before that step's optimiser update, so no checkpoint holds its state."""


class CheckpointError(RuntimeError):
    """A resume checkpoint that cannot be read or does not belong to this run."""


# --------------------------------------------------------------------------------------------------- configuration


def _opt(default: Any, help: str) -> Any:  # noqa: A002 - "help" as in argparse
    """A dataclass field with a help text (shown by ``mtanet train --help``)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Every choice of a training run. ``None`` means "pick for the hardware", as each field's help says.

    Build it with keywords, :meth:`from_dict` or :meth:`from_yaml`; unknown keys raise :class:`ConfigError` (with
    the closest known key), and values are converted to the field's type (so ``"1e-3"`` from a command line or YAML
    becomes a float). :meth:`to_dict` gives plain JSON.
    """

    # --- data
    data_root: str = _opt("", "Aff-Wild2 root (real or synthetic); empty: the synthetic set `synth_size`, written "
                              "on first use under data/")
    synth_size: str = _opt("smoke", "size of the default synthetic set: smoke, cpu or gpu")
    allow_cross_task_leak: bool = _opt(False, "keep training labels of videos in another task's validation split")
    tasks: list[str] = _opt(list(TASKS), "tasks to train (heads and losses), a subset of va, au, expr")
    image_size: int = _opt(112, "side of the square input in pixels (the paper: 112, the crop size)")
    augment: bool = _opt(True, "augment training images (flip, crop, brightness/contrast); never validation")
    aug_flip: float = _opt(0.5, "probability of a horizontal flip")
    aug_crop_scale: float = _opt(0.8, "smallest area share of the random square crop (1: no crop); the crop's "
                                      "position is random, so it also translates")
    aug_brightness: float = _opt(0.2, "brightness factor drawn from [1 - b, 1 + b]")
    aug_contrast: float = _opt(0.2, "contrast factor drawn from [1 - c, 1 + c]")
    cache_dir: str = _opt("", "folder for uint8 caches of the decoded images (faster epochs); empty: decode jpgs")
    # --- model
    backbone: str = _opt("senet50", "a key of mtanet.models.BACKBONES (senet50 is the paper's)")
    pretrained: bool = _opt(False, "timm ImageNet weights from the local cache (nothing is downloaded)")
    vggface2_weights: str = _opt("", "path of the VGGFace2 senet50_ft pickle (the paper's initialisation); "
                                     "needs backbone senet50")
    pooling: str = _opt("avgmax_concat", "neck variant, see mtanet.models.PoolingNeck")
    feature_dim: int = _opt(1024, "width of the shared feature (the paper: 1024)")
    dropout: float = _opt(0.5, "dropout probability in the neck")
    # --- optimisation
    batch_size: int = _opt(64, "global batch size (split evenly across DDP ranks); not given by the paper")
    steps_per_epoch: int | None = _opt(None, "batches per epoch; None: enough to cover the largest task pool once")
    stage1_epochs: int = _opt(10, "epochs of stage 1 (not given by the paper)")
    stage1_weighting: str = _opt("sum", "loss weighting of stage 1: sum or uncertainty")
    stage1_optimizer: str = _opt("adam", "adam, adamw or sgd (the paper: Adam)")
    stage1_lr: float = _opt(1e-3, "learning rate of stage 1 (the paper: 1e-3)")
    stage1_weight_decay: float = _opt(1e-3, "weight decay of stage 1 (the paper: 1e-3)")
    stage2_epochs: int = _opt(5, "epochs of stage 2 (not given by the paper); 0 skips the fine-tuning")
    stage2_weighting: str = _opt("uncertainty", "loss weighting of stage 2: uncertainty (eq. 5) or sum")
    stage2_optimizer: str = _opt("sgd", "adam, adamw or sgd (the paper: SGD)")
    stage2_lr: float = _opt(1e-4, "learning rate of stage 2 (the paper: 1e-4)")
    stage2_weight_decay: float = _opt(5e-3, "weight decay of stage 2 (the paper: 5e-3)")
    momentum: float = _opt(0.9, "SGD momentum (not given by the paper)")
    lr_log_vars: float | None = _opt(None, "learning rate of the uncertainty log-variances; None: the stage's rate")
    init_log_var: float = _opt(0.0, "initial s = log sigma^2 of every task")
    lr_schedule: str = _opt("constant", "constant (the paper names no schedule) or cosine, per stage")
    warmup_steps: int = _opt(0, "linear warm-up steps at the start of each stage")
    min_lr_ratio: float = _opt(0.0, "cosine: the last step's lr as a share of the stage's lr")
    grad_clip: float = _opt(0.0, "clip the gradient norm to this value; 0: no clipping")
    expr_class_weight: str = _opt("none", "expression cross-entropy class weights from the training labels: none (the "
                                          "paper's eq. 1), balanced (n / (C n_c)) or sqrt (its square root)")
    au_pos_weight: str = _opt("none", "AU BCE weight of positives from the training labels: none (the paper's eq. "
                                      "2), balanced (negatives / positives per AU) or sqrt (its square root)")
    # --- run
    seed: int = _opt(0, "seed of initialisation, batches, augmentation and dropout")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto (cuda if available); a missing device is an error")
    threads: int | None = _opt(None, "torch CPU threads; None: the cores this process may use, shared by the "
                                     "ranks of this machine")
    num_workers: int | None = _opt(None, "data loader processes; None: min(8, cores) on CUDA, 0 on CPU (measured "
                                         "on 2 cores: one worker was 4-7% slower than none)")
    amp: bool | None = _opt(None, "bfloat16 autocast; None: on for CUDA, off for CPU")
    channels_last: bool | None = _opt(None, "channels-last memory format; None: on for CUDA")
    compile: bool = _opt(False, "torch.compile the model")
    deterministic: bool | None = _opt(None, "torch.use_deterministic_algorithms; None: on for CPU, off for CUDA")
    eval_batch_size: int | None = _opt(None, "validation batch per rank; None: twice the training batch per rank")
    log_every: int = _opt(10, "steps between step rows of log.jsonl (and the only per-step device syncs)")
    checkpoint_every: int = _opt(500, "steps between resume checkpoints (also written at every epoch end); 0: "
                                      "epoch ends only")
    progress: bool = _opt(True, "tqdm progress bars (terminal and notebook)")
    output_dir: str = _opt("runs/mtanet", "folder of checkpoints, log.jsonl and metrics.json")
    resume: bool = _opt(False, "continue the run in output_dir from last.pt (start it if there is none)")
    inject_nan_at_step: int | None = _opt(None, "debug: make the loss of this (1-based) step NaN")

    #: Fields that may differ when a run is resumed: they change how it runs, not what it computes (device and
    #: threads can change the last bits of CPU/GPU arithmetic, which is the user's call).
    RESUMABLE_CHANGES: typing.ClassVar[frozenset[str]] = frozenset({
        "data_root", "cache_dir", "device", "threads", "num_workers", "amp", "channels_last", "compile",
        "deterministic", "eval_batch_size", "log_every", "checkpoint_every", "progress", "output_dir", "resume",
        "inject_nan_at_step"})

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._check()

    def _check(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{key}={getattr(self, key)!r}: {why}")

        if not self.tasks or set(self.tasks) - set(TASKS) or len(set(self.tasks)) != len(self.tasks):
            raise bad("tasks", f"must be distinct names among {list(TASKS)}")
        self.tasks = [t for t in TASKS if t in self.tasks]  # canonical order: heads and logs never depend on it
        for key in ("stage1_weighting", "stage2_weighting"):
            if getattr(self, key) not in ("sum", "uncertainty"):
                raise bad(key, "choose sum or uncertainty")
        for key in ("stage1_optimizer", "stage2_optimizer"):
            if getattr(self, key) not in _OPTIMIZERS:
                raise bad(key, f"choose one of {sorted(_OPTIMIZERS)}")
        for key in ("expr_class_weight", "au_pos_weight"):
            if getattr(self, key) not in ("none", "balanced", "sqrt"):
                raise bad(key, "choose none, balanced or sqrt")
        if self.lr_schedule not in ("constant", "cosine"):
            raise bad("lr_schedule", "choose constant or cosine")
        for key in ("image_size", "batch_size", "feature_dim", "log_every"):
            if getattr(self, key) < 1:
                raise bad(key, "must be at least 1")
        for key in ("stage1_epochs", "stage2_epochs", "warmup_steps", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise bad(key, "must be >= 0")
        if self.stage1_epochs + self.stage2_epochs == 0:
            raise bad("stage1_epochs", "both stages have 0 epochs: nothing to train")
        for key in ("steps_per_epoch", "threads", "eval_batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise bad(key, "must be at least 1 (or None)")
        if self.num_workers is not None and self.num_workers < 0:
            raise bad("num_workers", "must be >= 0 (or None)")
        for key in ("aug_flip", "dropout", "min_lr_ratio"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "must lie in [0, 1]")
        if not 0.0 < self.aug_crop_scale <= 1.0:
            raise bad("aug_crop_scale", "must lie in (0, 1]")
        for key in ("aug_brightness", "aug_contrast"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise bad(key, "must lie in [0, 1)")
        if self.synth_size not in ("smoke", "cpu", "gpu"):
            raise bad("synth_size", "choose smoke, cpu or gpu")
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", self.device.strip().lower()):
            raise bad("device", "use cpu, cuda, cuda:N or auto")
        if self.vggface2_weights and self.backbone != "senet50":
            raise bad("vggface2_weights", "the VGGFace2 SENet-50 weights need backbone senet50")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys raise :class:`ConfigError` naming the closest known key."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in known]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), known, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown TrainConfig key(s): {', '.join(hints)}; known keys: {', '.join(known)}")
        return cls(**dict(values))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TrainConfig:
        """Read a flat YAML mapping of fields (see :meth:`from_dict`)."""
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: a TrainConfig file must hold a mapping of keys to values")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated like a new config)."""
        return type(self).from_dict({**self.to_dict(), **changes})


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "auto", ""}


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Convert ``value`` to the field type ``hint``; strings are parsed (command lines and YAML give strings)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, str):
                value = float(value) if re.search(r"[.eE]", value) else int(value, 10)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if isinstance(value, (int, np.integer)):
                return int(value)
            raise ValueError
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, (int, float, np.integer, np.floating, str)):
                return float(value)
            raise ValueError
        if hint is str:
            if isinstance(value, (str, os.PathLike)):
                return str(value)
            raise ValueError
        if origin is list:
            if isinstance(value, str):
                value = [v for v in re.split(r"[,\s]+", value.strip().strip("[]")) if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [_coerce(name, v, args[0]) for v in value]
    except (ValueError, TypeError):
        pass
    else:
        return value
    raise ConfigError(f"TrainConfig.{name}: cannot read {value!r} as {getattr(hint, '__name__', hint)}")


# --------------------------------------------------------------------------------------------------- hardware


def resolve_device(spec: str, local_rank: int | None = None):
    """The ``torch.device`` that ``spec`` names: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available).

    Under ``torchrun`` (``local_rank`` given), ``cuda`` and ``auto`` mean ``cuda:<local_rank>``.

    Raises:
        DeviceUnavailableError: CUDA (or device N) was asked for and is not there; nothing falls back silently.
    """
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise ConfigError(f"device must be cpu, cuda, cuda:N or auto, got {spec!r}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {spec!r} was requested but CUDA is not available here (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s) visible); use device='cpu' or 'auto'")
    if m.group(1) is not None and local_rank is not None:
        raise ConfigError(f"under torchrun use device='cuda' (each rank takes cuda:LOCAL_RANK), not {spec!r}")
    index = int(m.group(1)) if m.group(1) is not None else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device cuda:{index} was requested but only {torch.cuda.device_count()} CUDA "
                                     "device(s) are visible")
    return torch.device("cuda", index)


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclasses.dataclass
class _Dist:
    """Where this process sits in a torchrun job (all defaults: a plain single process)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> _Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_info() -> dict[str, Any]:
    """Commit of the checkout this package runs from (``None`` outside git) and whether tracked files changed."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0
                else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def _versions() -> dict[str, str]:
    import timm
    import torch

    import mtanet

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "numpy": np.__version__, "mtanet": mtanet.__version__}


# --------------------------------------------------------------------------------------------------- augmentation


class FaceAugment:
    """Light augmentation of an aligned face crop, as a :class:`mtanet.data.FrameDataset` ``transform``.

    On the uint8 ``(3, H, W)`` crop: a random square crop of ``crop_scale``..1 of the area at a random position
    (a small zoom and translation; faces are aligned, so no rotation or aspect change), a horizontal flip with
    probability ``flip`` (valence-arousal, the expression and the eight AUs of ABAW 2020 are left-right symmetric),
    resized to ``image_size`` (antialiased), then contrast and brightness factors in ``[1 - c, 1 + c]`` and
    ``[1 - b, 1 + b]``. Returns float ``(3, image_size, image_size)`` on the 0-255 scale, which the dataset then
    scales to [0, 1] without resizing again.

    Randomness comes from ``self.rng``, which the trainer reseeds for every item from (seed, epoch, batch, slot):
    the augmentation of a frame then does not depend on the number of loader workers or ranks, nor on where a run
    was interrupted and resumed.
    """

    def __init__(self, image_size: int, flip: float = 0.5, crop_scale: float = 0.8, brightness: float = 0.2,
                 contrast: float = 0.2):
        self.image_size = image_size
        self.flip = flip
        self.crop_scale = crop_scale
        self.brightness = brightness
        self.contrast = contrast
        self.rng = np.random.default_rng(0)

    def reseed(self, key: Sequence[int]) -> None:
        self.rng = np.random.default_rng(list(key))

    def draw(self, height: int, width: int) -> tuple[int, int, int, bool, float, float]:
        """One item's random choices ``(side, top, left, flip, contrast, brightness)`` from ``self.rng``."""
        r = self.rng
        # every draw is made every time, so one item's draws never shift another's
        side = max(1, int(round(math.sqrt(r.uniform(self.crop_scale, 1.0)) * min(height, width))))
        top, left = int(r.integers(0, height - side + 1)), int(r.integers(0, width - side + 1))
        flip = bool(r.random() < self.flip)
        contrast = float(r.uniform(1.0 - self.contrast, 1.0 + self.contrast))
        brightness = float(r.uniform(1.0 - self.brightness, 1.0 + self.brightness))
        return side, top, left, flip, contrast, brightness

    def geometry(self, image, side: int, top: int, left: int, flip: bool):
        """The crop, flip and resize of a uint8 ``(3, H, W)`` image: uint8 ``(3, image_size, image_size)``."""
        import torch
        from torch.nn import functional as F

        x = image[:, top: top + side, left: left + side]
        if flip:
            x = x.flip(-1)
        if side != self.image_size:
            # resized while still uint8 and channels-last: torch's fast antialiased kernel, twice the float path's
            # speed on CPU (this runs once per training image, on the step's critical path)
            x = F.interpolate(x[None].contiguous(memory_format=torch.channels_last),
                              size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)[0]
        return x

    @staticmethod
    def photometric(x, mean, contrast, brightness):
        """Contrast about the image mean, then brightness, on float 0-255 (one image, or a batch with (B,1,1,1) factors)."""
        return ((x - mean) * contrast + mean).mul_(brightness).clamp_(0.0, 255.0)

    def __call__(self, image):
        side, top, left, flip, contrast, brightness = self.draw(image.shape[1], image.shape[2])
        x = self.geometry(image, side, top, left, flip).float()
        return self.photometric(x, x.mean(), contrast, brightness)

    def batch(self, images: Sequence, keys: Sequence[Sequence[int]]):
        """``images`` augmented as a float ``(B, 3, S, S)`` batch in [0, 1], item ``i`` reseeded from ``keys[i]``.

        Equal, bit for bit, to stacking ``FrameDataset`` items that use this transform (tested): the crops run per
        image, the float arithmetic once for the batch. Each mean is taken on the image's own crop, as in the
        single-image path, so that the order of the sum, and with it the rounding, is the same.
        """
        import torch

        crops, means, contrasts, brightnesses = [], [], [], []
        for image, key in zip(images, keys):
            self.reseed(key)
            side, top, left, flip, contrast, brightness = self.draw(image.shape[1], image.shape[2])
            crop = self.geometry(image, side, top, left, flip)
            crops.append(crop)
            means.append(crop.float().mean())
            contrasts.append(contrast)
            brightnesses.append(brightness)
        shape = (len(crops), 1, 1, 1)
        x = torch.stack(crops).float()
        mean = torch.stack(means).view(shape)
        factors = torch.tensor([contrasts, brightnesses], dtype=torch.float32).view(2, *shape)
        return self.photometric(x, mean, factors[0], factors[1]).div_(255.0)


class _KeyedFrames:
    """A FrameDataset addressed by ``(row, augmentation key)``: the key reseeds the augmentation before the item."""

    def __init__(self, dataset, augment: FaceAugment | None):
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        row, key = item
        if self.augment is not None:
            self.augment.reseed(key)
        return self.dataset[row]

    def __getitems__(self, items):
        """A whole batch at once (the DataLoader's batched fetch): one cache read, batched float arithmetic.

        Returns the collated ``(images, targets, masks)``, equal to collating ``self[item]`` for each item.
        """
        from torch.utils.data import default_collate

        rows = [row for row, _ in items]
        if self.augment is None:  # nothing to reseed: the dataset's own batched fetch
            return self.dataset.batch(rows)
        if self.dataset.transform is not self.augment:
            return default_collate([self[item] for item in items])
        images = self.augment.batch(self.dataset.load_images(rows), [key for _, key in items])
        return (images, *self.dataset.labels(rows))


class _Batched:
    """A FrameDataset whose DataLoader fetches each batch in one call (:meth:`mtanet.data.FrameDataset.batch`)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row):
        return self.dataset[row]

    def __getitems__(self, rows):
        return self.dataset.batch(rows)


def _collated(batch):
    """The DataLoader's collate_fn for datasets whose ``__getitems__`` returns a finished batch."""
    return batch


class _KeyedBatches:
    """The task-balanced sampler's batches, each row paired with its key ``(seed, epoch, batch, global slot)``.

    The slot is the row's position in the global batch (rank ``r`` holds slots ``r, r + R, ...``), so a run on R
    ranks augments exactly as a run on one.
    """

    def __init__(self, sampler, seed: int):
        self.sampler = sampler
        self.seed = seed

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        for b, rows in enumerate(s, start=s.start_batch):
            yield [(i, (self.seed, s.epoch, b, s.rank + j * s.num_replicas)) for j, i in enumerate(rows)]


# --------------------------------------------------------------------------------------------------- schedule


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


def _make_optimizer(name: str, model_params: list, weighting, lr: float, weight_decay: float, momentum: float,
                    lr_log_vars: float | None):
    """The stage's optimiser; the weighting's parameters (eq. 5's ``s``), if any, are a second group."""
    groups = [{"params": model_params, "lr": lr, "weight_decay": weight_decay, "base_lr": lr}]
    extra = list(weighting.parameters())
    if extra:
        lr_s = lr if lr_log_vars is None else lr_log_vars
        # no weight decay on s = log sigma^2: it would pull every s towards 0, i.e. back to the plain sum
        groups.append({"params": extra, "lr": lr_s, "weight_decay": 0.0, "base_lr": lr_s})
    cls = _OPTIMIZERS[name]()
    return cls(groups, momentum=momentum) if name == "sgd" else cls(groups)


def _torch_optim(name: str):
    import torch

    return getattr(torch.optim, name)


_OPTIMIZERS = {"adam": lambda: _torch_optim("Adam"), "adamw": lambda: _torch_optim("AdamW"),
               "sgd": lambda: _torch_optim("SGD")}


# --------------------------------------------------------------------------------------------------- small helpers


def _json_clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to ``None`` (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_clean(data), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


class _JsonlLog:
    """Append-only ``log.jsonl`` whose byte offset is stored in checkpoints; a resume cuts it back to that offset,
    so rows written after the checkpoint (and re-computed by the resumed run) never appear twice."""

    def __init__(self, path: Path, offset: int | None, enabled: bool):
        self.file = None
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "r+b" if path.exists() else "w+b")  # noqa: SIM115 - closed in close()
        self.file.truncate(offset or 0)
        self.file.seek(0, os.SEEK_END)

    @property
    def offset(self) -> int:
        return self.file.tell() if self.file is not None else 0

    def write(self, row: Mapping[str, Any]) -> None:
        if self.file is not None:
            self.file.write((json.dumps(_json_clean(row), allow_nan=False) + "\n").encode())
            self.file.flush()  # rows are few (every log_every steps); flushing lets a watcher see them at once

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _rng_state(cuda: bool) -> dict[str, Any]:
    import torch

    return {"python": random.getstate(), "numpy": _numpy_rng_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if cuda else None}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to(tensor, device):
    return None if tensor is None else tensor.to(device)


def _soften(weights: np.ndarray, mode: str):
    """``balanced`` weights as they are, ``sqrt`` their square root (a softer correction), as a float32 tensor."""
    import torch

    if mode == "sqrt":
        weights = np.sqrt(weights)
    elif mode != "balanced":
        raise ValueError(f"unknown label weighting {mode!r}: choose none, balanced or sqrt")
    return torch.tensor(weights, dtype=torch.float32)


def expression_class_weights(labels: np.ndarray, num_classes: int, mode: str):
    """Class weights for the expression cross entropy, from the labeled training frames.

    ``balanced`` is scikit-learn's ``n / (C * n_c)``; ``sqrt`` its square root (a softer correction); ``none`` gives
    ``None`` (plain eq. 1). A class absent from training gets weight 0: it has no frame to weigh.
    """
    if mode == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    return _soften(np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0), mode)


def au_positive_weights(labels: np.ndarray, mode: str):
    """``pos_weight`` of the AU BCE per AU: negatives / positives on the labeled training frames (``balanced``), its
    square root (``sqrt``), or ``None`` (plain eq. 2). An AU never present in training gets weight 1."""
    if mode == "none":
        return None
    labels = np.asarray(labels, dtype=np.float64)
    positives = labels.sum(axis=0)
    return _soften(np.where(positives > 0, (len(labels) - positives) / np.maximum(positives, 1), 1.0), mode)


def _train_label_stats(frames, au_names: Sequence[str], n_expr: int) -> dict[str, Any]:
    """Training-set constants used where a name has no face at all: mean VA, AU prevalence, majority expression."""
    from mtanet.data import label_arrays

    targets, masks = label_arrays(frames, au_names)
    out: dict[str, Any] = {"va_mean": None, "au_prevalence": None, "expr_majority": None}
    if masks["va"].any():
        out["va_mean"] = targets["va"][masks["va"]].mean(axis=0).tolist()
    if masks["au"].any():
        out["au_prevalence"] = targets["au"][masks["au"]].mean(axis=0).tolist()
    if masks["expr"].any():
        out["expr_majority"] = int(np.bincount(targets["expr"][masks["expr"]], minlength=n_expr).argmax())
    return out


# --------------------------------------------------------------------------------------------------- prediction


def _eval_loader(dataset, indices: np.ndarray, batch_size: int, num_workers: int, pin: bool):
    import torch

    batches = [indices[i: i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    # a generator of its own, so predicting never draws from (and shifts) the global torch RNG
    return torch.utils.data.DataLoader(_Batched(dataset), batch_sampler=batches, collate_fn=_collated,
                                       num_workers=num_workers, pin_memory=pin, generator=torch.Generator().manual_seed(0))


def _predict_dataset(model, dataset, indices: np.ndarray, *, batch_size: int, device, num_workers: int = 0,
                     amp: bool = False, channels_last: bool = False, progress: bool = False,
                     desc: str = "predict") -> dict[str, np.ndarray]:
    """Outputs of ``model`` on the items ``indices`` of a FrameDataset: VA values, AU and EXPR probabilities."""
    import torch
    from tqdm.auto import tqdm

    tasks = list(model.heads.keys())
    out: dict[str, list[np.ndarray]] = {t: [] for t in tasks}
    was_training = model.training
    model.eval()
    loader = _eval_loader(dataset, indices, batch_size, num_workers, device.type == "cuda")
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for images, _, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                pred = model(images)
                for t in tasks:
                    p = pred[t].float()
                    p = torch.sigmoid(p) if t == "au" else torch.softmax(p, dim=1) if t == "expr" else p
                    out[t].append(p.cpu().numpy())
    finally:
        model.train(was_training)
    widths = {t: model.heads[t].out_features for t in tasks}
    return {t: np.concatenate(v) if v else np.zeros((0, widths[t]), np.float32) for t, v in out.items()}


def _au_columns(frames) -> list[str]:
    return [c for c in frames.columns if re.fullmatch(r"AU\d+", str(c))]


def predict_frames(model, frames, root: str | os.PathLike[str], *, image_size: int = 112, batch_size: int = 64,
                   device=None, num_workers: int = 0, amp: bool | None = None, channels_last: bool | None = None,
                   packed: np.ndarray | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Batched inference over a frame table.

    Args:
        model: an :class:`mtanet.models.MTANet` (its mode is restored afterwards).
        frames: a frame table from :func:`mtanet.data.load_frames` (any subset of its rows).
        root: the dataset root the ``image`` paths are relative to.
        image_size: input side the model was trained at (a trainer checkpoint's ``train_config["image_size"]``).
        batch_size: images per forward pass.
        device: where to run; default: where the model's parameters are.
        num_workers: data loader processes decoding the jpgs.
        amp, channels_last: bfloat16 autocast and channels-last input; ``None``: on when ``device`` is CUDA.
        packed: optional uint8 cache aligned with the image rows (:func:`mtanet.data.build_packed_cache`).
        progress: show a progress bar.

    Returns:
        ``{task: array}`` for each head of the model, aligned with the rows of ``frames``: ``va`` (N, 2) in [-1, 1],
        ``au`` (N, K) sigmoid probabilities, ``expr`` (N, C) softmax probabilities; NaN on rows without an image.
    """
    import torch

    from mtanet.data import FrameDataset

    device = torch.device(device) if device is not None else next(model.parameters()).device
    cuda = device.type == "cuda"
    dataset = FrameDataset(frames, root, _au_columns(frames), image_size=image_size, packed=packed)
    pred = _predict_dataset(model, dataset, np.arange(len(dataset)), batch_size=batch_size, device=device,
                            num_workers=num_workers, amp=cuda if amp is None else amp,
                            channels_last=cuda if channels_last is None else channels_last, progress=progress)
    has_image = (frames["image"] != "").to_numpy()
    out = {}
    for t, p in pred.items():
        full = np.full((len(frames), p.shape[1]), np.nan, dtype=np.float32)
        full[has_image] = p
        out[t] = full
    return out


# --------------------------------------------------------------------------------------------------- scores


def score_predictions(frames, preds: Mapping[str, np.ndarray], *,
                      thresholds: Sequence[float] | np.ndarray | None = None,
                      require_image: bool = True) -> dict[str, Any]:
    """ABAW 2020 scores of predictions aligned with the rows of ``frames``.

    Scored rows are those with a label for the task and (``require_image=True``, as in training) an image; with
    ``require_image=False`` every labeled row is scored, which needs predictions on face-less rows too (see
    :func:`write_submission`'s fill rule).

    Returns:
        ``va`` (:func:`mtanet.metrics.va_score`), ``au`` (:func:`mtanet.metrics.au_score` at 0.5, the headline AU
        score), ``au_tuned`` (the AU score with ``thresholds``, or with per-AU thresholds tuned on these very frames
        by :func:`mtanet.metrics.tune_au_thresholds` when ``thresholds`` is None: optimistic, since tuned and scored
        on the same data), ``expr`` (:func:`mtanet.metrics.expr_score`), and ``mean``: the mean of the headline
        scores of the tasks present. A task without labeled rows is left out.
    """
    from mtanet import metrics

    keep = (frames["image"] != "").to_numpy() if require_image else np.ones(len(frames), dtype=bool)
    out: dict[str, Any] = {}
    if "va" in preds:
        y = frames[["valence", "arousal"]].to_numpy(np.float64)[keep]
        if metrics.va_valid_rows(y).any():
            out["va"] = metrics.va_score(y, preds["va"][keep])
    if "au" in preds:
        y = frames[_au_columns(frames)].to_numpy(np.int64)[keep]
        if (y >= 0).all(axis=1).any():
            p = preds["au"][keep]
            out["au"] = metrics.au_score(y, p, 0.5)
            th = metrics.tune_au_thresholds(y, p) if thresholds is None else np.asarray(thresholds, np.float64)
            out["au_tuned"] = metrics.au_score(y, p, th)
    if "expr" in preds:
        y = frames["expression"].to_numpy(np.int64)
        keep = keep & (y >= 0)  # expr_score checks every row of 2-D scores, labeled or not
        if keep.any():
            out["expr"] = metrics.expr_score(y[keep], preds["expr"][keep], num_classes=preds["expr"].shape[1])
    parts = [out[t]["score"] for t in TASKS if t in out]
    out["mean"] = float(np.mean(parts)) if parts else None
    return _json_clean(out)


def headline(scores: Mapping[str, Any]) -> dict[str, float | None]:
    """The single numbers of a :func:`score_predictions` dict: ``va``, ``au`` (at 0.5), ``au_tuned``, ``expr``,
    ``mean``."""
    out = {k: (scores[k]["score"] if isinstance(scores.get(k), Mapping) else None)
           for k in ("va", "au", "au_tuned", "expr")}
    out["mean"] = scores.get("mean")
    return out


# --------------------------------------------------------------------------------------------------- the trainer


def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train MTANet as ``config`` says and return the content of ``metrics.json``.

    ``metrics.json`` holds: ``final`` (the last epoch's validation scores, the dicts of :mod:`mtanet.metrics`:
    ``va``, ``au`` at threshold 0.5 (the headline AU score), ``au_tuned`` with per-AU thresholds tuned on
    validation, ``expr``, ``mean``), ``final_headline`` (their single numbers), ``au_thresholds`` (the tuned ones,
    also stored in every checkpoint), ``best`` (per key of :data:`BEST_KEYS`: score, epoch, step, checkpoint file),
    ``history`` (headline scores per epoch), ``config``, ``data`` (frame counts), ``versions``, ``git``,
    ``hardware``, ``wall_time_s``, ``images_per_s`` and, under DDP, ``ddp`` (world size and the largest
    difference of the final weights across ranks, which must be 0).

    Raises:
        ConfigError: an invalid config, or resuming with a config that changes what the run computes.
        DeviceUnavailableError: the requested device is not there.
        NonFiniteLossError: a NaN/inf loss (message names stage, epoch and step).
        FileExistsError: ``output_dir`` holds a run and ``resume`` is False.
        CheckpointError: ``last.pt`` exists but cannot be read.
    """
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        trainer.close()


class Trainer:
    """One training run; :func:`train` is ``Trainer(config).run()``. See the module docstring for the recipe.

    Attributes after construction: ``config``, ``device``, ``model`` (the plain :class:`mtanet.models.MTANet`, also
    under DDP), ``train_frames``/``val_frames`` (frame tables), ``au_names``, ``expr_names``.
    """

    def __init__(self, config: TrainConfig | Mapping[str, Any]):
        import torch

        self._saved_globals = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        try:
            self._init(config)
        except BaseException:
            self.close()  # leave the process (a notebook kernel, say) as it was
            raise

    def _init(self, config: TrainConfig | Mapping[str, Any]) -> None:
        import torch

        started = time.perf_counter()
        cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        self.config = cfg
        self.dist = _Dist.from_env()
        # the device first: a missing GPU must fail before minutes of data loading
        self.device = resolve_device(cfg.device, self.dist.local_rank if self.dist.world > 1 else None)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda if cfg.amp is None else cfg.amp
        self.channels_last = self.cuda if cfg.channels_last is None else cfg.channels_last
        self.threads = cfg.threads or max(1, usable_cores() // self.dist.local_world)
        self.num_workers = (min(8, max(1, usable_cores() // self.dist.local_world)) if self.cuda else 0) \
            if cfg.num_workers is None else cfg.num_workers
        torch.set_num_threads(self.threads)
        deterministic = (not self.cuda) if cfg.deterministic is None else cfg.deterministic
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._init_process_group()

        self.out = Path(cfg.output_dir)
        ckpt = self._prepare_output()
        self._setup_data()
        self._setup_model()
        self.total_epochs = cfg.stage1_epochs + cfg.stage2_epochs
        # position in the run; the checkpoint overrides these
        self.epoch, self.batches_done, self.step, self.opt_stage = 0, 0, 0, None
        self.optimizer = None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self.last_val: dict[str, Any] | None = None
        self.au_thresholds: list[float] | None = None
        # data_wait: the part of "train" spent waiting for the loader's next batch (on a GPU, time it idles for data)
        self.timing = {"setup": 0.0, "train": 0.0, "data_wait": 0.0, "validation": 0.0, "total": 0.0, "sessions": 0}
        self.images_trained = 0
        n_acc = len(cfg.tasks) + 1
        self.acc_window = torch.zeros(2, n_acc, dtype=torch.float64, device=self.device)  # sums, counts
        self.acc_epoch = torch.zeros(2, n_acc, dtype=torch.float64, device=self.device)
        # images/s of a log window counts training time only (validation falls between epochs)
        self.window_started, self.window_time, self.window_steps = time.perf_counter(), 0.0, 0
        log_offset = 0
        # Dropout streams differ per rank; rank 0's equals a one-process run's.
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        if ckpt is not None:
            log_offset = self._restore(ckpt)
        self.log = _JsonlLog(self.out / LOG_FILE, log_offset, self.dist.main)
        self._setup_loader()
        self.timing["setup"] += time.perf_counter() - started
        self.timing["sessions"] += 1
        self._session_started = started

    # ----------------------------------------------------------------------------------------------- setup

    def _init_process_group(self) -> None:
        import datetime

        import torch.distributed as dist

        self._owns_group = False
        if self.dist.world > 1 and not dist.is_initialized():
            # gloo on CPU, NCCL on GPUs; a long timeout so a slow rank-0 epoch end never trips the others
            dist.init_process_group("nccl" if self.cuda else "gloo", timeout=datetime.timedelta(minutes=60))
            self._owns_group = True

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.dist.world > 1:
            dist.barrier()

    def _prepare_output(self) -> dict[str, Any] | None:
        """Refuse to overwrite a run unless resuming; drop temporary files of interrupted writes; read last.pt."""
        import torch

        cfg, out = self.config, self.out
        path = out / CHECKPOINT
        if not cfg.resume and any((out / f).exists() for f in (CHECKPOINT, LOG_FILE, METRICS_FILE)):
            raise FileExistsError(f"{out} already holds a training run; pass resume=True (--resume) to continue it, "
                                  "or choose another output folder")
        self._barrier()  # every rank has looked before rank 0 writes anything
        if self.dist.main:
            out.mkdir(parents=True, exist_ok=True)
            # Leftovers of writes killed half-way. They are never read: checkpoints are only ever read under their
            # final name, which os.replace gives a file only once it is complete.
            for tmp in list(out.glob(".*.tmp")):
                tmp.unlink(missing_ok=True)
        self._barrier()
        if not (cfg.resume and path.exists()):
            if self.dist.main:
                _write_json_atomic(out / CONFIG_FILE, cfg.to_dict())
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to read means "do not use it"
            raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err}); it was not loaded. Move it "
                                  "away to start the run over") from err
        if not isinstance(ckpt, dict) or "position" not in ckpt or "train_config" not in ckpt:
            raise CheckpointError(f"{path} is not a resume checkpoint of mtanet.train")
        old = ckpt["train_config"]
        changed = sorted(k for k, v in cfg.to_dict().items()
                         if k not in TrainConfig.RESUMABLE_CHANGES and old.get(k) != v)
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise ConfigError(f"cannot resume {path} with a different config ({diff}); resume with the run's own "
                              f"config ({out / CONFIG_FILE}) or start a new output folder")
        return ckpt

    def _setup_data(self) -> None:
        from mtanet.data import FrameDataset, TaskBalancedBatchSampler, build_packed_cache, read_split
        from mtanet.synth import resolve_data_root

        cfg = self.config
        if self.dist.main:  # the synthetic default is written once, by one process
            self.root = resolve_data_root(cfg.data_root, cfg.synth_size)
        self._barrier()
        if not self.dist.main:
            self.root = resolve_data_root(cfg.data_root, cfg.synth_size)
        train_table = read_split(self.root, "train", allow_cross_task_leak=cfg.allow_cross_task_leak)
        val_table = read_split(self.root, "val")
        self.edition = train_table.edition
        self.au_names, self.expr_names = tuple(self.edition.au_names), tuple(self.edition.expr_names)
        self.num_outputs = {t: self.edition.num_outputs[t] for t in cfg.tasks}
        self.train_frames, self.val_frames = train_table.frames, val_table.frames
        self.train_stats = _train_label_stats(self.train_frames, self.au_names, len(self.expr_names))

        self.augment = FaceAugment(cfg.image_size, cfg.aug_flip, cfg.aug_crop_scale, cfg.aug_brightness,
                                   cfg.aug_contrast) if cfg.augment else None
        self.train_set = FrameDataset(self.train_frames, self.root, self.au_names, image_size=cfg.image_size,
                                      transform=self.augment)
        self.val_set = FrameDataset(self.val_frames, self.root, self.au_names, image_size=cfg.image_size)
        # loss weights live on the device once, not copied there every step
        self.expr_weight = _to(expression_class_weights(self.train_set.targets["expr"][self.train_set.masks["expr"]],
                                                        len(self.expr_names), cfg.expr_class_weight), self.device)
        self.au_pos_weight = _to(au_positive_weights(self.train_set.targets["au"][self.train_set.masks["au"]],
                                                     cfg.au_pos_weight), self.device)
        if cfg.cache_dir:
            for name, ds in (("train", self.train_set), ("val", self.val_set)):
                # the name pins the exact list of images, so a cache of another table is never reused
                digest = hashlib.sha1("\n".join(ds.paths).encode()).hexdigest()[:16]
                path = Path(cfg.cache_dir) / f"{name}-{digest}.npy"
                if self.dist.main:
                    build_packed_cache(ds, path)
                self._barrier()
                ds.packed = build_packed_cache(ds, path)  # opens the finished file

        self.sampler = TaskBalancedBatchSampler(
            {t: self.train_set.masks[t] for t in cfg.tasks}, cfg.batch_size, tasks=cfg.tasks,
            num_batches=cfg.steps_per_epoch, seed=cfg.seed, num_replicas=self.dist.world, rank=self.dist.rank)
        self.steps_per_epoch = self.sampler.num_batches

    def _setup_model(self) -> None:
        import torch

        from mtanet.losses import make_weighting
        from mtanet.models import MTANet, load_vggface2_senet50

        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
        model = MTANet(cfg.backbone, num_outputs=self.num_outputs, pooling=cfg.pooling, feature_dim=cfg.feature_dim,
                       dropout=cfg.dropout, pretrained=cfg.pretrained)
        if cfg.vggface2_weights:
            load_vggface2_senet50(model, cfg.vggface2_weights)
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.model = model
        # one weighting object per kind, shared by the stages that use it (eq. 5's s carries over)
        kinds = {cfg.stage1_weighting, cfg.stage2_weighting}
        self.weightings = {k: make_weighting(k, cfg.tasks, **({"init_log_var": cfg.init_log_var}
                                                              if k == "uncertainty" else {})).to(self.device)
                           for k in sorted(kinds)}
        net = model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(model, device_ids=[self.device.index] if self.cuda else None)
        self.net = torch.compile(net) if cfg.compile else net

    def _setup_loader(self) -> None:
        import torch

        # An explicit generator: otherwise each new loader iterator draws its worker seed from the global torch RNG,
        # which would shift the dropout stream whenever a resumed run starts mid-epoch.
        self.loader = torch.utils.data.DataLoader(
            _KeyedFrames(self.train_set, self.augment), batch_sampler=_KeyedBatches(self.sampler, self.config.seed),
            collate_fn=_collated, num_workers=self.num_workers, pin_memory=self.cuda,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.config.seed))

    def stage_of(self, epoch: int) -> int:
        """1 or 2: the stage a (0-based) epoch belongs to."""
        return 1 if epoch < self.config.stage1_epochs else 2

    def _weighting(self, stage: int):
        return self.weightings[self.config.stage1_weighting if stage == 1 else self.config.stage2_weighting]

    def _start_stage(self, stage: int, state: Mapping[str, Any] | None = None) -> None:
        cfg = self.config
        name = cfg.stage1_optimizer if stage == 1 else cfg.stage2_optimizer
        lr = cfg.stage1_lr if stage == 1 else cfg.stage2_lr
        wd = cfg.stage1_weight_decay if stage == 1 else cfg.stage2_weight_decay
        self.optimizer = _make_optimizer(name, list(self.model.parameters()), self._weighting(stage), lr, wd,
                                         cfg.momentum, cfg.lr_log_vars)
        if state is not None:
            self.optimizer.load_state_dict(state)
        self.opt_stage = stage

    # ----------------------------------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train to the end (or from the checkpoint to the end) and return ``metrics.json``'s content."""
        for epoch in range(self.epoch, self.total_epochs):
            stage = self.stage_of(epoch)
            if self.opt_stage != stage:
                self._start_stage(stage)
            self._train_epoch(epoch, stage)
            self._end_epoch(epoch, stage)
        return self._finish()

    def _train_epoch(self, epoch: int, stage: int) -> None:
        import torch
        from tqdm.auto import tqdm

        from mtanet.losses import task_losses

        cfg, tasks = self.config, self.config.tasks
        weighting = self._weighting(stage)
        stage_start = (0 if stage == 1 else cfg.stage1_epochs) * self.steps_per_epoch
        stage_steps = (cfg.stage1_epochs if stage == 1 else cfg.stage2_epochs) * self.steps_per_epoch
        self.sampler.load_state_dict({"epoch": epoch, "seed": cfg.seed}, batches_done=self.batches_done)
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.batches_done, desc=f"stage {stage} epoch {epoch + 1}",
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True)
        started = time.perf_counter()
        self.window_started = started
        batches = iter(self.loader)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            self.timing["data_wait"] += time.perf_counter() - waited
            if batch is None:
                break
            images, targets, masks = batch
            step = self.step + 1
            # which tasks have labels in this rank's slice, read on the CPU (no device sync)
            has_labels = [bool(masks[t].any()) for t in tasks]
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = {t: targets[t].to(self.device, non_blocking=True) for t in tasks}
            masks = {t: masks[t].to(self.device, non_blocking=True) for t in tasks}
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                pred = self.net(images)
            # losses in float32: a CCC of bf16 moments is too coarse
            losses = task_losses({t: pred[t].float() for t in tasks}, targets, masks, expr_weight=self.expr_weight,
                                 au_pos_weight=self.au_pos_weight)
            labeled = {t: losses[t] for t, has in zip(tasks, has_labels) if has}
            # Tasks without labels in this slice stay out of the weighting (eq. 5's 0.5*s would still pull on them)
            # but their zero losses keep every head in the graph, as DDP needs.
            total = weighting(labeled) if labeled else 0.0
            total = total + sum(losses[t] for t in tasks if t not in labeled)
            if cfg.inject_nan_at_step == step:
                total = total * float("nan")
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self._check_finite(total, losses, stage, epoch, step)  # one sync per step, before anything is updated
            self._average_weighting_grads(weighting)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                               cfg.grad_clip)
            factor = lr_factor(cfg.lr_schedule, step - 1 - stage_start, stage_steps, cfg.warmup_steps,
                               cfg.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            self.optimizer.step()

            row = torch.stack([losses[t].detach() for t in tasks] + [total.detach()]).double()
            present = torch.tensor(has_labels + [True], dtype=torch.float64).to(self.device, non_blocking=True)
            for acc in (self.acc_window, self.acc_epoch):
                acc[0] += row * present
                acc[1] += present
            self.step, self.batches_done, self.window_steps = step, self.batches_done + 1, self.window_steps + 1
            self.images_trained += cfg.batch_size
            bar.update(1)
            if step % cfg.log_every == 0:
                self._log_step(stage, epoch, weighting, bar)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and self.batches_done < self.steps_per_epoch:
                self._save_checkpoint()  # the epoch's last step is saved by the epoch end, after validation
        bar.close()
        self.window_time += time.perf_counter() - self.window_started
        self.timing["train"] += time.perf_counter() - started

    def _check_finite(self, total, losses, stage: int, epoch: int, step: int) -> None:
        import torch
        import torch.distributed as dist

        bad = (~torch.isfinite(total.detach())).float()
        if self.dist.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item():
            parts = ", ".join(f"{t}={float(v.detach()):.4g}" for t, v in losses.items())
            raise NonFiniteLossError(
                f"non-finite loss {float(total.detach())} at stage {stage}, epoch {epoch + 1}, step {step} (task "
                f"losses: {parts}); stopped before this step's update. The last checkpoint "
                f"({self.out / CHECKPOINT}) holds an earlier step; lower the learning rate or check the data")

    def _average_weighting_grads(self, weighting) -> None:
        """DDP averages the model's gradients; the weighting's ``s`` lives outside the DDP module, so average it."""
        import torch.distributed as dist

        if self.dist.world > 1:
            for p in weighting.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.dist.world

    def _reduced(self, acc):
        import torch.distributed as dist

        acc = acc.clone()
        if self.dist.world > 1:
            dist.all_reduce(acc)
        sums, counts = acc.cpu().tolist()
        names = [f"loss_{t}" for t in self.config.tasks] + ["loss_total"]
        return {n: (s / c if c else None) for n, s, c in zip(names, sums, counts)}

    def _weights_row(self, weighting) -> dict[str, Any]:
        row = {f"w_{t}": w for t, w in weighting.weights().items()}
        if hasattr(weighting, "sigmas"):
            row.update({f"sigma_{t}": s for t, s in weighting.sigmas().items()})
        return row

    def _log_step(self, stage: int, epoch: int, weighting, bar) -> None:
        losses = self._reduced(self.acc_window)
        self.acc_window.zero_()
        seconds = self.window_time + time.perf_counter() - self.window_started
        row = {"kind": "step", "stage": stage, "epoch": epoch + 1, "step": self.step, **losses,
               "lr": self.optimizer.param_groups[0]["lr"], **self._weights_row(weighting),
               "images_per_s": self.window_steps * self.config.batch_size / max(seconds, 1e-9)}
        self.log.write(row)
        bar.set_postfix(loss=f"{losses['loss_total']:.3f}" if losses["loss_total"] is not None else "-")
        self.window_started, self.window_time, self.window_steps = time.perf_counter(), 0.0, 0

    def _end_epoch(self, epoch: int, stage: int) -> None:
        import torch.distributed as dist

        if self.dist.world > 1:
            # BatchNorm statistics are per rank under DDP; take rank 0's everywhere, so validation, checkpoints and
            # every rank's model agree
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        train_losses = self._reduced(self.acc_epoch)
        self.acc_epoch.zero_()
        started = time.perf_counter()
        scores = self._validate()
        val_seconds = time.perf_counter() - started
        self.timing["validation"] += val_seconds
        self.epoch, self.batches_done = epoch + 1, 0
        if self.dist.main:
            self.last_val = scores
            self.au_thresholds = scores["au_tuned"]["thresholds"] if "au_tuned" in scores else None
            head = headline(scores)
            self.history.append({"epoch": epoch + 1, "stage": stage, "step": self.step, **head})
            self.log.write({"kind": "epoch", "stage": stage, "epoch": epoch + 1, "step": self.step, **train_losses,
                            "lr": self.optimizer.param_groups[0]["lr"], **self._weights_row(self._weighting(stage)),
                            **{f"val_{k}": v for k, v in head.items()}, "val": scores,
                            "val_seconds": val_seconds})
            for key in BEST_KEYS:
                value = head.get(key)
                if value is not None and (key not in self.best or value > self.best[key]["score"]):
                    self.best[key] = {"score": value, "epoch": epoch + 1, "step": self.step,
                                      "checkpoint": f"best_{key}.pt"}
                    self._save_model(self.out / f"best_{key}.pt", {"scores": scores, "epoch": epoch + 1,
                                                                    "step": self.step})
        self._save_checkpoint()

    def _validate(self) -> dict[str, Any]:
        """Predict the validation images (split across ranks) and score them on rank 0."""
        import torch.distributed as dist

        cfg = self.config
        indices = np.arange(len(self.val_set))[self.dist.rank:: self.dist.world]
        batch = cfg.eval_batch_size or 2 * cfg.batch_size // self.dist.world
        pred = _predict_dataset(self.model, self.val_set, indices, batch_size=batch, device=self.device,
                                num_workers=self.num_workers, amp=self.amp, channels_last=self.channels_last,
                                progress=cfg.progress and self.dist.main, desc="validation")
        if self.dist.world > 1:
            parts: list[Any] = [None] * self.dist.world
            dist.all_gather_object(parts, (indices, pred))
            order = np.argsort(np.concatenate([p[0] for p in parts]))
            pred = {t: np.concatenate([p[1][t] for p in parts])[order] for t in pred}
        if not self.dist.main:
            return {}
        return score_predictions(self.val_set.frames, pred)

    # ----------------------------------------------------------------------------------------------- checkpoints

    def _common_extra(self) -> dict[str, Any]:
        return {"train_config": self.config.to_dict(), "au_thresholds": self.au_thresholds,
                "au_names": list(self.au_names), "expr_names": list(self.expr_names), "edition": self.edition.name,
                "train_label_stats": self.train_stats}

    def _save_model(self, path: Path, extra: Mapping[str, Any]) -> None:
        from mtanet.models import save_checkpoint

        save_checkpoint(self.model, path, {**self._common_extra(), **extra})

    def _save_checkpoint(self) -> None:
        """Everything a resumed run needs, written atomically by rank 0 (every rank contributes its RNG state)."""
        import torch.distributed as dist

        rng = [_rng_state(self.cuda)]
        if self.dist.world > 1:
            rng = [None] * self.dist.world
            dist.all_gather_object(rng, _rng_state(self.cuda))
        if not self.dist.main:
            return
        now = time.perf_counter()
        timing = {**self.timing, "total": self.timing["total"] + now - self._session_started}
        self._save_model(self.out / CHECKPOINT, {
            "position": {"epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
                         "optimizer_stage": self.opt_stage},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"name": self.config.lr_schedule, "step": self.step},
            "weightings": {k: w.state_dict() for k, w in self.weightings.items()},
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch, "batches_done": self.batches_done},
            "rng": rng,
            "accumulators": {"window": self.acc_window.cpu(), "epoch": self.acc_epoch.cpu(),
                             "window_steps": self.window_steps},
            "log_offset": self.log.offset,
            "history": self.history, "best": self.best, "last_val": self.last_val,
            "timing": timing, "images_trained": self.images_trained,
        })

    def _restore(self, ckpt: Mapping[str, Any]) -> int:
        pos = ckpt["position"]
        self.model.load_state_dict(ckpt["state_dict"])
        for k, state in ckpt["weightings"].items():
            self.weightings[k].load_state_dict(state)
        self.epoch, self.batches_done, self.step = pos["epoch"], pos["batches_done"], pos["step"]
        if pos["optimizer_stage"] is not None and self.epoch < self.total_epochs \
                and pos["optimizer_stage"] == self.stage_of(self.epoch):
            self._start_stage(pos["optimizer_stage"], ckpt["optimizer"])
        self.acc_window.copy_(ckpt["accumulators"]["window"])
        self.acc_epoch.copy_(ckpt["accumulators"]["epoch"])
        self.window_steps = ckpt["accumulators"]["window_steps"]
        self.history, self.best, self.last_val = list(ckpt["history"]), dict(ckpt["best"]), ckpt["last_val"]
        self.au_thresholds = ckpt["au_thresholds"]
        self.timing = {"data_wait": 0.0, **ckpt["timing"]}  # checkpoints written before data_wait was measured
        self.images_trained = ckpt["images_trained"]
        rng = ckpt["rng"]
        if len(rng) != self.dist.world:
            raise CheckpointError(f"{self.out / CHECKPOINT} was written by {len(rng)} rank(s), this run has "
                                  f"{self.dist.world}; resume with the same number of processes")
        _set_rng_state(rng[self.dist.rank])
        return int(ckpt["log_offset"])

    # ----------------------------------------------------------------------------------------------- the end

    def _finish(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist

        ddp = None
        if self.dist.world > 1:
            # every rank must hold the same weights; measure it instead of assuming it
            flat = torch.cat([t.detach().double().flatten() for t in self.model.state_dict().values()])
            hi, lo = flat.clone(), flat.clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            ddp = {"world_size": self.dist.world, "backend": dist.get_backend(),
                   "max_abs_weight_diff_across_ranks": float((hi - lo).abs().max())}
        metrics = None
        if self.dist.main:
            timing = {**self.timing, "total": self.timing["total"] + time.perf_counter() - self._session_started}
            cfg = self.config
            metrics = {
                "final": self.last_val,
                "final_headline": headline(self.last_val or {}),
                "final_epoch": self.epoch,
                "au_thresholds": self.au_thresholds,
                "au_headline": "'au' binarises at 0.5 and is the headline; 'au_tuned' uses per-AU thresholds tuned on "
                               "the same validation frames (optimistic), saved with every checkpoint",
                "best": self.best,
                "history": self.history,
                "steps": self.step,
                "steps_per_epoch": self.steps_per_epoch,
                "images_trained": self.images_trained,
                "images_per_s": self.images_trained / timing["train"] if timing["train"] else None,
                # share of the training loop spent waiting for data (on a GPU: the share it idles for input)
                "data_wait_share": timing["data_wait"] / timing["train"] if timing["train"] else None,
                "config": cfg.to_dict(),
                "data": {
                    "root": str(self.root), "edition": self.edition.name,
                    "train_images": len(self.train_set), "val_images": len(self.val_set),
                    "train_labeled": {t: int(self.train_set.masks[t].sum()) for t in cfg.tasks},
                    "val_labeled": {t: int(self.val_set.masks[t].sum()) for t in cfg.tasks},
                },
                "versions": _versions(),
                "git": _git_info(),
                "hardware": {
                    "device": str(self.device),
                    "device_name": torch.cuda.get_device_name(self.device) if self.cuda else _cpu_model(),
                    "cpu": _cpu_model(), "cpu_cores": usable_cores(), "torch_threads": self.threads,
                    "num_workers": self.num_workers, "world_size": self.dist.world, "amp_bf16": self.amp,
                    "channels_last": self.channels_last, "compile": cfg.compile,
                },
                "wall_time_s": timing,
                "ddp": ddp,
            }
            metrics = _json_clean(metrics)
            _write_json_atomic(self.out / METRICS_FILE, metrics)
        if self.dist.world > 1:
            box = [metrics]
            dist.broadcast_object_list(box, 0)
            metrics = box[0]
        return metrics

    def close(self) -> None:
        """Close the log, leave the process group, restore torch's global settings."""
        import torch
        import torch.distributed as dist

        log = getattr(self, "log", None)
        if log is not None:
            log.close()
        if dist.is_available() and dist.is_initialized() and getattr(self, "_owns_group", False):
            dist.destroy_process_group()
        threads, deterministic = self._saved_globals
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


# --------------------------------------------------------------------------------------------------- submission


def _fill(values: np.ndarray, has: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Fill rows without a prediction: from the previous row that has one, leading rows from the first one; all
    rows from ``fallback`` when no row has one."""
    if not has.any():
        return np.tile(fallback, (len(values), 1)).astype(np.float32)
    idx = np.where(has, np.arange(len(has)), -1)
    idx = np.maximum.accumulate(idx)  # last row with a prediction at or before each row
    idx[idx < 0] = int(np.argmax(has))  # rows before the first face take the first face's
    return values[idx]


def write_submission(frames, preds: Mapping[str, np.ndarray], out_dir: str | os.PathLike[str], root: str |
                     os.PathLike[str], *, split: str = "val", edition=None,
                     au_thresholds: Sequence[float] | float = 0.5,
                     fallback: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write per-frame predictions in the ABAW 2020 submission format.

    One file per name per task, ``<out_dir>/<task folder>/<name>.txt``, where the task folders are the edition's
    annotation folders (ABAW 2020: ``VA_Set``, ``AU_Set``, ``EXPR_Set``). Each file has the header of the
    annotation files (``valence,arousal``; the edition's AU names, ``AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25`` in 2020;
    ``Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise``) and one line per frame 1..N, where N is the number of
    lines of that name's annotation file for the task: VA as two floats in [-1, 1] (6 decimals), AU as 0/1 per AU
    (probability >= the AU's threshold), EXPR as the index of the most probable class.

    The names written for a task are those whose annotation file of that task lies in ``split``.

    Fill rule for frames without a face (no jpg, so no prediction): the prediction of the previous frame that has a
    face (forward fill); frames before the first face take the first face's (backward fill). A name without any
    face gets the training-set constants of ``fallback``: mean valence-arousal, the AU prevalences thresholded like
    the predictions, the majority expression.

    Args:
        frames: the frame table of ``split`` (all rows of the names).
        preds: :func:`predict_frames` output aligned with ``frames`` (NaN on rows without an image).
        out_dir: folder to write.
        root: the dataset root (annotation files give N).
        split: the split the names come from.
        edition: an :class:`mtanet.tasks.Edition`; default: detected from ``root``.
        au_thresholds: one threshold or one per AU.
        fallback: ``{"va_mean", "au_prevalence", "expr_majority"}`` (a trainer checkpoint's ``train_label_stats``).

    Returns:
        ``{task: {"folder", "files", "lines", "filled", "names_without_face"}}`` and ``filled_preds``:
        ``{task: array}`` aligned with ``frames`` with every row filled (rows past N stay NaN).
    """
    from mtanet.data import detect_edition, read_annotation_file

    ed = edition or detect_edition(root)
    out_dir, root = Path(out_dir), Path(root)
    fallback = dict(fallback or {})
    summary: dict[str, Any] = {}
    filled_preds = {t: np.full_like(p, np.nan, dtype=np.float32) for t, p in preds.items()}
    for task, p in preds.items():
        folder = out_dir / ed.task_dirs[task]
        folder.mkdir(parents=True, exist_ok=True)
        names = sorted(frames.loc[frames[f"split_{task}"] == split, "name"].unique())
        rows_of = frames.groupby("name", sort=False).indices
        width = p.shape[1]
        if task == "va":
            header, fb = "valence,arousal", np.asarray(fallback.get("va_mean") or [0.0, 0.0], np.float32)
        elif task == "au":
            header, fb = ",".join(ed.au_names), np.asarray(fallback.get("au_prevalence") or [0.0] * width,
                                                           np.float32)
            th = np.broadcast_to(np.asarray(au_thresholds, np.float64), (width,))
        else:
            header = ",".join(ed.expr_names)
            fb = np.zeros(width, np.float32)
            fb[int(fallback.get("expr_majority") or 0)] = 1.0
        info = {"folder": ed.task_dirs[task], "files": 0, "lines": 0, "filled": 0, "names_without_face": []}
        for name in names:
            path = root / "annotations" / ed.task_dirs[task] / ed.split_dirs[split] / f"{name}.txt"
            n = len(read_annotation_file(path, task)[1])
            rows = np.sort(rows_of[name])
            f = frames["frame"].to_numpy()[rows]
            inside = f <= n
            rows, f = rows[inside], f[inside]
            values = np.full((n, width), np.nan, np.float32)
            values[f - 1] = p[rows]
            has = np.isfinite(values).all(axis=1)
            full = _fill(values, has, fb)
            filled_preds[task][rows] = full[f - 1]
            if task == "va":
                lines = [f"{v:.6f},{a:.6f}" for v, a in np.clip(full, -1.0, 1.0)]
            elif task == "au":
                lines = [",".join(map(str, r)) for r in (full >= th).astype(np.int64)]
            else:
                lines = [str(int(c)) for c in full.argmax(axis=1)]
            (folder / f"{name}.txt").write_text(header + "\n" + "\n".join(lines) + "\n")
            info["files"] += 1
            info["lines"] += n
            info["filled"] += int((~has).sum())
            if not has.any():
                info["names_without_face"].append(name)
        summary[task] = info
    summary["filled_preds"] = filled_preds
    return summary


def evaluate(checkpoint: str | os.PathLike[str], *, data_root: str | os.PathLike[str] | None = None,
             split: str = "val", output_dir: str | os.PathLike[str] = "eval", batch_size: int = 64,
             device: str = "auto", num_workers: int = 0, threads: int | None = None,
             au_thresholds: str = "saved", image_size: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Score a checkpoint on a split and write its predictions in the ABAW 2020 submission format.

    Writes ``<output_dir>/scores.json`` and the files of :func:`write_submission` (``VA_Set/``, ``AU_Set/``,
    ``EXPR_Set/`` for ABAW 2020). Scores (:func:`score_predictions`) come twice: ``scores`` over the labeled frames
    that have an image (as during training; ``au`` at 0.5, ``au_tuned`` with the AU thresholds used for the files),
    and ``scores_all_frames`` over every labeled frame with the filled predictions of the files, which is what the
    challenge's scorer sees.

    Args:
        checkpoint: a trainer checkpoint (``best_*.pt``, ``last.pt``) or any :func:`mtanet.models.save_checkpoint`
            file.
        data_root: the Aff-Wild2 root; default: the training run's (``train_config["data_root"]``), else the
            synthetic default.
        split: ``"train"`` or ``"val"``.
        au_thresholds: ``"saved"`` (the checkpoint's tuned thresholds; 0.5 when it has none) or ``"0.5"``, the
            thresholds that binarise AU predictions in the files and in ``au_tuned``.
        image_size: input side; default: the training run's (112 when unknown).
        threads: torch CPU threads while evaluating (default: all cores); restored afterwards.
    """
    import torch

    dev = resolve_device(device)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads or usable_cores())
    try:
        return _evaluate(checkpoint, dev, data_root, split, output_dir, batch_size, num_workers, au_thresholds,
                         image_size, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _evaluate(checkpoint, dev, data_root, split, output_dir, batch_size, num_workers, au_thresholds, image_size,
              progress) -> dict[str, Any]:
    import torch

    from mtanet.data import read_split
    from mtanet.models import load_model
    from mtanet.synth import resolve_data_root

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = load_model(checkpoint, map_location=dev)
    train_cfg = ckpt.get("train_config") or {}
    root = resolve_data_root(data_root or train_cfg.get("data_root") or None, train_cfg.get("synth_size", "smoke"))
    table = read_split(root, split)
    frames = table.frames
    size = image_size or train_cfg.get("image_size", 112)
    heads = model.config["num_outputs"]
    for t, n in heads.items():
        if n != table.edition.num_outputs[t]:
            raise ValueError(f"the checkpoint's {t} head has {n} outputs, the data's edition "
                             f"{table.edition.name} {table.edition.num_outputs[t]}")
    if au_thresholds == "saved" and ckpt.get("au_thresholds") is not None:
        th = np.asarray(ckpt["au_thresholds"], np.float64)
    elif au_thresholds in ("saved", "0.5"):
        th = np.full(len(table.edition.au_names), 0.5)
    else:
        raise ValueError(f"au_thresholds must be 'saved' or '0.5', got {au_thresholds!r}")
    fallback = ckpt.get("train_label_stats")
    if fallback is None:
        fallback = _train_label_stats(read_split(root, "train").frames, table.edition.au_names,
                                      len(table.edition.expr_names))
    preds = predict_frames(model, frames, root, image_size=size, batch_size=batch_size, device=dev,
                           num_workers=num_workers, progress=progress)
    out = Path(output_dir)
    sub = write_submission(frames, preds, out, root, split=split, edition=table.edition, au_thresholds=th,
                           fallback=fallback)
    filled = sub.pop("filled_preds")
    scores = score_predictions(frames, preds, thresholds=th if "au" in preds else None)
    if "au" in filled:
        filled["au"] = (filled["au"] >= th).astype(np.float32)  # the files hold decisions, not probabilities
    result = {
        "checkpoint": str(checkpoint), "data_root": str(root), "split": split, "image_size": size,
        "au_thresholds": th.tolist(),
        "scores": scores, "headline": headline(scores),
        "scores_all_frames": score_predictions(frames, filled, thresholds=th if "au" in filled else None,
                                               require_image=False),
        "submission": sub,
    }
    result["headline_all_frames"] = headline(result["scores_all_frames"])
    result = _json_clean(result)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / "scores.json", result)
    return result


# --------------------------------------------------------------------------------------------------- command line


def _field_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_cli(subparsers) -> None:
    """Register ``mtanet train`` and ``mtanet evaluate``.

    ``mtanet train [--config cfg.yaml] [--<field> VALUE ...] [--set key=value ...] [--resume] -o OUTPUT_DIR``:
    every :class:`TrainConfig` field is a flag (``--stage1-lr 1e-3``; booleans: ``--augment`` or ``--augment
    false``); precedence: defaults < ``--config`` < flags < ``--set``. With ``--resume`` and an existing run, the
    run's ``config.json`` is the base instead of the defaults. Under ``torchrun --nproc_per_node N`` the same command
    trains on N processes.

    ``mtanet evaluate CHECKPOINT [--data-root PATH] [--split val] -o OUT``: see :func:`evaluate`.
    """
    import argparse

    p = subparsers.add_parser("train", help="train MTANet (the paper's two-stage recipe)",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="set any TrainConfig field (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    fields = p.add_argument_group("TrainConfig fields")
    for f in dataclasses.fields(TrainConfig):
        flags = [_field_flag(f.name)] + (["-o"] if f.name == "output_dir" else [])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kwargs: dict[str, Any] = {"dest": f"field_{f.name}", "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata.get('help', '')} (default: {default})"}
        if f.type in ("bool", bool):
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = "VALUE"
        fields.add_argument(*flags, **kwargs)
    p.set_defaults(func=_train_cli)

    p = subparsers.add_parser("evaluate", help="score a checkpoint and write ABAW 2020 submission files")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-root", default=None, help="Aff-Wild2 root (default: the training run's)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("-o", "--output-dir", type=Path, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="default: the training run's")
    p.add_argument("--au-thresholds", default="saved", choices=["saved", "0.5"],
                   help="AU decision thresholds: the checkpoint's tuned ones, or 0.5")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_evaluate_cli)


def _config_from_args(args) -> TrainConfig:
    values: dict[str, Any] = {}
    given = {k[len("field_"):]: v for k, v in vars(args).items() if k.startswith("field_")}
    resume = str(given.get("resume", "false")).lower() in _TRUE
    out = given.get("output_dir")
    if resume and out and (Path(out) / CONFIG_FILE).exists():
        values.update(json.loads((Path(out) / CONFIG_FILE).read_text()))
    if args.config:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{args.config}: a TrainConfig file must hold a mapping of keys to values")
        values.update(data)
    values.update(given)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip()] = value
    return TrainConfig.from_dict(values)


def _train_cli(args) -> int:
    try:
        cfg = _config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        metrics = train(cfg)
    except (ConfigError, DeviceUnavailableError, NonFiniteLossError, CheckpointError) as err:
        print(f"mtanet: error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"final": metrics["final_headline"], "best": metrics["best"],
                          "output_dir": cfg.output_dir}, indent=2))
    return 0


def _evaluate_cli(args) -> int:
    try:
        result = evaluate(args.checkpoint, data_root=args.data_root, split=args.split, output_dir=args.output_dir,
                          batch_size=args.batch_size, device=args.device, num_workers=args.num_workers,
                          threads=args.threads, au_thresholds=args.au_thresholds, image_size=args.image_size,
                          progress=not args.no_progress)
    except (ConfigError, DeviceUnavailableError, CheckpointError, ValueError) as err:
        print(f"mtanet: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"scores": result["headline"], "scores_all_frames": result["headline_all_frames"],
                      "written": str(args.output_dir)}, indent=2))
    return 0
