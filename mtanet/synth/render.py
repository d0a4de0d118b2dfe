"""Parametric renderer of 112x112 aligned face crops driven by facial action units (the synthetic Aff-Wild2 twin).

A face is an :class:`Identity` (drawn once per person), a set of action-unit intensities (:data:`ACTIONS`, each in
[0, 1]), a latent valence/arousal that mildly modulates the face beyond the AUs, and a per-frame :class:`Nuisance`
(head pose, lighting, exposure, blur, noise, occlusion). :func:`render_face` turns them into an RGB ``uint8`` array
of shape ``(112, 112, 3)``; :func:`landmarks` returns the key 2-D points of the very same geometry.

How it works: every shape (face outline, hair, brows, lids, nose, lips, wrinkles) is a polygon or polyline built in
*frontal* 112-px coordinates, where the action units move its points as FACS describes. All points of a frame then
go through one vectorised head-pose transform (yaw/pitch on a rough ellipsoidal head, re-centred the way a face
aligner would re-centre the crop, then roll about the crop centre) and are drawn with ``ImageDraw`` on a
supersampled canvas, box-downsampled to 112 px, and finished at 112 px with blur, a directional lighting gradient,
brightness/contrast and gaussian pixel noise. Only numpy and PIL are used; the output is a pure function of the
inputs (pixel noise and occlusion are seeded from the :class:`Nuisance`).

Conventions: image coordinates in pixels of the 112 crop, x to the right, y down; "left"/"right" in landmark names
mean *image* left/right (``eye_left`` is the eye with the smaller x, the subject's right eye). Positive yaw turns the
nose towards image right, positive pitch tilts the face up, positive roll rotates the face clockwise on screen
(in degrees, as in ``PIL.Image.rotate(-roll)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "ACTIONS",
    "LABELED_ACTIONS",
    "SIZE",
    "Identity",
    "Nuisance",
    "five_points",
    "landmarks",
    "random_identity",
    "random_nuisance",
    "render_face",
]

#: Side of the square output crop, in pixels.
SIZE: int = 112
#: Supersampling factor of the drawing canvas (drawn at ``SIZE * SUPERSAMPLE``, box-downsampled to ``SIZE``).
SUPERSAMPLE: int = 2

#: Action units the renderer understands. AU5 (upper lid raiser), AU9 (nose wrinkler) and AU26 (jaw drop) are
#: rendered but not labelled in the 2020 edition.
ACTIONS: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU5", "AU6", "AU9", "AU12", "AU15", "AU20", "AU25", "AU26")
#: The subset that the ABAW 2020 AU set labels (same order as ``mtanet.tasks.AU_NAMES_2020``).
LABELED_ACTIONS: tuple[str, ...] = ("AU1", "AU2", "AU4", "AU6", "AU12", "AU15", "AU20", "AU25")

_ACTION_SET = frozenset(ACTIONS)

# Frontal head centre (pose pivot) and crop centre (roll pivot), in 112-px coordinates.
_HX, _HY = 56.0, 57.0
_RX, _RY = 56.0, 56.0

_Color = tuple[int, int, int]


@dataclass(frozen=True)
class Identity:
    """Everything about a person that stays fixed across their frames.

    Shape fields named ``*_width``, ``*_height``, ``*_size``, ``*_spacing``, ``*_length`` are factors around 1.0 of
    the average face; colours are RGB tuples. The defaults are an average face.
    """

    face_width: float = 1.0  #: half face width = 41 px * face_width
    face_height: float = 1.0  #: crown-to-chin size factor
    jaw: float = 0.5  #: 0 narrow pointed chin .. 1 broad square jaw
    skin: _Color = (224, 172, 130)
    hair: _Color = (70, 48, 35)
    hair_style: int = 0  #: 0 short, 1 side-swept fringe, 2 bangs + long, 3 receding/bald top, 4 long with middle part
    eye_color: _Color = (95, 62, 38)
    eye_spacing: float = 1.0  #: half interocular distance = 17 px * eye_spacing
    eye_size: float = 1.0
    brow_thickness: float = 2.6  #: pixels at 112
    nose_length: float = 1.0
    mouth_width: float = 1.0
    lip_color: _Color = (186, 104, 98)
    brow_arch: float = 1.0  #: height factor of the brow arch
    lip_thickness: float = 1.0
    eye_height: float = 0.0  #: offset of the eye line in px (positive = lower)
    hair_part: int = 1  #: side (+1 image right, -1 image left) the side-swept fringe falls to
    beard: float = 0.0  #: 0 clean-shaven .. 1 full dark beard
    background: _Color = (128, 136, 146)
    background2: _Color = (96, 100, 108)
    background_split: float = 0.75  #: x fraction where the second background panel starts (>1: none)
    shirt: _Color = (60, 72, 112)


@dataclass(frozen=True)
class Nuisance:
    """Per-frame nuisance. ``Nuisance()`` is a clean frontal frame (no blur, noise, occlusion, lighting)."""

    yaw: float = 0.0  #: degrees, |yaw| <= 30; positive turns the nose to image right
    pitch: float = 0.0  #: degrees, |pitch| <= 20; positive tilts the face up
    roll: float = 0.0  #: degrees, |roll| <= 15; positive rotates the face clockwise on screen
    light_angle: float = 0.0  #: degrees, direction (image coordinates) the light comes from
    light_strength: float = 0.0  #: relative gain difference across half the crop (0 = flat light)
    brightness: float = 0.0  #: additive offset in 8-bit units
    contrast: float = 1.0  #: gain around mid-grey 128
    blur: float = 0.0  #: gaussian sigma in px at 112
    noise: float = 0.0  #: std of gaussian pixel noise, 8-bit units
    jpeg_quality: int = 95  #: not applied by render_face; for the writer
    occlusion: int = 0  #: 0 none, 1 hand, 2 dark bar, 3 sunglasses, 4 a lock of hair over one eye
    occlusion_seed: int = 0  #: seeds the occluder's placement/shape/colour
    noise_seed: int = 0  #: seeds the pixel noise
    gaze: float = 0.0  #: horizontal gaze in [-1, 1] (iris shift, +1 = image right)
    shift_x: float = 0.0  #: alignment error: px the whole crop content moves right (a real aligner is off by a few)
    shift_y: float = 0.0  #: alignment error: px the whole crop content moves down
    scale: float = 1.0  #: alignment error: zoom of the crop content around the centre (1 = the canonical size)
    clutter: int = 0  #: number of background objects (shelves, frames, lamps) behind the person
    clutter_seed: int = 0  #: seeds the objects' places, shapes and colours (kept per video: the room does not move)


def _clip01(v: float) -> float:
    return 0.0 if v < 0.0 else min(v, 1.0)


def _mix(c1, c2, t: float) -> _Color:
    t = _clip01(t)
    return (
        round(c1[0] + (c2[0] - c1[0]) * t),
        round(c1[1] + (c2[1] - c1[1]) * t),
        round(c1[2] + (c2[2] - c1[2]) * t),
    )


def _jitter(rng: np.random.Generator, c, amount: float) -> _Color:
    return tuple(int(np.clip(v + rng.normal(0.0, amount), 0, 255)) for v in c)  # type: ignore[return-value]


_SKINS = np.array(
    [(255, 226, 202), (243, 200, 168), (228, 178, 140), (206, 150, 108), (172, 118, 80), (130, 88, 60), (92, 62, 44)],
    dtype=float,
)
_HAIRS = [
    ((28, 24, 24), 0.22), ((58, 40, 30), 0.22), ((96, 66, 42), 0.16), ((140, 104, 68), 0.1),
    ((196, 160, 106), 0.1), ((150, 72, 36), 0.06), ((140, 138, 136), 0.08), ((205, 200, 195), 0.06),
]
_EYES = [
    ((92, 56, 30), 0.35), ((52, 36, 26), 0.25), ((74, 118, 168), 0.14), ((86, 118, 70), 0.09),
    ((124, 96, 52), 0.1), ((110, 122, 132), 0.07),
]


def _pick(rng: np.random.Generator, table) -> tuple:
    p = np.array([w for _, w in table])
    return table[int(rng.choice(len(table), p=p / p.sum()))][0]


def random_identity(rng: np.random.Generator) -> Identity:
    """Draw a random person: face shape, colours, hair style, feature sizes and a background."""
    u = rng.uniform(0.0, len(_SKINS) - 1.0)
    i = min(int(u), len(_SKINS) - 2)
    skin = _jitter(rng, _SKINS[i] + (_SKINS[i + 1] - _SKINS[i]) * (u - i), 5.0)
    dark = 1.0 - (sum(skin) / 3.0) / 230.0
    hair = _jitter(rng, _pick(rng, _HAIRS), 8.0)
    if dark > 0.3 and sum(hair) > 200 and rng.random() < 0.85:  # mostly dark hair on dark skin (contrast)
        hair = _jitter(rng, (30, 26, 26), 6.0)
    lip = _mix(skin, (178, 70, 84), rng.uniform(0.35, 0.6))
    lip = _mix(lip, (60, 30, 30), max(0.0, dark) * 0.5 + rng.uniform(0.0, 0.1))
    bg = tuple(int(v) for v in rng.integers(35, 225, size=3))
    bg2 = _mix(bg, tuple(int(v) for v in rng.integers(20, 235, size=3)), rng.uniform(0.3, 0.9))
    male = rng.random() < 0.5
    style = int(rng.choice(5, p=[0.3, 0.2, 0.17, 0.1, 0.23] if male else [0.08, 0.2, 0.3, 0.02, 0.4]))
    return Identity(
        face_width=float(rng.uniform(0.9, 1.08)),
        face_height=float(rng.uniform(0.93, 1.06)),
        jaw=float(rng.uniform(0.4, 1.0) if male else rng.uniform(0.0, 0.6)),
        skin=skin,
        hair=hair,
        hair_style=style,
        eye_color=_jitter(rng, _pick(rng, _EYES), 6.0),
        eye_spacing=float(rng.uniform(0.92, 1.08)),
        eye_size=float(rng.uniform(0.88, 1.12)),
        brow_thickness=float(rng.uniform(2.4, 3.6) if male else rng.uniform(1.8, 2.8)),
        nose_length=float(rng.uniform(0.88, 1.12)),
        mouth_width=float(rng.uniform(0.88, 1.12)),
        lip_color=lip,
        brow_arch=float(rng.uniform(0.5, 1.4)),
        lip_thickness=float(rng.uniform(0.75, 1.05) if male else rng.uniform(0.9, 1.25)),
        eye_height=float(rng.uniform(-1.5, 1.5)),
        hair_part=int(rng.choice([-1, 1])),
        beard=float(rng.uniform(0.3, 1.0)) if (male and rng.random() < 0.3) else 0.0,
        background=bg,  # type: ignore[arg-type]
        background2=bg2,
        background_split=float(rng.uniform(0.55, 0.95) if rng.random() < 0.6 else 2.0),
        shirt=tuple(int(v) for v in rng.integers(20, 220, size=3)),  # type: ignore[arg-type]
    )


def random_nuisance(rng: np.random.Generator, strength: float = 1.0) -> Nuisance:
    """Draw a random frame nuisance; ``strength`` in [0, 1+] scales every perturbation (0 -> ``Nuisance()``-like)."""
    s = float(max(strength, 0.0))
    occl = 0
    if rng.random() < 0.12 * min(s, 2.0):
        occl = int(rng.choice([1, 2, 3], p=[0.5, 0.25, 0.25]))
    return Nuisance(
        yaw=float(np.clip(rng.normal(0.0, 10.0 * s), -30.0, 30.0)),
        pitch=float(np.clip(rng.normal(0.0, 6.0 * s), -20.0, 20.0)),
        roll=float(np.clip(rng.normal(0.0, 5.0 * s), -15.0, 15.0)),
        light_angle=float(rng.uniform(0.0, 360.0)),
        light_strength=float(rng.uniform(0.0, 0.35) * min(s, 1.5)),
        brightness=float(rng.normal(0.0, 12.0 * s)),
        contrast=float(np.clip(math.exp(rng.normal(0.0, 0.12 * s)), 0.7, 1.35)),
        blur=float(np.clip(rng.normal(0.25, 0.45) * s, 0.0, 2.0)),
        noise=float(rng.uniform(0.0, 6.0) * s),
        jpeg_quality=int(np.clip(round(95 - rng.uniform(0.0, 60.0) * s), 20, 95)),
        occlusion=occl,
        occlusion_seed=int(rng.integers(0, 2**31 - 1)),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        gaze=float(np.clip(rng.normal(0.0, 0.35 * s), -1.0, 1.0)),
    )


# --------------------------------------------------------------------------------------------------------------------
# Scene: shapes in frontal coordinates, one vectorised pose transform, then drawing.

_SURF, _SIL, _CROP = 2, 1, 0  # point modes: on the face surface, on the head silhouette, fixed to the crop


class _Scene:
    __slots__ = ("cdz", "chunks", "cmode", "counts", "marks", "n", "ops")

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.cmode: list[int] = []
        self.cdz: list[float] = []
        self.counts: list[int] = []
        self.ops: list[tuple] = []
        self.n = 0
        self.marks: dict[str, int] = {}

    def _add(self, pts, mode: int, dz: float) -> tuple[int, int]:
        pts = np.asarray(pts, dtype=np.float64)
        if pts.ndim != 2:
            pts = pts.reshape(-1, 2)
        k = pts.shape[0]
        self.chunks.append(pts)
        self.cmode.append(mode)
        self.cdz.append(dz)
        self.counts.append(k)
        s = self.n
        self.n += k
        return s, self.n

    def poly(self, pts, fill, mode: int = _SURF, dz: float = 0.0) -> None:
        s, e = self._add(pts, mode, dz)
        self.ops.append(("p", s, e, fill))

    def poly2(self, pts1, mode1: int, dz1: float, pts2, mode2: int, dz2: float, fill) -> None:
        """One polygon whose two runs of points follow different pose modes."""
        s, _ = self._add(pts1, mode1, dz1)
        _, e = self._add(pts2, mode2, dz2)
        self.ops.append(("p", s, e, fill))

    def line(self, pts, fill, width: float, mode: int = _SURF, dz: float = 0.0) -> None:
        s, e = self._add(pts, mode, dz)
        self.ops.append(("l", s, e, fill, width))

    def circle(self, center, r: float, fill, mode: int = _SURF, dz: float = 0.0, outline=None) -> None:
        s, e = self._add(center, mode, dz)
        self.ops.append(("c", s, e, fill, r, outline))

    def mark(self, name: str, pt, mode: int = _SURF, dz: float = 0.0) -> None:
        self.marks[name] = self._add(pt, mode, dz)[0]


def _transform(sc: _Scene, a: float, b: float, nz: Nuisance) -> np.ndarray:
    """Pose all scene points: yaw/pitch on an ellipsoidal head, recentred like an aligner would, then roll."""
    P = np.concatenate(sc.chunks)
    yaw, pitch, roll = math.radians(nz.yaw), math.radians(nz.pitch), math.radians(nz.roll)
    if yaw != 0.0 or pitch != 0.0:
        mode = np.repeat(np.array(sc.cmode, dtype=np.int8), sc.counts)
        dz = np.repeat(np.array(sc.cdz, dtype=np.float64), sc.counts)
        dx = P[:, 0] - _HX
        dy = P[:, 1] - _HY
        c = 0.8 * a
        u = np.clip(1.0 - (dx / a) ** 2, 0.0, 1.0)
        z_surf = c * np.sqrt(np.clip(u - 0.45 * (dy / b) ** 2, 0.0, 1.0))
        z_sil = c * 0.5 * np.clip(dy / b, 0.0, 1.0) ** 1.5 * np.sqrt(u)  # chin is forward of the ears
        surf = mode == _SURF
        z = np.where(surf, z_surf, z_sil) + dz
        sy, sp = math.sin(yaw), math.sin(pitch)
        kx = np.where(surf, math.cos(yaw), 1.0)
        ky = np.where(surf, math.cos(pitch), 1.0)
        moved = mode != _CROP
        # an aligner keeps eyes/nose/mouth near their canonical place: shift back most of the feature motion
        X = np.where(moved, dx * kx + (z - 0.75 * c) * sy, dx) + _HX
        Y = np.where(moved, dy * ky - (z - 0.75 * c) * sp, dy) + _HY
        P = np.stack([X, Y], axis=1)
    if roll != 0.0:
        cr, sr = math.cos(roll), math.sin(roll)
        x = P[:, 0] - _RX
        y = P[:, 1] - _RY
        P = np.stack([_RX + cr * x - sr * y, _RY + sr * x + cr * y], axis=1)
    if nz.scale != 1.0 or nz.shift_x != 0.0 or nz.shift_y != 0.0:  # the aligner's error moves everything alike
        P = np.stack([_RX + nz.scale * (P[:, 0] - _RX) + nz.shift_x, _RY + nz.scale * (P[:, 1] - _RY) + nz.shift_y],
                     axis=1)
    return P


# Parameter grids reused by every frame.
_T13 = np.linspace(0.0, 1.0, 13)
_T9 = np.linspace(0.0, 1.0, 9)
_X17 = np.linspace(-1.0, 1.0, 17)
_PHI_UP = np.linspace(math.pi, 2.0 * math.pi, 21)
_PHI_LO = np.linspace(0.0, math.pi, 23)[1:-1]
_ANG16 = np.linspace(0.0, 2.0 * math.pi, 16, endpoint=False)
_COS16, _SIN16 = np.cos(_ANG16), np.sin(_ANG16)


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    return np.stack([cx + rx * _COS16, cy + ry * _SIN16], axis=1)


def _band(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Closed polygon between two curves sampled at the same xs."""
    return np.concatenate([np.stack([xs, top], 1), np.stack([xs[::-1], bottom[::-1]], 1)])


