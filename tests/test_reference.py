"""The committed reference sweep's runner (mtanet.book.reference): its settings, its order, its file, its resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mtanet.book import reference, sweep
from mtanet.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# A stand-in for the training chapter with the parameters the reference passes: writes metrics.json and
# held_out.json as the chapter does (scores a function of backbone and seed), and logs each execution.
FAKE = '''# %% tags=["parameters"]
data_root: str = ""
synth_size: str = ""
image_size: int = 0
steps_per_epoch: int = 0
output_dir: str = ""
seed: int = 0
held_out_checkpoint: str = ""
backbone: str = ""
stage2_weighting: str = "uncertainty"
tasks: list = ["va", "au", "expr"]
threads: int = 0
cache_dir: str = ""
calls: str = ""
train_options: dict = {}

# %%
import json
from pathlib import Path

from mtanet.data import annotation_fingerprint

out = Path(output_dir)
with open(calls, "a") as log:
    log.write(f"{out.parent.name}/{out.name}\\n")
bonus = {"seresnet26_half": 0.05, "resnet26_half": 0.0}[backbone] + (0.02 if stage2_weighting == "sum" else 0.0)
scores = {"va": {"score": 0.3 + bonus + 0.01 * seed, "ccc_valence": 0.3, "ccc_arousal": 0.3},
          "au": {"score": 0.5 + 0.01 * seed, "f1_mean": 0.3, "accuracy": 0.9},
          "expr": {"score": 0.4, "f1_macro": 0.4, "accuracy": 0.7}}
intervals = {t: {"score": s["score"], "low": s["score"] - 0.05, "high": s["score"] + 0.05} for t, s in scores.items()}
(out / "held_out.json").write_text(json.dumps({"split": "test", "checkpoint": held_out_checkpoint, "scores": scores,
                                              "intervals": intervals}))
(out / "metrics.json").write_text(json.dumps({
    "final": scores, "steps": 3,
    "config": {"backbone": backbone, "image_size": image_size, "seed": seed, "steps_per_epoch": steps_per_epoch,
               "stage2": {"weighting": stage2_weighting}, "tasks": tasks, "data_root": data_root,
               "output_dir": output_dir},
    "wall_time_s": {"total": 60.0}, "hardware": {"device_name": "test cpu"}, "git": {"commit": "abc123"},
    "versions": {"torch": "x"}, "data": {"annotations_sha256": annotation_fingerprint(data_root)},
    "uncertainty": {"log_vars": {"va": -1.0, "au": -0.5, "expr": 0.1},
                    "stationary_log_vars": {"va": -1.1, "au": -0.5, "expr": 0.0}}}))
'''


def _shared(path: Path) -> dict:
    values = yaml.safe_load(path.read_text())
    return {k: v for k, v in values.items() if k not in ("rows", "seeds", "more_seeds", "jobs")}


def test_the_cpu_profile_reruns_reference_experiments_with_exactly_its_settings() -> None:
    params = ROOT / "notebooks" / "params" / "05_ablations"
    assert _shared(params / "cpu.yaml") == _shared(params / "reference.yaml")
    values = yaml.safe_load((params / "reference.yaml").read_text())
    cpu = yaml.safe_load((params / "cpu.yaml").read_text())
    assert set(cpu["rows"]) <= set(values["rows"]) and set(cpu["seeds"]) <= set(values["seeds"])
    assert len(values["seeds"]) >= 5 and set(values["rows"]) <= set(sweep.ROWS)
    # the committed more_seeds reads: Table I's rows and their factorial carry ten seeds, every other row five
    seeds = reference.seeds_of(values)
    backbones = {"senet", "resnet", "resnext", "seresnext", "resnext_cbam"}
    assert {row: len(s) for row, s in seeds.items()} == {row: 10 if row in backbones else 5 for row in values["rows"]}


def test_the_reference_runs_seed_by_seed_writes_its_file_after_each_run_and_resumes(smoke_root: Path,
                                                                                    tmp_path: Path) -> None:
    notebook = tmp_path / "fake.py"
    notebook.write_text(FAKE)
    calls = tmp_path / "calls.txt"
    values = {"data_root": str(smoke_root), "synth_size": "smoke", "family": "small", "image_size": 32,
              "steps_per_epoch": 3, "rows": ["senet", "resnet", "sum_only"], "seeds": [0, 1], "jobs": 1,
              "calls": str(calls), "results_dir": "ignored"}
    output = tmp_path / "results" / "reference.json"
    written = []
    real_export = reference.export

    def watched(*args, **kwargs):
        n = real_export(*args, **kwargs)
        written.append(n)
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "work"))
        mp.setattr(reference, "export", watched)
        assert reference.run_reference(values, output, notebook=notebook, log=lambda _: None) == 6
        # every row's seed 0 before any seed 1: a sweep stopped half way holds complete pairs
        assert calls.read_text().split() == ["senet/seed0", "resnet/seed0", "sum_only/seed0", "senet/seed1",
                                             "resnet/seed1", "sum_only/seed1"]
        assert written[:6] == [1, 2, 3, 4, 5, 6]  # rewritten after every run
        data = json.loads(output.read_text())
        assert len(data["runs"]) == 6
        run = data["runs"][0]
        for key in ("row", "seed", "va", "va_low", "va_high", "s_va", "s_star_va", "commit", "versions", "config",
                    "hardware", "train_seconds", "data_sha256"):
            assert key in run, key
        assert "folder" not in run and data["meta"]["rows"] == values["rows"]
        assert {r["checkpoint"] for r in data["runs"]} == {"last.pt"}  # whole recipes: every run scored at its end
        assert data["meta"]["bounds"] == json.loads((smoke_root / "synth_ceiling.json").read_text())["splits"]["test"]
        assert str(smoke_root) not in output.read_text()  # no path of the machine that ran it
        # a second start runs nothing and keeps the file
        assert reference.run_reference(values, output, notebook=notebook, log=lambda _: None) == 6
        assert len(calls.read_text().split()) == 6
        # the results folder alone is a resume point too: without the file, nothing runs and the file is written anew
        output.rename(tmp_path / "moved.json")
        assert reference.run_reference(values, output, notebook=notebook, log=lambda _: None) == 6
        assert len(calls.read_text().split()) == 6 and len(json.loads(output.read_text())["runs"]) == 6
        # the runs read back into the table chapter 05 compares
        runs, meta = sweep.read_summary(output)
        assert set(runs["row"]) == {"senet", "resnet", "sum_only"} and meta["family"] == "small"


def _values(smoke_root: Path, calls: Path, rows: list[str], seeds: list[int]) -> dict:
    return {"data_root": str(smoke_root), "synth_size": "smoke", "family": "small", "image_size": 32,
            "steps_per_epoch": 3, "rows": rows, "seeds": seeds, "jobs": 1, "calls": str(calls)}


@pytest.fixture
def fake(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The stand-in chapter, the log of its executions and where the reference file goes, in this test's folder."""
    notebook = tmp_path / "fake.py"
    notebook.write_text(FAKE)
    return notebook, tmp_path / "calls.txt", tmp_path / "reference.json"


