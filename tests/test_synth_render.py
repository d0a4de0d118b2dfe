"""Tests of the parametric face renderer (mtanet.synth.render): output contract, determinism, AU geometry."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mtanet.synth.render import (
    ACTIONS,
    LABELED_ACTIONS,
    SIZE,
    Identity,
    Nuisance,
    five_points,
    landmarks,
    random_identity,
    random_nuisance,
    render_face,
)
from mtanet.tasks import AU_NAMES_2020

CLEAN = Nuisance()  # frontal, no blur/noise/occlusion/lighting


def _identities() -> list[Identity]:
    return [Identity()] + [random_identity(np.random.default_rng(seed)) for seed in (1, 2, 3)]


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=-1)


def _regions(lm: dict[str, np.ndarray]) -> dict[str, tuple[slice, slice]]:
    """Boxes (rows, cols) around brows, eyes+cheeks and mouth of a neutral frontal face, from its landmarks."""

    def box(y0, y1, x0, x1):
        return slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1)))

    brow_top = min(lm[k][1] for k in ("brow_inner_left", "brow_outer_left", "brow_inner_right", "brow_outer_right"))
    return {
        "brows": box(brow_top - 8, lm["eye_left"][1] - 6.0, lm["brow_outer_left"][0] - 3,
                     lm["brow_outer_right"][0] + 4),
        "eyes": box(lm["eye_left"][1] - 4, lm["nose_tip"][1], lm["eye_outer_left"][0] - 6,
                    lm["eye_outer_right"][0] + 7),
        "mouth": box(lm["upper_lip_top"][1] - 5, lm["lower_lip_bottom"][1] + 6, lm["mouth_left"][0] - 7,
                     lm["mouth_right"][0] + 8),
    }


# ---- output contract ---------------------------------------------------------------------------------------------


def test_shape_dtype_and_range():
    rng = np.random.default_rng(0)
    for _ in range(5):
        img = render_face(random_identity(rng), {"AU12": rng.random()}, random_nuisance(rng), 0.3, -0.2)
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert img.std() > 10  # not a blank canvas


def test_deterministic_including_noise_and_occlusion():
    idt = random_identity(np.random.default_rng(7))
    nz = dataclasses.replace(random_nuisance(np.random.default_rng(8)), noise=5.0, blur=0.8, occlusion=1, yaw=12.0)
    acts = {"AU1": 0.4, "AU12": 0.9, "AU25": 0.5}
    a = render_face(idt, acts, nz, valence=0.5, arousal=0.1)
    b = render_face(idt, dict(acts), nz, valence=0.5, arousal=0.1)
    assert np.array_equal(a, b)
    assert random_identity(np.random.default_rng(3)) == random_identity(np.random.default_rng(3))
    assert random_nuisance(np.random.default_rng(3)) == random_nuisance(np.random.default_rng(3))


def test_noise_seed_changes_only_the_noise():
    idt = Identity()
    a = render_face(idt, {}, Nuisance(noise=4.0, noise_seed=1))
    b = render_face(idt, {}, Nuisance(noise=4.0, noise_seed=2))
    clean = render_face(idt, {}, CLEAN)
    assert not np.array_equal(a, b)
    assert abs(float(a.astype(float).mean() - clean.astype(float).mean())) < 1.0  # zero-mean noise


def test_different_identities_differ():
    ids = [random_identity(np.random.default_rng(s)) for s in range(6)]
    imgs = [render_face(i, {}, CLEAN) for i in ids]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert _diff(imgs[i], imgs[j]).mean() > 8.0


def test_random_identity_fields_in_range():
    rng = np.random.default_rng(11)
    styles = set()
    for _ in range(200):
        idt = random_identity(rng)
        styles.add(idt.hair_style)
        assert 0.85 <= idt.face_width <= 1.1 and 0.9 <= idt.face_height <= 1.1 and 0.0 <= idt.jaw <= 1.0
        for c in (idt.skin, idt.hair, idt.eye_color, idt.lip_color, idt.background, idt.shirt):
            assert len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
    assert styles == {0, 1, 2, 3, 4}


def test_random_nuisance_bounds_and_zero_strength_is_clean():
    rng = np.random.default_rng(5)
    for _ in range(300):
        nz = random_nuisance(rng, strength=1.0)
        assert abs(nz.yaw) <= 30 and abs(nz.pitch) <= 20 and abs(nz.roll) <= 15
        assert nz.blur >= 0 and nz.noise >= 0 and 20 <= nz.jpeg_quality <= 95 and nz.occlusion in (0, 1, 2, 3)
    idt = random_identity(rng)
    calm = random_nuisance(rng, strength=0.0)
    assert np.array_equal(render_face(idt, {"AU4": 1.0}, calm), render_face(idt, {"AU4": 1.0}, CLEAN))


def test_labeled_actions_match_the_2020_label_set():
    assert LABELED_ACTIONS == AU_NAMES_2020 and set(LABELED_ACTIONS) < set(ACTIONS)


def test_unknown_action_rejected_and_missing_means_zero():
    with pytest.raises(ValueError, match=r"unknown action units \['AU7'\]"):
        render_face(Identity(), {"AU7": 1.0}, CLEAN)
    full = {a: 0.0 for a in ACTIONS}
    assert np.array_equal(render_face(Identity(), full, CLEAN), render_face(Identity(), {}, CLEAN))


# ---- action units change the right region ------------------------------------------------------------------------

_TARGET = {"AU1": "brows", "AU2": "brows", "AU4": "brows", "AU6": "eyes",
           "AU12": "mouth", "AU15": "mouth", "AU20": "mouth", "AU25": "mouth"}
_FAR = {"brows": ("mouth",), "eyes": ("brows", "mouth"), "mouth": ("brows", )}


@pytest.mark.parametrize("au", LABELED_ACTIONS)
def test_each_labeled_au_changes_its_region_only(au):
    for idt in _identities():
        regions = _regions(landmarks(idt, {}, CLEAN))
        neutral = render_face(idt, {}, CLEAN)
        d = _diff(render_face(idt, {au: 1.0}, CLEAN), neutral)
        near = regions[_TARGET[au]]
        assert d[near].mean() > 2.0, (au, idt, d[near].mean())
        for name in _FAR[_TARGET[au]]:
            far = regions[name]
            assert d[far].mean() < 1.0, (au, name, idt, d[far].mean())


@pytest.mark.parametrize("au", ACTIONS)
def test_intensity_scales_continuously(au):
    idt = Identity()
    neutral = render_face(idt, {}, CLEAN)
    d = [_diff(render_face(idt, {au: v}, CLEAN), neutral).sum() for v in (0.25, 0.5, 1.0)]
    assert 0 < d[0] < d[1] < d[2], (au, d)


# ---- geometry through landmarks ------------------------------------------------------------------------------------


def _lm(acts, idt=None, **kw):
    return landmarks(idt or Identity(), acts, CLEAN, **kw)


def test_neutral_layout_is_an_aligned_crop():
    for idt in _identities():
        lm = _lm({}, idt)
        for eye in ("eye_left", "eye_right"):
            assert 0.33 * SIZE <= lm[eye][1] <= 0.42 * SIZE
        mouth_y = (lm["mouth_left"][1] + lm["mouth_right"][1]) / 2
        assert 0.63 * SIZE <= mouth_y <= 0.76 * SIZE
        assert lm["eye_left"][0] < SIZE / 2 < lm["eye_right"][0]
        assert abs((lm["eye_left"][0] + lm["eye_right"][0]) / 2 - SIZE / 2) < 1.0
        assert lm["eye_left"][1] < lm["nose_tip"][1] < mouth_y < lm["chin"][1] < SIZE


def test_mouth_corners_au12_up_au15_down():
    n, up, down = _lm({}), _lm({"AU12": 1.0}), _lm({"AU15": 1.0})
    for c in ("mouth_left", "mouth_right"):
        assert up[c][1] < n[c][1] - 2.0  # smaller y = higher
        assert down[c][1] > n[c][1] + 2.0
    assert up["mouth_right"][0] - up["mouth_left"][0] > n["mouth_right"][0] - n["mouth_left"][0] + 3.0
    half = _lm({"AU12": 0.5})
    assert half["mouth_left"][1] == pytest.approx((n["mouth_left"][1] + up["mouth_left"][1]) / 2, abs=0.05)


def test_au20_stretches_and_au25_au26_open():
    n = _lm({})
    st = _lm({"AU20": 1.0})
    width = lambda lm: lm["mouth_right"][0] - lm["mouth_left"][0]
    assert width(st) > width(n) + 6.0
    assert abs(st["mouth_left"][1] - n["mouth_left"][1]) < 1.5  # horizontal, not a smile/frown
    gap = lambda lm: lm["lower_lip_inner"][1] - lm["upper_lip_inner"][1]
    assert gap(n) == pytest.approx(0.0, abs=1e-9)
    assert gap(_lm({"AU25": 1.0})) > 2.0
    jaw = _lm({"AU26": 1.0})
    assert gap(jaw) > gap(_lm({"AU25": 1.0})) and jaw["chin"][1] > n["chin"][1] + 3.0


def test_brow_aus():
    n, a1, a2, a4 = _lm({}), _lm({"AU1": 1.0}), _lm({"AU2": 1.0}), _lm({"AU4": 1.0})
    for s in ("left", "right"):
        inner, outer = f"brow_inner_{s}", f"brow_outer_{s}"
        assert a1[inner][1] < n[inner][1] - 3.0 and abs(a1[outer][1] - n[outer][1]) < 1.0
        assert a2[outer][1] < n[outer][1] - 3.0 and abs(a2[inner][1] - n[inner][1]) < 1.0
        assert a4[inner][1] > n[inner][1] + 2.0
    gap = lambda lm: lm["brow_inner_right"][0] - lm["brow_inner_left"][0]
    assert gap(a4) < gap(n) - 3.0


def test_eye_aus():
    n, a5, a6 = _lm({}), _lm({"AU5": 1.0}), _lm({"AU6": 1.0})
    for s in ("left", "right"):
        up, lo = f"upper_lid_{s}", f"lower_lid_{s}"
        assert a5[up][1] < n[up][1] - 1.5  # upper lid raised
        assert a6[lo][1] < n[lo][1] - 1.0  # lower lid pushed up
        assert (a6[lo][1] - a6[up][1]) < (n[lo][1] - n[up][1]) - 2.0  # eye narrows


def test_valence_and_arousal_modulate_the_face():
    pos, neg = _lm({}, valence=1.0), _lm({}, valence=-1.0)
    assert pos["mouth_left"][1] < neg["mouth_left"][1] - 2.0
    hi, lo = _lm({}, arousal=1.0), _lm({}, arousal=-1.0)
    assert hi["upper_lid_left"][1] < lo["upper_lid_left"][1] - 0.8
    assert hi["brow_inner_left"][1] < lo["brow_inner_left"][1] - 1.5
    idt = Identity()
    assert not np.array_equal(render_face(idt, {}, CLEAN, valence=1.0), render_face(idt, {}, CLEAN, valence=-1.0))


def test_landmarks_match_the_pixels():
    idt = Identity()
    img = render_face(idt, {}, CLEAN).astype(float).mean(-1)
    lm = _lm({}, idt)
    skin = img[int(lm["nose_tip"][1]) - 8, int(lm["nose_tip"][0]) + 12]  # cheek
    for eye in ("eye_left", "eye_right"):
        x, y = np.round(lm[eye]).astype(int)
        assert img[y - 1: y + 2, x - 1: x + 2].mean() < skin - 60  # pupil/iris is dark
    x, y = np.round((lm["mouth_left"] + lm["mouth_right"]) / 2).astype(int)
    assert img[y, x] < skin - 30  # lip line
    pts = five_points(lm)
    assert pts.shape == (5, 2)


def test_pose_moves_landmarks_like_the_pose():
    idt = Identity()
    n = five_points(landmarks(idt, {}, CLEAN))
    rolled = five_points(landmarks(idt, {}, Nuisance(roll=10.0)))
    v0, v1 = n[1] - n[0], rolled[1] - rolled[0]
    assert np.linalg.norm(v1) == pytest.approx(np.linalg.norm(v0), rel=1e-6)
    assert np.degrees(np.arctan2(v1[1], v1[0]) - np.arctan2(v0[1], v0[0])) == pytest.approx(10.0, abs=1e-6)
    turned = five_points(landmarks(idt, {}, Nuisance(yaw=25.0)))
    assert turned[2, 0] > n[2, 0] + 2.0  # nose tip swings to image right
    assert (turned[1, 0] - turned[0, 0]) < (n[1, 0] - n[0, 0]) - 1.0  # eye distance foreshortened
    assert np.abs(turned[:, 0] - n[:, 0]).max() < 15.0  # still roughly an aligned crop
    up = five_points(landmarks(idt, {}, Nuisance(pitch=15.0)))
    assert (up[3, 1] - up[0, 1]) < (n[3, 1] - n[0, 1]) - 1.0  # eye-mouth distance foreshortened
    # pose changes the image, the outline too (not only the features)
    assert _diff(render_face(idt, {}, Nuisance(yaw=25.0)), render_face(idt, {}, CLEAN)).mean() > 5.0


# ---- nuisance ----------------------------------------------------------------------------------------------------


def test_nuisance_effects():
    idt = Identity()
    clean = render_face(idt, {}, CLEAN).astype(float)

    def hf(img):  # high-frequency energy
        g = img.mean(-1)
        return np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()

    assert hf(render_face(idt, {}, Nuisance(blur=1.5)).astype(float)) < 0.7 * hf(clean)
    assert render_face(idt, {}, Nuisance(brightness=25.0)).astype(float).mean() > clean.mean() + 15.0
    assert render_face(idt, {}, Nuisance(contrast=0.6)).astype(float).std() < 0.75 * clean.std()
    lit = render_face(idt, {}, Nuisance(light_angle=180.0, light_strength=0.3)).astype(float).mean(-1)
    assert lit[:, :40].mean() > lit[:, -40:].mean() + 15.0  # light from image left
    for kind in (1, 2, 3):
        occ = render_face(idt, {}, Nuisance(occlusion=kind, occlusion_seed=4))
        d = _diff(occ, clean)
        assert (d > 30).mean() > 0.02, kind  # a visible occluder
        assert (d[30:100, 20:92] > 30).sum() > 0.5 * (d > 30).sum(), kind  # ... mostly on the face