@lru_cache(maxsize=512)
def _palette(idt: Identity) -> dict:
    skin = idt.skin
    dark = (36, 22, 18)
    return {
        "skin": skin,
        "edge": _mix(skin, dark, 0.17),
        "mid": _mix(skin, dark, 0.09),
        "mid2": _mix(skin, dark, 0.04),
        "lid": _mix(skin, dark, 0.1),
        "lowlid": _mix(skin, dark, 0.05),
        "ear": _mix(skin, dark, 0.15),
        "ear_in": _mix(skin, dark, 0.35),
        "neck": _mix(skin, dark, 0.32),
        "nostril": _mix(skin, (30, 12, 10), 0.62),
        "wing": _mix(skin, dark, 0.3),
        "under_nose": _mix(skin, dark, 0.2),
        "bridge": _mix(skin, dark, 0.1),
        "tip": _mix(skin, (255, 255, 255), 0.14),
        "blush": _mix(skin, (214, 104, 104), 0.08),
        "hair": idt.hair,
        "buzz": _mix(idt.hair, skin, 0.45),
        "hair_hi": _mix(idt.hair, (255, 255, 255), 0.16),
        "hair_dk": _mix(idt.hair, (0, 0, 0), 0.3),
        "brow": _mix(idt.hair, (34, 26, 22), 0.45),
        "beard": _mix(skin, _mix(idt.hair, (20, 16, 14), 0.4), 0.5 * idt.beard),
        "beard_soft": _mix(skin, _mix(idt.hair, (20, 16, 14), 0.4), 0.25 * idt.beard),
        "white": (236, 232, 226),
        "iris": idt.eye_color,
        "iris_rim": _mix(idt.eye_color, (0, 0, 0), 0.5),
        "pupil": (14, 10, 10),
        "lash": (28, 20, 18),
        "lip_up": _mix(idt.lip_color, dark, 0.12),
        "lip_lo": idt.lip_color,
        "lip_line": _mix(idt.lip_color, (30, 10, 10), 0.55),
        "mouth_in": (58, 20, 24),
        "teeth": (232, 226, 210),
        "dark": dark,
    }


