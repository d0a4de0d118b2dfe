"""The ablation sweep: planning, execution through papermill, resuming after a failure, and the tables."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mtanet.sweep
from mtanet.book import sweep
from mtanet.errors import ConfigError, NotebookFailed
from mtanet.models import BACKBONES
from mtanet.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for the training notebook: same interface (parameters in, metrics.json into output_dir), no training.
# Its scores are a function of backbone and seed, it logs every execution, and it fails once for one run. Like the
# training chapter, it merges train_options into a TrainConfig last and stores that config in metrics.json.
FAKE_TRAINING = '''# %% tags=["parameters"]
output_dir: str = ""
seed: int = 0
held_out_checkpoint: str = ""
backbone: str = ""
tasks: list = ["va", "au", "expr"]
calls: str = ""
fail_once: str = ""
hold_once: str = ""
threads: int = 0
train_options: dict = {}

# %%
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

out = Path(output_dir)
with open(calls, "a") as log:
    log.write(f"{out.parent.name}/{out.name}\\n")
marker = Path(calls).with_suffix(".failed")
if fail_once == f"{out.parent.name}/{out.name}" and not marker.exists():
    marker.write_text("x")
    (out / "last.pt").write_text(json.dumps({"step": 2}))  # its partial state
    raise RuntimeError("killed half way")
held = Path(calls).with_suffix(".held")
if hold_once == f"{out.parent.name}/{out.name}" and not held.exists():
    held.write_text("x")
    import time
    time.sleep(120)  # the test kills the whole sweep here
# like the training chapter (resume=True): a run cut off before continues from its partial state, not from scratch
partial = out / "last.pt"
resumed_from = json.loads(partial.read_text())["step"] if partial.exists() else 0
bonus = {"seresnet26_half": 0.10, "resnext26_half": 0.0, "resnext26_half_cbam": 0.02}[backbone]
final = {}
if "va" in tasks:
    final["va"] = {"score": 0.4 + bonus + 0.001 * seed, "ccc_valence": 0.5, "ccc_arousal": 0.3 + bonus + 0.002 * seed}
if "au" in tasks:
    final["au"] = {"score": 0.6 + 0.01 * seed, "f1_mean": 0.3, "accuracy": 0.9}
if "expr" in tasks:
    final["expr"] = {"score": 0.5 - 0.01 * seed, "f1_macro": 0.4, "accuracy": 0.7}
config = {"backbone": backbone, "image_size": 40}
if train_options:  # only then: importing the trainer takes seconds, and most runs here have none
    from mtanet.train import TrainConfig
    config = TrainConfig.from_dict({"data_root": str(out), **config, "seed": seed, **train_options}).to_dict()
(out / "best_mean.pt").write_text("weights")
(out / "mine.pt").write_text("the user's")
(out / "metrics.json").write_text(json.dumps({"final": final, "config": config,
                                              "steps": 3, "resumed_from": resumed_from, "wall_time_s": {"total": 1.0},
                                              "hardware": {"device_name": "test cpu"}}))
'''


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, Path]:
    nb = tmp_path / "fake_training.py"
    nb.write_text(FAKE_TRAINING)
    return nb, tmp_path / "calls.txt"


def _calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _run_config(folder: Path) -> dict:
    """The TrainConfig a run stored in its metrics.json, with the stages' fields as flat keys (stage2_lr, ...)."""
    return TrainConfig.from_dict(json.loads((folder / sweep.METRICS_FILE).read_text())["config"]).to_flat_dict()


def test_plan_resolves_each_design_to_its_family_and_changes_one_thing() -> None:
    runs = sweep.plan(["senet", "resnext_cbam", "va_only", "avg_pool"], [0, 1], {"image_size": 40}, family="small")
    assert [r.key for r in runs] == ["senet/seed0", "senet/seed1", "resnext_cbam/seed0", "resnext_cbam/seed1",
                                     "va_only/seed0", "va_only/seed1", "avg_pool/seed0", "avg_pool/seed1"]
    by_key = {r.key: dict(r.parameters) for r in runs}
    end = {"held_out_checkpoint": "last.pt"}  # every run is scored at its end, whatever its best epoch was
    assert by_key["senet/seed1"] == {**end, "image_size": 40, "backbone": "seresnet26_half", "seed": 1}
    assert by_key["resnext_cbam/seed0"]["backbone"] == "resnext26_half_cbam"
    assert by_key["va_only/seed0"] == {**end, "image_size": 40, "backbone": "seresnet26_half", "tasks": ["va"],
                                       "seed": 0}
    chosen = sweep.plan(["senet"], [0], {"held_out_checkpoint": "best_mean.pt"}, family="small")
    assert chosen[0].parameters["held_out_checkpoint"] == "best_mean.pt"  # the shared parameters may choose
    assert (sweep.results_folder({"held_out_checkpoint": "best_mean.pt"}, "small")
            != sweep.results_folder({}, "small") == sweep.results_folder({"held_out_checkpoint": "last.pt"}, "small"))
    assert by_key["avg_pool/seed0"]["pooling"] == "avg"
    paper = sweep.plan(["senet", "resnext", "resnext_cbam"], [0], {}, family="paper")
    assert [r.parameters["backbone"] for r in paper] == ["senet50", "resnext50", "resnext50_cbam"]
    for family in sweep.FAMILIES.values():
        assert set(family.values()) <= set(BACKBONES)


