"""A short video of a still photograph seen through a moving virtual camera, to test video prediction on a real face.

No real video with a face ships with the project's dependencies, so :func:`write_camera_video` makes one from a
photograph: the camera pans from the whole picture to a ``focus`` point (the face), zooms in, tilts a few degrees
each way, moves off so that the focus leaves the frame for a few frames, and comes back. The face is real; the
motion is synthetic (a rigid similarity of a flat picture, no change of expression, pose or lighting).

Each frame is a similarity warp of the photo (:func:`render_frame`): output pixel ``o`` shows the photo at
``c + s * R(angle) @ (o - o0)``, with ``c`` the camera centre in photo pixels, ``s`` photo pixels per output pixel
(smaller is more zoom), ``o0`` the frame centre; outside the photo is black. Pixel centres follow
:mod:`mtanet.inference.faces` (pixel ``(i, j)`` at ``x = j, y = i``). The path (:func:`camera_path`) is a function
of its arguments only, and the handheld shake comes from ``seed``: the same arguments give the same rendered frames.
The H.264 bytes are not bit-exact between runs (x264 here varies run to run by a few grey levels on some frames), so
compare the rendered frames, or decoded ones with a tolerance.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CameraPath", "camera_path", "render_frame", "write_camera_video", "write_video"]


@dataclasses.dataclass(frozen=True)
class CameraPath:
    """Per-frame camera: centre ``cx``, ``cy`` (photo pixels), ``scale`` (photo pixels per output pixel),
    ``angle`` (degrees, counter-clockwise), and where the focus point lands in the frame (``focus_u``,
    ``focus_v``, output pixels) with ``focus_in_view`` (it lies at least ``margin`` pixels inside the frame)."""

    cx: np.ndarray
    cy: np.ndarray
    scale: np.ndarray
    angle: np.ndarray
    focus_u: np.ndarray
    focus_v: np.ndarray
    focus_in_view: np.ndarray

    def __len__(self) -> int:
        return len(self.cx)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def camera_path(n_frames: int, image_size: tuple[int, int], focus: Sequence[float], frame_size: tuple[int, int] =
                (640, 480), zoom: float = 2.2, max_angle: float = 6.0, shake: float = 1.5, margin: float = 0.0,
                seed: int = 0) -> CameraPath:
    """The camera of each frame: whole photo -> zoom on ``focus`` -> tilt -> focus out of frame -> back.

    Args:
        n_frames: frames of the video (at least 10).
        image_size: the photo's ``(width, height)``.
        focus: the ``(x, y)`` photo pixel to zoom on and to move away from (the face centre).
        frame_size: the video's ``(width, height)``.
        zoom: magnification at the closest point, relative to the view that fits the whole photo.
        max_angle: the largest tilt in degrees.
        shake: standard deviation in output pixels of a smooth handheld jitter (0 for none).
        margin: ``focus_in_view`` needs the focus this many output pixels inside the frame.
        seed: seed of the jitter.
    """
    if n_frames < 10:
        raise ValueError(f"n_frames must be >= 10, got {n_frames}")
    (iw, ih), (fw, fh) = image_size, frame_size
    fx, fy = float(focus[0]), float(focus[1])
    fit = max(iw / fw, ih / fh)  # the whole photo in view
    close = fit / zoom
    mid = fit / math.sqrt(zoom)
    away = fx + 0.5 * fw * mid + 0.6 * iw  # the focus ends up far past the left edge of the view
    # keyframes: (time in [0, 1], cx, cy, scale, angle)
    keys = np.array([
        (0.00, iw / 2, ih / 2, fit, 0.0),
        (0.25, fx, fy, close, 0.0),
        (0.38, fx, fy, close, max_angle),
        (0.50, fx, fy, mid, -max_angle),
        (0.62, away, fy, mid, 0.0),
        (0.72, away, fy, mid, 0.0),  # hold: no face in the frame
        (0.86, fx, fy, mid, 0.0),
        (1.00, fx, fy, close, 0.5 * max_angle),
    ])
    t = np.linspace(0.0, 1.0, n_frames)
    seg = np.clip(np.searchsorted(keys[:, 0], t, side="right") - 1, 0, len(keys) - 2)
    w = _smoothstep((t - keys[seg, 0]) / (keys[seg + 1, 0] - keys[seg, 0]))[:, None]
    cx, cy, scale, angle = ((1 - w) * keys[seg, 1:] + w * keys[seg + 1, 1:]).T
    if shake > 0:
        rng = np.random.default_rng(seed)
        kernel = np.hanning(9) / np.hanning(9).sum()
        jitter = np.stack([np.convolve(rng.normal(0.0, 1.0, n_frames + 8), kernel, mode="valid") for _ in range(2)])
        jitter *= shake / max(float(jitter.std()), 1e-9)
        cx, cy = cx + jitter[0] * scale, cy + jitter[1] * scale
    # where the focus lands: o = o0 + R(-angle) (p - c) / s
    a = np.radians(angle)
    dx, dy = (fx - cx) / scale, (fy - cy) / scale
    u = (fw - 1) / 2 + np.cos(a) * dx + np.sin(a) * dy
    v = (fh - 1) / 2 - np.sin(a) * dx + np.cos(a) * dy
    inside = (u >= margin) & (u <= fw - 1 - margin) & (v >= margin) & (v <= fh - 1 - margin)
    return CameraPath(cx, cy, scale, angle, u, v, inside)


def render_frame(image: np.ndarray, cx: float, cy: float, scale: float, angle: float,
                 frame_size: tuple[int, int] = (640, 480)) -> np.ndarray:
    """One ``uint8`` RGB frame ``(height, width, 3)`` of the camera at ``(cx, cy)``, ``scale``, ``angle``
    (bilinear, black outside the photo)."""
    fw, fh = frame_size
    a = math.radians(angle)
    ca, sa = math.cos(a) * scale, math.sin(a) * scale
    u0, v0 = (fw - 1) / 2, (fh - 1) / 2
    # PIL maps output (u, v) to input (a u + b v + c, d u + e v + f) with pixel centres at +0.5
    x_c = cx + 0.5 - ca * (u0 + 0.5) + sa * (v0 + 0.5)
    y_c = cy + 0.5 - sa * (u0 + 0.5) - ca * (v0 + 0.5)
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    out = img.transform((fw, fh), Image.Transform.AFFINE, (ca, -sa, x_c, sa, ca, y_c),
                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(out)


def write_video(frames, path: str | os.PathLike, fps: int = 15, crf: int = 20) -> Path:
    """Encode ``uint8`` RGB frames (an iterable of equal-size arrays) as H.264 (yuv420p) with PyAV."""
    import av  # PyAV loads FFmpeg: imported where a video is written, not when the book kit is imported

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = None
        for frame in frames:
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                stream.codec_context.thread_count = 1  # encoding is not the slow part; leave the cores alone
                stream.options = {"crf": str(crf), "preset": "veryfast"}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError("no frames to write")
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_camera_video(image: np.ndarray, path: str | os.PathLike, focus: Sequence[float], n_frames: int = 90,
                       frame_size: tuple[int, int] = (640, 480), fps: int = 15, seed: int = 0,
                       **path_options) -> CameraPath:
    """Write the virtual-camera video of ``image`` (see :func:`camera_path`, whose options pass through) to
    ``path`` (H.264 MP4) and return its :class:`CameraPath`."""
    h, w = image.shape[:2]
    cam = camera_path(n_frames, (w, h), focus, frame_size, seed=seed, **path_options)
    write_video((render_frame(image, cam.cx[i], cam.cy[i], cam.scale[i], cam.angle[i], frame_size)
                 for i in range(n_frames)), path, fps=fps)
    return cam