def _build(idt: Identity, actions: Mapping[str, float], nz: Nuisance, valence: float, arousal: float,
           draw: bool) -> tuple[_Scene, float, float]:
    unknown = set(actions) - _ACTION_SET
    if unknown:
        raise ValueError(f"unknown action units {sorted(unknown)}; expected names from {ACTIONS}")

    def au(name: str) -> float:
        return _clip01(float(actions.get(name, 0.0)))

    a1, a2, a4, a5, a6, a9 = au("AU1"), au("AU2"), au("AU4"), au("AU5"), au("AU6"), au("AU9")
    a12, a15, a20, a25, a26 = au("AU12"), au("AU15"), au("AU20"), au("AU25"), au("AU26")
    val = max(-1.0, min(1.0, float(valence)))
    aro = max(-1.0, min(1.0, float(arousal)))

    pal = _palette(idt)
    skin, dark = pal["skin"], pal["dark"]
    sc = _Scene()

    # ---- key frontal geometry -------------------------------------------------------------------------------------
    a = 40.0 * idt.face_width
    bt = 52.0 * idt.face_height
    bb = 45.0 * idt.face_height
    y0 = 42.0 + idt.eye_height  # eye line
    esp = 17.0 * idt.eye_spacing
    yn = y0 + 20.0 * idt.nose_length  # nose tip
    my = yn + 15.5  # mouth line
    mw = 14.0 * idt.mouth_width
    gap = 2.6 * a25 + 5.4 * a26  # lips part / jaw drop opening
    drop = 0.8 * 5.4 * a26 + 0.25 * 2.6 * a25  # chin drop
    chin = _HY + bb

    # ---- background, shirt, neck, back hair, ears -----------------------------------------------------------------
    if draw:
        if idt.background_split < 1.0:
            xs = 112.0 * idt.background_split
            sc.poly([(xs, -60), (180, -60), (180, 180), (xs, 180)], idt.background2, _CROP)
        sc.poly([(-20, 132), (-20, 104), (18, 98), (40, 104), (72, 104), (94, 98), (132, 104), (132, 132)],
                idt.shirt, _CROP)
        nk = 0.46 * a
        sc.poly([(_HX - nk, _HY + 10), (_HX + nk, _HY + 10), (_HX + nk + 2, 120), (_HX - nk - 2, 120)],
                pal["neck"], _SIL)
        style = idt.hair_style % 5
        long_hair = style in (2, 4)
        if long_hair:
            ang = _PHI_UP
            top = np.stack([_HX + (a + 6.0) * np.cos(ang), _HY + (bt + 5.0) * np.sin(ang)], 1)
            sides = [(_HX + a + 10.0, _HY + 30.0), (_HX + a + 13.0, 118.0), (_HX - a - 13.0, 118.0),
                     (_HX - a - 10.0, _HY + 30.0)]
            sc.poly(np.concatenate([top, sides]), pal["hair_dk"], _SIL)
        for s in (-1.0, 1.0):
            ex_ = _HX + s * (a - 1.0)
            ey_ = 0.5 * (y0 + yn) + 1.0
            sc.poly(_ellipse(ex_, ey_, 5.0, 10.5), pal["ear"], _SIL, -0.2 * a)
            sc.line([(ex_ + s * 1.5, ey_ - 6.5), (ex_ + s * 3.2, ey_ - 2.0), (ex_ + s * 2.0, ey_ + 5.0)],
                    pal["ear_in"], 1.0, _SIL, -0.2 * a)

        # ---- face: outline with jaw control, three shading layers ------------------------------------------------
        n = 2.0 + 1.2 * idt.jaw
        cu, su = np.cos(_PHI_LO), np.sin(_PHI_LO)
        ly = su ** (2.0 / n)
        lx = np.sign(cu) * np.abs(cu) ** (2.0 / n) * (1.0 - (0.30 * (1.0 - idt.jaw) + 0.18) * ly ** 2)
        yw = _HY - 8.0  # widest level (cheekbones)
        hu, hl = yw - (_HY - bt), chin - yw
        upper = np.stack([_HX + a * np.cos(_PHI_UP), yw + hu * np.sin(_PHI_UP)], 1)
        lower = np.stack([_HX + a * lx, yw + hl * ly], 1)
        lower[:, 1] += drop * ly ** 3
        outline = np.concatenate([upper[::-1], lower[::-1]])  # right side over the top, then round the chin
        c0 = np.array([_HX, yw + 8.0])
        for k, col in ((1.0, pal["edge"]), (0.955, pal["mid"]), (0.9, pal["mid2"]), (0.84, skin)):
            sc.poly(c0 + k * (outline - c0), col, _SIL)
        if idt.beard > 0.0:
            lo = lower
            keep = lo[:, 1] > yn - 2.0
            top = [(_HX + a * 0.98, yn - 2.0), (_HX + mw + 6.0, my - 3.0), (_HX + mw + 1.0, my - 4.5),
                   (_HX + 6.0, yn + 3.0), (_HX - 6.0, yn + 3.0), (_HX - mw - 1.0, my - 4.5),
                   (_HX - mw - 6.0, my - 3.0), (_HX - a * 0.98, yn - 2.0)]
            top = np.asarray(top[::-1])
            sc.poly(np.concatenate([lo[keep], top]), pal["beard_soft"], _SURF)  # soft fringe, then the dense part
            sc.poly(np.concatenate([lo[keep], top + (0.0, 3.0)]), pal["beard"], _SURF)

        # cheeks (AU6 raises and bulges them, AU12 a little)
        for s in (-1.0, 1.0):
            ccx = _HX + s * (esp + 3.0)
            ccy = yn + 1.0 - 4.0 * a6 - 1.5 * a12
            col = _mix(pal["blush"], (255, 236, 226), 0.16 * a6 + 0.05 * a12)
            sc.poly(_ellipse(ccx, ccy, 9.0 + 1.0 * a6, 6.0 + 1.5 * a6), col)

        # forehead lines: AU1 central, AU2 lateral
        for k in range(2):
            fy = y0 - 18.0 - 3.2 * k
            if a1 > 0.0:
                xs_ = _HX + np.linspace(-9.0, 9.0, 5)
                sc.line(np.stack([xs_, fy + 0.012 * (xs_ - _HX) ** 2], 1), _mix(skin, dark, 0.42 * a1), 1.0)
            if a2 > 0.0:
                for s in (-1.0, 1.0):
                    xs_ = _HX + s * np.linspace(esp - 4.0, esp + 8.0, 4)
                    sc.line(np.stack([xs_, fy + 1.5 - 0.06 * np.abs(xs_ - _HX - s * (esp - 4.0))], 1),
                            _mix(skin, dark, 0.42 * a2), 1.0)

    # ---- brows -----------------------------------------------------------------------------------------------------
    ew = 7.6 * idt.eye_size
    th0 = idt.brow_thickness
    for s, side in ((-1.0, "left"), (1.0, "right")):
        ex = _HX + s * esp
        t = _T9
        x_in = ex - s * (ew * 0.95 + 2.4 * a4)
        x_out = ex + s * (ew + 2.8 + 0.6 * a2)
        xs_ = x_in + (x_out - x_in) * t
        base = y0 - 9.5 + 0.6 * t - 3.0 * idt.brow_arch * np.sin(math.pi * t ** 0.8)
        base = (base - 4.6 * a1 * (1.0 - t) ** 1.6 - 4.6 * a2 * t ** 1.4 + 3.0 * a4 * (1.0 - 0.55 * t)
                + 0.8 * a9 * (1.0 - t) - 1.3 * aro)
        th = th0 * (1.15 - 0.55 * t)
        if draw:
            sc.poly(_band(xs_, base - 0.5 * th, base + 0.5 * th), pal["brow"], _SURF, 1.0)
        sc.mark(f"brow_inner_{side}", (xs_[0], base[0]), _SURF, 1.0)
        sc.mark(f"brow_outer_{side}", (xs_[-1], base[-1]), _SURF, 1.0)
    if draw and a4 > 0.0:  # glabellar furrow
        col = _mix(skin, dark, 0.55 * a4)
        for s in (-1.0, 1.0):
            sc.line([(_HX + s * 2.6, y0 - 12.0), (_HX + s * 1.7, y0 - 7.5), (_HX + s * 1.9, y0 - 4.0)], col, 1.0)

    # ---- eyes ------------------------------------------------------------------------------------------------------
    # Low arousal lids the eyes as visibly as high arousal widens them (AU5): without it, a calm or tired resting
    # state would differ from a neutral one by less than people's eye sizes differ (v6; v5 lidded by 0.18 * arousal).
    lidded = 0.5 * max(0.0, -aro)
    eu = 3.5 * idt.eye_size * max(0.15, 1.0 + 0.65 * a5 + 0.18 * aro - lidded - 0.25 * a6 - 0.12 * a4)
    el = 2.5 * idt.eye_size * (1.0 - 0.6 * a6 + 0.05 * aro)
    ir = 3.8 * idt.eye_size
    eu0 = 3.5 * idt.eye_size
    gx = 1.6 * max(-1.0, min(1.0, nz.gaze))
    for s, side in ((-1.0, "left"), (1.0, "right")):
        ex = _HX + s * esp
        t = _T13
        xs_ = ex + s * ew * (2.0 * t - 1.0)
        cl = y0 + 0.6 - 0.9 * t
        up = cl - eu * np.sin(math.pi * t ** 0.9) ** 0.7
        lo = cl + el * np.sin(math.pi * t ** 1.15) ** 0.9
        crease = cl - max(eu0 + 2.6, eu + 1.3) * np.sin(math.pi * t ** 0.9) ** 0.6
        lo_band = lo + 4.5 * np.sin(math.pi * t) ** 0.7 + 0.3
        icx, icy = ex + gx, y0 + 0.4
        if draw:
            sc.poly(_band(xs_, up, lo), pal["white"])
            sc.circle((icx, icy), ir, pal["iris"], outline=pal["iris_rim"])
            sc.circle((icx, icy), ir * 0.45, pal["pupil"])
            sc.circle((icx - 1.0, icy - 1.3), 0.75, (250, 250, 250))
            sc.poly(_band(xs_, crease, up), pal["lid"])
            sc.poly(_band(xs_, lo, lo_band), pal["lowlid"])
            sc.line(np.stack([xs_, up], 1), pal["lash"], 1.4)
            sc.line(np.stack([xs_[1:-1], lo[1:-1]], 1), _mix(skin, dark, 0.38), 0.5)
            sc.line(np.stack([xs_[1:-1], crease[1:-1]], 1), _mix(skin, dark, 0.28), 0.6)
            # infra-orbital bulge line (stronger with AU6)
            bag = lo + 2.4 + 2.6 * np.sin(math.pi * t) - 0.8 * a6
            sc.line(np.stack([xs_[2:-1], bag[2:-1]], 1), _mix(skin, dark, 0.07 + 0.38 * a6), 0.6)
            if a6 > 0.0:  # crow's feet
                ox, oy = xs_[-1] + s * 1.2, cl[-1]
                col = _mix(skin, dark, 0.55 * a6)
                L = 2.0 + 3.0 * a6
                for ang in (-0.5, 0.0, 0.5):
                    sc.line([(ox, oy + ang * 1.5), (ox + s * L * math.cos(ang), oy + L * math.sin(ang) * 1.2)],
                            col, 0.6)
        sc.mark(f"eye_{side}", (icx, icy))
        sc.mark(f"eye_inner_{side}", (xs_[0], cl[0]))
        sc.mark(f"eye_outer_{side}", (xs_[-1], cl[-1]))
        sc.mark(f"upper_lid_{side}", (ex, float(np.interp(ex, np.sort(xs_), up if s > 0 else up[::-1]))))
        sc.mark(f"lower_lid_{side}", (ex, float(np.interp(ex, np.sort(xs_), lo if s > 0 else lo[::-1]))))

    # ---- mouth geometry (needed by nasolabial folds and beard) -------------------------------------------------------
    cdx = 3.0 * a12 + 4.2 * a20 - 0.4 * a15
    cdy = -4.2 * a12 + 3.6 * a15 + 0.6 * a20 - 1.6 * val
    W = mw + cdx
    ut = 3.0 * idt.lip_thickness * (1.0 - 0.38 * a20 - 0.15 * a12)
    lt = 3.8 * idt.lip_thickness * (1.0 - 0.38 * a20 - 0.12 * a12)
    X = _X17
    xs_m = _HX + W * X
    prof = 1.0 - X * X
    base = my + cdy * X * X - 0.8 * a9 * prof
    up_in = base - 0.3 * gap * prof ** 0.8
    lo_in = base + 0.7 * gap * prof ** 0.8
    up_out = up_in - 0.9 * a9 * prof - ut * np.sqrt(prof) * (1.0 - 0.28 * np.exp(-((W * X) / 2.2) ** 2))
    lo_out = lo_in + lt * prof ** 0.6
    corner_y = my + cdy

    # ---- nose ------------------------------------------------------------------------------------------------------
    nu = 1.8 * a9
    if draw:
        for s in (-1.0, 1.0):
            sc.line([(_HX + s * 3.4, y0 + 2.0), (_HX + s * 4.2, y0 + 10.0), (_HX + s * 5.0, yn - 3.0)],
                    pal["bridge"], 1.0, _SURF, 4.0)
        sc.poly(_ellipse(_HX, yn - 2.2 - 0.5 * nu, 3.2, 2.6), pal["tip"], _SURF, 10.0)
        ucol = pal["under_nose"]
        sc.line([(_HX - 5.8, yn + 0.6 - nu), (_HX - 2.5, yn + 2.4 - nu), (_HX, yn + 2.6 - nu),
                 (_HX + 2.5, yn + 2.4 - nu), (_HX + 5.8, yn + 0.6 - nu)], ucol, 1.2, _SURF, 7.0)
        for s in (-1.0, 1.0):
            sc.poly(_ellipse(_HX + s * 3.0, yn + 1.0 - nu, 1.9, 1.0), pal["nostril"], _SURF, 7.0)
            wx = _HX + s * 5.6
            sc.line([(wx - s * 0.6, yn - 3.6 - nu), (wx + s * 0.9, yn - 1.6 - nu), (wx + s * 0.6, yn + 0.4 - nu),
                     (wx - s * 0.8, yn + 1.4 - nu)], pal["wing"], 0.8, _SURF, 5.0)
        if a9 > 0.0:  # nose-bridge wrinkles
            col = _mix(skin, dark, 0.55 * a9)
            for k in range(3):
                wy = y0 + 1.5 + 2.6 * k
                sc.line([(_HX - 4.2, wy + 0.9), (_HX, wy - 0.3), (_HX + 4.2, wy + 0.9)], col, 0.8, _SURF, 4.0)
        # nasolabial folds
        alpha = _clip01(0.14 + 0.5 * a12 + 0.22 * a6 + 0.3 * a9 + 0.1 * a20)
        col = _mix(skin, dark, 0.55 * alpha)
        for s in (-1.0, 1.0):
            p0 = np.array([_HX + s * 7.6, yn - 1.5 - nu])
            p1 = np.array([_HX + s * (mw + 3.0 + 0.5 * cdx), yn + 5.0 - 1.2 * a12])
            p2 = np.array([_HX + s * (W + 2.4), corner_y + 3.5 - 0.2 * a12 + 0.5 * a15])
            tt = np.linspace(0.0, 1.0, 7)[:, None]
            sc.line((1 - tt) ** 2 * p0 + 2 * (1 - tt) * tt * p1 + tt ** 2 * p2, col, 0.8)
        if a15 > 0.0:  # depressor lines below the corners
            col = _mix(skin, dark, 0.45 * a15)
            for s in (-1.0, 1.0):
                sc.line([(_HX + s * (W + 0.4), corner_y + 0.8), (_HX + s * (W + 1.6), corner_y + 4.5)], col, 0.7)
    sc.mark("nose_tip", (_HX, yn - 0.5 - nu), _SURF, 11.0)

    # ---- lips ------------------------------------------------------------------------------------------------------
    if draw:
        sc.poly(_band(xs_m, up_out, up_in), pal["lip_up"], _SURF, 3.0)
        sc.poly(_band(xs_m, lo_in, lo_out), pal["lip_lo"], _SURF, 3.0)
        if gap > 0.05:
            sc.poly(_band(xs_m, up_in, lo_in), pal["mouth_in"], _SURF, 2.0)
            i = slice(3, 14)
            teeth_lo = np.minimum(up_in[i] + 2.3 * prof[i] ** 0.3, lo_in[i])
            sc.poly(_band(xs_m[i], up_in[i], teeth_lo), pal["teeth"], _SURF, 2.0)
            if gap > 4.0:
                teeth_up = np.maximum(lo_in[i] - 1.2 * prof[i] ** 0.3, teeth_lo)
                sc.poly(_band(xs_m[i], teeth_up, lo_in[i]), _mix(pal["teeth"], pal["mouth_in"], 0.25), _SURF, 2.0)
        sc.line(np.stack([xs_m, up_in], 1), pal["lip_line"], 0.9, _SURF, 3.0)
        # lower-lip highlight and mentolabial shadow
        sc.poly(_ellipse(_HX, lo_in[8] + 0.45 * lt, 3.2 * idt.mouth_width, 0.7),
                _mix(pal["lip_lo"], (255, 255, 255), 0.18), _SURF, 3.0)
        sy_ = lo_out[8] + 2.6 + 0.35 * drop
        sc.line([(_HX - 4.5, sy_ + 0.6), (_HX, sy_), (_HX + 4.5, sy_ + 0.6)], _mix(skin, dark, 0.16), 1.0)
    sc.mark("mouth_left", (xs_m[0], corner_y), _SURF, 2.0)
    sc.mark("mouth_right", (xs_m[-1], corner_y), _SURF, 2.0)
    sc.mark("upper_lip_top", (_HX, up_out[8]), _SURF, 3.0)
    sc.mark("upper_lip_inner", (_HX, up_in[8]), _SURF, 3.0)
    sc.mark("lower_lip_inner", (_HX, lo_in[8]), _SURF, 3.0)
    sc.mark("lower_lip_bottom", (_HX, lo_out[8]), _SURF, 3.0)
    sc.mark("chin", (_HX, chin + drop), _SIL)

    # ---- front hair --------------------------------------------------------------------------------------------------
    if draw:
        _front_hair(sc, idt, pal, a, bt, y0)
    return sc, a, bb


