"""Frames per second of `mtanet predict` on a 640x480 video with one face, split into decode, detection, alignment
and model; the same end to end; and the model part on a GPU against the CPU when there is one.

    .venv/bin/python benchmarks/predict_speed.py [--frames 150] [--backbone senet50] [--threads 1 2]
        [--out benchmarks/results/predict_speed.json]

Each thread setting is measured in this process (torch and onnxruntime set alike), and the best end-to-end one is
the figure against the goal (25 frames/s on 2 cores). The stages are timed one after the other on the same frames,
so their shares add up to the pipeline's cost; the end-to-end figure is :func:`mtanet.inference.predict_to_csv` on
the file, smoothing and CSV writing included.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit, hardware  # beside this script: python puts its folder on sys.path
from predict_memory import make_video


def stage_times(predictor, video: Path, batch_size: int) -> dict[str, float]:
    """Seconds per frame of each stage, measured on every frame of ``video``."""
    from mtanet.inference import FrameSource, as_rgb

    started = time.perf_counter()
    with FrameSource(video) as source:
        images = [as_rgb(item.image) for item in source]
    decode = time.perf_counter() - started

    started = time.perf_counter()
    faces = [predictor.aligner.detect(image)[:1] for image in images]
    detect = time.perf_counter() - started

    started = time.perf_counter()
    crops = [predictor.aligner.align(image, found[0].landmarks)[0] for image, found in zip(images, faces) if found]
    align = time.perf_counter() - started

    predictor.infer(np.stack(crops[:batch_size]))  # warm-up: first-call allocations are not per-frame cost
    started = time.perf_counter()
    for i in range(0, len(crops), batch_size):
        predictor.infer(np.stack(crops[i:i + batch_size]))
    model = time.perf_counter() - started
    n = len(images)
    return {"frames": n, "faces_found": len(crops), "decode_ms": 1e3 * decode / n, "detect_ms": 1e3 * detect / n,
            "align_ms": 1e3 * align / n, "model_ms": 1e3 * model / n}


def end_to_end_fps(model, video: Path, out: Path, threads: int, batch_size: int, engine: str = "torch",
                   onnx: Path | None = None) -> float:
    from mtanet.inference import predict_to_csv

    started = time.perf_counter()
    predict_to_csv(video, out, model, threads=threads, batch_size=batch_size, engine=engine, onnx=onnx, overwrite=True)
    seconds = time.perf_counter() - started
    return (sum(1 for _ in open(out)) - 1) / seconds


def gpu_model_speedup(model, batch_size: int, repeats: int = 20) -> dict[str, float] | None:
    """Crops per second of the model alone, batched, on the GPU (bf16) against this CPU; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    x = torch.rand(batch_size, 3, 112, 112)

    def rate(device, amp: bool) -> float:
        net = model.to(device).eval()
        xs = x.to(device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            net(xs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(repeats):
                net(xs)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return repeats * batch_size / (time.perf_counter() - started)

    cpu = rate(torch.device("cpu"), False)
    gpu = rate(torch.device("cuda"), True)
    model.to("cpu")
    return {"batch": batch_size, "cpu_crops_per_s": cpu, "gpu_crops_per_s": gpu, "gpu_over_cpu": gpu / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--backbone", default="senet50", help="the model's backbone (untrained: speed only)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--onnx", action="store_true", help="also measure the exported ONNX model end to end")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from mtanet.models import MTANet, save_checkpoint
    from mtanet.inference import Predictor

    torch.manual_seed(0)
    model = MTANet(backbone=args.backbone).eval()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = tmp / "video.mp4"
        make_video(video, args.frames)
        checkpoint = tmp / "model.pt"
        save_checkpoint(model, checkpoint)
        onnx = None
        if args.onnx:
            from mtanet.inference import export_checkpoint

            onnx = export_checkpoint(checkpoint, tmp / "model.onnx")
        for threads in args.threads:
            torch.set_num_threads(threads)
            predictor = Predictor(checkpoint, threads=threads)
            stages = stage_times(predictor, video, args.batch_size)
            total_ms = sum(stages[k] for k in ("decode_ms", "detect_ms", "align_ms", "model_ms"))
            row = {"threads": threads, **{k: round(v, 2) if isinstance(v, float) else v for k, v in stages.items()},
                   "stages_fps": round(1e3 / total_ms, 1),
                   "share": {k[:-3]: round(stages[k] / total_ms, 3) for k in ("decode_ms", "detect_ms", "align_ms",
                                                                            "model_ms")},
                   "end_to_end_fps": round(end_to_end_fps(checkpoint, video, tmp / "out.csv", threads,
                                                          args.batch_size), 1)}
            if onnx is not None:
                row["end_to_end_fps_onnx"] = round(end_to_end_fps(None, video, tmp / "out_onnx.csv", threads,
                                                                  args.batch_size, "onnx", onnx), 1)
            results.append(row)
            print(f"{threads} thread(s): {row['end_to_end_fps']} frames/s end to end; per frame: decode "
                  f"{row['decode_ms']} ms, detection {row['detect_ms']} ms, alignment {row['align_ms']} ms, model "
                  f"{row['model_ms']} ms", flush=True)
    best = max(results, key=lambda r: max(r["end_to_end_fps"], r.get("end_to_end_fps_onnx", 0.0)))
    best_fps = max(best["end_to_end_fps"], best.get("end_to_end_fps_onnx", 0.0))
    emit({"what": f"mtanet predict on a {args.frames}-frame 640x480 video with one face, {args.backbone} "
                  f"(untrained), batch {args.batch_size}",
          "goal_cpu_fps": 25.0, "best_threads": best["threads"], "best_end_to_end_fps": best_fps,
          "best_over_goal": round(best_fps / 25.0, 3), "by_threads": results,
          "gpu_model": gpu_model_speedup(model, 64), "goal_gpu_over_cpu": 20.0,
          "hardware": hardware(), "date": time.strftime("%Y-%m-%d")}, args.out)


if __name__ == "__main__":
    main()
