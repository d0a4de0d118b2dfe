"""Integrity of checkpoint files: a SHA-256 digest written at save time and checked at every read.

``torch.load`` does not check the zip container's CRCs, so bytes flipped inside a tensor's storage record (a bad disk,
an interrupted copy, a file edited by mistake) load without a word and the damaged weights are used. Every
:func:`~mtanet.models.save_checkpoint` file therefore carries ``"digest": "sha256:<hex>"``, computed over the rest of
the payload serialised canonically:

- every tensor as its dtype, shape and raw bytes (contiguous, on the CPU), so one flipped bit in any weight, buffer,
  optimizer moment or RNG state changes the digest;
- dicts in their key order (which ``torch.save`` and ``torch.load`` keep), lists and tuples in order (told apart), and
  ``None``, bools, ints, floats (their 8 IEEE bytes), strings and bytes with a type tag and a length, so that no two
  different payloads serialise alike.

:func:`load_checked` reads a file (``torch.load(weights_only=True)``: a file cannot run code) and compares the digest
before anything is returned; a mismatch, or a file that cannot be read at all (truncated, empty, not a torch file), is
a :class:`~mtanet.errors.CheckpointError` naming the file. A checkpoint written before digests existed (an MTANet
payload without the key) is still read, with a :class:`UserWarning` naming the file: its damage cannot be detected,
and saving it again (``save_checkpoint(load_model(path), path)``) adds a digest. Plain state dicts (a ``weights_path``
that is not a checkpoint) carry no digest and are read as they are.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtanet.errors import CheckpointError

__all__ = ["DIGEST_KEY", "payload_digest", "load_checked"]

#: Key of the digest in a checkpoint's payload.
DIGEST_KEY = "digest"
_PREFIX = "sha256:"
#: What to do about a checkpoint that was not used; the last sentence of every error of this module.
ADVICE = "it was not used. Restore it from a backup or retrain"


def payload_digest(payload: Mapping[str, Any]) -> str:
    """``"sha256:<hex>"`` of ``payload`` without its :data:`DIGEST_KEY` (see the module docstring for what counts).

    Raises:
        TypeError: the payload holds a value that a checkpoint cannot hold (anything but tensors, numpy arrays,
            numbers, strings, bytes, ``None`` and dicts, lists and tuples of them).
    """
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != DIGEST_KEY})
    return _PREFIX + h.hexdigest()


def _chunk(h, tag: bytes, data: bytes | memoryview = b"") -> None:
    h.update(tag)
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def _feed(h, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.layout != torch.strided or t.is_quantized:
            raise TypeError(f"a checkpoint digest covers dense tensors only, not {t.layout} / quantized ones")
        _chunk(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.to("cpu").contiguous().reshape(-1)
        _chunk(h, b"t", flat.view(torch.uint8).numpy().data if flat.numel() else b"")
    elif isinstance(value, (np.ndarray, np.generic)):
        arr = np.ascontiguousarray(value)
        _chunk(h, b"A", f"{arr.dtype.str}{arr.shape}".encode())
        _chunk(h, b"a", arr.tobytes())
    elif isinstance(value, Mapping):
        _chunk(h, b"D", str(len(value)).encode())
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        _chunk(h, b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
        for item in value:
            _feed(h, item)
    elif value is None:
        _chunk(h, b"N")
    elif isinstance(value, bool):
        _chunk(h, b"B", b"1" if value else b"0")
    elif isinstance(value, int):
        _chunk(h, b"I", str(value).encode())
    elif isinstance(value, float):
        _chunk(h, b"F", struct.pack("<d", value))
    elif isinstance(value, str):
        _chunk(h, b"S", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        _chunk(h, b"Y", bytes(value))
    elif isinstance(value, (torch.dtype, torch.device)):
        _chunk(h, b"O", f"{type(value).__name__}:{value}".encode())
    else:
        raise TypeError(f"a checkpoint cannot hold a {type(value).__name__} (tensors, numbers, strings, None and "
                        "dicts, lists and tuples of them)")


def _first_sentence(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text.split(". ")[0]
    return f"{type(err).__name__}: {text[:100]}" if text else type(err).__name__


def load_checked(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """What ``torch.load(path, weights_only=True)`` returns, once its digest (when it has one) matches.

    Args:
        mmap: memory-map the tensors (reads only what is touched; the digest check still reads every byte once).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: ``path`` is a folder; the file cannot be read (permissions, truncated, empty, not a torch
            file) or its content is not what was written (digest mismatch).

    Warns:
        UserWarning: an MTANet checkpoint (``config`` and ``state_dict``) without a digest, written before digests
            existed; it is returned, unchecked.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; give the .pt file inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            obj = torch.load(path, map_location=map_location, weights_only=True)  # legacy non-zip files
    except OSError as err:  # the file itself (permissions, I/O): say so rather than blame its content
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err}); check that it is readable") from err
    except Exception as err:  # noqa: BLE001 - whatever torch.load raises, the file is not used
        raise CheckpointError(f"{path} cannot be read as a checkpoint (truncated, empty or not a torch file; "
                              f"{_first_sentence(err)}); {ADVICE}") from err
    if isinstance(obj, Mapping) and DIGEST_KEY in obj:
        stored = obj[DIGEST_KEY]
        try:
            actual = payload_digest(obj)
        except TypeError as err:
            raise CheckpointError(f"{path} holds a value no checkpoint holds ({err}); {ADVICE}") from err
        if stored != actual:
            raise CheckpointError(f"{path} was changed after it was written (digest mismatch); {ADVICE}")
    elif isinstance(obj, Mapping) and "config" in obj and "state_dict" in obj:
        warnings.warn(f"{path} carries no digest (written before mtanet checked its checkpoints), so damage to it "
                      "cannot be detected; save it again with mtanet.models.save_checkpoint to add one",
                      UserWarning, stacklevel=3)
    return obj