def _front_hair(sc: _Scene, idt: Identity, pal: dict, a: float, bt: float, y0: float) -> None:
    style = idt.hair_style % 5
    yh = y0 - 22.0  # hairline
    ang = _PHI_UP
    ra, rb = a + 2.5, bt + 3.5
    arc = np.stack([_HX + ra * np.cos(ang), _HY + rb * np.sin(ang)], 1)  # left (x small) -> over top -> right
    p = float(idt.hair_part)
    if style == 0:
        line = [(_HX + a - 1.5, y0 - 2.0), (_HX + a - 4.5, y0 - 7.0), (_HX + 0.8 * a, yh + 3.0),
                (_HX + 0.42 * a, yh - 0.2), (_HX, yh + 1.2), (_HX - 0.42 * a, yh - 0.2), (_HX - 0.8 * a, yh + 3.0),
                (_HX - a + 4.5, y0 - 7.0), (_HX - a + 1.5, y0 - 2.0)]
        side_y = y0 - 2.0
    elif style == 1:  # side-swept fringe falling to side p
        xs_ = np.linspace(1.0, -1.0, 9)  # from right to left (polygon order after the arc)
        w = 1.0 / (1.0 + np.exp(-3.5 * p * xs_))  # 1 on the side the fringe falls to
        ys = yh - 3.0 + w * 10.0 + 1.5 * np.sin(xs_ * 9.0) * w
        line = [(_HX + a - 1.5, y0 - 1.0)] + list(zip(_HX + 0.86 * a * xs_, ys)) + [(_HX - a + 1.5, y0 - 1.0)]
        side_y = y0 - 1.0
    elif style == 2:  # straight bangs
        xs_ = np.linspace(1.0, -1.0, 13)
        ys = y0 - 15.5 + 1.4 * np.abs(np.sin(xs_ * 10.0)) + 3.0 * xs_ ** 4
        line = [(_HX + a + 1.5, _HY + 12.0), (_HX + a - 2.5, y0 - 4.0)] + list(zip(_HX + 0.88 * a * xs_, ys)) + [
            (_HX - a + 2.5, y0 - 4.0), (_HX - a - 1.5, _HY + 12.0)]
        side_y = _HY + 12.0
    elif style == 3:  # buzz cut: high hairline, hair colour thinned towards the skin
        yb = yh - 3.0
        line = [(_HX + a - 1.5, y0 - 3.0), (_HX + a - 4.0, y0 - 9.0), (_HX + 0.75 * a, yb + 2.0),
                (_HX + 0.4 * a, yb - 0.5), (_HX, yb), (_HX - 0.4 * a, yb - 0.5), (_HX - 0.75 * a, yb + 2.0),
                (_HX - a + 4.0, y0 - 9.0), (_HX - a + 1.5, y0 - 3.0)]
        side_y = y0 - 3.0
        ra, rb = a + 1.0, bt + 1.5
        arc = np.stack([_HX + ra * np.cos(ang), _HY + rb * np.sin(ang)], 1)
    else:  # long, middle part: curtains over the temples and ears
        line = [(_HX + a + 1.5, _HY + 14.0), (_HX + a - 3.5, y0 + 2.0), (_HX + 0.74 * a, yh + 2.0),
                (_HX + 0.45 * a, yh - 2.5), (_HX + 0.15 * a, yh - 6.0), (_HX + 0.02 * a, _HY - bt + 3.0),
                (_HX - 0.02 * a, _HY - bt + 3.0), (_HX - 0.15 * a, yh - 6.0), (_HX - 0.45 * a, yh - 2.5),
                (_HX - 0.74 * a, yh + 2.0), (_HX - a + 3.5, y0 + 2.0), (_HX - a - 1.5, _HY + 14.0)]
        side_y = _HY + 14.0
    outer = np.concatenate([[(_HX - ra - 0.5, side_y)], arc, [(_HX + ra + 0.5, side_y)]])
    line = np.asarray(line, dtype=np.float64)
    sc.poly2(outer, _SIL, 0.0, line, _SURF, 1.5, pal["buzz"] if style == 3 else pal["hair"])
    if style == 3:
        return
    # a sheen stroke across the top
    hi = np.stack([_HX + 0.75 * ra * np.cos(ang[6:15]), _HY + (rb - 4.5) * np.sin(ang[6:15])], 1)
    hi[:, 1] = np.minimum(hi[:, 1], yh - 6.0)
    sc.line(hi, pal["hair_hi"], 1.6, _SIL)


