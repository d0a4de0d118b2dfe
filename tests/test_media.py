"""The virtual-camera video: frame count, size, determinism, geometry and the frames where the focus leaves view."""

from __future__ import annotations

import av  # a declared dependency: missing, it fails the suite rather than skipping these tests
import numpy as np

from mtanet.book.media import camera_path, render_frame, write_camera_video


def photo(w: int = 160, h: int = 120) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 200 // w + 20, y * 200 // h + 20, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    img[50:70, 70:90] = (255, 0, 0)  # a red square around the focus (80, 60)
    return img


def decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_video_frame_count_size_and_determinism(tmp_path):
    img = photo()
    cam = write_camera_video(img, tmp_path / "a.mp4", focus=(80, 60), n_frames=24, frame_size=(96, 64), seed=3)
    again = camera_path(24, (160, 120), (80, 60), (96, 64), seed=3)
    rendered = [render_frame(img, again.cx[i], again.cy[i], again.scale[i], again.angle[i], (96, 64))
                for i in range(24)]
    first = render_frame(img, again.cx[0], again.cy[0], again.scale[0], again.angle[0], (96, 64))
    assert np.array_equal(first, rendered[0])  # rendering is exact
    decoded = decode(tmp_path / "a.mp4")
    assert len(decoded) == len(cam) == 24
    assert all(f.shape == (64, 96, 3) for f in decoded)
    # H.264 is lossy and not bit-exact between runs: the decoded frames are the rendered ones up to coding noise
    assert max(np.abs(d.astype(int) - r).mean() for d, r in zip(decoded, rendered)) < 4
    for field in ("cx", "cy", "scale", "angle"):
        assert np.array_equal(getattr(cam, field), getattr(again, field))
    other = camera_path(24, (160, 120), (80, 60), (96, 64), seed=4)
    assert not np.allclose(other.cx, cam.cx)  # the seed moves the jitter


def test_path_zooms_on_focus_and_leaves_it_for_some_frames():
    cam = camera_path(60, (160, 120), (80, 60), (96, 64), shake=0.0)
    assert cam.scale.min() < cam.scale[0]  # zooms in
    assert 0 < (~cam.focus_in_view).sum() < 20  # the focus leaves the frame, briefly
    assert cam.focus_in_view[0] and cam.focus_in_view[-1]
    assert np.abs(cam.angle).max() > 3


def test_render_frame_puts_the_focus_where_the_path_says():
    img = photo()
    cam = camera_path(40, (160, 120), (80, 60), (96, 64), shake=0.0)
    for i in (0, 10, 15, 39):
        frame = render_frame(img, cam.cx[i], cam.cy[i], cam.scale[i], cam.angle[i], (96, 64))
        u, v = int(round(cam.focus_u[i])), int(round(cam.focus_v[i]))
        assert frame[v, u, 0] > 200 and frame[v, u, 1] < 60, i  # red at the focus
    # identity camera reproduces the photo
    same = render_frame(img, 79.5, 59.5, 1.0, 0.0, (160, 120))
    assert np.array_equal(same, img)
