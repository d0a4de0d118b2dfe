"""Peak memory of `mtanet predict` on a generated video of N and 10N frames: streaming means the same peak.

    .venv/bin/python benchmarks/predict_memory.py [--frames 100] [--out benchmarks/results/predict_memory.json]

Each run is a separate process (peak RSS from the OS, ru_maxrss of the child); the untrained model is built from a
small backbone so the figure is about the pipeline, not the weights. Goal (issue): the two peaks within 10%.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import emit  # beside this script: python puts its folder on sys.path


def make_video(path: Path, frames: int, seed: int = 0) -> None:
    """A 640x480 H.264 video with one synthetic face moving slowly across a textured background."""
    import av

    from mtanet.synth import render as synth_render

    rng = np.random.default_rng(seed)
    identity = synth_render.random_identity(rng)
    face = synth_render.render_face(identity, {"AU12": 0.8}, synth_render.Nuisance())
    background = rng.integers(60, 200, (480, 640, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 640, 480, "yuv420p"
        for t in range(frames):
            image = background.copy()
            x = 100 + int(200 * (0.5 + 0.5 * np.sin(t / 40)))
            big = np.kron(face, np.ones((2, 2, 1), dtype=np.uint8))  # 224x224 face
            image[120:344, x:x + 224] = big
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: run the small video first
    return max(after, before) / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import torch

    from mtanet.models import MTANet, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        save_checkpoint(MTANet(backbone="seresnet18"), tmp / "model.pt")
        results = {}
        for n in (args.frames, 10 * args.frames):
            video = tmp / f"video_{n}.mp4"
            make_video(video, n)
            cmd = [sys.executable, "-m", "mtanet.cli", "predict", str(video), "-o", str(tmp / f"out_{n}.csv"),
                   "--checkpoint", str(tmp / "model.pt"), "--batch-size", "16", "--threads", "2"]
            peak, seconds = peak_rss_mb(cmd)
            rows = sum(1 for _ in open(tmp / f"out_{n}.csv")) - 1
            results[n] = {"peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1), "rows": rows}
    small, large = results[args.frames], results[10 * args.frames]
    report = {"what": "peak RSS of one `mtanet predict` process on a 640x480 video, seresnet18, batch 16, 2 threads",
              "frames": {str(k): v for k, v in results.items()},
              "ratio_10n_over_n": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
              "goal": "ratio <= 1.10", "date": time.strftime("%Y-%m-%d")}
    emit(report, args.out)


if __name__ == "__main__":
    main()