# --------------------------------------------------------------------------------------------------------------------
# Public functions

_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_XX -= (SIZE - 1) / 2.0
_YY -= (SIZE - 1) / 2.0


def _draw(sc: _Scene, P: np.ndarray, nz: Nuisance, bg, pal: dict) -> Image.Image:
    S = SUPERSAMPLE
    n = SIZE * S
    img = Image.new("RGB", (n, n), bg)
    d = ImageDraw.Draw(img)
    if nz.clutter:
        _draw_clutter(d, nz, bg)
    flat = (P * S).ravel().tolist()
    kx = S * math.cos(math.radians(nz.yaw))
    ky = S * math.cos(math.radians(nz.pitch))
    for op in sc.ops:
        kind, s, e = op[0], op[1], op[2]
        if kind == "p":
            d.polygon(flat[2 * s: 2 * e], fill=op[3])
        elif kind == "l":
            d.line(flat[2 * s: 2 * e], fill=op[3], width=max(1, round(op[4] * S)))
        else:
            x, y, r = flat[2 * s], flat[2 * s + 1], op[4]
            d.ellipse((x - r * kx, y - r * ky, x + r * kx, y + r * ky), fill=op[3], outline=op[5])
    return img


def _draw_clutter(d: ImageDraw.ImageDraw, nz: Nuisance, bg) -> None:
    """Background objects behind everything else: boxes, discs and bars in colours near and far from the wall's, at
    places fixed by ``clutter_seed`` and moved with the alignment error, so a network must learn to ignore them."""
    rng = np.random.default_rng(nz.clutter_seed)
    S = SUPERSAMPLE
    for _ in range(int(nz.clutter)):
        col = _jitter(rng, bg, 70.0) if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(-10, 122), rng.uniform(-10, 122)
        w, h = rng.uniform(6, 40), rng.uniform(6, 40)
        cx = _RX + nz.scale * (cx - _RX) + nz.shift_x
        cy = _RY + nz.scale * (cy - _RY) + nz.shift_y
        box = (S * (cx - w / 2), S * (cy - h / 2), S * (cx + w / 2), S * (cy + h / 2))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            d.rectangle(box, fill=col)
        elif kind == 1:
            d.ellipse(box, fill=col)
        else:  # a thin bar: a shelf edge or a door frame
            d.line((box[0], box[1], box[2], box[1] + S * rng.uniform(-8, 8)), fill=col, width=int(S * rng.uniform(1, 4)))


