"""MTANet checkpoints: ``{"config", "state_dict", **extra}`` written atomically, read without running code.

``config`` holds :attr:`MTANet.config <mtanet.models.MTANet>` (the constructor arguments), so :func:`load_model`
rebuilds the model from the file alone; ``extra`` carries what the trainer adds (epoch, metrics, ``train_config``,
prediction settings); ``digest`` is the SHA-256 of all the rest (:mod:`mtanet.models.integrity`), checked by every
read (:func:`read_checkpoint`, :func:`load_model`), so a file changed after it was written is never used.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtanet.errors import CheckpointError
from mtanet.models.integrity import DIGEST_KEY, load_checked, payload_digest
from mtanet.models.mtanet import MTANet
from mtanet.runtime import atomic_path

__all__ = ["save_checkpoint", "load_model", "read_checkpoint", "model_from_checkpoint"]


def save_checkpoint(model: MTANet, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"config", "state_dict", **extra, "digest"}`` to ``path`` atomically (temporary file, then
    ``os.replace``); ``digest`` is the SHA-256 of the rest (:func:`mtanet.models.integrity.payload_digest`).

    ``extra`` (epoch, metrics, optimizer state, ...) must hold only what ``torch.load(weights_only=True)`` accepts:
    tensors, numbers, strings, lists, tuples and dicts of them.
    """
    extra = dict(extra or {})
    clash = {"config", "state_dict", DIGEST_KEY} & set(extra)
    if clash:
        raise ValueError(f"extra must not override {sorted(clash)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": copy.deepcopy(model.config), "state_dict": model.state_dict(), **extra}
    payload[DIGEST_KEY] = payload_digest(payload)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """The dict a :func:`save_checkpoint` file holds, read with ``torch.load(weights_only=True)`` (a checkpoint
    cannot run code), once its digest matches its content.

    A checkpoint written before digests existed is read with a ``UserWarning`` naming the file (its damage cannot be
    detected; saving it again adds a digest).

    Args:
        mmap: memory-map the tensors (for a caller that reads only the small entries; the digest check still reads
            every byte once).

    Raises:
        FileNotFoundError: there is no file at ``path``.
        CheckpointError: the file cannot be read (truncated, empty, not a torch file), was changed after it was
            written (digest mismatch) or is not an MTANet checkpoint (no ``config`` or no ``state_dict``).
    """
    ckpt = load_checked(path, map_location, mmap=mmap)
    if not isinstance(ckpt, dict) or "config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an MTANet checkpoint (needs 'config' and 'state_dict'); give a file "
                              "written by mtanet train or mtanet.models.save_checkpoint")
    return ckpt


def model_from_checkpoint(ckpt: Mapping[str, Any], map_location: str | torch.device = "cpu") -> MTANet:
    """The model of a :func:`read_checkpoint` dict, its weights loaded; returned in eval mode on ``map_location``."""
    config = ckpt["config"]
    model = MTANet(**{**config, "pretrained": False, "weights_path": None})
    model.load_state_dict(ckpt["state_dict"])
    model.config = copy.deepcopy(config)
    return model.to(map_location).eval()


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> MTANet:
    """Rebuild the model saved by :func:`save_checkpoint` and load its weights; returned in eval mode.

    Uses ``torch.load(weights_only=True)``, so a checkpoint cannot run code, and checks the file's digest first
    (:func:`read_checkpoint`). Nothing is read from the timm cache: the backbone weights come from the checkpoint.
    """
    return model_from_checkpoint(read_checkpoint(path, map_location), map_location)
