"""Decoded images per second: JPEG files vs the packed uint8 cache, through FrameDataset, on one core.

    .venv/bin/python benchmarks/data_loading.py [--data-root data/synth-cpu] [--n 3000] [--out benchmarks/results/data_loading.json]

Both paths are timed in the same process, alternating, and reported with their ratio (these machines are shared and
noisy: compare ratios across runs, not absolute numbers).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtanet.data import FrameDataset, build_packed_cache, load_frames
from mtanet.synth import default_data_root
from _report import emit  # beside this script: python puts its folder on sys.path


def images_per_second(dataset: FrameDataset, indices: np.ndarray) -> float:
    started = time.perf_counter()
    for i in indices:
        dataset[int(i)]
    return len(indices) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--n", type=int, default=3000, help="images per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker's view: decoding is single-threaded per worker
    root = args.data_root or default_data_root("cpu")
    frames = load_frames(root, "train")
    au_names = [c for c in frames.columns if c.startswith("AU")]
    jpeg = FrameDataset(frames, root, au_names)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        packed = build_packed_cache(jpeg, Path(tmp) / "train.npy")
        build_seconds = time.perf_counter() - started
        cached = FrameDataset(frames, root, au_names, packed=packed)
        rng = np.random.default_rng(0)
        indices = rng.choice(len(jpeg), size=min(args.n, len(jpeg)), replace=False)  # random access, as in training
        rates = {"jpeg": [], "packed": []}
        for _ in range(args.repeats):
            rates["jpeg"].append(images_per_second(jpeg, indices))
            rates["packed"].append(images_per_second(cached, indices))
    result = {
        "what": "FrameDataset.__getitem__ (decode + float conversion + targets), random order, 1 thread",
        "images": int(len(indices)), "repeats": args.repeats,
        "jpeg_images_per_second": round(float(np.median(rates["jpeg"])), 1),
        "packed_images_per_second": round(float(np.median(rates["packed"])), 1),
        "packed_over_jpeg": round(float(np.median(rates["packed"]) / np.median(rates["jpeg"])), 2),
        "cache_build_seconds": round(build_seconds, 1), "cache_images": len(jpeg),
        "hardware": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1},
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