def _occlude(img: Image.Image, nz: Nuisance, pts: dict[str, np.ndarray]) -> None:
    """Draw the occluder on the (supersampled) canvas, in crop coordinates."""
    rng = np.random.default_rng(nz.occlusion_seed)
    S = SUPERSAMPLE
    d = ImageDraw.Draw(img)
    kind = nz.occlusion
    if kind == 1:  # hand / object blob
        col = _jitter(rng, _SKINS[int(rng.integers(0, len(_SKINS)))], 8.0)
        target = ["mouth", "cheek", "eye", "chin"][int(rng.integers(0, 4))]
        ml, mr = pts["mouth_left"], pts["mouth_right"]
        side = pts["eye_left"] if rng.random() < 0.5 else pts["eye_right"]
        cx, cy = {"mouth": (ml + mr) / 2, "cheek": side + (0.0, 18.0), "eye": side, "chin": (ml + mr) / 2 + (0, 14)}[
            target]
        cx += rng.normal(0, 4)
        cy += rng.normal(0, 3)
        rx, ry = rng.uniform(12, 20), rng.uniform(9, 15)
        ang = rng.uniform(0, math.pi)
        t = np.linspace(0, 2 * math.pi, 24, endpoint=False)
        wob = 1.0 + 0.08 * np.sin(3 * t + rng.uniform(0, 6))
        ex, ey = rx * wob * np.cos(t), ry * wob * np.sin(t)
        X = cx + ex * math.cos(ang) - ey * math.sin(ang)
        Y = cy + ex * math.sin(ang) + ey * math.cos(ang)
        shade = _mix(col, (30, 20, 15), 0.3)
        u = np.array([math.cos(ang), math.sin(ang)])  # along the knuckles
        v = np.array([-math.sin(ang), math.cos(ang)])  # along the fingers
        if rng.random() < 0.5:
            v = -v
        fw = rx * 0.21
        half = np.linspace(-math.pi / 2, math.pi / 2, 7)
        for k in range(4):  # fingers: capsules sticking out of the palm
            base = np.array([cx, cy]) + u * (k - 1.5) * fw * 2.05 + v * ry * 0.5
            tip = base + v * (ry * (0.95 + 0.25 * (k in (1, 2))) + rng.uniform(-1.0, 1.0))
            cap = tip + fw * (np.outer(np.cos(half), v) + np.outer(np.sin(half), u))
            finger = np.concatenate([[base - u * fw], cap, [base + u * fw]])
            d.polygon((finger * S).ravel().tolist(), fill=col, outline=shade, width=1)
        d.polygon((np.stack([X, Y], 1) * S).ravel().tolist(), fill=col)
    elif kind == 2:  # dark bar (microphone, object, censor bar)
        col = _jitter(rng, (35, 35, 40), 15.0)
        on_eyes = rng.random() < 0.5
        c = (pts["eye_left"] + pts["eye_right"]) / 2 if on_eyes else (pts["mouth_left"] + pts["mouth_right"]) / 2
        c = c + rng.normal(0, 2.5, size=2)
        hw, hh = rng.uniform(26, 60), rng.uniform(5, 10)
        ang = math.radians(rng.normal(0, 12))
        corners = np.array([(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)])
        R = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        d.polygon(((corners @ R.T + c) * S).ravel().tolist(), fill=col)
    elif kind == 3:  # sunglasses
        col = _jitter(rng, (24, 24, 30), 8.0)
        frame = _jitter(rng, (40, 35, 35), 12.0)
        el, er = pts["eye_left"], pts["eye_right"]
        rx, ry = rng.uniform(11.5, 13.5), rng.uniform(8.0, 10.0)
        for e in (el, er):
            d.ellipse(((e[0] - rx) * S, (e[1] - ry + 1.0) * S, (e[0] + rx) * S, (e[1] + ry + 1.0) * S), fill=col,
                      outline=frame, width=S)
        d.line(((el[0] + rx) * S, el[1] * S, (er[0] - rx) * S, er[1] * S), fill=frame, width=2 * S)
        d.line(((el[0] - rx) * S, el[1] * S, (el[0] - rx - 6) * S, (el[1] + 1) * S), fill=frame, width=S)
        d.line(((er[0] + rx) * S, er[1] * S, (er[0] + rx + 6) * S, (er[1] + 1) * S), fill=frame, width=S)
    elif kind == 4:  # a lock of hair falling from the forehead over one eye and cheek
        col = _HAIRS[int(rng.integers(0, len(_HAIRS)))][0]
        eye = pts["eye_left"] if rng.random() < 0.5 else pts["eye_right"]
        top = eye + (rng.normal(0, 3), -30.0)
        bottom = eye + (rng.normal(0, 5), rng.uniform(6, 22))
        t = np.linspace(0, 1, 12)
        bend = rng.uniform(-8, 8) * np.sin(np.pi * t)
        spine = top[None, :] * (1 - t[:, None]) + bottom[None, :] * t[:, None] + np.stack([bend, 0 * t], 1)
        width = rng.uniform(5, 11) * (1 - 0.7 * t)
        band = np.concatenate([spine - np.stack([width, 0 * t], 1), (spine + np.stack([width, 0 * t], 1))[::-1]])
        d.polygon((band * S).ravel().tolist(), fill=_jitter(rng, col, 10.0))


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of N(0, 1) samples; a frame's noise is the window at an offset given by its ``noise_seed``."""
    return np.random.default_rng(20240601).standard_normal(1 << 20, dtype=np.float32)


