"""Training throughput: the full trainer step against a bare timm step of the same batch shape, side by side.

    .venv/bin/python benchmarks/train_step.py [--backbone seresnet18 --image-size 64] [--steps 30]
        [--out benchmarks/results/train_step.json]

*Full step*: :class:`mtanet.train.Trainer` on the synthetic set (loader, augmentation, three heads, masked losses,
loss weighting, logging), read from its own ``log.jsonl`` windows so validation and start-up are excluded.
*Bare step*: ``timm.create_model(...)`` with its own classifier, forward + cross entropy + backward + Adam on a
random batch already in memory. Both run in this process, alternating, ``--repeats`` times, each rate the median
of its windows of ``--warmup`` steps; the ratio of the best repeats is the figure to compare across runs (goal: at
least 0.9), the ratio of the median repeats and each adjacent pair's ratio are kept beside it.

Its data part (item 2 of the benchmark issue) is the consumption rate printed here: images per second the full
step eats, to set against ``benchmarks/data_loading.py``'s decode rate.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit, hardware  # beside this script: python puts its folder on sys.path

from mtanet.models import BACKBONES
from mtanet.runtime import resolve_device
from mtanet.synth import resolve_data_root
from mtanet.train import TrainConfig, Trainer


def bare_step_rate(backbone: str, image_size: int, batch_size: int, steps: int, warmup: int, device,
                   amp: bool, channels_last: bool, compile_model: bool, window: int) -> float:
    """Images per second of forward + loss + backward + Adam on one fixed random batch (no data, no logging)."""
    import timm

    torch.manual_seed(0)
    kwargs = copy.deepcopy(BACKBONES[backbone])
    model = timm.create_model(pretrained=False, num_classes=7, **kwargs).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 7, (batch_size,), device=device)
    model.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(images)
        loss = torch.nn.functional.cross_entropy(out.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    # windows of `window` steps, as the trainer's log windows, and their median, as for the full step
    rates = []
    for _ in range(max(1, steps // window)):
        sync()
        started = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        rates.append(window * batch_size / (time.perf_counter() - started))
    return float(np.median(rates))


def full_step_rate(config: TrainConfig, warmup: int) -> tuple[float, dict]:
    """Images per second of the trainer's loop, from its log windows after the first ``warmup`` steps."""
    trainer = Trainer(config)
    try:
        metrics = trainer.run()
    finally:
        trainer.close()
    rows = [json.loads(line) for line in (Path(config.output_dir) / "log.jsonl").read_text().splitlines()]
    windows = [r["images_per_s"] for r in rows if r["kind"] == "step" and r["step"] > warmup]
    return float(np.median(windows)), {**metrics["hardware"], "data_wait_share": metrics["data_wait_share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", nargs="+", default=["seresnet18"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the trainer's choice)")
    parser.add_argument("--synth-size", default="smoke", help="synthetic set the full step reads")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--cache-dir", default="", help="the trainer's packed uint8 image cache (empty: decode jpgs)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results = []
    data_root = resolve_data_root(args.data_root, args.synth_size)
    for backbone in args.backbone:
        with tempfile.TemporaryDirectory() as tmp:
            base = TrainConfig(
                data_root=str(data_root), backbone=backbone, image_size=args.image_size, batch_size=args.batch_size,
                steps_per_epoch=args.warmup + args.steps, stage1_epochs=1,
                stage2_epochs=0, device=args.device, threads=args.threads, num_workers=args.num_workers,
                # log windows of `warmup` steps: the first one holds the warm-up, which full_step_rate leaves out
                cache_dir=args.cache_dir, compile=args.compile, log_every=args.warmup, checkpoint_every=0,
                progress=False, seed=0)
            full, bare, hw = [], [], {}
            for repeat in range(args.repeats):
                config = base.replace(output_dir=str(Path(tmp) / f"run{repeat}"))
                rate, hw = full_step_rate(config, args.warmup)
                full.append(rate)
                # the same thread count; torch's default (non-deterministic) mode, which the trainer restored on
                # closing: deterministic algorithms, on by default for CPU runs, are part of the full step's cost
                device = resolve_device(args.device)
                torch.set_num_threads(hw["torch_threads"])
                bare.append(bare_step_rate(backbone, args.image_size, args.batch_size, args.steps, args.warmup,
                                           device, bool(hw["amp_bf16"]), bool(hw["channels_last"]), args.compile,
                                           window=args.warmup))
        results.append({
            "backbone": backbone, "image_size": args.image_size, "batch_size": args.batch_size,
            # The best repeat of each side: other machines' load only ever slows a run down (the reason timeit
            # reports the minimum time), so the fastest repeats are the least disturbed. Medians are kept beside.
            "full_images_per_s": round(float(np.max(full)), 1),
            "bare_images_per_s": round(float(np.max(bare)), 1),
            "full_over_bare": round(float(np.max(full) / np.max(bare)), 3),
            "median_full_over_bare": round(float(np.median(full) / np.median(bare)), 3),
            "pair_ratios": [round(f / b, 3) for f, b in zip(full, bare)],
            # the loop's time waiting for the loader: on a GPU, the share of time it idles for input
            "data_wait_share": round(hw.pop("data_wait_share"), 3),
            "runs": {"full": [round(r, 1) for r in full], "bare": [round(r, 1) for r in bare]},
            "trainer_hardware": hw,
        })
        print(f"{backbone} {args.image_size}px: full {results[-1]['full_images_per_s']} img/s, bare "
              f"{results[-1]['bare_images_per_s']} img/s, ratio {results[-1]['full_over_bare']}", flush=True)
    emit({"what": "full trainer step vs bare timm step, images per second (goal: ratio >= 0.9)", "goal": 0.9,
          "results": results, "hardware": hardware(), "date": time.strftime("%Y-%m-%d")}, args.out)


if __name__ == "__main__":
    main()
