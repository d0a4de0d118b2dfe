"""SynthAffWild: a deterministic synthetic twin of Aff-Wild2, written in the exact ABAW 2020 on-disk layout.

Aff-Wild2 needs a signed licence, so the book runs on this by default. It is written to disk in the real format and
read back with :func:`mtanet.data.load_frames`, the same reader the real dataset goes through.

How a video is made (all from one seed, video by video, so the result does not depend on the number of workers):

1. **People.** A video shows one person, or two (``<video>_left`` / ``<video>_right``, one file each). Each person
   gets an identity (face shape, skin, hair, features) from :mod:`mtanet.synth.render`.
2. **Episodes.** The timeline alternates neutral stretches with expression episodes (onset, apex, offset). The
   expression is drawn from a skewed distribution like Aff-Wild2's (Neutral dominant, Disgust and Fear rare).
3. **Actions.** Each expression drives its FACS prototype (e.g. Happiness = AU6 + AU12 (+AU25)), scaled by the
   episode envelope, with per-episode variation, plus spontaneous actions (talking opens the lips, brief brow
   flashes) and three actions that are never labeled (AU5, AU9, AU26).
4. **Latent labels.** AU k is active when its intensity is >= 0.5; the expression is the episode's while its
   intensity is >= 0.35, else Neutral; valence and arousal follow the expression's place on Russell's circumplex
   times its intensity, plus a slow per-video drift, so they vary smoothly over time. The face is rendered from these
   latents (actions and valence-arousal), so the latents are what a perfect model could see.
5. **Annotations** are the latents with annotator noise: smooth and white noise on valence-arousal, jittered onsets
   and offsets and a few flips for AUs, boundary jitter and a few confusions (Fear/Surprise, Anger/Disgust) for
   expressions; some stretches are left unlabeled (-5 / -1) and some frames have no face (no jpg).
6. **Tasks and splits.** Each name is annotated for a subset of tasks; each video has a split, and a few names take
   the other split for one task, so the cross-task overlap of the real data exists here too.

The generator records its own ceiling: the ABAW 2020 scores of the noise-free latent labels against the noisy
annotations on validation, and of trivial predictors, in ``synth_ceiling.json`` beside the data.
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

from mtanet.data import ANNOTATION_DIR, IMAGE_DIR, label_arrays, load_frames
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
    "EPISODE_EXPRESSIONS",
    "PROTOTYPES",
    "CIRCUMPLEX",
    "CONFUSIONS",
    "AU_ACTIVE",
    "EXPR_ACTIVE",
    "VideoPlan",
    "plan_person",
    "latent_labels",
    "annotate",
    "format_annotation",
    "write_synth",
    "load_latent",
    "ceiling",
    "default_data_root",
    "resolve_data_root",
]

EDITION = EDITIONS["2020"]
CEILING_FILE = "synth_ceiling.json"
MANIFEST_FILE = "synth_manifest.json"
LATENT_DIR = "synth_latent"  # noise-free labels per name; not part of the Aff-Wild2 layout, the reader ignores it
GENERATOR_VERSION = 4


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
    "smoke": SynthSize(videos=14, min_frames=30, max_frames=60, purpose="tests and quick checks (seconds)"),
    "cpu": SynthSize(videos=90, min_frames=100, max_frames=200, purpose="the default book, on a CPU"),
    "gpu": SynthSize(videos=700, min_frames=300, max_frames=800,
                     purpose="training SENet-50 at 112 px on a GPU"),
}
#: The size an empty ``data_root`` stands for unless another is named.
DEFAULT_SIZE = "smoke"


def _check_size(size: str) -> SynthSize:
    if size not in SIZES:
        raise ConfigError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    return SIZES[size]

#: Share of expression episodes by class (Neutral comes from the stretches between episodes and low intensities).
EPISODE_EXPRESSIONS: dict[str, float] = {
    "Anger": 0.10, "Disgust": 0.035, "Fear": 0.035, "Happiness": 0.38, "Sadness": 0.24, "Surprise": 0.21,
}

#: FACS prototypes (EMFACS-like) as action -> weight; AU5, AU9 and AU26 are rendered but never labeled.
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

#: Annotators' typical confusions, used for a few mislabeled expression episodes.
CONFUSIONS: dict[str, str] = {"Fear": "Surprise", "Surprise": "Fear", "Anger": "Disgust", "Disgust": "Anger",
                              "Sadness": "Neutral", "Happiness": "Neutral"}

AU_ACTIVE = 0.5  # intensity at which a labeled AU counts as present
EXPR_ACTIVE = 0.35  # intensity at which an episode's expression is annotated instead of Neutral


@dataclasses.dataclass
class VideoPlan:
    """Latents of one name (one person in one video), before noise and rendering."""

    name: str
    actions: np.ndarray  # (T, len(ACTIONS)) intensities in [0, 1]
    expression: np.ndarray  # (T,) int, latent
    va: np.ndarray  # (T, 2) latent
    face_present: np.ndarray  # (T,) bool


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


def plan_person(rng: np.random.Generator, name: str, n_frames: int) -> VideoPlan:
    """Draw the latent timeline of one person: episodes, actions, expression and valence-arousal."""
    actions_idx = {a: i for i, a in enumerate(ACTIONS)}
    actions = np.zeros((n_frames, len(ACTIONS)))
    expression = np.zeros(n_frames, dtype=np.int64)
    va = np.zeros((n_frames, 2))
    episode_names = list(EPISODE_EXPRESSIONS)
    probs = np.array(list(EPISODE_EXPRESSIONS.values()))
    probs /= probs.sum()
    t = int(rng.integers(0, 40))
    while t < n_frames:
        expr = episode_names[rng.choice(len(episode_names), p=probs)]
        onset, apex, offset = int(rng.integers(4, 16)), int(rng.integers(8, 60)), int(rng.integers(4, 16))
        env = _envelope(n_frames - t, onset, apex, offset) * rng.uniform(0.55, 1.0)
        sl = slice(t, t + env.size)
        for action, weight in PROTOTYPES[expr].items():
            if rng.random() < 0.12:  # individual variation: not everyone uses every action of the prototype
                continue
            actions[sl, actions_idx[action]] = np.maximum(actions[sl, actions_idx[action]],
                                                          env * min(1.0, weight * rng.uniform(0.8, 1.25)))
        code = EXPR_NAMES_2020.index(expr)
        expression[sl] = np.where(env >= EXPR_ACTIVE, code, expression[sl])
        va[sl] += env[:, None] * np.asarray(CIRCUMPLEX[expr])
        t += env.size + int(rng.integers(10, 70))  # a neutral stretch before the next episode
    # Spontaneous actions outside the prototypes: talking parts the lips, brief brow flashes.
    for action, rate, length in (("AU25", 0.02, (6, 30)), ("AU1", 0.006, (4, 12)), ("AU2", 0.004, (4, 12)),
                                 ("AU6", 0.004, (6, 20)), ("AU20", 0.003, (4, 12))):
        for start in np.flatnonzero(rng.random(n_frames) < rate):
            env = _envelope(n_frames - start, 3, int(rng.integers(*length)), 3) * rng.uniform(0.4, 1.0)
            j = actions_idx[action]
            actions[start: start + env.size, j] = np.maximum(actions[start: start + env.size, j], env)
    # Slow drift and a per-person baseline make valence-arousal vary smoothly beyond the episodes.
    va[:, 0] += rng.normal(0, 0.08) + _smooth_noise(rng, n_frames, 25, 0.12)
    va[:, 1] += rng.normal(0, 0.08) + _smooth_noise(rng, n_frames, 25, 0.12)
    va = np.tanh(1.2 * va)  # saturates smoothly inside (-1, 1) instead of piling up on the boundary
    face_present = np.ones(n_frames, dtype=bool)
    for start in np.flatnonzero(rng.random(n_frames) < 0.006):  # the detector loses the face now and then
        face_present[start: start + int(rng.integers(1, 12))] = False
    return VideoPlan(name, np.clip(actions, 0, 1), expression, va.astype(np.float32), face_present)


def latent_labels(plan: VideoPlan) -> dict[str, np.ndarray]:
    """Noise-free labels in the annotation files' encoding: VA (T,2), AU (T,8) 0/1, EXPR (T,) 0-6."""
    idx = [ACTIONS.index(a) for a in AU_NAMES_2020]
    return {"va": plan.va.astype(np.float32), "au": (plan.actions[:, idx] >= AU_ACTIVE).astype(np.int16),
            "expr": plan.expression.astype(np.int16)}


