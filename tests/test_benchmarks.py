"""The benchmark report: every figure becomes a ratio against its goal, and the page says what was measured.

The measurements themselves are not timed here (speed lives in `make bench`); this checks the arithmetic and the
report on fixed inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run_all

TRAIN = {"results": [{"backbone": "seresnet18_half", "image_size": 64, "full_images_per_s": 270.0,
                      "bare_images_per_s": 300.0, "full_over_bare": 0.9,
                      "data_wait_share": 0.12, "median_full_over_bare": 0.85,
                      "runs": {"full": [270.0, 250.0, 240.0], "bare": [300.0, 290.0, 280.0]}}]}
DATA = {"jpeg_images_per_second": 5400.0, "packed_images_per_second": 18000.0,
        "training_batches": {"image_size": 64, "batch_size": 32, "images_per_second": 4050.0}}
PREDICT = {"best_threads": 2, "best_end_to_end_fps": 20.0, "gpu_model": None,
           "by_threads": [{"threads": 1, "decode_ms": 1.0, "detect_ms": 20.0, "align_ms": 0.5, "model_ms": 30.0,
                           "end_to_end_fps": 12.0},
                          {"threads": 2, "decode_ms": 1.0, "detect_ms": 12.0, "align_ms": 0.5, "model_ms": 20.0,
                           "end_to_end_fps": 18.0, "end_to_end_fps_onnx": 20.0}]}
MEMORY = {"frames": {"60": {"peak_rss_mb": 1000.0}, "600": {"peak_rss_mb": 1050.0}}, "ratio_10n_over_n": 1.05}


def test_each_figure_is_a_ratio_to_its_goal() -> None:
    rows = {r["figure"]: r for r in run_all.figures(TRAIN, DATA, PREDICT, MEMORY)}
    step = rows["training step, seresnet18_half at 64 px: full / bare timm step"]
    assert step["ratio"] == pytest.approx(1.0) and "12% of the loop waits for data" in step["detail"]
    assert "best of 3 alternating repeats" in step["detail"] and "(median repeats: 0.85)" in step["detail"]
    jpeg = rows["data: jpeg decode (1 thread) / consumption of the seresnet18_half step"]
    assert jpeg["value"] == 20.0 and jpeg["ratio"] == pytest.approx(20.0 / 3.0)
    batches = rows["data: the trainer's augmented batches at 64 px (packed, 1 thread) / consumption of the "
                   "seresnet18_half step"]
    assert batches["value"] == 15.0 and batches["ratio"] == pytest.approx(5.0)
    # no training batches measured (an older results file): no such row, the other figures stay
    older = run_all.figures(TRAIN, {k: v for k, v in DATA.items() if k != "training_batches"}, PREDICT, MEMORY)
    assert len(older) == len(rows) - 1
    fps = rows["inference: mtanet predict end to end, 2 thread(s), frames/s"]
    assert fps["ratio"] == pytest.approx(0.8) and "detection 12.0 ms" in fps["detail"]  # the 2-thread split
    assert "torch 18.0, onnx 20.0 frames/s" in fps["detail"]
    gpu = rows["inference: model batched on the GPU / on this CPU"]
    assert gpu["value"] is None and gpu["ratio"] is None and gpu["detail"] == "no GPU on this machine"
    memory = rows["memory: peak RSS of mtanet predict, 600 / 60 frames"]
    assert memory["ratio"] == pytest.approx(1.10 / 1.05)  # lower is better: the goal over the value


def test_the_page_names_the_hardware_and_every_figure() -> None:
    rows = run_all.figures(TRAIN, DATA, PREDICT, MEMORY)
    times = [{"what": "make test", "seconds": 300, "date": "2026-11-27"}]
    hw = {"cpu": "Test CPU", "cores": 2, "torch": "2.14.1", "gpu": None}
    text = run_all.page(rows, times, hw, "2026-11-27", 123.0)
    assert text.startswith("# Performance") and "Test CPU, 2 cores, no GPU" in text and "123 s" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "figure" not in line
             and "run |" not in line]
    assert len(table) == len(rows) + 1  # every figure, then the make test row
    assert "| make test | 300 | 2026-11-27 |" in text
    assert "times the speed of the reference machine" not in text  # not measured: not claimed
    slower = run_all.page(rows, times, {**hw, "speed_vs_reference": 0.32}, "2026-11-27", 123.0)
    assert "trains a bare timm step at 0.32 times the speed of the reference machine" in slower


def test_the_renderer_figure_is_its_rate_over_the_goal() -> None:
    row = run_all.render_figure({"faces_per_second": 125.0, "goal_faces_per_second": 50.0, "faces": 60, "repeats": 3})
    assert (row["value"], row["goal"], row["ratio"]) == (125.0, 50.0, 2.5)
    assert row["detail"] == "median of 3 timings of 60 faces"