def test_a_fresh_clone_resumes_from_the_committed_file_and_runs_only_what_is_new(smoke_root: Path, tmp_path: Path,
                                                                                 fake) -> None:
    notebook, calls, output = fake
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "first"))
        reference.run_reference(_values(smoke_root, calls, ["senet", "resnet"], [0]), output, notebook=notebook,
                                log=lambda _: None)
        first = {(r["row"], r["seed"]): r for r in json.loads(output.read_text())["runs"]}
        # another machine: its results folder is empty, the committed file is all it has
        mp.setenv("MTANET_WORK", str(tmp_path / "second"))
        more = _values(smoke_root, calls, ["senet", "resnet", "sum_only"], [0, 1])
        assert reference.run_reference(more, output, notebook=notebook, log=lambda _: None) == 6
    assert calls.read_text().split() == ["senet/seed0", "resnet/seed0", "sum_only/seed0", "senet/seed1",
                                         "resnet/seed1", "sum_only/seed1"]
    runs = json.loads(output.read_text())["runs"]
    assert [(r["row"], r["seed"]) for r in runs] == [("senet", 0), ("senet", 1), ("resnet", 0), ("resnet", 1),
                                                     ("sum_only", 0), ("sum_only", 1)]
    kept = {(r["row"], r["seed"]): r for r in runs if (r["row"], r["seed"]) in first}
    assert kept == first  # the committed records pass through unchanged


def test_more_seeds_run_only_for_the_rows_they_name_after_the_shared_seeds(smoke_root: Path, tmp_path: Path,
                                                                          fake) -> None:
    notebook, calls, output = fake
    values = {**_values(smoke_root, calls, ["senet", "resnet", "sum_only"], [0]),
              "more_seeds": {"rows": ["sum_only", "senet"], "seeds": [1, 2]}}
    assert reference.seeds_of(values) == {"senet": [0, 1, 2], "resnet": [0], "sum_only": [0, 1, 2]}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "work"))
        assert reference.run_reference(values, output, notebook=notebook, log=lambda _: None) == 7
        # seed by seed, each seed's rows in the settings' order, resnet never past its seeds
        assert calls.read_text().split() == ["senet/seed0", "resnet/seed0", "sum_only/seed0", "senet/seed1",
                                             "sum_only/seed1", "senet/seed2", "sum_only/seed2"]
        data = json.loads(output.read_text())
        assert data["meta"]["more_seeds"] == values["more_seeds"] and data["meta"]["seeds"] == [0]
        assert sorted((r["row"], r["seed"]) for r in data["runs"]) == [
            ("resnet", 0), ("senet", 0), ("senet", 1), ("senet", 2), ("sum_only", 0), ("sum_only", 1), ("sum_only", 2)]
        # dropping more_seeds later keeps their records (nothing committed is dropped) and runs nothing
        assert reference.run_reference({**values, "more_seeds": None}, output, notebook=notebook,
                                       log=lambda _: None) == 7
        assert len(calls.read_text().split()) == 7


