"""SynthAffWild: a deterministic synthetic twin of Aff-Wild2, written in the exact ABAW 2020 on-disk layout.

Aff-Wild2 needs a signed licence, so the book runs on this by default. It is written to disk in the real format and
read back with :func:`mtanet.data.load_frames`, the same reader the real dataset goes through.

How the twin is made (all from one seed, video by video, so the result does not depend on the number of workers):

1. **Subjects and splits.** Every synthetic person is a *subject* with a fixed face and fixed habits; each subject
   belongs to exactly one of train, validation and test (about 60/20/20 by video), and may appear in several videos
   of that split. A video shows one person, or two (``<video>_left`` / ``<video>_right``, one file each).
   :func:`plan_videos` draws this plan first, in one place, so no subject crosses a split.
2. **Habits.** A subject shows each expression with a personal action pattern (:func:`subject_traits`: some
   actions of the FACS prototype left out, others added, weights changed), with a personal expressivity, talks more
   or less, and has a resting mood.
3. **Episodes.** The timeline alternates neutral stretches with expression episodes (onset, apex, offset); Neutral
   dominates the frames and Disgust and Fear are rare, as in Aff-Wild2.
4. **Actions beyond expressions.** Speech opens the lips and jaw (AU25, AU26) and raises the brows for emphasis;
   polite smiles (AU12, sometimes AU6), concentration frowns (AU4) and lip stretches (AU20) come without an
   expression. So action units hold information the expression lacks.
5. **Valence and arousal** follow the expression's place on Russell's circumplex times its intensity, plus the
   subject's mood, a slow drift and the arousal of speech. Mood and drift reach the face through cues other than the
   eight annotated AUs (the upper lid, AU5; the mouth corners below the AU12 threshold; the brows), so VA holds
   information the AUs lack, and the expression holds some the AUs lack (AU5 and AU9 are never annotated).
6. **Annotations** are made like Aff-Wild2's: valence-arousal is the mean of :data:`VA_ANNOTATORS` simulated raters,
   each with a bias, a scale, a rating lag of about a second and noise; AU and expression labels have boundaries
   that annotators place differently, per-video thresholds, missed short events, and confusions
   (:data:`CONFUSIONS`). Some stretches are unlabeled (-5 / -1), some frames have no face (no jpg). Every shift is
   clamped at a video's ends: no label wraps around.
7. **Images that ask for attention**: alignment jitter (shift, scale, roll), background clutter, occluders (hands,
   bars, sunglasses, hair), light, exposure, blur, pixel noise seeded by (video, person, frame), and JPEG quality
   varying between videos and frames.

Train and validation are written in the ABAW 2020 layout; the test split's annotations go to a ``Test_Set`` folder
per task, read by ``load_frames(root, "test")``. The generator records, in :data:`CEILING_FILE`, per split and task,
the score of the noise-free labels against the annotations (the *reference*) and the best any constant scores (the
*floor*); see :func:`bounds`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter1d

from mtanet.data import ANNOTATION_DIR, IMAGE_DIR, SPLITS, label_arrays, load_frames
from mtanet.errors import ConfigError, OutputExistsError
from mtanet.metrics import au_score, expr_score, va_score
from mtanet.runtime import json_clean, usable_cores, work_root, write_json
from mtanet.synth.render import ACTIONS, random_identity, random_nuisance, render_face
from mtanet.tasks import AU_NAMES_2020, EDITIONS, EXPR_NAMES_2020, TASKS, VA_NAMES

__all__ = [
    "EDITION",
    "CEILING_FILE",
    "MANIFEST_FILE",
    "PARTIAL_MARKER",
    "LATENT_DIR",
    "GENERATOR_VERSION",
    "SynthSize",
    "SIZES",
    "DEFAULT_SIZE",
    "SPLIT_SHARES",
    "VA_ANNOTATORS",
    "EPISODE_EXPRESSIONS",
    "PROTOTYPES",
    "CIRCUMPLEX",
    "CONFUSIONS",
    "AU_ACTIVE",
    "EXPR_ACTIVE",
    "SubjectTraits",
    "VideoSpec",
    "VideoPlan",
    "subject_traits",
    "plan_videos",
    "plan_person",
    "latent_labels",
    "annotate",
    "format_annotation",
    "write_synth",
    "load_latent",
    "bounds",
    "BOUND_DEFINITIONS",
    "split_bounds",
    "default_data_root",
    "resolve_data_root",
]

EDITION = EDITIONS["2020"]
CEILING_FILE = "synth_ceiling.json"
MANIFEST_FILE = "synth_manifest.json"
LATENT_DIR = "synth_latent"  # noise-free labels per name; not part of the Aff-Wild2 layout, the reader ignores it
GENERATOR_VERSION = 6


@dataclasses.dataclass(frozen=True)
class SynthSize:
    """How much data one named size writes, and what it is for."""

    videos: int
    min_frames: int
    max_frames: int
    purpose: str = ""


#: The named sizes, the one place they are spelled out: the command line's ``--size`` choices, the notebooks'
#: ``synth_size`` and the book's profiles are names of this registry.
SIZES: dict[str, SynthSize] = {
    "smoke": SynthSize(videos=15, min_frames=40, max_frames=80, purpose="tests and quick checks (seconds)"),
    "cpu": SynthSize(videos=130, min_frames=100, max_frames=200, purpose="the default book, on a CPU"),
    "gpu": SynthSize(videos=700, min_frames=300, max_frames=800,
                     purpose="training SENet-50 at 112 px on a GPU"),
}
#: The size an empty ``data_root`` stands for unless another is named.
DEFAULT_SIZE = "smoke"

#: Share of videos per split; a subject's videos are all in one split.
SPLIT_SHARES: dict[str, float] = {"train": 0.6, "val": 0.2, "test": 0.2}

#: Raters whose valence-arousal traces are averaged into the annotation of a name.
VA_ANNOTATORS = 4


def _check_size(size: str) -> SynthSize:
    if size not in SIZES:
        raise ConfigError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]


#: Share of expression episodes by class. Neutral is not drawn: it is the stretches between episodes and the weak
#: parts of each, so that it covers about 60% of the labelled frames (ABAW2020.md: about 62% in Aff-Wild2).
EPISODE_EXPRESSIONS: dict[str, float] = {
    "Anger": 0.09, "Disgust": 0.03, "Fear": 0.03, "Happiness": 0.38, "Sadness": 0.31, "Surprise": 0.16,
}

#: FACS prototypes (EMFACS-like) as action -> weight; AU5, AU9 and AU26 are rendered but never labeled. Each subject
#: shows a personal variant of each (:func:`subject_traits`).
PROTOTYPES: dict[str, dict[str, float]] = {
    "Neutral": {},
    "Anger": {"AU4": 1.0, "AU5": 0.7, "AU15": 0.3},
    "Disgust": {"AU9": 1.0, "AU15": 0.7, "AU4": 0.5, "AU25": 0.4},
    "Fear": {"AU1": 0.9, "AU2": 0.8, "AU4": 0.6, "AU5": 0.9, "AU20": 0.9, "AU25": 0.7, "AU26": 0.3},
    "Happiness": {"AU6": 0.9, "AU12": 1.0, "AU25": 0.5},
    "Sadness": {"AU1": 0.9, "AU4": 0.7, "AU15": 0.9},
    "Surprise": {"AU1": 1.0, "AU2": 1.0, "AU5": 0.9, "AU25": 0.8, "AU26": 0.9},
}

#: Where each expression sits on Russell's circumplex (valence, arousal) at full intensity.
CIRCUMPLEX: dict[str, tuple[float, float]] = {
    "Neutral": (0.0, 0.0), "Anger": (-0.6, 0.65), "Disgust": (-0.65, 0.3), "Fear": (-0.55, 0.75),
    "Happiness": (0.75, 0.4), "Sadness": (-0.65, -0.4), "Surprise": (0.2, 0.8),
}

#: Annotators' typical confusions, used for some mislabeled expression episodes.
CONFUSIONS: dict[str, str] = {"Fear": "Surprise", "Surprise": "Fear", "Anger": "Disgust", "Disgust": "Anger",
                              "Sadness": "Neutral", "Happiness": "Neutral"}

#: Rare classes that open the first expression videos of each split (see :func:`plan_videos`).
_FEATURED = ("Anger", "Disgust", "Fear", "Surprise", "Happiness", "Sadness")

AU_ACTIVE = 0.5  # intensity at which a labeled AU counts as present (noise-free)
EXPR_ACTIVE = 0.35  # intensity at which an episode's expression is present instead of Neutral (noise-free)

#: Annotation noise, in one place so the calibration is visible. Frames are at 30 fps.
_VA_LAG_FRAMES = (18, 42)  # a rater's joystick follows the face about a second late
_VA_BIAS, _VA_SCALE = 0.10, (0.75, 1.15)  # per rater: offset and gain of their scale
_VA_NOISE = (0.14, 0.04)  # per rater: slow (1 s) and white noise
_BOUNDARY_FRAMES = 5.0  # std of where annotators put an onset or an offset
_AU_THRESHOLD_SD = 0.10  # per video and AU: the intensity an annotator calls "present"
_EXPR_THRESHOLD_SD = 0.10  # per video: the intensity an annotator calls an expression rather than Neutral
_MISS_SHORT = (12, 0.35)  # events shorter than this many frames are missed with this probability
_CONFUSION_RATE = 0.15  # share of expression episodes given a confusable class
_FLIP_RATE = 0.0015  # per frame and AU: the start of a spurious short AU event


@dataclasses.dataclass(frozen=True)
class SubjectTraits:
    """What stays fixed for one synthetic person across their videos."""

    subject: int
    identity: Any  # mtanet.synth.render.Identity
    prototypes: dict[str, dict[str, float]]  # the person's own action pattern per expression
    expressivity: float  # gain on every expression's actions
    talkativeness: float  # share of time spent talking
    mood: tuple[float, float]  # resting valence, arousal
    glasses: bool  # wears sunglasses in every video (a fixed occluder)


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """One video of the plan: its split, its annotated tasks and who is in it."""

    index: int
    split: str
    tasks: tuple[str, ...]
    people: tuple[tuple[str, int], ...]  # (annotation name, subject) per person
    frames: int
    featured: str = ""  # an expression the first episode shows (rare classes are placed in every split this way)


@dataclasses.dataclass
class VideoPlan:
    """Latents of one name (one person in one video), before noise and rendering."""

    name: str
    actions: np.ndarray  # (T, len(ACTIONS)) intensities in [0, 1]
    expression: np.ndarray  # (T,) int, latent
    va: np.ndarray  # (T, 2) latent
    face_present: np.ndarray  # (T,) bool
    episode: np.ndarray  # (T,) int: the class of the episode a frame belongs to (Neutral between episodes)
    intensity: np.ndarray  # (T,) the episode's envelope times its strength (0 between episodes)
    cue_va: np.ndarray  # (T, 2) the part of VA drawn by the renderer's own cues (mood, drift, speech)


def _smooth_noise(rng: np.random.Generator, n: int, sigma_frames: float, scale: float) -> np.ndarray:
    """Gaussian-smoothed white noise with standard deviation ``scale`` in expectation, whatever ``n``.

    Normalised by the filter's theoretical gain, not by the sample's own std: on a short sequence the smoothed noise
    is nearly constant, and dividing by its tiny std would blow that constant up.
    """
    x = gaussian_filter1d(rng.standard_normal(n), sigma_frames, mode="reflect")
    return x * np.sqrt(2.0 * np.sqrt(np.pi) * sigma_frames) * scale


def _envelope(n: int, onset: int, apex: int, offset: int) -> np.ndarray:
    """Raised-cosine onset, flat apex, raised-cosine offset; length onset + apex + offset."""
    up = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, onset, endpoint=False))
    down = 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, offset, endpoint=False))
    return np.concatenate([up, np.ones(apex), down])[:n]


def _lagged(x: np.ndarray, lag: int) -> np.ndarray:
    """``x`` delayed by ``lag`` frames along axis 0; the first frames hold the first value (no wrap-around)."""
    idx = np.clip(np.arange(len(x)) - lag, 0, len(x) - 1)
    return x[idx]


def subject_traits(seed: int, subject: int) -> SubjectTraits:
    """The fixed face and habits of one subject: the same in every video the subject appears in."""
    rng = np.random.default_rng([seed, 7919, subject])
    identity = random_identity(rng)
    prototypes: dict[str, dict[str, float]] = {}
    extras = ("AU4", "AU6", "AU10", "AU20", "AU25", "AU15", "AU1", "AU2")
    for expr, proto in PROTOTYPES.items():
        own = {a: w * float(rng.uniform(0.8, 1.3)) for a, w in proto.items() if rng.random() > 0.08}
        if expr != "Neutral" and not own:  # keep at least the strongest action of the prototype
            main = max(proto, key=proto.get)
            own = {main: proto[main]}
        if expr != "Neutral" and rng.random() < 0.25:  # a personal extra action
            extra = str(rng.choice([a for a in extras if a in ACTIONS]))
            own[extra] = max(own.get(extra, 0.0), float(rng.uniform(0.4, 0.9)))
        prototypes[expr] = own
    return SubjectTraits(subject=subject, identity=identity, prototypes=prototypes,
                         expressivity=float(rng.uniform(0.85, 1.2)), talkativeness=float(rng.uniform(0.0, 0.6)),
                         mood=(float(rng.normal(0.0, 0.15)), float(rng.normal(0.0, 0.15))),
                         glasses=bool(rng.random() < 0.08))


def plan_videos(seed: int, size: str) -> list[VideoSpec]:
    """Split, tasks, people and length of every video of a size, drawn in one place so subjects never cross splits.

    The first nine videos are pinned (split by ``index % 3``, one task each guaranteed) so that even the smoke size
    has every task in every split. The first expression-annotated videos of each split open with an episode of each
    class (:data:`_FEATURED`, one video each), so every split has every class to score. About one person in ten is
    a subject already seen in an earlier video of the same split (Aff-Wild2 has people in several videos); everyone
    else is a new subject.
    """
    spec = _check_size(size)
    rng = np.random.default_rng([seed, 104729])
    splits = list(SPLIT_SHARES)
    shares = np.array(list(SPLIT_SHARES.values()))
    seen: dict[str, list[int]] = {s: [] for s in splits}
    next_subject = 0
    featured_count = {s: 0 for s in splits}
    videos = []
    for index in range(spec.videos):
        if index < 9:
            split = splits[index % 3]
            first = TASKS[index // 3]
            tasks = [first] + [t for t in TASKS if t != first and rng.random() < 0.5]
        else:
            split = splits[int(rng.choice(len(splits), p=shares / shares.sum()))]
            tasks = [t for t, p in zip(TASKS, (0.8, 0.6, 0.6)) if rng.random() < p] or ["va"]
        base = f"{index + 1}-30-640x480"
        names = [f"{base}_left", f"{base}_right"] if rng.random() < 0.12 else [base]
        people = []
        for name in names:
            earlier = [s for s in seen[split] if s not in {p[1] for p in people}]
            if earlier and rng.random() < 0.1:
                subject = int(rng.choice(earlier))
            else:
                subject, next_subject = next_subject, next_subject + 1
                seen[split].append(subject)
            people.append((name, subject))
        frames = int(rng.integers(spec.min_frames, spec.max_frames + 1))
        featured = ""
        if "expr" in tasks and featured_count[split] < len(_FEATURED):
            featured = _FEATURED[featured_count[split] % len(_FEATURED)]
            featured_count[split] += 1
        videos.append(VideoSpec(index, split, tuple(t for t in TASKS if t in tasks), tuple(people), frames, featured))
    return videos


def _add_event(track: np.ndarray, start: int, env: np.ndarray) -> None:
    stop = min(len(track), start + env.size)
    track[start:stop] = np.maximum(track[start:stop], env[: stop - start])


def plan_person(rng: np.random.Generator, name: str, n_frames: int, traits: SubjectTraits,
                featured: str = "") -> VideoPlan:
    """Draw the latent timeline of one person in one video: episodes, actions, expression and valence-arousal.

    ``featured`` names the class of the first episode (otherwise drawn like the others)."""
    col = {a: i for i, a in enumerate(ACTIONS)}
    actions = np.zeros((n_frames, len(ACTIONS)))
    episode = np.zeros(n_frames, dtype=np.int64)
    intensity = np.zeros(n_frames)
    va_expr = np.zeros((n_frames, 2))
    episode_names = list(EPISODE_EXPRESSIONS)
    probs = np.array(list(EPISODE_EXPRESSIONS.values()))
    probs /= probs.sum()
    t = int(rng.integers(0, 80))
    while t < n_frames:
        expr = episode_names[rng.choice(len(episode_names), p=probs)]
        if featured:
            expr, featured, t = featured, "", min(t, n_frames // 4)
        onset, apex, offset = int(rng.integers(6, 20)), int(rng.integers(20, 90)), int(rng.integers(6, 20))
        env = _envelope(n_frames - t, onset, apex, offset) * rng.uniform(0.6, 1.0) * traits.expressivity
        sl = slice(t, t + env.size)
        for action, weight in traits.prototypes[expr].items():
            actions[sl, col[action]] = np.maximum(actions[sl, col[action]],
                                                  np.clip(env * weight * rng.uniform(0.85, 1.15), 0, 1))
        episode[sl] = EXPR_NAMES_2020.index(expr)
        intensity[sl] = env
        va_expr[sl] += env[:, None] * np.asarray(CIRCUMPLEX[expr])
        t += env.size + int(rng.integers(40, 200))  # a neutral stretch before the next episode
    # Speech: stretches of talking open the lips and jaw in syllables and raise the brows for emphasis.
    talking = np.zeros(n_frames, dtype=bool)
    s = int(rng.integers(0, 60))
    while s < n_frames:
        length = int(rng.integers(30, 150))
        if rng.random() < traits.talkativeness:
            talking[s: s + length] = True
        s += length + int(rng.integers(10, 60))
    syllables = np.clip(0.55 + 0.45 * np.sin(np.cumsum(rng.uniform(0.5, 1.1, n_frames))), 0, 1)
    actions[:, col["AU25"]] = np.maximum(actions[:, col["AU25"]], talking * syllables * rng.uniform(0.6, 1.0))
    actions[:, col["AU26"]] = np.maximum(actions[:, col["AU26"]], talking * syllables * rng.uniform(0.2, 0.6))
    # Actions without an expression: brow flashes while talking, polite smiles, frowns of concentration, lip stretch.
    spontaneous = (("AU1", 0.010, (4, 12), (0.5, 1.0)), ("AU2", 0.008, (4, 12), (0.5, 1.0)),
                   ("AU12", 0.0025, (15, 60), (0.5, 0.8)), ("AU4", 0.0025, (15, 60), (0.5, 0.8)),
                   ("AU20", 0.002, (6, 20), (0.5, 0.9)), ("AU6", 0.002, (10, 30), (0.5, 0.8)))
    for action, rate, length, strength in spontaneous:
        gate = talking if action in ("AU1", "AU2") else np.ones(n_frames, dtype=bool)
        for start in np.flatnonzero((rng.random(n_frames) < rate) & gate):
            _add_event(actions[:, col[action]], int(start),
                       _envelope(n_frames - start, 4, int(rng.integers(*length)), 4) * rng.uniform(*strength))
            if action == "AU12" and rng.random() < 0.4:  # a polite smile sometimes reaches the eyes
                _add_event(actions[:, col["AU6"]], int(start),
                           _envelope(n_frames - start, 4, int(rng.integers(*length)), 4) * rng.uniform(0.3, 0.6))
    # Mood, drift and the arousal of speech: VA the eight labelled AUs do not carry (the renderer draws it itself).
    cue = np.zeros((n_frames, 2))
    cue[:, 0] = traits.mood[0] + _smooth_noise(rng, n_frames, 40, 0.15)
    cue[:, 1] = traits.mood[1] + _smooth_noise(rng, n_frames, 40, 0.15) + 0.25 * gaussian_filter1d(
        talking.astype(float), 10)
    va = np.tanh(1.2 * (va_expr + cue))  # saturates smoothly inside (-1, 1) instead of piling up on the boundary
    # Mood shows the way faces show it: a faint smile or a faint droop of the mouth corners (AU12, AU15 kept below the
    # intensity an annotator calls present), eyes widened (AU5, never annotated) or lidded (the renderer, for arousal
    # below zero) and brows lifted with arousal. The AU labels stay blind to all of it, so valence-arousal holds
    # information they lack.
    faint = 0.45
    actions[:, col["AU12"]] = np.maximum(actions[:, col["AU12"]], np.clip(1.2 * cue[:, 0], 0, faint))
    actions[:, col["AU15"]] = np.maximum(actions[:, col["AU15"]], np.clip(-1.2 * cue[:, 0], 0, faint))
    actions[:, col["AU5"]] = np.maximum(actions[:, col["AU5"]], np.clip(1.5 * cue[:, 1], 0, 0.8))
    actions[:, col["AU1"]] = np.maximum(actions[:, col["AU1"]], np.clip(0.8 * cue[:, 1], 0, faint))
    face_present = np.ones(n_frames, dtype=bool)
    for start in np.flatnonzero(rng.random(n_frames) < 0.006):  # the detector loses the face now and then
        face_present[start: start + int(rng.integers(1, 12))] = False
    expression = np.where(intensity >= EXPR_ACTIVE, episode, 0)
    return VideoPlan(name, np.clip(actions, 0, 1), expression.astype(np.int64), va.astype(np.float32), face_present,
                     episode, intensity, cue.astype(np.float32))


def latent_labels(plan: VideoPlan) -> dict[str, np.ndarray]:
    """Noise-free labels in the annotation files' encoding: VA (T,2), AU (T,8) 0/1, EXPR (T,) 0-6."""
    idx = [ACTIONS.index(a) for a in AU_NAMES_2020]
    return {"va": plan.va.astype(np.float32), "au": (plan.actions[:, idx] >= AU_ACTIVE).astype(np.int16),
            "expr": plan.expression.astype(np.int16)}