@pytest.mark.parametrize("rows, seeds, family, match", [
    (["senet", "bogus"], [0], "small", "unknown row 'bogus'"),
    (["senet"], [0, 0], "small", "distinct"),
    (["senet"], [], "small", "distinct"),
    (["senet"], [0], "huge", "unknown backbone family"),
])
def test_plan_rejects_bad_requests(rows, seeds, family, match) -> None:
    with pytest.raises(ValueError, match=match):
        sweep.plan(rows, seeds, {}, family=family)


def test_rows_and_shared_parameters_carry_any_train_config_field() -> None:
    slow = sweep.Row("slow", "stage 2 at 1e-5", "learning rate", {"backbone": "se"}, train_options={"stage2_lr": 1e-5})
    runs = sweep.plan(["senet", slow], [0], {"image_size": 40, "train_options": {"warmup_steps": 5, "stage2_lr": 1e-4}},
                      family="small")
    by_key = {r.key: dict(r.parameters) for r in runs}
    assert by_key["senet/seed0"] == {"held_out_checkpoint": "last.pt", "image_size": 40, "backbone": "seresnet26_half",
                                     "seed": 0, "train_options": {"warmup_steps": 5, "stage2_lr": 1e-4}}
    assert by_key["slow/seed0"]["train_options"] == {"warmup_steps": 5, "stage2_lr": 1e-5}  # the row's value wins
    # no options, no key: the records of sweeps run before train_options existed still match
    assert "train_options" not in sweep.plan(["senet"], [0], {"train_options": {}}, family="small")[0].parameters
    with pytest.raises(ValueError, match="must name a design"):
        sweep.plan([sweep.Row("x", "x", "x", {"backbone": "senet50"})], [0], {}, family="small")


@pytest.mark.parametrize("options, match", [
    ({"stage2_lrr": 1e-4}, "stage2_lrr"),
    ({"stage2_optimizer": "rmsprop"}, "rmsprop"),
    ({"seed": 3}, r"sets \['seed'\], which the sweep sets"),
    ({"output_dir": "elsewhere"}, "output_dir"),
])
def test_train_options_are_checked_when_the_sweep_is_planned(options, match) -> None:
    with pytest.raises(ConfigError, match=match):
        sweep.plan(["senet"], [0], {"train_options": options}, family="small")
    with pytest.raises(ConfigError, match=match):
        sweep.plan([sweep.Row("mine", "mine", "mine", {"backbone": "se"}, train_options=options)], [0], {},
                   family="small")


def test_a_row_that_sets_a_train_config_field_reaches_the_runs_config(fake, tmp_path: Path) -> None:
    notebook, calls = fake
    assert "stage2_lr" not in sweep.notebook_parameters(notebook)
    slow = sweep.Row("slow", "stage 2 at 1e-5", "learning rate", {"backbone": "se"}, train_options={"stage2_lr": 1e-5})
    base = {"calls": str(calls), "train_options": {"warmup_steps": 7}}
    out = tmp_path / "results"
    sweep.run_sweep(sweep.plan(["senet", slow], [0], base, family="small"), out, notebook=notebook, log=None)
    config = _run_config(out / "slow" / "seed0")
    assert (config["stage2_lr"], config["warmup_steps"], config["backbone"], config["seed"]) == (
        1e-5, 7, "seresnet26_half", 0)
    reference = _run_config(out / "senet" / "seed0")
    assert reference["warmup_steps"] == 7 and reference["stage2_lr"] != 1e-5
    assert json.loads((out / "slow" / "seed0" / sweep.RUN_FILE).read_text())["parameters"]["train_options"] == {
        "warmup_steps": 7, "stage2_lr": 1e-5}
    table = sweep.collect(out)
    assert table["row"].tolist() == ["senet", "slow"]  # a row of one's own comes after the paper's rows
    assert list(sweep.summarize(table, ["va"]).index) == ["senet", "slow"]
    # the same row with another value is another configuration: refused, not reused
    faster = dataclasses.replace(slow, train_options={"stage2_lr": 1e-3})
    with pytest.raises(sweep.SweepConflict, match="slow"):
        sweep.run_sweep(sweep.plan([faster], [0], base, family="small"), out, notebook=notebook, log=None)
    assert _calls(calls) == ["senet/seed0", "slow/seed0"]


def test_a_parameter_the_notebook_does_not_declare_is_refused_before_anything_runs(fake, tmp_path: Path) -> None:
    notebook, calls = fake
    runs = sweep.plan(["senet", "resnext"], [0], {"calls": str(calls), "stage2_lr": 1e-5}, family="small")
    with pytest.raises(ConfigError, match="declares no parameter stage2_lr.*train_options"):
        sweep.run_sweep(runs, tmp_path / "results", notebook=notebook, log=None)
    assert _calls(calls) == [] and not (tmp_path / "results").exists()


def test_the_training_chapter_declares_what_the_sweep_sets() -> None:
    declared = sweep.notebook_parameters(ROOT / "notebooks" / "04_training.py")
    assert {"train_options", "output_dir", "seed", "threads"} <= declared
    for row in sweep.ROWS.values():
        assert set(row.changes) <= declared, row.name