def test_more_seeds_run_after_the_shared_seeds_whatever_their_numbers(smoke_root: Path, tmp_path: Path) -> None:
    values = {**_values(smoke_root, tmp_path / "calls.txt", ["senet", "resnet"], [5, 3]),
              "more_seeds": {"rows": ["resnet"], "seeds": [0]}}
    runs, _ = reference.plan_reference(values)
    assert [(run.row, run.seed) for run in runs] == [("senet", 5), ("resnet", 5), ("senet", 3), ("resnet", 3),
                                                     ("resnet", 0)]
    assert [(run.row, run.seed) for run in reference.plan_reference(values, ["resnet"])[0]] == [
        ("resnet", 5), ("resnet", 3), ("resnet", 0)]
    with pytest.raises(ConfigError, match="rows not in the reference settings' rows: sum_only"):
        reference.plan_reference(values, ["senet", "sum_only"])


def test_a_results_folder_run_the_settings_no_longer_plan_is_not_exported(smoke_root: Path, tmp_path: Path,
                                                                          fake) -> None:
    notebook, calls, output = fake
    values = {**_values(smoke_root, calls, ["senet", "resnet"], [0]), "more_seeds": {"rows": ["resnet"], "seeds": [1]}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "work"))
        assert reference.run_reference(values, output, notebook=notebook, log=lambda _: None) == 3
        output.rename(tmp_path / "moved.json")
        # resnet/seed1 is still in the results folder; the settings without more_seeds do not plan it
        assert reference.run_reference({**values, "more_seeds": None}, output, notebook=notebook,
                                       log=lambda _: None) == 2
    assert sorted((r["row"], r["seed"]) for r in json.loads(output.read_text())["runs"]) == [("resnet", 0),
                                                                                           ("senet", 0)]
    assert "more_seeds" not in json.loads(output.read_text())["meta"] and len(calls.read_text().split()) == 3


@pytest.mark.parametrize("more, message", [
    ({"rows": ["avg_pool"], "seeds": [5]}, "rows not in the sweep's rows: avg_pool"),
    ({"rows": ["senet"], "seeds": [1, 5]}, r"seeds already in seeds: \[1\]"),
    ({"rows": ["senet", "senet"], "seeds": [5]}, "rows named twice: senet"),
    ({"rows": ["senet"], "seeds": [5, 5]}, "lists a seed twice"),
    ({"rows": ["senet"], "seeds": 5}, "more_seeds.seeds must be a list of integers"),
    ({"rows": ["senet"], "seeds": ["5"]}, "more_seeds.seeds must be a list of integers"),
    ({"rows": "senet", "seeds": [5]}, "must be a mapping"),
    ([5, 6], "must be a mapping"),
])
def test_more_seeds_that_name_unknown_rows_or_repeat_seeds_are_refused(more, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        reference.seeds_of({"rows": ["senet", "resnet"], "seeds": [0, 1], "more_seeds": more})


def test_records_the_settings_no_longer_plan_are_kept_and_one_scored_elsewhere_is_run_again(smoke_root: Path,
                                                                                          tmp_path: Path,
                                                                                          fake) -> None:
    notebook, calls, output = fake
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "first"))
        reference.run_reference(_values(smoke_root, calls, ["senet", "resnet"], [0, 1]), output, notebook=notebook,
                                log=lambda _: None)
        data = json.loads(output.read_text())
        old = next(r for r in data["runs"] if (r["row"], r["seed"]) == ("senet", 1))
        old["checkpoint"], old["va"] = "best_mean.pt", -0.5  # an older protocol's record
        output.write_text(json.dumps(data))
        lines: list[str] = []
        mp.setenv("MTANET_WORK", str(tmp_path / "second"))
        # settings with resnet left out and a new seed: resnet's records stay, senet/seed1 runs again
        assert reference.run_reference(_values(smoke_root, calls, ["senet"], [0, 1, 2]), output, notebook=notebook,
                                       log=lines.append) == 5
    assert calls.read_text().split()[4:] == ["senet/seed1", "senet/seed2"]
    runs = {(r["row"], r["seed"]): r for r in json.loads(output.read_text())["runs"]}
    assert set(runs) == {("senet", 0), ("senet", 1), ("senet", 2), ("resnet", 0), ("resnet", 1)}
    assert runs[("senet", 1)]["checkpoint"] == "last.pt" and runs[("senet", 1)]["va"] != -0.5
    assert any("senet/seed1" in line and "another checkpoint" in line for line in lines)


