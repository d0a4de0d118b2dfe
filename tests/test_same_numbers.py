"""The same seed and parameters give the same numbers, run after run and commit after commit.

``tests/data/numbers_before_redesign.json`` holds a small two-stage run: the loss rows of its log, its validation
scores per epoch, sums of its final weights and what ``evaluate`` scored its best checkpoint. It was first recorded
with the code of commit 71862e4 (before the package redesign of issue 12) and recorded again when the synthetic twin
changed (issue 13: SynthAffWild v5, then v6, whose eyes show arousal below zero), whose data the run trains on; ``recorded_with`` names the commit. Its config
names ``init_log_var: 0.0``, the start of eq. 5's log-variances when it was recorded (the default is now
``"stationary"``, tested in tests/test_train.py). The run below
uses the same configuration on the smoke twin written by the current generator, so the generator is checked too. On
a machine like the recording's (CPU model, vector extensions, torch) every number must be equal; elsewhere CPU
kernels differ in the last bits (which grow over 24 steps), so the first log rows are compared to 1e-4 and the final
scores to 0.05: still far below what a changed learning rate, sampler, augmentation, loss or generator would move.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtanet.evaluate import evaluate
from mtanet.runtime import cpu_model
from mtanet.train import train

RECORD = Path(__file__).parent / "data" / "numbers_before_redesign.json"
TIMING_KEYS = {"images_per_s", "val_seconds", "val"}


def machine() -> dict:
    """What decides the CPU kernels torch picks: the CPU model, its vector extensions and torch's version."""
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), []) if Path("/proc/cpuinfo").exists() else []
    return {"cpu": cpu_model(), "vector": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
            "torch": torch.__version__}


def summarize(out: Path, evaluated: dict) -> dict:
    """The numbers a run's output folder holds, in the recorded form."""
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)["state_dict"]
    parts: dict[str, list[float]] = {}
    for name, tensor in state.items():
        if tensor.is_floating_point():
            parts.setdefault(".".join(name.split(".")[:2]), []).extend(tensor.double().abs().flatten().tolist())
    # math.fsum is exactly rounded whatever the order, unlike torch's sum, whose reduction order follows the number of
    # threads: the sums then tell weights apart, never the thread count of the process that summed them
    sums = {part: math.fsum(values) for part, values in parts.items()}
    return {"log": [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in log],
            "weight_abs_sums": sums,
            "evaluate": {k: evaluated[k] for k in ("headline", "headline_all_frames")}}


def test_a_fixed_run_gives_the_numbers_recorded_before_the_redesign(smoke_root: Path, tmp_path: Path) -> None:
    record = json.loads(RECORD.read_text())
    out = tmp_path / "run"
    train({**record["config"], "data_root": str(smoke_root), "output_dir": str(out)})
    evaluated = evaluate(out / "best_mean.pt", data_root=smoke_root, output_dir=out / "eval", device="cpu",
                         threads=1, progress=False)
    got = summarize(out, evaluated)
    if machine() == record["recorded_with"]["machine"]:
        assert got["log"] == record["log"]
        assert got["weight_abs_sums"] == record["weight_abs_sums"]
        assert got["evaluate"] == record["evaluate"]
        return
    assert [(r["kind"], r["step"]) for r in got["log"]] == [(r["kind"], r["step"]) for r in record["log"]]
    for row, want in zip(got["log"][:2], record["log"][:2]):
        for key, value in want.items():
            assert row[key] == (pytest.approx(value, rel=1e-4) if isinstance(value, float) else value), key
    for key, value in record["evaluate"]["headline"].items():
        assert got["evaluate"]["headline"][key] == pytest.approx(value, abs=0.05), key
    assert got["weight_abs_sums"].keys() == record["weight_abs_sums"].keys()