@pytest.mark.slow
def test_a_row_option_reaches_the_config_the_training_chapter_trains(smoke_root: Path, tmp_path: Path) -> None:
    """The real chapter, a few steps: TrainConfig fields that are no chapter parameter end up in its metrics.json."""
    row = sweep.Row("warm", "warm-up, narrow feature", "schedule", {"backbone": "se"},
                    train_options={"warmup_steps": 1, "stage1_lr": 2e-3, "feature_dim": 32, "aug_flip": 0.0})
    base = {"data_root": str(smoke_root), "synth_size": "smoke", "device": "cpu", "image_size": 32, "batch_size": 8,
            "steps_per_epoch": 2, "stage1_epochs": 1, "stage2_epochs": 0}
    out = tmp_path / "results"
    sweep.run_sweep(sweep.plan([row], [0], base, family="small"), out, drop_tags=("report",), log=None)
    config = _run_config(out / "warm" / "seed0")
    assert {k: config[k] for k in ("warmup_steps", "stage1_lr", "feature_dim", "aug_flip", "backbone", "image_size")} \
        == {"warmup_steps": 1, "stage1_lr": 2e-3, "feature_dim": 32, "aug_flip": 0.0, "backbone": "seresnet26_half",
            "image_size": 32}
    collected = sweep.collect(out)
    assert collected["row"].tolist() == ["warm"]
    assert collected["checkpoint"].tolist() == ["last.pt"]  # the chapter scored the run's end, as the sweep asks


