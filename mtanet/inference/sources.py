"""The frames of an input, decoded one at a time: an image, a folder of images or a video (PyAV).

:class:`FrameSource` yields :class:`FrameItem` objects in order, whatever the input; a frame that cannot be decoded
keeps its place (``image=None`` and the reason), so every input frame gets its row downstream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np

from mtanet.errors import ConfigError, DataFormatError
from mtanet.inference.faces import load_image

__all__ = ["IMAGE_SUFFIXES", "FrameItem", "FrameSource"]

#: File suffixes read as images (anything else that is not a folder is opened as a video).
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"})


@dataclasses.dataclass
class FrameItem:
    """One input frame: 0-based ``index`` in the source, ``timestamp`` in seconds (NaN for images), ``file`` name
    (image inputs), the ``uint8`` RGB ``image`` or ``None`` with the reason in ``error``."""

    index: int
    timestamp: float
    file: str | None
    image: np.ndarray | None
    error: str | None = None


class FrameSource:
    """The frames of an image file, a folder of images (sorted by name) or a video, read lazily and in order.

    Args:
        path: an image (suffix in :data:`IMAGE_SUFFIXES`), a folder, or anything PyAV/FFmpeg can open.
        every: keep frames whose index is a multiple of ``every`` (the others are decoded, for inter-frame codecs,
            but not converted).

    Opening checks what can be checked up front: a missing path raises :class:`FileNotFoundError`; a folder
    without images, a file FFmpeg cannot open and anything that is neither a regular file nor a folder (a named pipe,
    a device or a socket, which would block or never end) raise :class:`~mtanet.errors.DataFormatError`. In a
    folder, an image that cannot be decoded keeps its place like a bad video frame. While iterating, a
    frame that fails to decode is yielded with ``image=None`` and the reason (a video packet that fails to decode
    counts as one frame), and ``errors`` collects the messages; a container that breaks off ends the iteration
    with ``truncated = True``.
    """

    def __init__(self, path: str | os.PathLike, every: int = 1):
        self.path = Path(path)
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.errors: list[str] = []
        self.truncated = False
        self.info: dict[str, Any] = {}
        self._container = None
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file or folder")
        if not (self.path.is_dir() or self.path.is_file()):
            raise DataFormatError(self.path, None, "not a regular file or a folder (a named pipe, device or socket "
                                                   "cannot be read as frames); give an image, a folder of images or "
                                                   "a video file")
        if self.path.is_dir():
            self.kind = "folder"
            self.files = sorted((p for p in self.path.iterdir() if p.is_file() and not p.name.startswith(".")
                                 and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
            if not self.files:
                raise DataFormatError(self.path, None, f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                                       "in this folder")
            self.info = {"images": len(self.files)}
        elif self.path.suffix.lower() in IMAGE_SUFFIXES:
            self.kind = "image"
            self.files = [self.path]
            self.info = {"images": 1}
        else:
            self.kind = "video"
            self._open_video()

    def _open_video(self) -> None:
        import av  # PyAV loads FFmpeg: imported when a video is opened, not when the package is imported

        try:
            self._container = av.open(str(self.path))
        except (av.error.FFmpegError, OSError, ValueError) as err:
            raise DataFormatError(self.path, None, f"cannot open as a video ({err})") from None
        if not self._container.streams.video:
            self._container.close()
            raise DataFormatError(self.path, None, "no video stream in this file")
        stream = self._container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        self._rate = float(rate) if rate else math.nan
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        self.info = {
            "codec": stream.codec_context.name,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": self._rate,
            "frames_in_header": int(stream.frames) or None,  # 0 when the container does not say
            "duration_s": duration,
        }

    def estimated_frames(self) -> int | None:
        """Frames the source will yield (after ``every``), when known in advance."""
        if self.kind != "video":
            return -(-len(self.files) // self.every)
        n = self.info.get("frames_in_header")
        if not n and self.info.get("duration_s") and self._rate == self._rate:
            n = round(self.info["duration_s"] * self._rate)
        return -(-n // self.every) if n else None

    def __iter__(self) -> Iterator[FrameItem]:
        if self.kind == "video":
            yield from self._iter_video()
            return
        for index, path in enumerate(self.files):
            if index % self.every:
                continue
            try:
                image, error = load_image(path), None
            except (DataFormatError, FileNotFoundError) as err:
                if self.kind == "image":
                    raise
                image, error = None, str(err)
                self._note(error)
            yield FrameItem(index, math.nan, path.name, image, error)

    def _iter_video(self) -> Iterator[FrameItem]:
        import av  # PyAV loads FFmpeg: imported when a video is read, not when the package is imported

        container = self._container
        stream = container.streams.video[0]
        tb = stream.time_base
        start = stream.start_time or 0

        def seconds(pts: int | None, index: int) -> float:
            return float((pts - start) * tb) if pts is not None and tb else index / self._rate

        index = 0
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as err:  # the container itself breaks off: nothing after this can be read
                self.truncated = True
                self._note(f"{self.path}: reading stopped after {index} frames ({err})")
                break
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                if packet.size:  # a corrupt frame: keep its place in the sequence
                    if index % self.every == 0:
                        message = f"{self.path}: frame {index}: cannot decode ({err})"
                        self._note(message)
                        yield FrameItem(index, seconds(packet.pts, index), None, None, message)
                    index += 1
                continue
            for frame in frames:
                if index % self.every == 0:
                    yield FrameItem(index, seconds(frame.pts, index), None, frame.to_ndarray(format="rgb24"))
                index += 1

    def _note(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)
        if len(self.errors) < 100:
            self.errors.append(message)

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