def test_execution_settings_may_change_but_a_record_of_another_configuration_is_refused(smoke_root: Path,
                                                                                       tmp_path: Path,
                                                                                       fake) -> None:
    notebook, calls, output = fake
    values = _values(smoke_root, calls, ["senet", "resnet"], [0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "first"))
        reference.run_reference(values, output, notebook=notebook, log=lambda _: None)
        mp.setenv("MTANET_WORK", str(tmp_path / "second"))
        # another cache folder, thread count and evaluation batch: the same experiments, nothing runs again
        assert reference.run_reference({**values, "cache_dir": "elsewhere", "threads": 1, "eval_batch_size": 7},
                                       output, notebook=notebook, log=lambda _: None) == 2
        assert len(calls.read_text().split()) == 2
        data = json.loads(output.read_text())
        data["runs"][1]["config"]["backbone"] = "seresnet26_half"  # resnet's record, as if the row were redefined
        output.write_text(json.dumps(data))
        before = output.read_bytes()
        with pytest.raises(ConfigError, match=r"resnet/seed0 \(backbone 'seresnet26_half', planned 'resnet26_half'"):
            reference.run_reference(values, output, notebook=notebook, log=lambda _: None)
    assert output.read_bytes() == before and len(calls.read_text().split()) == 2


@pytest.mark.parametrize("spoil", ["settings", "family", "data", "corrupt", "twice", "no digest", "no meta",
                                   "no seed column", "empty runs, other settings"])
def test_a_committed_file_of_another_experiment_is_refused_and_left_as_it_is(smoke_root: Path, tmp_path: Path,
                                                                             spoil: str, capsys, fake) -> None:
    notebook, calls, output = fake
    values = _values(smoke_root, calls, ["senet"], [0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "work"))
        reference.run_reference(values, output, notebook=notebook, log=lambda _: None)
    data = json.loads(output.read_text())
    if spoil == "settings":
        data["meta"]["shared"]["image_size"] = 48
    elif spoil == "family":
        data["meta"]["family"] = "paper"
    elif spoil == "data":
        data["runs"][0]["data_sha256"] = "0" * 64
    elif spoil == "twice":
        data["runs"].append(data["runs"][0])
    elif spoil == "no digest":
        data["runs"][0]["data_sha256"] = None
    elif spoil == "no meta":
        data["meta"] = None
    elif spoil == "no seed column":
        del data["runs"][0]["seed"]
    elif spoil == "empty runs, other settings":
        data["runs"], data["meta"]["shared"]["image_size"] = [], 48
    output.write_text("{not json" if spoil == "corrupt" else json.dumps(data))
    before = output.read_bytes()
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({**values, "rows": ["senet", "resnet"]}))
    from mtanet.book.__main__ import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTANET_WORK", str(tmp_path / "elsewhere"))
        assert main(["--reference-sweep", "--settings", str(settings), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtanet: error:") and str(output) in err[0], err
    assert output.read_bytes() == before and calls.read_text().split() == ["senet/seed0"]


def test_the_reference_command_gives_one_line_for_a_bad_settings_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: [senet\n")
    from mtanet.book.__main__ import main

    assert main(["--reference-sweep", "--settings", str(bad), "--output", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mtanet: error:") and "bad.yaml" in err[0]
    assert not (tmp_path / "out.json").exists()


def test_the_gpu_profile_is_the_full_factorial_at_the_papers_size_with_five_seeds() -> None:
    gpu = yaml.safe_load((ROOT / "notebooks" / "params" / "05_ablations" / "gpu.yaml").read_text())
    assert gpu["rows"] == list(sweep.ROWS) and len(gpu["seeds"]) >= 5
    assert gpu["family"] == "paper" and gpu["image_size"] == 112


def test_the_committed_reference_file_is_the_experiment_the_committed_settings_plan(smoke_root: Path) -> None:
    # another data root only so that nothing is generated here; no shared setting compared below reads it
    values = {**reference.settings(), "data_root": str(smoke_root)}
    output = ROOT / reference.OUTPUT
    runs, _ = sweep.read_summary(output)
    digests = set(runs["data_sha256"])
    assert len(digests) == 1  # one twin for every record
    # same shared settings and family, no run twice (committed_runs raises otherwise)
    committed = reference.committed_runs(values, output, fingerprint=digests.pop())
    planned, _ = reference.plan_reference(values)
    reference._check_against_plan(committed, planned, output)  # every record has the configuration its row plans
    seeds = reference.seeds_of(values)
    assert all(int(seed) in seeds[row] for row, seed in zip(committed["row"], committed["seed"]))
    assert set(committed["row"]) == set(values["rows"])