@pytest.mark.slow
def test_the_training_chapter_resumes_a_run_that_failed_half_way(smoke_root: Path, tmp_path: Path) -> None:
    """The real chapter, failing once right after its first checkpoint: the sweep's second pass continues that run
    (the chapter trains with resume=True) and ends with the numbers of an uninterrupted run."""
    import jupytext
    import nbformat

    from mtanet.train import train

    marker = tmp_path / "failed-once"
    fail_once = (
        "import pathlib\n"
        "from mtanet.train import Trainer\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if not marker.exists():  # the first execution dies right after the checkpoint of step 2\n"
        "    real_save = Trainer._save_checkpoint\n\n"
        "    def save_then_fail(self):\n"
        "        real_save(self)\n"
        "        if self.step == 2:\n"
        "            marker.write_text('x')\n"
        "            raise RuntimeError('killed half way')\n\n"
        "    Trainer._save_checkpoint = save_then_fail\n")
    chapter = jupytext.read(ROOT / "notebooks" / "04_training.py")
    at = 1 + next(i for i, c in enumerate(chapter.cells) if "parameters" in c.metadata.get("tags", []))
    chapter.cells.insert(at, nbformat.v4.new_code_cell(fail_once))
    notebook = tmp_path / "04_training.py"
    jupytext.write(chapter, notebook, fmt="py:percent")

    base = {"data_root": str(smoke_root), "synth_size": "smoke", "device": "cpu", "image_size": 32, "batch_size": 8,
            "steps_per_epoch": 2, "stage1_epochs": 1, "stage2_epochs": 1, "train_options": {"feature_dim": 32}}
    runs = sweep.plan(["senet"], [0], base, family="small")
    out = tmp_path / "results"
    with pytest.raises(NotebookFailed, match="killed half way"):
        sweep.run_sweep(runs, out, notebook=notebook, drop_tags=("report",), log=None)
    run = out / "senet" / "seed0"
    assert marker.exists() and (run / "last.pt").exists() and not (run / "metrics.json").exists()
    status = sweep.run_sweep(runs, out, notebook=notebook, drop_tags=("report",), log=None)
    assert status["status"].tolist() == ["ran"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["wall_time_s"]["sessions"] == 2 and metrics["steps"] == 4  # continued, not started over
    straight = train({**metrics["config"], "output_dir": str(tmp_path / "straight"), "resume": False})
    assert metrics["final"] == straight["final"] and metrics["history"] == straight["history"]


def test_mtanet_sweep_re_exports_the_book_kits_sweep() -> None:
    assert set(mtanet.sweep.__all__) == set(sweep.__all__)
    assert all(getattr(mtanet.sweep, name) is getattr(sweep, name) for name in sweep.__all__)


def test_the_sweep_resumes_after_a_failure_without_redoing_finished_runs(fake, tmp_path: Path) -> None:
    notebook, calls = fake
    runs = sweep.plan(["senet", "resnext"], [0, 1], {"calls": str(calls), "fail_once": "resnext/seed1"},
                      family="small")
    out = tmp_path / "results"
    before = Path.cwd()
    with pytest.raises(NotebookFailed, match="killed half way"):
        sweep.run_sweep(runs, out, notebook=notebook, jobs=2, log=None)
    assert Path.cwd() == before  # two kernels started from threads leave this process where it was
    assert sorted(_calls(calls)) == ["resnext/seed0", "resnext/seed1", "senet/seed0", "senet/seed1"]
    # the failed run keeps its partial state and no results; the others are complete and their checkpoints gone
    assert (out / "resnext" / "seed1" / "last.pt").exists()
    assert not (out / "resnext" / "seed1" / "metrics.json").exists()
    assert sorted(p.parent.parent.name + "/" + p.parent.name for p in out.glob("*/*/metrics.json")) == [
        "resnext/seed0", "senet/seed0", "senet/seed1"]
    assert not list(out.glob("*/*/best_mean.pt"))
    assert len(list(out.glob("*/*/mine.pt"))) == 3  # only the trainer's checkpoints are removed
    assert len(sweep.collect(out)) == 3

    status = sweep.run_sweep(runs, out, notebook=notebook, jobs=2, log=None)
    assert _calls(calls)[4:] == ["resnext/seed1"]  # only the unfinished run was executed again
    assert dict(zip(status["run"], status["status"])) == {
        "senet/seed0": "reused", "senet/seed1": "reused", "resnext/seed0": "reused", "resnext/seed1": "ran"}
    assert (out / "resnext" / "seed1" / sweep.NOTEBOOK_FILE).exists()
    assert (out / "resnext" / "seed1" / sweep.KERNEL_LOG_FILE).exists()  # the kernel's own stderr, not ours
    resumed = {p.parent.parent.name + "/" + p.parent.name: json.loads(p.read_text())["resumed_from"]
               for p in out.glob("*/*/metrics.json")}
    # the run that failed continued from the partial state it left; the others had none
    assert resumed == {"senet/seed0": 0, "senet/seed1": 0, "resnext/seed0": 0, "resnext/seed1": 2}
    record = json.loads((out / "resnext" / "seed1" / sweep.RUN_FILE).read_text())
    assert record == {"row": "resnext", "seed": 1, "parameters": dict(runs[3].parameters)}

    moved = [dataclasses.replace(r, parameters={**r.parameters, "cache_dir": "elsewhere"}) for r in runs]
    # all done (where the image cache lives does not matter): nothing runs
    sweep.run_sweep(moved, out, notebook=notebook, log=None)
    assert len(_calls(calls)) == 5
    table = sweep.collect(out)
    assert list(zip(table["row"], table["seed"])) == [("senet", 0), ("senet", 1), ("resnext", 0), ("resnext", 1)]
    assert table.loc[table["row"] == "senet", "va"].tolist() == pytest.approx([0.5, 0.501])
    assert table["backbone"].tolist() == ["seresnet26_half", "seresnet26_half", "resnext26_half", "resnext26_half"]


def test_a_sweep_killed_mid_run_resumes_with_the_unfinished_runs_only(fake, tmp_path: Path) -> None:
    notebook, calls = fake
    out = tmp_path / "results"
    base = {"calls": str(calls), "hold_once": "senet/seed1"}
    script = (f"from mtanet import sweep; runs = sweep.plan(['senet'], [0, 1, 2], {base!r}, family='small'); "
              f"sweep.run_sweep(runs, {str(out)!r}, notebook={str(notebook)!r}, jobs=1, log=None)")
    with open(tmp_path / "sweep.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=err)
    held = calls.with_suffix(".held")
    deadline = time.monotonic() + 120
    while not held.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held.exists(), f"the sweep never reached the second run (exit {proc.poll()}):\n" \
                          f"{(tmp_path / 'sweep.err').read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep, its kernel and everything they started
    proc.wait()
    assert _calls(calls) == ["senet/seed0", "senet/seed1"]
    assert (out / "senet" / "seed0" / "metrics.json").exists()
    assert not (out / "senet" / "seed1" / "metrics.json").exists()

    status = sweep.run_sweep(sweep.plan(["senet"], [0, 1, 2], base, family="small"), out, notebook=notebook,
                             log=None)
    assert _calls(calls) == ["senet/seed0", "senet/seed1", "senet/seed1", "senet/seed2"]
    assert status["status"].tolist() == ["reused", "ran", "ran"]
    assert len(sweep.collect(out)) == 3


def test_a_folder_of_other_parameters_is_refused_before_anything_runs(fake, tmp_path: Path) -> None:
    notebook, calls = fake
    out = tmp_path / "results"
    sweep.run_sweep(sweep.plan(["senet"], [0], {"calls": str(calls)}, family="small"), out, notebook=notebook,
                    log=None)
    other = sweep.plan(["resnext", "senet"], [0], {"calls": str(calls), "image_size": 64}, family="small")
    with pytest.raises(sweep.SweepConflict, match=r"senet[/\\]seed0[/\\]sweep_run.json"):
        sweep.run_sweep(other, out, notebook=notebook, log=None)
    assert _calls(calls) == ["senet/seed0"]  # resnext, first in the plan, did not start either
    stray = out / "avg_pool" / "seed0"
    stray.mkdir(parents=True)
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(sweep.SweepConflict, match="not empty"):
        sweep.run_sweep(sweep.plan(["avg_pool"], [0], {"calls": str(calls)}, family="small"), out,
                        notebook=notebook, log=None)
    assert (stray / "notes.txt").read_text() == "mine"


def _results(values: dict[str, list[float]], metric: str = "va") -> pd.DataFrame:
    return pd.DataFrame([{"row": row, "seed": s, metric: v} for row, vs in values.items() for s, v in enumerate(vs)])


def test_summary_gives_mean_std_and_count_per_row_in_table_order() -> None:
    runs = pd.DataFrame([
        {"row": "va_only", "seed": 0, "va": 0.2},
        {"row": "senet", "seed": 0, "va": 0.5, "au": 0.6},
        {"row": "senet", "seed": 1, "va": 0.7, "au": 0.8},
    ])
    summary = sweep.summarize(runs, ["va", "au"])
    assert list(summary.index) == ["senet", "va_only"]
    assert summary.loc["senet", ("va", "mean")] == pytest.approx(0.6)
    assert summary.loc["senet", ("va", "std")] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary.loc["va_only", ("va", "n")] == 1 and np.isnan(summary.loc["va_only", ("va", "std")])
    assert np.isnan(summary.loc["va_only", ("au", "mean")])
    text = sweep.formatted(summary, ["va", "au"])
    assert text.loc["senet", "va"] == "0.600 ± 0.141" and text.loc["va_only", "va"] == "0.200"
    assert text.loc["va_only", "au"] == "-"


def test_only_differences_beyond_twice_their_standard_error_count() -> None:
    runs = _results({"senet": [0.50, 0.51, 0.52], "resnext": [0.40, 0.41, 0.42], "avg_pool": [0.49, 0.53, 0.51]})
    cmp = sweep.against_reference(runs, "senet", metrics=["va"]).set_index("row")
    assert cmp.loc["resnext", "difference"] == pytest.approx(-0.10)
    assert cmp.loc["resnext", "noise"] == pytest.approx(np.sqrt(2 * 0.01 ** 2 / 3))
    assert bool(cmp.loc["resnext", "beyond_noise"]) and cmp.loc["resnext", "p_value"] < 0.01
    assert cmp.loc["avg_pool", "difference"] == pytest.approx(0.0, abs=1e-12)
    assert not bool(cmp.loc["avg_pool", "beyond_noise"]) and cmp.loc["avg_pool", "p_value"] > 0.5
    with pytest.raises(ValueError, match="reference row 'senet'"):
        sweep.against_reference(runs[runs["row"] != "senet"], "senet", metrics=["va"])


def test_seeds_equal_up_to_rounding_are_no_difference_and_raise_no_warning() -> None:
    # both rows stuck at the trivial AU predictor: scores equal but for the last bits of a float sum
    # and one row stuck there while the other spreads (its Welch test rests on the spreading row)
    runs = _results({"senet": [0.41599999999999998, 0.41600000000000004], "resnext": [0.416, 0.416 + 1e-16],
                     "au_only": [0.418, 0.416]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here is a stderr block on the book's page
        cmp = sweep.against_reference(runs, "senet", metrics=["va"]).set_index("row")
    assert cmp.loc["resnext", "difference"] == 0.0 and cmp.loc["resnext", "noise"] == 0.0
    assert cmp.loc["resnext", "p_value"] == 1.0 and not bool(cmp.loc["resnext", "beyond_noise"])
    assert cmp.loc["au_only", "difference"] == pytest.approx(0.001)
    assert 0.2 < cmp.loc["au_only", "p_value"] < 1.0 and not bool(cmp.loc["au_only", "beyond_noise"])


def test_a_single_seed_gives_no_comparison() -> None:
    runs = _results({"senet": [0.5], "resnext": [0.4]})
    assert sweep.against_reference(runs, "senet", metrics=["va"]).empty


def test_summary_file_round_trips_and_the_results_folder_follows_the_shared_parameters(tmp_path: Path) -> None:
    runs = pd.DataFrame([{"row": "senet", "seed": 0, "va": 0.5, "folder": "/x"},
                         {"row": "senet", "seed": 1, "va": 0.6, "folder": "/y"}])
    path = sweep.write_summary(runs, tmp_path / "s" / "summary.json", hardware="NVIDIA H100", shared={"a": 1})
    back, meta = sweep.read_summary(path)
    assert back.to_dict("records") == [{"row": "senet", "seed": 0, "va": 0.5}, {"row": "senet", "seed": 1, "va": 0.6}]
    assert meta == {"hardware": "NVIDIA H100", "shared": {"a": 1}}
    a = sweep.results_folder({"synth_size": "cpu", "image_size": 40}, "small", root=tmp_path)
    assert a == sweep.results_folder({"image_size": 40, "synth_size": "cpu"}, "small", root=tmp_path)
    assert a != sweep.results_folder({"synth_size": "cpu", "image_size": 48}, "small", root=tmp_path)
    assert a != sweep.results_folder({"synth_size": "cpu", "image_size": 40}, "paper", root=tmp_path)
    assert a.parent == tmp_path / "runs" / "sweep" and a.name.startswith("cpu-small-")
    # where the image cache lives changes how runs execute, not their results
    assert a == sweep.results_folder({"synth_size": "cpu", "image_size": 40, "cache_dir": "x"}, "small", root=tmp_path)
    # training options shared by every run are shared parameters too; none at all is the folder of no options
    assert a != sweep.results_folder({"synth_size": "cpu", "image_size": 40, "train_options": {"stage2_lr": 1e-5}},
                                     "small", root=tmp_path)
    for options in ({}, {"num_workers": 2}):
        assert a == sweep.results_folder({"synth_size": "cpu", "image_size": 40, "train_options": options}, "small",
                                         root=tmp_path)


def _table_without_folders(out: Path) -> pd.DataFrame:
    return sweep.collect(out).drop(columns=["folder"])


@pytest.mark.slow
def test_a_sweep_sent_to_slurm_through_submitit_gives_the_local_sweeps_results_and_resumes(
        fake, tmp_path: Path) -> None:
    """submitit's local cluster stands in for Slurm: the same jobs, each a separate process started by submitit."""
    pytest.importorskip("submitit")
    notebook, calls = fake
    local_out, local_calls = tmp_path / "local", tmp_path / "local-calls.txt"
    sweep.run_sweep(sweep.plan(["senet", "resnext"], [0], {"calls": str(local_calls)}, family="small"),
                    local_out, notebook=notebook, log=None)

    runs = sweep.plan(["senet", "resnext"], [0], {"calls": str(calls), "fail_once": "resnext/seed0"}, family="small")
    out = tmp_path / "slurm"
    options = {"cluster": "local", "timeout_min": 10, "partition": "not-used-by-the-local-cluster"}
    lines: list[str] = []
    before = Path.cwd()
    with pytest.raises(NotebookFailed, match="killed half way"):
        sweep.run_sweep(runs, out, notebook=notebook, executor="slurm", slurm=options, log=lines.append)
    assert Path.cwd() == before
    assert sorted(_calls(calls)) == ["resnext/seed0", "senet/seed0"]
    assert sum(line.startswith("  submitted") for line in lines) == 2
    assert any(line.startswith("  failed resnext/seed0") for line in lines)
    # the other run finished in its job; the failed one keeps its partial state for the next call
    assert sweep.collect(out)["row"].tolist() == ["senet"]
    assert (out / "resnext" / "seed0" / "last.pt").exists()
    assert not list(out.glob("*/*/best_mean.pt"))
    assert list((out / "_submitit").glob("*/*_log.err"))  # submitit's job logs, apart from the run folders

    status = sweep.run_sweep(runs, out, notebook=notebook, executor="slurm", slurm=options, log=None)
    assert _calls(calls)[2:] == ["resnext/seed0"]
    assert dict(zip(status["run"], status["status"])) == {"senet/seed0": "reused", "resnext/seed0": "ran"}
    assert status.loc[status["status"] == "ran", "seconds"].notna().all()
    for name in (sweep.RUN_FILE, sweep.NOTEBOOK_FILE, sweep.KERNEL_LOG_FILE, sweep.METRICS_FILE):
        assert (out / "resnext" / "seed0" / name).exists(), name
    assert json.loads((out / "resnext" / "seed0" / "metrics.json").read_text())["resumed_from"] == 2
    pd.testing.assert_frame_equal(_table_without_folders(out), _table_without_folders(local_out))

    # all done: nothing is submitted, and the local executor reads the same folder as its own
    assert sweep.run_sweep(runs, out, notebook=notebook, executor="slurm", slurm=options,
                           log=None)["status"].tolist() == ["reused"] * 2
    assert sweep.run_sweep(runs, out, notebook=notebook, log=None)["status"].tolist() == ["reused"] * 2
    assert len(_calls(calls)) == 3


@pytest.mark.slow
def test_the_training_chapter_run_as_a_submitit_job_gives_the_numbers_of_a_local_run(smoke_root: Path,
                                                                                      tmp_path: Path) -> None:
    """The real chapter, a few steps, in a job process submitit started (kernel, papermill and trainer there)."""
    pytest.importorskip("submitit")
    base = {"data_root": str(smoke_root), "synth_size": "smoke", "device": "cpu", "image_size": 32, "batch_size": 8,
            "steps_per_epoch": 2, "stage1_epochs": 1, "stage2_epochs": 1, "threads": 1,
            "train_options": {"feature_dim": 32}}
    runs = sweep.plan(["senet"], [3], base, family="small")
    sweep.run_sweep(runs, tmp_path / "local", drop_tags=("report",), log=None)
    status = sweep.run_sweep(runs, tmp_path / "slurm", drop_tags=("report",), executor="slurm",
                             slurm={"cluster": "local", "timeout_min": 10}, log=None)
    assert status["status"].tolist() == ["ran"]
    local, remote = (json.loads((tmp_path / where / "senet" / "seed3" / sweep.METRICS_FILE).read_text())
                     for where in ("local", "slurm"))
    assert remote["config"]["seed"] == 3 and remote["steps"] == local["steps"] == 4
    assert remote["final"] == local["final"] and remote["history"] == local["history"]
    pd.testing.assert_frame_equal(_table_without_folders(tmp_path / "slurm").drop(columns=["train_seconds"]),
                                  _table_without_folders(tmp_path / "local").drop(columns=["train_seconds"]))


@pytest.mark.parametrize("executor, options, match", [
    ("kubernetes", None, r"executor='kubernetes' is not one of \['local', 'slurm'\]"),
    ("local", {"timeout_min": 10}, "slurm parameters are given but executor='local'"),
    ("slurm", {"cluster": "local"}, "slurm needs timeout_min"),
    ("slurm", {"cluster": "local", "timeout_min": 10, "gpus": 1}, "rejected by submitit.*'gpus'"),
    ("slurm", {"cluster": "pbs", "timeout_min": 10}, "executor='slurm'.*pbs"),
])
def test_bad_executor_options_are_refused_before_any_run_starts(fake, tmp_path: Path, executor, options,
                                                                match) -> None:
    if executor == "slurm":
        pytest.importorskip("submitit")
    notebook, calls = fake
    runs = sweep.plan(["senet"], [0], {"calls": str(calls)}, family="small")
    with pytest.raises(ConfigError, match=match):
        sweep.run_sweep(runs, tmp_path / "results", notebook=notebook, executor=executor, slurm=options, log=None)
    assert _calls(calls) == [] and not (tmp_path / "results" / "senet").exists()


def test_without_submitit_the_slurm_option_is_one_clear_error(fake, tmp_path: Path, monkeypatch) -> None:
    notebook, calls = fake
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now raises ImportError
    runs = sweep.plan(["senet"], [0], {"calls": str(calls)}, family="small")
    with pytest.raises(ConfigError) as caught:
        sweep.run_sweep(runs, tmp_path / "results", notebook=notebook, executor="slurm",
                        slurm={"timeout_min": 10}, log=None)
    assert str(caught.value) == "run_sweep: executor='slurm' needs the submitit package (pip install submitit)"
    assert _calls(calls) == [] and not (tmp_path / "results").exists()


def test_collect_takes_the_held_out_scores_when_the_chapter_wrote_them(fake, tmp_path: Path) -> None:
    """The sweep reports what the training chapter scored on test (chosen on validation), and says so; a run from
    before that file existed keeps its last-epoch validation scores, labelled as such."""
    notebook, calls = fake
    out = tmp_path / "results"
    sweep.run_sweep(sweep.plan(["senet", "resnext"], [0], {"calls": str(calls)}, family="small"), out,
                    notebook=notebook, log=None)
    before = sweep.collect(out).set_index("row")
    held = {"va": {"score": 0.123, "ccc_valence": 0.1, "ccc_arousal": 0.146},
            "au": {"score": 0.456, "f1_mean": 0.2, "accuracy": 0.712},
            "expr": {"score": 0.321, "f1_macro": 0.25, "accuracy": 0.465}}
    (out / "senet" / "seed0" / sweep.HELD_OUT_FILE).write_text(json.dumps({"split": "test", "checkpoint": "last.pt",
                                                                          "scores": held}))
    after = sweep.collect(out).set_index("row")
    assert after.loc["senet", "scored_on"] == "test" and after.loc["resnext", "scored_on"] == "val (last epoch)"
    assert after.loc["senet", "checkpoint"] == "last.pt" and pd.isna(after.loc["resnext", "checkpoint"])
    assert (after.loc["senet", ["va", "valence", "au", "au_f1", "expr", "expr_accuracy"]].tolist()
            == [0.123, 0.1, 0.456, 0.2, 0.321, 0.465])
    assert after.loc["resnext", "va"] == before.loc["resnext", "va"]
    assert after.loc["senet", "va"] != before.loc["senet", "va"]
    # the validation people's scores stay beside the test people's: the last epoch's, whatever was held out
    for row in ("senet", "resnext"):
        assert after.loc[row, ["val_va", "val_au", "val_expr"]].tolist() \
            == before.loc[row, ["va", "au", "expr"]].tolist()


def test_the_factorial_rows_change_one_factor_and_equal_frames_rows_train_a_third_of_the_steps() -> None:
    names = list(sweep.ROWS)
    base = {"steps_per_epoch": 30, "stage2_epochs": 2}
    runs = {r.row: dict(r.parameters) for r in sweep.plan(names, [0], base, family="small")}
    assert runs["resnet"]["backbone"] == "resnet26_half" and runs["seresnext"]["backbone"] == "seresnext26_half"
    assert runs["va_only"]["steps_per_epoch"] == 30 and runs["va_only_frames"]["steps_per_epoch"] == 10
    # the long-stage-2 rows scale the shared stage 2, and only it
    assert runs["eq5_long"]["stage2_epochs"] == runs["sum_long"]["stage2_epochs"] == 6
    assert runs["senet"]["stage2_epochs"] == runs["sum_only"]["stage2_epochs"] == 2
    assert {k: v for k, v in runs["eq5_long"].items() if k != "stage2_epochs"} \
        == {k: v for k, v in runs["senet"].items() if k != "stage2_epochs"}
    with pytest.raises(ValueError, match="eq5_long.*stage2_epochs"):
        sweep.plan(["eq5_long"], [0], {"steps_per_epoch": 30}, family="small")
    assert runs["fixed_weights"]["train_options"] == {"init_log_var": 0.0, "lr_log_vars": 0.0}
    assert runs["avgmax_add"]["pooling"] == "avgmax_add"
    # every contrast's two rows differ in their parameters (no contrast compares a row with itself)
    for c in sweep.CONTRASTS:
        assert c.row in sweep.ROWS and c.versus in sweep.ROWS and runs[c.row] != runs[c.versus], c
    # the small family's designs differ only in their block: their timm arguments share depth and widths
    small = [BACKBONES[b] for b in sweep.FAMILIES["small"].values()]
    assert {(b["model_name"], b["channels"], b["stem_width"]) for b in small} == {("resnet26", (32, 64, 128, 256),
                                                                                   32)}
    assert len({repr(b) for b in small}) == 5
    # only contrasts whose two rows ran, plus the user's rows against senet
    chosen = sweep.contrasts(["senet", "resnext", "resnext_cbam", "sum_only"], extra=["lr3"])
    assert [(c.row, c.versus) for c in chosen] == [("resnext_cbam", "senet"), ("resnext", "senet"),
                                                   ("resnext_cbam", "resnext"), ("sum_only", "senet"),
                                                   ("lr3", "senet")]


def test_reproducibility_pairs_runs_of_the_same_experiment_only() -> None:
    config = {"backbone": "seresnet26_half", "image_size": 48, "data_root": "/here", "threads": 2}
    reference = pd.DataFrame([
        {"row": "senet", "seed": s, "va": v, "va_low": v - 0.05, "va_high": v + 0.05, "config": config,
         "data_sha256": "abc"} for s, v in ((0, 0.30), (1, 0.34), (2, 0.38))])
    here = pd.DataFrame([
        {"row": "senet", "seed": 0, "va": 0.33, "config": {**config, "data_root": "/there", "threads": 1},
         "data_sha256": "abc"},  # same experiment on another machine: compared
        {"row": "senet", "seed": 1, "va": 0.50, "config": {**config, "image_size": 64}, "data_sha256": "abc"},
        {"row": "senet", "seed": 2, "va": 0.38, "config": config, "data_sha256": "other data"},
        {"row": "resnext", "seed": 0, "va": 0.2, "config": config, "data_sha256": "abc"}])
    table = sweep.reproducibility(here, reference, metrics=["va"])
    assert len(table) == 1
    line = table.iloc[0]
    assert (line["row"], line["seed"]) == ("senet", 0)
    assert line["diff"] == pytest.approx(0.03) and line["in_video_interval"] and line["in_seed_range"]
    assert line["reference_seeds"] == 3
    far = sweep.reproducibility(here.assign(va=0.10).iloc[:1], reference, metrics=["va"]).iloc[0]
    assert not far["in_video_interval"] and not far["in_seed_range"]
    # a one-seed reference row and a rerun that differs from it in the last bits: inside the range, not beside it
    rerun = sweep.reproducibility(here.assign(va=0.30 + 4e-11).iloc[:1], reference.iloc[:1], metrics=["va"]).iloc[0]
    assert rerun["in_seed_range"] and rerun["reference_seeds"] == 1
    assert not sweep.reproducibility(here.assign(va=0.3001).iloc[:1], reference.iloc[:1],
                                     metrics=["va"]).iloc[0]["in_seed_range"]
    assert sweep.same_settings(config, {**config, "cache_dir": "x"}) and not sweep.same_settings(config, None)


_WHERE_AND_HOW = ["data_root", "output_dir", "cache_dir", "threads", "num_workers", "progress", "device", "resume",
                  "eval_batch_size", "log_every", "checkpoint_every"]


@pytest.mark.parametrize("field", _WHERE_AND_HOW)
def test_runs_that_differ_only_in_how_they_executed_are_the_same_experiment(field: str) -> None:
    config = {"backbone": "seresnet26_half", "image_size": 48, "seed": 0, "stage2": {"weighting": "uncertainty"}}
    assert sweep.same_settings(config, {**config, field: "elsewhere"})
    assert not sweep.same_settings(config, {**config, "image_size": 64, field: "elsewhere"})


@pytest.mark.parametrize("field", ["backbone", "image_size", "seed", "stage2", "tasks", "pooling", "batch_size", "amp",
                                   "compile", "channels_last", "deterministic", "device_augment"])
def test_runs_that_differ_in_what_they_compute_or_in_their_arithmetic_are_not_repeats(field: str) -> None:
    """Mixed precision or compilation may resume a training run, but change more than the last bits of a score."""
    config = {"backbone": "seresnet26_half", "image_size": 48, "seed": 0, "stage2": {"weighting": "uncertainty"}}
    assert not sweep.same_settings(config, {**config, field: "other"})
    assert sweep.HOW_NOT_WHAT <= sweep.EXECUTION_FIELDS == set(_WHERE_AND_HOW)


def test_runs_and_summaries_follow_the_table_order_with_rows_of_other_versions_last() -> None:
    """A record of a row this version no longer defines keeps its place at the end (by name), not a NaN key that
    sorts anywhere."""
    runs = pd.DataFrame([{"row": r, "seed": s, "va": 0.1} for r, s in
                         [("zz_old", 0), ("resnet", 1), ("aa_old", 1), ("senet", 1), ("aa_old", 0), ("resnet", 0),
                          ("senet", 0)]])
    ordered = sweep.in_row_order(runs)
    assert list(zip(ordered["row"], ordered["seed"])) == [
        ("senet", 0), ("senet", 1), ("resnet", 0), ("resnet", 1), ("aa_old", 0), ("aa_old", 1), ("zz_old", 0)]
    assert list(ordered.index) == list(range(len(runs))) and list(runs["row"])[0] == "zz_old"  # input untouched
    assert list(sweep.summarize(runs, ["va"]).index) == ["senet", "resnet", "aa_old", "zz_old"]


def test_only_runs_scored_at_their_end_are_compared() -> None:
    """A best epoch may fall in stage 1, where rows that differ in stage 2 only are one model: such runs, and runs
    that recorded no checkpoint, are refused by name; rows outside the comparison are not looked at."""
    runs = pd.DataFrame([{"row": "senet", "seed": 0, "checkpoint": "last.pt"},
                         {"row": "sum_only", "seed": 0, "checkpoint": "last.pt"},
                         {"row": "sum_only", "seed": 1, "checkpoint": "best_mean.pt"},
                         {"row": "resnext", "seed": 0, "checkpoint": None}])
    sweep.check_scored_at_end(runs, ["senet"])
    with pytest.raises(ValueError, match=r"sum_only/seed1 \(best_mean.pt\)") as caught:
        sweep.check_scored_at_end(runs, ["senet", "sum_only"])
    assert "senet" not in str(caught.value).split(":")[1].split(";")[0]
    with pytest.raises(ValueError, match=r"resnext/seed0 \(none recorded\)"):
        sweep.check_scored_at_end(runs, ["resnext", "senet"])
    with pytest.raises(ValueError, match=r"senet/seed0 \(none recorded\)"):  # a record from before the column
        sweep.check_scored_at_end(runs.drop(columns="checkpoint"), ["senet"])
