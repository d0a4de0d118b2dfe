"""Is the GPU a run asks for really there? One line that says why not, before anything starts.

The installed torch may be a build for a newer CUDA than the machine's NVIDIA driver supports; torch then reports no
GPU (``torch.cuda.is_available()`` is false) and nothing else. ``device: auto`` would quietly train on the CPU for
days, so the gpu profiles ask for ``cuda``, and :func:`require_cuda` names the mismatch: torch's CUDA version
(``torch.version.cuda``) against the newest the driver supports (``cuDriverGetVersion`` of ``libcuda``, read without
initialising CUDA) and the driver's version (``/proc/driver/nvidia/version``).

:func:`check_profile_devices` runs that check for every parameter file of a book profile; the book runner calls it
before the first notebook (``make book PROFILE=gpu``).
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from mtanet.errors import DeviceUnavailableError
from mtanet.train.config import read_yaml_mapping

__all__ = ["driver_cuda_version", "driver_version", "cuda_diagnosis", "require_cuda", "check_profile_devices"]

_CUDA_SPEC = re.compile(r"cuda(:\d+)?")


def driver_cuda_version() -> tuple[int, int] | None:
    """The newest CUDA version the installed NVIDIA driver supports (``cuDriverGetVersion``), or ``None`` when there
    is no driver library."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
        return None
    return version.value // 1000, (version.value % 1000) // 10


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``/proc/driver/nvidia/version``), or ``None``."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \w+)?\s+([\d.]+)", text)
    return match.group(1) if match else None


def _version(text: str | None) -> tuple[int, int] | None:
    match = re.match(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_diagnosis() -> str | None:
    """``None`` when CUDA is usable here, else one sentence saying why not (the driver/torch mismatch named)."""
    if torch.cuda.is_available():
        return None
    built = torch.version.cuda
    if not built:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch "
                "(pip install torch --index-url https://download.pytorch.org/whl/cu<VERSION>)")
    supports, driver = driver_cuda_version(), driver_version()
    if supports is None and driver is None:
        return (f"no NVIDIA driver found (no libcuda.so.1, no /proc/driver/nvidia/version); torch "
                f"{torch.__version__} is built for CUDA {built}; on a machine without a GPU use the cpu profile")
    driver_name = f"the NVIDIA driver {driver or '(version unknown)'}"
    if supports is not None and _version(built) is not None and supports < _version(built):
        wanted = f"{supports[0]}{supports[1]}"
        return (f"torch {torch.__version__} is built for CUDA {built}, but {driver_name} supports CUDA up to "
                f"{supports[0]}.{supports[1]}: update the driver, or install a torch build for CUDA "
                f"{supports[0]}.{supports[1]} or older (pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu{wanted}) (torch.cuda.is_available() is false)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU, or " if visible is not None else ""
    support = f"supports CUDA {supports[0]}.{supports[1]}" if supports else "is present"
    return (f"torch.cuda.is_available() is false although {driver_name} {support} and torch {torch.__version__} "
            f"is built for CUDA {built}: {where}no GPU is visible to this process (see nvidia-smi)")


def require_cuda(what: str = "device 'cuda'") -> None:
    """Raise :class:`DeviceUnavailableError` (one line, the reason named) unless CUDA is usable here."""
    reason = cuda_diagnosis()
    if reason is not None:
        raise DeviceUnavailableError(f"{what} asks for a GPU, but CUDA is not available: {reason}")


def check_profile_devices(param_files: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Check, before a book profile runs, that every device its parameter files ask for is there.

    Each YAML file's ``device`` key is read; ``cuda``/``cuda:N`` needs a usable GPU (``cuda:N`` at least N + 1 of
    them); ``cpu``, ``auto``, files without the key and paths that do not exist (the runner reports those) pass.
    Returns the files checked that ask for CUDA.

    Raises:
        DeviceUnavailableError: a file asks for CUDA that is not there (the message names the file and why).
        ConfigError: a file is not a YAML mapping.
    """
    needing = []
    for path in sorted(Path(p) for p in param_files):
        if not path.is_file():
            continue
        spec = str(read_yaml_mapping(path).get("device", "")).strip().lower()
        match = _CUDA_SPEC.fullmatch(spec)
        if not match:
            continue
        require_cuda(f"{path} (device: {spec})")
        index = int(match.group(1)[1:]) if match.group(1) else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"{path} (device: {spec}) asks for GPU {index}, but only "
                                         f"{torch.cuda.device_count()} are visible")
        needing.append(str(path))
    return needing