def annotate(rng: np.random.Generator, plan: VideoPlan) -> dict[str, np.ndarray]:
    """Noisy human-like annotations of the latents, with unlabeled stretches (NaN / -1)."""
    n = len(plan.expression)
    latent = latent_labels(plan)
    va = latent["va"] + np.stack([_smooth_noise(rng, n, 8, 0.07), _smooth_noise(rng, n, 8, 0.07)], 1)
    va = np.clip(va + rng.normal(0, 0.03, va.shape), -1, 1).astype(np.float32)
    # AU: annotators mark onsets and offsets a few frames off, and miss or add a few frames.
    idx = [ACTIONS.index(a) for a in AU_NAMES_2020]
    shifted = np.stack([np.roll(plan.actions[:, j], int(rng.integers(-3, 4))) for j in idx], 1)
    au = (shifted >= AU_ACTIVE + rng.normal(0, 0.05, (1, len(idx)))).astype(np.int16)
    flips = rng.random(au.shape) < 0.015
    au[flips] = 1 - au[flips]
    # EXPR: the same boundary jitter, and a few episodes given a confusable class.
    expr = np.roll(latent["expr"], int(rng.integers(-3, 4))).astype(np.int16)
    changes = np.flatnonzero(np.diff(expr) != 0) + 1
    for start, stop in zip(np.r_[0, changes], np.r_[changes, n]):
        current = EXPR_NAMES_2020[expr[start]]
        if current in CONFUSIONS and rng.random() < 0.06:
            expr[start:stop] = EXPR_NAMES_2020.index(CONFUSIONS[current])
    out = {"va": va, "au": au, "expr": expr}
    for task in TASKS:  # stretches the annotators skipped
        for start in np.flatnonzero(rng.random(n) < 0.004):
            stop = start + int(rng.integers(5, 40))
            if task == "va":
                out[task][start:stop] = np.nan
            else:
                out[task][start:stop] = -1
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


