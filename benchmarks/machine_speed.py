"""How fast this machine trains, next to the reference machine the book's CPU budgets were sized on.

    .venv/bin/python benchmarks/machine_speed.py [--threads 2] [--out benchmarks/results/machine_speed.json]

``train_step.py``'s bare timm step (forward, cross entropy, backward, Adam) on one random batch of 32 in memory, for
the two models the project's guide quotes: seresnet18 at 64 px and seresnet50 at 112 px. ``speed_vs_reference`` is
this machine's rate over the reference's (156 and 23 images/s with 2 threads); the `cpu` profile's times (training
chapter under 8 minutes, book under 20) scale roughly with its inverse. An AMD EPYC with AVX2 only measured 0.38 and
0.43 (2026-11-30), and took 2.3 times as long for the training chapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _report import emit, hardware  # beside this script: python puts its folder on sys.path
from train_step import bare_step_rate

# images/s with 2 torch threads on the reference machine (2-core Intel Xeon), as the project's guide gives them
REFERENCE = {("seresnet18", 64): 156.0, ("seresnet50", 112): 23.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the reference used 2)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps of seresnet18 (seresnet50 runs a third)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for (name, size), reference in REFERENCE.items():
        steps = args.steps if size == 64 else max(1, args.steps // 3)
        rate = bare_step_rate(name, size, batch_size=32, steps=steps, warmup=2, device=torch.device("cpu"), amp=False,
                              channels_last=False, compile_model=False, window=steps)
        rows.append({"model": name, "image_size": size, "images_per_s": round(rate, 1),
                     "reference_images_per_s": reference, "speed_vs_reference": round(rate / reference, 3)})
    # the headline is the slower of the two: the conservative factor for the book's budgets
    emit({"what": "bare timm training steps against the reference machine", "threads": args.threads, "rows": rows,
          "speed_vs_reference": round(min(r["speed_vs_reference"] for r in rows), 3), "hardware": hardware()},
         args.out)


if __name__ == "__main__":
    main()