def _segments(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True in a boolean array."""
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(np.int8), 0]))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _annotate_events(rng: np.random.Generator, present: np.ndarray, spurious: bool = True) -> np.ndarray:
    """How an annotator marks a binary event track: each onset and offset placed a few frames off (clamped inside
    the video), short events missed now and then, and (``spurious``) a few spurious short ones added."""
    n = len(present)
    out = np.zeros(n, dtype=bool)
    for start, stop in _segments(present):
        if stop - start < _MISS_SHORT[0] and rng.random() < _MISS_SHORT[1]:
            continue
        a = int(np.clip(start + round(rng.normal(0, _BOUNDARY_FRAMES)), 0, n))
        b = int(np.clip(stop + round(rng.normal(0, _BOUNDARY_FRAMES)), 0, n))
        out[a: max(a, b)] = True
    for start in np.flatnonzero(rng.random(n) < _FLIP_RATE) if spurious else ():
        out[start: start + int(rng.integers(3, 15))] ^= True
    return out


def annotate(rng: np.random.Generator, plan: VideoPlan) -> dict[str, np.ndarray]:
    """Human-like annotations of the latents, with unlabeled stretches (NaN / -1).

    Returns the three tasks' labels and ``va_raters`` (raters, T, 2): each simulated rater's own trace, whose mean
    is the VA annotation.
    """
    n = len(plan.expression)
    raters = []
    for _ in range(VA_ANNOTATORS):
        lag = int(rng.integers(*_VA_LAG_FRAMES))
        scale = rng.uniform(*_VA_SCALE)
        trace = scale * _lagged(plan.va, lag) + rng.normal(0, _VA_BIAS, 2)
        trace = gaussian_filter1d(trace, 3, axis=0, mode="nearest")  # a hand on a joystick does not jump
        trace += np.stack([_smooth_noise(rng, n, 30, _VA_NOISE[0]) for _ in range(2)], 1)
        raters.append(np.clip(trace + rng.normal(0, _VA_NOISE[1], trace.shape), -1, 1))
    va_raters = np.stack(raters).astype(np.float32)
    va = np.clip(va_raters.mean(0), -1, 1).astype(np.float32)
    idx = [ACTIONS.index(a) for a in AU_NAMES_2020]
    thresholds = AU_ACTIVE + rng.normal(0, _AU_THRESHOLD_SD, len(idx))
    au = np.stack([_annotate_events(rng, plan.actions[:, j] >= thr) for j, thr in zip(idx, thresholds)], 1)
    au = au.astype(np.int16)
    # EXPR: the annotator's own threshold for "an expression", their boundaries, and confusable classes.
    shown = plan.intensity >= EXPR_ACTIVE + rng.normal(0, _EXPR_THRESHOLD_SD)
    expr = np.zeros(n, dtype=np.int16)
    for start, stop in _segments(shown & (plan.episode > 0)):
        label = EXPR_NAMES_2020[int(plan.episode[start])]
        if label in CONFUSIONS and rng.random() < _CONFUSION_RATE:
            label = CONFUSIONS[label]
        marked = _annotate_events(rng, np.isin(np.arange(n), np.arange(start, stop)), spurious=False)
        expr[marked] = EXPR_NAMES_2020.index(label)
    out = {"va": va, "au": au, "expr": expr}
    for task in TASKS:  # stretches the annotators skipped
        for start in np.flatnonzero(rng.random(n) < 0.004):
            stop = start + int(rng.integers(5, 40))
            if task == "va":
                out[task][start:stop] = np.nan
            else:
                out[task][start:stop] = -1
    out["va_raters"] = va_raters
    return out


def format_annotation(task: str, values: np.ndarray) -> str:
    """Text of an annotation file in the ABAW 2020 format, sentinels included."""
    if task == "va":
        header = ",".join(VA_NAMES)
        body = ["-5,-5" if not np.isfinite(v).all() else f"{v[0]:.4f},{v[1]:.4f}" for v in values]
    elif task == "au":
        header = ",".join(AU_NAMES_2020)
        body = [",".join(str(int(x)) for x in row) for row in values]
    else:
        header = ",".join(EXPR_NAMES_2020)
        body = [str(int(x)) for x in values]
    return header + "\n" + "\n".join(body) + "\n"


def _frame_seed(seed: int, index: int, person: int, frame: int) -> int:
    """The pixel-noise seed of one frame: a function of (video, person, frame), so no two videos share a pattern."""
    return int(np.random.SeedSequence([seed, index, person, frame]).generate_state(1)[0])


def _write_video(args: tuple[str, int, VideoSpec]) -> dict[str, Any]:
    """Plan, annotate, render and write one video. Runs in a worker process."""
    root, seed, video = args
    root_path = Path(root)
    index, n_frames = video.index, video.frames
    rng = np.random.default_rng([seed, index])
    scene_light = random_nuisance(rng)
    clutter, clutter_seed = int(rng.integers(0, 9)), int(rng.integers(0, 2**31 - 1))
    results = []
    for person, (name, subject) in enumerate(video.people):
        traits = subject_traits(seed, subject)
        person_rng = np.random.default_rng([seed, index, person + 1])
        plan = plan_person(person_rng, name, n_frames, traits, video.featured)
        notes = annotate(person_rng, plan)
        folder = root_path / "cropped_aligned" / name
        folder.mkdir(parents=True, exist_ok=True)
        drift = {k: _smooth_noise(person_rng, n_frames, 15, s) for k, s in (("yaw", 10.0), ("pitch", 6.0),
                                                                            ("roll", 5.0))}
        # The aligner's error: a slow part (the tracker drifts) and a per-frame part (landmark noise).
        align = {k: _smooth_noise(person_rng, n_frames, 8, s) + person_rng.normal(0, s / 2, n_frames)
                 for k, s in (("shift_x", 2.5), ("shift_y", 2.5), ("scale", 0.05), ("roll", 2.0))}
        occluder = int(person_rng.choice([1, 2, 3, 4], p=[0.45, 0.15, 0.1, 0.3]))  # kept for the whole video
        occluded = np.zeros(n_frames, dtype=bool)
        for start in np.flatnonzero(person_rng.random(n_frames) < 0.005):
            occluded[start: start + int(person_rng.integers(10, 45))] = True
        # Camera and compression stay fixed within a video; pose, gaze and exposure drift smoothly, noise is fresh.
        camera = random_nuisance(person_rng, strength=0.7)
        gaze = np.clip(_smooth_noise(person_rng, n_frames, 10, 0.4), -1, 1)
        exposure = _smooth_noise(person_rng, n_frames, 20, 8.0)
        blur = np.clip(camera.blur + _smooth_noise(person_rng, n_frames, 10, 0.4), 0, 2.5)
        quality = np.clip(camera.jpeg_quality + _smooth_noise(person_rng, n_frames, 30, 12), 15, 95).round()
        for t in range(n_frames):
            if not plan.face_present[t]:
                continue
            kind = 3 if traits.glasses else (occluder if occluded[t] else 0)
            nuisance = dataclasses.replace(
                camera, yaw=float(np.clip(drift["yaw"][t], -30, 30)), gaze=float(gaze[t]),
                brightness=float(camera.brightness + exposure[t]), noise_seed=_frame_seed(seed, index, person, t),
                pitch=float(np.clip(drift["pitch"][t], -20, 20)),
                roll=float(np.clip(drift["roll"][t] + align["roll"][t], -18, 18)),
                light_angle=scene_light.light_angle, light_strength=scene_light.light_strength,
                occlusion=kind, occlusion_seed=index * 7 + subject, blur=float(blur[t]),
                jpeg_quality=int(quality[t]), shift_x=float(align["shift_x"][t]), shift_y=float(align["shift_y"][t]),
                scale=float(1.0 + align["scale"][t]), clutter=clutter, clutter_seed=clutter_seed)
            actions = dict(zip(ACTIONS, plan.actions[t]))
            # The renderer's own VA cues (mouth corners, brows, lids) show the whole latent VA: the expression's part,
            # which the AUs carry too, and the mood, drift and speech, which no annotated AU carries.
            pixels = render_face(traits.identity, actions, nuisance, float(plan.va[t, 0]), float(plan.va[t, 1]))
            _save_jpeg(pixels, folder / f"{t + 1:05d}.jpg", nuisance.jpeg_quality)
        split_dir = EDITION.split_dirs[video.split]
        for task in video.tasks:
            ann = root_path / "annotations" / EDITION.task_dirs[task] / split_dir
            ann.mkdir(parents=True, exist_ok=True)
            (ann / f"{name}.txt").write_text(format_annotation(task, notes[task]))
        latent = latent_labels(plan)
        # The latents, the raters and the annotations as generated: the bounds and the round-trip tests read them.
        np.savez_compressed(root_path / LATENT_DIR / f"{name}.npz", **latent, face_present=plan.face_present,
                            va_raters=notes["va_raters"], **{f"annotated_{t}": notes[t] for t in TASKS})
        results.append({"name": name, "subject": subject, "split": video.split, "tasks": list(video.tasks),
                        "frames": n_frames, "images": int(plan.face_present.sum())})
    return {"index": index, "names": results}
def _save_jpeg(pixels: np.ndarray, path: Path, quality: int) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=int(quality))
    path.write_bytes(buffer.getvalue())


def write_synth(root: str | os.PathLike[str], size: str = DEFAULT_SIZE, *, seed: int = 0, workers: int | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """Write SynthAffWild of a named size at ``root`` in the ABAW 2020 layout and return its manifest.

    If ``root`` already holds a complete dataset written with the same size, seed and generator version, nothing is
    rewritten (so ``make book`` can call this every time). The dataset is built in ``<root>.partial`` and renamed at
    the end, so an interrupted run never leaves something that looks complete.

    What may be replaced or deleted, and nothing else (checked again just before anything is deleted):

    - ``root`` missing or an empty folder: used.
    - ``root`` holding a synthetic dataset of other settings: replaced only with ``overwrite=True``. A folder counts
      as one when it has a readable :data:`MANIFEST_FILE` and every entry under it is one that this function writes
      (the annotation, crop and latent folders with their generated names, the manifest and ceiling files). A
      manifest beside anything else (a user's file, a real Aff-Wild2 name, a symbolic link) is not enough: such a
      folder is refused even with ``overwrite=True``, and nothing in it is deleted.
    - ``<root>.partial``: the leftover of an interrupted run is removed only when it is recognisably one (it holds
      the :data:`PARTIAL_MARKER` or manifest and only generated entries); another folder of that name is refused.

    Raises:
        ConfigError: ``size`` is not a name of :data:`SIZES`.
        OutputExistsError: ``root`` (or ``<root>.partial``) holds something this function did not write, or holds a
            different synthetic dataset and ``overwrite`` is false. Nothing was deleted.
    """
    spec = _check_size(size)
    root = Path(root).expanduser()
    if root.is_symlink():  # build beside the folder the link points to, and keep the link
        root = root.resolve()
    wanted = {"generator_version": GENERATOR_VERSION, "size": size, "seed": seed}
    manifest = _read_manifest(root)
    if manifest is not None and all(manifest.get(k) == v for k, v in wanted.items()):
        return manifest
    _check_replaceable(root, manifest, wanted, overwrite)
    partial = root.with_name(root.name + ".partial")
    if partial.exists() or partial.is_symlink():
        if not _is_synth_folder(partial):
            raise OutputExistsError(f"{partial} exists and was not written by mtanet synth (the dataset is built "
                                    "there); move it away or choose another folder; nothing was deleted")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    write_json(partial / PARTIAL_MARKER, wanted)  # first: marks the folder as ours until the rename
    (partial / LATENT_DIR).mkdir()
    started = time.perf_counter()
    jobs = [(str(partial), seed, video) for video in plan_videos(seed, size)]
    workers = workers or min(usable_cores(), 8)
    if workers > 1:
        # spawn, not fork: forking a process that already runs torch or a Jupyter kernel's threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            videos = list(pool.map(_write_video, jobs, chunksize=1))
    else:
        videos = [_write_video(j) for j in jobs]
    seconds = time.perf_counter() - started
    names = [n for v in videos for n in v["names"]]
    subjects = {s: sorted({n["subject"] for n in names if n["split"] == s}) for s in SPLITS}
    manifest = {**wanted, "video_count": spec.videos, "names": len(names),
                "frames": sum(n["frames"] for n in names), "images": sum(n["images"] for n in names),
                "subjects": {s: len(v) for s, v in subjects.items()},
                "seconds": round(seconds, 2), "workers": workers,
                "images_per_second": round(sum(n["images"] for n in names) / seconds, 1),
                "videos": names}
    write_json(partial / CEILING_FILE, bounds(partial))
    write_json(partial / MANIFEST_FILE, manifest)
    (partial / PARTIAL_MARKER).unlink()
    if root.exists():
        # checked again: the folder may have changed during the minutes the dataset took to write
        _check_replaceable(root, _read_manifest(root), wanted, overwrite)
        if any(root.iterdir()):
            shutil.rmtree(root)
        else:
            root.rmdir()
    os.replace(partial, root)
    return manifest


#: Written first into ``<root>.partial`` and removed just before the rename: marks an unfinished build as ours.
PARTIAL_MARKER = "synth_partial.json"
_NAME = r"\d+-30-640x480(?:_left|_right)?"  # the names plan_videos gives
_TOP = "|".join(re.escape(n) for n in (MANIFEST_FILE, CEILING_FILE, PARTIAL_MARKER))
#: Everything write_synth writes, folder by folder: "dirs" maps a sub-folder's name (or a pattern of names) to what
#: it holds, "files" is the pattern of its file names (a ``.<name>.*.tmp`` is a write killed half-way, see
#: mtanet.runtime.atomic_path).
_LAYOUT: dict[str, Any] = {
    "files": re.compile(rf"(?:{_TOP})|\.(?:{_TOP})\.[^/]+\.tmp"),
    "dirs": {
        ANNOTATION_DIR: {"dirs": {task: {"dirs": {split: {"files": re.compile(_NAME + r"\.txt")}
                                                  for split in EDITION.split_dirs.values()}}
                                  for task in EDITION.task_dirs.values()}},
        IMAGE_DIR: {"dirs": {re.compile(_NAME): {"files": re.compile(r"\d{5}\.jpg")}}},
        LATENT_DIR: {"files": re.compile(_NAME + r"\.npz")},
    },
}


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of ``root`` as a dict, or ``None`` when there is none or it is not a readable JSON object."""
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _foreign_entry(folder: Path, layout: dict[str, Any] = _LAYOUT, rel: str = "") -> str | None:
    """The first entry under ``folder`` (as a path relative to it) that :func:`write_synth` does not write, or
    ``None`` when there is none. Symbolic links are never ours."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:  # a folder this process cannot list is not known to be ours
        return rel or "."
    for entry in entries:
        where = rel + entry.name
        if entry.is_dir(follow_symlinks=False):
            inner = next((v for k, v in layout.get("dirs", {}).items()
                          if (k == entry.name if isinstance(k, str) else k.fullmatch(entry.name))), None)
            found = where if inner is None else _foreign_entry(Path(entry.path), inner, where + "/")
            if found is not None:
                return found
        elif not (entry.is_file(follow_symlinks=False) and "files" in layout
                  and layout["files"].fullmatch(entry.name)):
            return where
    return None


def _is_synth_folder(folder: Path) -> bool:
    """Whether ``folder`` is a real folder that :func:`write_synth` wrote (finished or not) and nothing else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    marked = (folder / MANIFEST_FILE).is_file() or (folder / PARTIAL_MARKER).is_file()
    return marked and _foreign_entry(folder) is None


def _check_replaceable(root: Path, manifest: dict[str, Any] | None, wanted: dict[str, Any], overwrite: bool) -> None:
    """Raise :class:`OutputExistsError` unless ``root`` is missing, an empty folder, or (with ``overwrite``) a
    synthetic dataset and nothing else."""
    if not root.exists():
        return
    if not root.is_dir():
        raise OutputExistsError(f"{root} is a file, not a folder; give a new or empty folder for the dataset")
    try:
        if not any(root.iterdir()):
            return
    except OSError as err:
        raise OutputExistsError(f"{root} cannot be listed ({err.strerror}); nothing was deleted: choose a new or "
                                "empty folder") from None
    foreign = _foreign_entry(root)
    if manifest is None or foreign is not None:
        what = ", ".join(([f"it holds {foreign}"] if foreign is not None else [])
                         + ([f"it has no readable {MANIFEST_FILE}"] if manifest is None else []))
        raise OutputExistsError(f"{root} is not a synthetic dataset written by mtanet synth ({what}); nothing was "
                                "deleted: choose a new or empty folder")
    if not overwrite:
        settings = ", ".join(f"{k} {manifest.get(k)!r}" for k in wanted)
        raise OutputExistsError(f"{root} holds a different synthetic dataset ({settings}); pass overwrite=True "
                                "(--overwrite) to replace it, or choose another folder")



# ------------------------------------------------------------------------------------------ the reference and the floor


def load_latent(root: str | os.PathLike[str], frames: pd.DataFrame) -> dict[str, np.ndarray]:
    """Noise-free labels aligned with the rows of a frame table of a synthetic root."""
    root = Path(root)
    out = {"va": [], "au": [], "expr": []}
    for name, group in frames.groupby("name", sort=False):
        latent = np.load(root / LATENT_DIR / f"{name}.npz")
        rows = group["frame"].to_numpy() - 1
        for task in out:
            out[task].append((group.index.to_numpy(), latent[task][rows]))
    aligned = {}
    for task, parts in out.items():
        index = np.concatenate([p[0] for p in parts])
        values = np.concatenate([p[1] for p in parts])
        order = np.argsort(frames.index.get_indexer(index))
        aligned[task] = values[order]
    return aligned


def _best_constant_au(y_true: np.ndarray) -> dict[str, Any]:
    """The best constant AU prediction on ``y_true``: per AU, always present or always absent, whichever scores more.

    The ABAW 2020 AU score is a mean over AUs of ``0.5 * F1 + 0.5 * accuracy`` (the accuracy over all N*K decisions
    is the mean of the per-AU accuracies), so each AU's constant can be chosen on its own.
    """
    constants = []
    for column in y_true.T:
        p = float(column.mean()) if len(column) else 0.0
        present = 0.5 * (2 * p / (1 + p) if p > 0 else 0.0) + 0.5 * p  # F1 of "always present" and its accuracy
        absent = 0.5 * (1 - p)  # "always absent": F1 0, accuracy 1 - p
        constants.append(1.0 if present > absent else 0.0)
    result = au_score(y_true, np.tile(np.asarray(constants), (len(y_true), 1)))
    result["constants"] = constants
    return result


def _best_constant_expr(y_true: np.ndarray) -> dict[str, Any]:
    """The best constant expression: the class that, predicted for every frame, scores most."""
    tries = {k: expr_score(y_true, np.full(len(y_true), k), num_classes=len(EXPR_NAMES_2020))
             for k in range(len(EXPR_NAMES_2020))}
    best = max(tries, key=lambda k: tries[k]["score"])
    return {**tries[best], "class": EXPR_NAMES_2020[best]}


def _rater_agreement(root: Path, frames: pd.DataFrame, rows: np.ndarray) -> dict[str, float]:
    """Mean CCC of each VA rater against each other rater, and against the mean of the others, on labelled rows."""
    traces: list[np.ndarray] = []
    for name, group in frames[rows].groupby("name", sort=False):
        raters = np.load(root / LATENT_DIR / f"{name}.npz")["va_raters"]
        traces.append(raters[:, group["frame"].to_numpy() - 1])
    if not traces:
        return {}
    all_raters = np.concatenate(traces, axis=1)  # (raters, N, 2)
    k = len(all_raters)
    out: dict[str, float] = {}
    for j, dim in enumerate(VA_NAMES):
        pairs = [va_score(all_raters[a][:, [j, j]], all_raters[b][:, [j, j]])["score"]
                 for a in range(k) for b in range(a + 1, k)]
        loo = [va_score(all_raters[a][:, [j, j]], np.delete(all_raters, a, 0).mean(0)[:, [j, j]])["score"]
               for a in range(k)]
        out[f"{dim}_pairwise_ccc"] = float(np.mean(pairs))
        out[f"{dim}_rater_vs_others_ccc"] = float(np.mean(loo))
    return out


def split_bounds(root: str | os.PathLike[str], split: str) -> dict[str, Any]:
    """The reference and the floor of one split (see :func:`bounds`)."""
    root = Path(root)
    frames = load_frames(root, split)
    targets, masks = label_arrays(frames, AU_NAMES_2020)
    latent = load_latent(root, frames)
    result: dict[str, Any] = {"frames": {t: int(masks[t].sum()) for t in TASKS}, "reference": {}, "floor": {}}
    if masks["va"].any():
        result["reference"]["va"] = va_score(targets["va"][masks["va"]], latent["va"][masks["va"]])
        result["floor"]["va"] = {"score": 0.0, "why": "a constant has zero covariance with the labels: CCC 0"}
        result["annotators"] = _rater_agreement(root, frames, masks["va"])
    if masks["au"].any():
        y = targets["au"][masks["au"]].astype(int)
        result["reference"]["au"] = au_score(y, latent["au"][masks["au"]].astype(float))
        result["floor"]["au"] = _best_constant_au(y)
    if masks["expr"].any():
        y = targets["expr"][masks["expr"]]
        result["reference"]["expr"] = expr_score(y, latent["expr"][masks["expr"]].astype(int),
                                                 num_classes=len(EXPR_NAMES_2020))
        result["floor"]["expr"] = _best_constant_expr(y)
    result["reference_score"] = {t: r["score"] for t, r in result["reference"].items()}
    result["floor_score"] = {t: r["score"] for t, r in result["floor"].items()}
    return result


#: What the two bounds in :data:`CEILING_FILE` mean; the data chapter prints these.
BOUND_DEFINITIONS = {
    "reference": "the ABAW 2020 score of the noise-free labels (the latents the faces were drawn from) against the "
                 "annotations of the split: what a model scores if it recovers exactly what was shown. It is not a "
                 "bound: a model can pass it, e.g. by shrinking VA towards the raters' mean or by matching the "
                 "annotators' habits",
    "floor": "the best score any constant prediction reaches on the split, with the constant chosen on that split's "
             "own labels (so no constant can beat it): CCC 0 for VA, per AU always-present or always-absent, for "
             "expressions the best single class",
}


def bounds(root: str | os.PathLike[str]) -> dict[str, Any]:
    """The reference and the floor of every split and task of a synthetic root, as written to :data:`CEILING_FILE`.

    ``splits[split]`` holds ``frames``, ``reference`` and ``floor`` (the full ABAW 2020 score records),
    ``reference_score`` and ``floor_score`` (the scores alone) and, for VA, ``annotators``: the agreement of the
    simulated raters (mean pairwise CCC and each rater against the mean of the others).
    """
    result = {"generator_version": GENERATOR_VERSION, "definitions": BOUND_DEFINITIONS,
              "splits": {split: split_bounds(root, split) for split in SPLITS}}
    # JSON-safe, floats rounded to 6 decimals (json's own float text parses back to the very same float first)
    return json.loads(json.dumps(json_clean(result), allow_nan=False), parse_float=lambda text: round(float(text), 6))


def default_data_root(size: str = DEFAULT_SIZE, *, create: bool = True, seed: int = 0) -> Path:
    """The embedded default dataset: ``data/synth-<size>`` under the checkout (or under ``$MTANET_WORK``, see
    :func:`mtanet.runtime.work_root`), written on first use (then reused)."""
    _check_size(size)
    root = work_root() / "data" / f"synth-{size}"
    if create:
        write_synth(root, size, seed=seed)
    return root


def resolve_data_root(data_root: str | os.PathLike[str] | None, synth_size: str = DEFAULT_SIZE) -> Path:
    """A notebook's ``data_root`` parameter: a path to an Aff-Wild2 root, or empty for the synthetic default."""
    if data_root:
        path = Path(data_root).expanduser()
        if not (path / "annotations").is_dir():
            raise FileNotFoundError(f"{path}: not an Aff-Wild2 root (no annotations/ folder)")
        return path
    return default_data_root(synth_size)
