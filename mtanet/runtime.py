"""What every layer shares about the machine and the file system: cores, devices, atomic writes, JSON, provenance.

Nothing here knows about tasks, models or training; every module may import it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtanet.errors import ConfigError, DeviceUnavailableError, OutputExistsError

__all__ = [
    "DEVICE_NAMES",
    "usable_cores",
    "resolve_device",
    "atomic_path",
    "prepare_output_file",
    "check_output_folder",
    "json_clean",
    "write_json",
    "cpu_model",
    "git_info",
    "versions",
    "project_root",
    "WORK_ENV",
    "work_root",
]

#: How a device is named everywhere (training, evaluation, prediction, export, the notebooks' parameters).
DEVICE_NAMES = "cpu, cuda, cuda:N, mps or auto (cuda when available, else cpu)"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask on Linux, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_device(spec: Any, local_rank: int | None = None):
    """The ``torch.device`` that ``spec`` names (see :data:`DEVICE_NAMES`; a ``torch.device`` is accepted too).

    Under ``torchrun`` (``local_rank`` given), ``cuda`` and ``auto`` mean ``cuda:<local_rank>``.

    Raises:
        ConfigError: ``spec`` is not a device name.
        DeviceUnavailableError: the device was asked for and is not usable here; nothing falls back silently.
    """
    name = str(spec).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if torch.backends.mps.is_available():
            return torch.device("mps")
        raise DeviceUnavailableError("device 'mps' was requested but is not available here; use cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", name)
    if not m:
        raise ConfigError(f"device {str(spec)!r} is not a device name; use {DEVICE_NAMES}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(
            f"device {name!r} was requested but CUDA is not available here (torch {torch.__version__}, built for "
            f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s) visible; an NVIDIA driver older than "
            "the one this build needs also reads as no CUDA); use cpu or auto")
    if m.group(1) is not None and local_rank is not None:
        raise ConfigError(f"under torchrun use device 'cuda' (each rank takes cuda:LOCAL_RANK), not {name!r}")
    index = int(m.group(1)) if m.group(1) is not None else (local_rank or 0)
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"device cuda:{index} was requested but only {torch.cuda.device_count()} CUDA "
                                     "device(s) are visible")
    return torch.device("cuda", index)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends without an error.

    Readers only ever see the old file or the complete new one (``os.replace`` is atomic within a folder); after a
    failure (an exception, a full disk) the temporary file is removed and ``path`` is untouched. Its name starts with
    ``.`` and ends in ``.tmp``, so a leftover of a killed process is recognisable.

    A file-system error (a full disk, a folder without write permission) is raised as an :class:`OSError` of the same
    ``errno`` naming ``path``: writers such as ``torch.save`` raise it without a file name, and the temporary name
    means nothing to a user.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        named = _naming(err, path)
        if named is err:
            raise
        raise named from err
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        named = _naming(err, path)
        if named is err:
            raise
        raise named from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` naming ``path`` when it names no file or a temporary file of :func:`atomic_path` (same errno, so
    the same subclass); otherwise ``err`` itself."""
    if err.errno is None:
        return err
    if err.filename is not None:
        name = os.path.basename(os.fsdecode(err.filename))
        if not (name.startswith(f".{path.name}.") and name.endswith(".tmp")):
            return err
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


def prepare_output_file(path: str | os.PathLike[str]) -> Path:
    """Check that a file can be written at ``path`` and create its folder; returns ``path`` as a :class:`Path`.

    Called before the work starts, so that a wrong output path fails in a second, not after the work. Whether an
    existing file may be replaced is the caller's decision.

    Raises:
        OutputExistsError: ``path`` is a folder, or a part of it that should be a folder is a file.
        PermissionError: the folder cannot be written (named with ``path``).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a folder; give the path of a file to write in it (nothing was changed)")
    _writable_folder(path.parent, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` is a folder that can be written, or can be created as one; creates nothing.

    Raises:
        OutputExistsError: ``path``, or a folder above it, is a file.
        PermissionError: the folder (or the nearest existing one above it) cannot be written (named with ``path``).
    """
    path = Path(path)
    _writable_folder(path, path)
    return path


def _writable_folder(folder: Path, target: Path) -> None:
    """Raise unless ``folder`` is, or can be created as, a folder this process may write ``target`` into."""
    for above in (folder, *folder.parents):
        if above.is_dir():
            if not os.access(above, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
            return
        if above.exists():
            where = f"{target} is a file" if above == target else f"cannot write {target}: {above} is a file"
            raise OutputExistsError(f"{where}, not a folder; choose another path (nothing was changed)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays to Python, paths to strings, non-finite floats to ``None`` (strict
    JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2) -> None:
    """Write ``data`` (cleaned by :func:`json_clean`) as strict JSON, atomically."""
    text = json.dumps(json_clean(data), indent=indent, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_info() -> dict[str, Any]:
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


def versions() -> dict[str, str]:
    """Versions of Python and of the packages whose arithmetic a result depends on."""
    out = {"python": platform.python_version()}
    for package in ("torch", "timm", "numpy", "mtanet"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The checkout: the nearest folder at or above ``start`` (default: cwd) holding ``_toc.yml`` and ``mtanet/``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "mtanet").is_dir():
            return folder
    # an installed (non-editable) package: fall back to the folder above the package, then cwd
    package_parent = Path(__file__).resolve().parents[1]
    if (package_parent / "_toc.yml").is_file():
        return package_parent
    return here


#: The environment variable that moves what the project generates (``data/``, ``runs/``) out of the checkout.
WORK_ENV = "MTANET_WORK"


def work_root(start: str | os.PathLike[str] | None = None) -> Path:
    """Where generated data (``data/synth-<size>``) and results (``runs/``) go: the folder named by ``$MTANET_WORK``
    when it is set (a test, or a checkout on a read-only or small disk), else the checkout (:func:`project_root`).
    Sources (notebooks, ``_toc.yml``, committed results) always come from the checkout."""
    work = os.environ.get(WORK_ENV, "").strip()
    return Path(work).expanduser().resolve() if work else project_root(start)
