"""Decoded images per second: JPEG files vs the packed uint8 cache, through FrameDataset, on one core.

    .venv/bin/python benchmarks/data_loading.py [--data-root data/synth-cpu] [--n 3000] [--image-size 64]
        [--out benchmarks/results/data_loading.json]

Four paths: ``FrameDataset[i]`` on the JPEG files and on the packed cache (112 px, no augmentation), and the
trainer's own batches (``_KeyedFrames.__getitems__``: packed cache, augmentation, resize to ``--image-size``, batch
``--batch-size``), which is what the training loop waits for, as float batches (the CPU's path) and as uint8 batches
whose colour arithmetic the GPU finishes (the worker's share of the GPU path, ``device_augment``).

All three are timed in the same process, alternating; the JPEG and cache paths are reported with their ratio (these
machines are shared and noisy: compare ratios across runs, not absolute numbers).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mtanet.data import FaceAugment, FrameDataset, build_packed_cache, load_frames
from mtanet.data import KeyedFrames as _KeyedFrames
from mtanet.synth import default_data_root
from _report import emit  # beside this script: python puts its folder on sys.path


def images_per_second(dataset: FrameDataset, indices: np.ndarray) -> float:
    started = time.perf_counter()
    for i in indices:
        dataset[int(i)]
    return len(indices) / (time.perf_counter() - started)


def training_batches_per_second(dataset: _KeyedFrames, indices: np.ndarray, batch_size: int) -> float:
    """Images per second of the trainer's batched fetch (augmented), keys as the trainer makes them."""
    started = time.perf_counter()
    for b, start in enumerate(range(0, len(indices), batch_size)):
        dataset.__getitems__([(int(i), (0, 0, b, j)) for j, i in enumerate(indices[start: start + batch_size])])
    return len(indices) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=None)
    parser.add_argument("--n", type=int, default=3000, help="images per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64, help="the training batches' size (the cpu profile's)")
    parser.add_argument("--batch-size", type=int, default=32)
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
        augment = FaceAugment(args.image_size)
        augmented = FrameDataset(frames, root, au_names, image_size=args.image_size, transform=augment, packed=packed)
        training = _KeyedFrames(augmented, augment)
        training_uint8 = _KeyedFrames(augmented, augment, uint8=True)
        rates = {"jpeg": [], "packed": [], "training": [], "training_uint8": []}
        for _ in range(args.repeats):
            rates["jpeg"].append(images_per_second(jpeg, indices))
            rates["packed"].append(images_per_second(cached, indices))
            rates["training"].append(training_batches_per_second(training, indices, args.batch_size))
            rates["training_uint8"].append(training_batches_per_second(training_uint8, indices, args.batch_size))
    result = {
        "what": "FrameDataset.__getitem__ (decode + float conversion + targets), random order, 1 thread; "
                "training_batches: the trainer's batched fetch",
        "images": int(len(indices)), "repeats": args.repeats,
        "jpeg_images_per_second": round(float(np.median(rates["jpeg"])), 1),
        "packed_images_per_second": round(float(np.median(rates["packed"])), 1),
        "packed_over_jpeg": round(float(np.median(rates["packed"]) / np.median(rates["jpeg"])), 2),
        "training_batches": {"what": "the trainer's batched fetch: packed cache, augmentation, resize",
                             "image_size": args.image_size, "batch_size": args.batch_size,
                             "images_per_second": round(float(np.median(rates["training"])), 1),
                             "uint8_images_per_second": round(float(np.median(rates["training_uint8"])), 1)},
        "cache_build_seconds": round(build_seconds, 1), "cache_images": len(jpeg),
        "hardware": {"cpu": platform.processor() or platform.machine(), "torch_threads": 1},
        "date": time.strftime("%Y-%m-%d"),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
