"""Every error class of the package, in one place, so that catching one never misses its twin.

:class:`MtanetError` marks errors a user can fix (a bad file, option or device): the command line prints them as one
line, ``mtanet: error: ...``, and exits with code 2. The others (a notebook that failed, a sweep folder of another
sweep) are raised by the book kit and carry their own context.
"""

from __future__ import annotations

import os

__all__ = [
    "MtanetError",
    "ConfigError",
    "DataFormatError",
    "DeviceUnavailableError",
    "CheckpointError",
    "OutputExistsError",
    "NonFiniteLossError",
    "PretrainedWeightsNotFound",
    "NotebookFailed",
    "SweepConflict",
]


class MtanetError(Exception):
    """An error the user can fix; its message names the file or option and what to do."""


class ConfigError(MtanetError, ValueError):
    """A configuration value or key that is not allowed (a :class:`mtanet.train.TrainConfig` field, a device name)."""


class DataFormatError(MtanetError, ValueError):
    """Malformed dataset input. The message always starts with ``path:line:`` (line omitted for whole files)."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")

    def __reduce__(self):  # rebuilt with its three arguments when it crosses a process (a DataLoader worker)
        return type(self), (self.path, self.line, self.message)


class DeviceUnavailableError(MtanetError, RuntimeError):
    """A device was requested that this machine (or this torch / onnxruntime build) cannot use; never replaced
    silently by another."""


class CheckpointError(MtanetError, RuntimeError):
    """A checkpoint that cannot be read, is not of the kind asked for, or does not belong to this run."""


class OutputExistsError(MtanetError, FileExistsError):
    """An output path holds something the command did not write and must not replace or delete (user files, a
    folder of another kind); nothing was deleted."""


class NonFiniteLossError(MtanetError, FloatingPointError):
    """A NaN or infinite loss; raised before that step's optimiser update, so no checkpoint holds its state."""


class PretrainedWeightsNotFound(MtanetError, FileNotFoundError):
    """``pretrained=True`` asked for timm weights that are not in the local cache (nothing is ever downloaded)."""


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the message names the notebook, the cell and the error."""


class SweepConflict(RuntimeError):
    """A sweep's run folder holds results of other parameters than the ones asked for."""