def _marks(sc: _Scene, P: np.ndarray) -> dict[str, np.ndarray]:
    return {k: P[i].copy() for k, i in sc.marks.items()}


def landmarks(identity: Identity, actions: Mapping[str, float], nuisance: Nuisance | None = None,
              valence: float = 0.0, arousal: float = 0.0) -> dict[str, np.ndarray]:
    """Key 2-D points (x, y) in 112-px crop coordinates of the face that :func:`render_face` draws.

    Keys (left/right = image side): ``brow_inner_*``, ``brow_outer_*``, ``eye_*`` (iris centre), ``eye_inner_*``,
    ``eye_outer_*``, ``upper_lid_*``/``lower_lid_*`` (lid points above/below the eye centre), ``nose_tip``,
    ``mouth_left``, ``mouth_right``, ``upper_lip_top``, ``upper_lip_inner``, ``lower_lip_inner``,
    ``lower_lip_bottom``, ``chin``.
    """
    nz = nuisance if nuisance is not None else Nuisance()
    sc, a, bb = _build(identity, actions, nz, valence, arousal, draw=False)
    return _marks(sc, _transform(sc, a, bb, nz))


def five_points(lm: Mapping[str, np.ndarray]) -> np.ndarray:
    """The usual 5 alignment points as a (5, 2) array: left eye, right eye, nose tip, left and right mouth corner."""
    return np.stack([lm["eye_left"], lm["eye_right"], lm["nose_tip"], lm["mouth_left"], lm["mouth_right"]])


