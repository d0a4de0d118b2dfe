"""What a run keeps between sessions: RNG states, the append-only log, and the resume checkpoint's checks."""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtanet.errors import CheckpointError, ConfigError
from mtanet.models import read_checkpoint
from mtanet.runtime import json_clean
from mtanet.train.config import TrainConfig, flatten

__all__ = ["CHECKPOINT", "LOG_FILE", "METRICS_FILE", "CONFIG_FILE", "BEST_KEYS", "JsonlLog", "rng_state",
           "set_rng_state", "read_resume_checkpoint"]

CHECKPOINT = "last.pt"
LOG_FILE = "log.jsonl"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.json"
#: The four "best" checkpoints: ``best_<key>.pt`` keeps the model of the epoch with the highest validation ``key``.
BEST_KEYS: tuple[str, ...] = ("va", "au", "expr", "mean")


class JsonlLog:
    """Append-only ``log.jsonl`` whose byte offset is stored in checkpoints; a resume cuts it back to that offset,
    so rows written after the checkpoint (and re-computed by the resumed run) never appear twice. A row that cannot
    be written whole (a full disk) is cut off again: the file only ever holds whole rows."""

    def __init__(self, path: Path, offset: int | None, enabled: bool):
        self.file = None
        self.path = path
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        # unbuffered: each row goes to the file in write(), and a failed one leaves no bytes behind in a buffer
        self.file = open(path, "r+b" if path.exists() else "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        self.file.truncate(offset or 0)
        self.file.seek(0, os.SEEK_END)

    @property
    def offset(self) -> int:
        return self.file.tell() if self.file is not None else 0

    def write(self, row: Mapping[str, Any]) -> None:
        if self.file is None:
            return
        data = memoryview((json.dumps(json_clean(row), allow_nan=False) + "\n").encode())
        start = self.file.tell()
        try:
            while data:  # rows are few (every log_every steps); each is in the file when write() returns
                data = data[self.file.write(data):]
        except OSError as err:
            with contextlib.suppress(OSError):
                self.file.truncate(start)
                self.file.seek(start)
            if err.errno is None or err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(self.path)) from err

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def rng_state(cuda: bool) -> dict[str, Any]:
    """Python's, numpy's global, torch's (and CUDA's) RNG states, as plain data a checkpoint can hold."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)},
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if cuda else None}


def set_rng_state(state: Mapping[str, Any]) -> int:
    """Restore what :func:`rng_state` saved; returns how many CUDA devices' states were restored.

    A checkpoint holds one CUDA state per device that was visible when it was written; a run resumed with another
    ``CUDA_VISIBLE_DEVICES`` restores the first ``min(saved, visible)`` (a rank draws on its own device only, which
    is among them whenever it was at save time), where restoring them all would fail on a missing device.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda")
    if saved is None or not torch.cuda.is_available():
        return 0
    restored = min(len(saved), torch.cuda.device_count())
    for index in range(restored):
        torch.cuda.set_rng_state(saved[index], index)
    return restored


def read_resume_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """``last.pt`` of the run in ``path.parent``, checked to be what was written (its digest, see
    :func:`mtanet.models.read_checkpoint`) and to belong to ``config``.

    Raises:
        CheckpointError: the file cannot be read, was changed after it was written, or is not a resume checkpoint.
        ConfigError: the checkpoint's run computes something else (a field outside
            :attr:`TrainConfig.RESUMABLE_CHANGES` differs).
    """
    try:
        ckpt = read_checkpoint(path)  # its digest checked: a file changed since it was written is never resumed
    except CheckpointError as err:
        raise CheckpointError(f"{err} (or move it away to start the run over)") from err
    if not isinstance(ckpt, dict) or "position" not in ckpt or "train_config" not in ckpt:
        raise CheckpointError(f"{path} is not a resume checkpoint of mtanet.train (no 'position' or "
                              "'train_config'); move it away to start the run over")
    old, new = flatten(ckpt["train_config"]), config.to_flat_dict()
    if isinstance(old.get("pretrained"), bool):  # its older spelling: true meant timm's ImageNet weights
        old["pretrained"] = "imagenet" if old["pretrained"] else ""
    changed = sorted(k for k, v in new.items() if k not in TrainConfig.RESUMABLE_CHANGES and old.get(k) != v)
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume {path} with a different config ({diff}); resume with the run's own "
                          f"config ({path.parent / CONFIG_FILE}) or start a new output folder")
    return ckpt
