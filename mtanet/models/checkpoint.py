"""MTANet checkpoints: ``{"config", "state_dict", **extra}`` written atomically, read without running code.

``config`` holds :attr:`MTANet.config <mtanet.models.MTANet>` (the constructor arguments), so :func:`load_model`
rebuilds the model from the file alone; ``extra`` carries what the trainer adds (epoch, metrics, ``train_config``,
prediction settings).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtanet.models.mtanet import MTANet
from mtanet.errors import CheckpointError
from mtanet.runtime import atomic_path

__all__ = ["save_checkpoint", "load_model", "read_checkpoint"]


def save_checkpoint(model: MTANet, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"config", "state_dict", **extra}`` to ``path`` atomically (temporary file, then ``os.replace``).

    ``extra`` (epoch, metrics, optimizer state, ...) must hold only what ``torch.load(weights_only=True)`` accepts:
    tensors, numbers, strings, lists, tuples and dicts of them.
    """
    extra = dict(extra or {})
    clash = {"config", "state_dict"} & set(extra)
    if clash:
        raise ValueError(f"extra must not override {sorted(clash)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": copy.deepcopy(model.config), "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict a :func:`save_checkpoint` file holds, read with ``torch.load(weights_only=True)`` (a checkpoint
    cannot run code).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file cannot be read (truncated, empty, not a torch file) or is not an MTANet checkpoint
            (no ``config`` or no ``state_dict``).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means "do not use it"
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an MTANet checkpoint (needs 'config' and 'state_dict')")
    return ckpt


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MTANet:
    """Rebuild the model saved by :func:`save_checkpoint` and load its weights; returned in eval mode.

    Uses ``torch.load(weights_only=True)``, so a checkpoint cannot run code. Nothing is read from the timm cache:
    the backbone weights come from the checkpoint.
    """
    ckpt = read_checkpoint(path, map_location)
    config = ckpt["config"]
    model = MTANet(**{**config, "pretrained": False, "weights_path": None})
    model.load_state_dict(ckpt["state_dict"])
    model.config = copy.deepcopy(config)
    return model.to(map_location).eval()