def render_face(identity: Identity, actions: Mapping[str, float], nuisance: Nuisance | None = None,
                valence: float = 0.0, arousal: float = 0.0) -> np.ndarray:
    """Render one aligned face crop: ``(112, 112, 3)`` ``uint8`` RGB, a pure function of its arguments."""
    nz = nuisance if nuisance is not None else Nuisance()
    sc, a, bb = _build(identity, actions, nz, valence, arousal, draw=True)
    P = _transform(sc, a, bb, nz)
    img = _draw(sc, P, nz, identity.background, _palette(identity))
    if nz.occlusion:
        _occlude(img, nz, _marks(sc, P))
    img = img.reduce(SUPERSAMPLE)
    if nz.blur > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(nz.blur))
    out = np.asarray(img, dtype=np.float32)
    gain = float(nz.contrast)
    offset = 128.0 * (1.0 - gain) + float(nz.brightness)
    if nz.light_strength != 0.0:
        th = math.radians(nz.light_angle)
        # brighter towards the side the light comes from
        g = 1.0 + nz.light_strength * (math.cos(th) * _XX + math.sin(th) * _YY) / (SIZE / 2.0)
        out *= (gain * g)[:, :, None]
    elif gain != 1.0:
        out *= gain
    out += offset
    if nz.noise > 0.0:
        bank = _noise_bank()
        off = int(nz.noise_seed) % (bank.size - out.size)
        out += bank[off: off + out.size].reshape(out.shape) * float(nz.noise)
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)