def _people_of_video(rng: np.random.Generator, index: int) -> list[str]:
    base = f"{index + 1}-30-640x480"
    if rng.random() < 0.12:  # two people in one video, one annotation file each
        return [f"{base}_left", f"{base}_right"]
    return [base]


def _assign(rng: np.random.Generator, index: int) -> dict[str, str]:
    """Tasks and split of one video: about 20% validation; a few names swap the split of one task."""
    # The first videos are pinned so that even the smoke size has every task in both splits.
    if index < 6:
        split = "val" if index % 2 else "train"
        tasks = [TASKS[index // 2]] + [t for t in TASKS if t != TASKS[index // 2] and rng.random() < 0.5]
    else:
        split = "val" if rng.random() < 0.2 else "train"
        tasks = [t for t, p in zip(TASKS, (0.8, 0.6, 0.6)) if rng.random() < p] or ["va"]
    assignment = {t: split for t in tasks}
    if index >= 6 and len(tasks) > 1 and rng.random() < 0.08:
        t = tasks[int(rng.integers(len(tasks)))]
        assignment[t] = "train" if split == "val" else "val"
    return assignment


def _write_video(args: tuple[str, int, int, int]) -> dict[str, Any]:
    """Plan, annotate, render and write one video. Runs in a worker process."""
    root, seed, index, size_name = args
    size = SIZES[size_name]
    root_path = Path(root)
    rng = np.random.default_rng([seed, index])
    n_frames = int(rng.integers(size.min_frames, size.max_frames + 1))
    assignment = _assign(rng, index)
    scene_light = random_nuisance(rng)
    results = []
    for person, name in enumerate(_people_of_video(rng, index)):
        person_rng = np.random.default_rng([seed, index, person + 1])
        identity = random_identity(person_rng)
        plan = plan_person(person_rng, name, n_frames)
        notes = annotate(person_rng, plan)
        folder = root_path / "cropped_aligned" / name
        folder.mkdir(parents=True, exist_ok=True)
        poses = {k: _smooth_noise(person_rng, n_frames, 15, s) for k, s in (("yaw", 9.0), ("pitch", 5.0),
                                                                            ("roll", 4.0))}
        occluder = int(person_rng.integers(1, 4))  # hand, bar or sunglasses, kept for the whole video
        occluded = np.zeros(n_frames, dtype=bool)
        for start in np.flatnonzero(person_rng.random(n_frames) < 0.003):
            occluded[start: start + int(person_rng.integers(5, 30))] = True
        # Camera and compression stay fixed within a video; pose, gaze and exposure drift smoothly, noise is fresh.
        camera = random_nuisance(person_rng, strength=0.6)
        gaze = np.clip(_smooth_noise(person_rng, n_frames, 10, 0.4), -1, 1)
        exposure = _smooth_noise(person_rng, n_frames, 20, 6.0)
        for t in range(n_frames):
            if not plan.face_present[t]:
                continue
            nuisance = dataclasses.replace(
                camera, yaw=float(np.clip(poses["yaw"][t], -30, 30)), gaze=float(gaze[t]),
                brightness=float(camera.brightness + exposure[t]), noise_seed=t,
                pitch=float(np.clip(poses["pitch"][t], -20, 20)), roll=float(np.clip(poses["roll"][t], -15, 15)),
                light_angle=scene_light.light_angle, light_strength=scene_light.light_strength,
                occlusion=occluder if occluded[t] else 0, occlusion_seed=index)
            actions = dict(zip(ACTIONS, plan.actions[t]))
            pixels = render_face(identity, actions, nuisance, float(plan.va[t, 0]), float(plan.va[t, 1]))
            _save_jpeg(pixels, folder / f"{t + 1:05d}.jpg", nuisance.jpeg_quality)
        for task, split in assignment.items():
            ann = root_path / "annotations" / EDITION.task_dirs[task] / EDITION.split_dirs[split]
            ann.mkdir(parents=True, exist_ok=True)
            (ann / f"{name}.txt").write_text(format_annotation(task, notes[task]))
        latent = latent_labels(plan)
        # The latents and the annotations as generated: the ceiling and the round-trip tests read them back.
        np.savez_compressed(root_path / LATENT_DIR / f"{name}.npz", **latent, face_present=plan.face_present,
                            **{f"annotated_{t}": notes[t] for t in TASKS})
        results.append({"name": name, "frames": n_frames, "images": int(plan.face_present.sum()),
                        "splits": assignment})
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
    jobs = [(str(partial), seed, i, size) for i in range(spec.videos)]
    workers = workers or min(usable_cores(), 8)
    if workers > 1:
        # spawn, not fork: forking a process that already runs torch or a Jupyter kernel's threads can deadlock
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            videos = list(pool.map(_write_video, jobs, chunksize=1))
    else:
        videos = [_write_video(j) for j in jobs]
    seconds = time.perf_counter() - started
    names = [n for v in videos for n in v["names"]]
    manifest = {**wanted, "videos": spec.videos, "names": len(names),
                "frames": sum(n["frames"] for n in names), "images": sum(n["images"] for n in names),
                "seconds": round(seconds, 2), "workers": workers,
                "images_per_second": round(sum(n["images"] for n in names) / seconds, 1)}
    write_json(partial / CEILING_FILE, ceiling(partial))
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
_NAME = r"\d+-30-640x480(?:_left|_right)?"  # the names _people_of_video gives
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


# --------------------------------------------------------------------------------------------------- the ceiling


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


def ceiling(root: str | os.PathLike[str]) -> dict[str, Any]:
    """ABAW 2020 scores on validation of the latent labels (the ceiling) and of trivial predictors.

    Trivial predictors take their constants from the training split: the mean valence-arousal (a constant has CCC 0),
    the majority expression, and per AU either its prevalence as a probability (thresholded at 0.5, so mostly
    "absent") or always "present". ``trivial_best`` is the best trivial score per task, the floor a model must beat.
    """
    train = load_frames(root, "train")
    val = load_frames(root, "val")
    targets, masks = label_arrays(val, AU_NAMES_2020)
    train_targets, train_masks = label_arrays(train, AU_NAMES_2020)
    latent = load_latent(root, val)
    va_true, au_true, expr_true = (targets[t][masks[t]] for t in TASKS)
    result: dict[str, Any] = {"split": "val", "frames": {t: int(masks[t].sum()) for t in TASKS}}
    result["ceiling"] = {
        "va": va_score(va_true, latent["va"][masks["va"]]),
        "au": au_score(au_true, latent["au"][masks["au"]].astype(float)),
        "expr": expr_score(expr_true, latent["expr"][masks["expr"]].astype(int),
                                   num_classes=len(EXPR_NAMES_2020)),
    }
    mean_va = train_targets["va"][train_masks["va"]].mean(axis=0)
    prevalence = train_targets["au"][train_masks["au"]].mean(axis=0)
    majority = int(np.bincount(train_targets["expr"][train_masks["expr"]], minlength=7).argmax())
    trivial = {
        "va_constant_mean": va_score(va_true, np.tile(mean_va, (len(va_true), 1))),
        "au_prevalence": au_score(au_true, np.tile(prevalence, (len(au_true), 1))),
        "au_all_present": au_score(au_true, np.ones_like(au_true, dtype=float)),
        "expr_majority": expr_score(expr_true, np.full(len(expr_true), majority),
                                            num_classes=len(EXPR_NAMES_2020)),
    }
    result["trivial"] = trivial
    result["trivial_best"] = {
        "va": trivial["va_constant_mean"]["score"],
        "au": max(trivial["au_prevalence"]["score"], trivial["au_all_present"]["score"]),
        "expr": trivial["expr_majority"]["score"],
    }
    result["ceiling_score"] = {t: result["ceiling"][t]["score"] for t in TASKS}
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
