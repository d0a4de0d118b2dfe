"""Faces per second of the synthetic set's renderer (mtanet.synth.render.render_face) in one process.

    .venv/bin/python benchmarks/synth_render.py [--faces 60] [--repeats 3] [--out benchmarks/results/synth_render.json]

Goal: at least 50 faces/s on a loaded CI core (about 500 on an idle one), so that writing the `cpu` profile's
synthetic set stays a small part of `make book` (the writer renders in one process per core, numpy and PIL
only). Each face is a random identity (4 of them, cycled), two action units
at random intensities and random nuisances (pose, light, blur, noise, occlusion), as the dataset writer draws them.
The median of ``--repeats`` timings is reported, with its ratio to the goal (>= 1 meets it).

This was a timed test (tests/test_synth_render.py::test_fast_enough); a timing is a measurement, not a pass/fail
check of behaviour, so it lives here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _report import emit, hardware  # beside this script: python puts its folder on sys.path

from mtanet.synth.render import random_identity, random_nuisance, render_face

GOAL_FACES_PER_S = 50.0


def faces_per_second(n: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    ids = [random_identity(rng) for _ in range(4)]
    jobs = [(ids[k % 4], {"AU12": rng.random(), "AU6": rng.random()}, random_nuisance(rng)) for k in range(n)]
    render_face(*jobs[0])  # warm-up: first-call allocations and imports
    started = time.perf_counter()
    for job in jobs:
        render_face(*job)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faces", type=int, default=60, help="faces per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rates = [faces_per_second(args.faces, seed) for seed in range(args.repeats)]
    rate = float(np.median(rates))
    emit({"what": "render_face: random identity, two AUs, random nuisances, one process", "faces": args.faces,
          "repeats": args.repeats, "faces_per_second": round(rate, 1), "runs": [round(r, 1) for r in rates],
          "goal_faces_per_second": GOAL_FACES_PER_S, "ratio_to_goal": round(rate / GOAL_FACES_PER_S, 2),
          "hardware": hardware()}, args.out)


if __name__ == "__main__":
    main()
