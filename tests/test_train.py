"""The trainer: config, determinism, resume after SIGKILL, NaN stop, checkpoints, logs, evaluation files, DDP.

Every run uses the smoke synthetic set, a small backbone at 32 px, batch 8 and 6 steps per epoch, so a whole
two-stage run (24 steps, 4 validations) takes seconds. One reference run is shared by the tests that only read it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mtanet import train as T
from mtanet.data import FaceAugment
from mtanet.data.loading import KeyedFrames
from mtanet.errors import CheckpointError, ConfigError, DeviceUnavailableError, NonFiniteLossError
from mtanet.evaluate import headline, predict_frames, write_submission
from mtanet.losses import au_positive_weights, expression_class_weights
from mtanet.runtime import resolve_device
from mtanet.tasks import AU_NAMES_2020, EXPR_NAMES_2020

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"images_per_s", "val_seconds"}  # the only log fields allowed to differ between equal runs


def tiny(root: Path, out: Path, **changes) -> dict:
    cfg = dict(data_root=str(root), backbone="seresnet18", image_size=32, batch_size=8, feature_dim=64,
               steps_per_epoch=6, stage1_epochs=2, stage2_epochs=2, threads=1, num_workers=0, log_every=2,
               checkpoint_every=4, eval_batch_size=64, output_dir=str(out), progress=False, device="cpu")
    cfg.update(changes)
    return cfg


def as_cli(cfg: dict) -> list[str]:
    out = ["-o", cfg["output_dir"], "--set"]
    out += [f"{k}={v}" for k, v in cfg.items() if k != "output_dir"]
    return out


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"weights differ in {different[:5]}"


@pytest.fixture(scope="module")
def reference(smoke_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("train") / "reference"
    cfg = tiny(smoke_root, out)
    metrics = T.train(cfg)
    return out, metrics, cfg


# --------------------------------------------------------------------------------------------------- config


def test_config_round_trip_unknown_keys_and_coercion(tmp_path: Path) -> None:
    cfg = T.TrainConfig(backbone="seresnet18", tasks=["expr", "va"], steps_per_epoch=3)
    assert cfg.tasks == ["va", "expr"]  # canonical order
    again = T.TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    # the paper's recipe is the default
    d = T.TrainConfig()
    assert (d.stage1.optimizer, d.stage1.lr, d.stage1.weight_decay, d.stage1.weighting) == ("adam", 1e-3, 1e-3, "sum")
    assert (d.stage2.optimizer, d.stage2.lr, d.stage2.weight_decay, d.stage2.weighting, d.momentum) == (
        "sgd", 1e-4, 5e-3, "uncertainty", 0.9)
    # one record per stage, read from flat keys (the command line's --stage2-lr) or a partial mapping
    flat = T.TrainConfig(stage2_lr="3e-4", stage2_epochs=0)
    nested = T.TrainConfig(stage2={"lr": 3e-4, "epochs": 0})
    assert flat == nested and flat.stage2 == d.stage2.model_copy(update={"lr": 3e-4, "epochs": 0})
    assert flat.to_dict()["stage2"] == {"epochs": 0, "weighting": "uncertainty", "optimizer": "sgd", "lr": 3e-4,
                                        "weight_decay": 5e-3}

    path = tmp_path / "cfg.yaml"
    path.write_text("stage1_lr: 1e-3\ntasks: [au]\namp: null\nthreads: '2'\naugment: 'false'\n")
    from_yaml = T.TrainConfig.from_yaml(path)
    assert from_yaml.stage1.lr == 1e-3 and isinstance(from_yaml.stage1.lr, float)  # YAML reads 1e-3 as a string
    assert (from_yaml.tasks, from_yaml.amp, from_yaml.threads, from_yaml.augment) == (["au"], None, 2, False)

    with pytest.raises(ConfigError, match="stage1_lrr.*did you mean 'stage1_lr'"):
        T.TrainConfig.from_dict({"stage1_lrr": 0.1})
    path.write_text("batch_sise: 3\n")
    with pytest.raises(ConfigError, match="batch_sise"):
        T.TrainConfig.from_yaml(path)
    path.write_text("batch_size: [3\n")
    with pytest.raises(ConfigError, match="cfg.yaml: not valid YAML"):
        T.TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="batch_size='many'"):
        T.TrainConfig(batch_size="many")
    with pytest.raises(ConfigError, match="tasks"):
        T.TrainConfig(tasks=["va", "pose"])
    with pytest.raises(ConfigError, match="stage2_optimizer='lbfgs'"):
        T.TrainConfig(stage2_optimizer="lbfgs")
    with pytest.raises(ConfigError, match="steps_per_epoch=2.5"):
        T.TrainConfig(steps_per_epoch=2.5)
    with pytest.raises(ConfigError, match="nothing to train"):
        T.TrainConfig(stage1_epochs=0, stage2_epochs="0")
    assert T.TrainConfig(steps_per_epoch="1e3", amp="auto", threads="none").steps_per_epoch == 1000


def test_cli_resolves_config_precedence(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mtanet.cli import main

    path = tmp_path / "cfg.yaml"
    path.write_text("stage1_lr: 0.01\nbatch_size: 16\n")
    rc = main(["train", "--config", str(path), "--batch-size", "32", "--augment", "false", "--set", "momentum=0.5",
               "-o", str(tmp_path / "run"), "--print-config"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["stage1"]["lr"], printed["batch_size"], printed["augment"], printed["momentum"]) == (
        0.01, 32, False, 0.5)
    rc = main(["train", "--stage2-lr", "2e-4", "--stage2-epochs", "1", "-o", str(tmp_path / "run"), "--print-config"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["stage2"]["lr"] == 2e-4
    assert main(["train", "--set", "momentum=fast", "-o", str(tmp_path / "run"), "--print-config"]) == 2
    assert "momentum" in capsys.readouterr().err


def test_lr_factor() -> None:
    assert T.lr_factor("constant", 7, 10) == 1.0
    assert T.lr_factor("cosine", 0, 10) == 1.0
    assert T.lr_factor("cosine", 9, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert T.lr_factor("cosine", 0, 10, warmup=4) == pytest.approx(0.25)
    assert T.lr_factor("cosine", 4, 10, warmup=4) == 1.0


def test_unavailable_device_is_an_error(smoke_root: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceUnavailableError, match="'cuda' was requested but CUDA is not available"):
        T.train(tiny(smoke_root, tmp_path / "run", device="cuda"))
    with pytest.raises(DeviceUnavailableError):
        resolve_device("cuda:1")
    assert resolve_device("auto").type == "cpu"
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_training_never_writes_a_dataset_of_its_own(tmp_path: Path) -> None:
    # no data root is an error, not a synthetic set written into the checkout as a side effect
    with pytest.raises(ConfigError, match="data_root is empty"):
        T.train({"output_dir": str(tmp_path / "run"), "device": "cpu", "progress": False})
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------- one run, read


def test_metrics_json(reference) -> None:
    out, metrics, cfg = reference
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("final", "final_headline", "au_thresholds", "best", "history", "config", "data", "versions", "git",
                "hardware", "wall_time_s", "images_per_s", "steps"):
        assert key in metrics, key
    final = metrics["final"]
    assert {"score", "ccc_valence", "ccc_arousal"} <= final["va"].keys()
    assert {"score", "f1_mean", "accuracy", "f1_per_au", "thresholds"} <= final["au"].keys()
    assert final["au"]["thresholds"] == [0.5] * 8 and final["au_tuned"]["thresholds"] == metrics["au_thresholds"]
    assert {"score", "f1_macro", "accuracy", "f1_per_class"} <= final["expr"].keys()
    assert final["mean"] == pytest.approx(np.mean([final[t]["score"] for t in ("va", "au", "expr")]))
    assert metrics["steps"] == 24 and metrics["final_epoch"] == 4 and len(metrics["history"]) == 4
    assert metrics["config"] == T.TrainConfig.from_dict(cfg).to_dict()
    assert {"torch", "timm", "numpy", "mtanet"} <= metrics["versions"].keys()
    assert "commit" in metrics["git"]
    assert metrics["hardware"]["torch_threads"] == 1 and metrics["hardware"]["device"] == "cpu"
    assert metrics["wall_time_s"]["total"] > 0 and metrics["images_per_s"] > 0
    # waiting for the loader is part of the loop's time, and with no loader workers a visible part of it
    assert 0 < metrics["wall_time_s"]["data_wait"] < metrics["wall_time_s"]["train"]
    assert metrics["data_wait_share"] == pytest.approx(metrics["wall_time_s"]["data_wait"] /
                                                      metrics["wall_time_s"]["train"])
    assert json.loads((out / "config.json").read_text()) == metrics["config"]


def test_log_rows(reference) -> None:
    out, metrics, _ = reference
    rows = read_log(out)
    steps = [r for r in rows if r["kind"] == "step"]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(2, 25, 2))
    assert [(r["stage"], r["epoch"], r["step"]) for r in epochs] == [(1, 1, 6), (1, 2, 12), (2, 3, 18), (2, 4, 24)]
    for r in rows:
        assert all(math.isfinite(r[f"loss_{t}"]) for t in ("va", "au", "expr", "total"))
        assert r["lr"] == (1e-3 if r["stage"] == 1 else 1e-4)
        if r["stage"] == 1:
            assert (r["w_va"], r["w_au"], r["w_expr"]) == (1.0, 1.0, 1.0) and "sigma_va" not in r
        else:  # eq. 5's effective weights start at 0.5 (regression) and 1 and move with s
            assert {"sigma_va", "sigma_au", "sigma_expr"} <= r.keys()
            assert r["w_va"] == pytest.approx(0.5 / r["sigma_va"] ** 2)
            assert r["w_va"] != 0.5
    assert steps[0]["images_per_s"] > 0
    for r, h in zip(epochs, metrics["history"]):
        assert (r["val_va"], r["val_au"], r["val_au_tuned"], r["val_expr"], r["val_mean"]) == (
            h["va"], h["au"], h["au_tuned"], h["expr"], h["mean"])


def test_best_checkpoints_hold_model_scores_and_thresholds(reference) -> None:
    from mtanet.models import load_model

    out, metrics, _ = reference
    history = metrics["history"]
    for key in T.BEST_KEYS:
        best = metrics["best"][key]
        values = [h[key] for h in history]
        assert best["score"] == max(values) and best["epoch"] == 1 + int(np.argmax(values))  # first best epoch
        ckpt = torch.load(out / f"best_{key}.pt", map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == best["epoch"]
        assert headline(ckpt["scores"])[key] == best["score"]
        thresholds = ckpt["au_thresholds"]
        assert len(thresholds) == 8 and all(0 < t < 1 for t in thresholds)
        assert thresholds == ckpt["scores"]["au_tuned"]["thresholds"]
        assert ckpt["au_names"] == list(AU_NAMES_2020) and ckpt["train_label_stats"]["expr_majority"] is not None
        assert load_model(out / f"best_{key}.pt").config["num_outputs"] == {"va": 2, "au": 8, "expr": 7}
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert last["position"] == {"epoch": 4, "batches_done": 0, "step": 24, "optimizer_stage": 2}
    assert {"optimizer", "scheduler", "weightings", "sampler", "rng", "log_offset"} <= last.keys()
    assert last["au_thresholds"] == metrics["au_thresholds"]


def test_refuses_to_overwrite_and_never_loads_a_corrupt_checkpoint(reference, smoke_root: Path,
                                                                   tmp_path: Path) -> None:
    out, _, cfg = reference
    with pytest.raises(FileExistsError, match="resume"):
        T.train(cfg)
    broken = tmp_path / "broken"
    broken.mkdir()
    good = (out / "last.pt").read_bytes()
    (broken / "last.pt").write_bytes(good[: len(good) // 2])  # what a non-atomic write could have left
    with pytest.raises(CheckpointError, match="cannot be read"):
        T.train(tiny(smoke_root, broken, resume=True))
    with pytest.raises(ConfigError, match="stage1_lr: 0.001 -> 0.5"):
        T.train({**cfg, "resume": True, "stage1_lr": 0.5})


# --------------------------------------------------------------------------------------------------- runs compared


@pytest.mark.slow
def test_same_seed_same_numbers_even_with_a_loader_worker(reference, tmp_path: Path) -> None:
    out, metrics, cfg = reference
    # one loader process instead of none: augmentation is keyed by position in the run, so nothing may change
    again = T.train({**cfg, "output_dir": str(tmp_path / "again"), "num_workers": 1})
    assert again["final"] == metrics["final"] and again["history"] == metrics["history"]
    assert without_timing(read_log(tmp_path / "again")) == without_timing(read_log(out))
    assert_same_weights(tmp_path / "again" / "last.pt", out / "last.pt")


def _wait_for_step(proc: subprocess.Popen, log: Path, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists():
            rows = [json.loads(x) for x in log.read_text().splitlines() if x.endswith("}")]
            if any(r["kind"] == "step" and r["step"] >= step for r in rows):
                return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not logged within {timeout} s")


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(reference, tmp_path: Path) -> None:
    ref_out, ref_metrics, cfg = reference
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mtanet.cli", "train", *as_cli({**cfg, "output_dir": str(out)})]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run_until(step: int) -> int:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for_step(proc, out / "log.jsonl", step)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return torch.load(out / "last.pt", map_location="cpu", weights_only=True)["position"]["step"]

    # killed in stage 1 (a mid-epoch checkpoint exists at step 4), then in stage 2 after a resume
    assert 4 <= run_until(6) < 24
    cmd.append("--resume")
    assert 16 <= run_until(18) < 24
    # a leftover of a write killed half-way must be ignored (and cleaned up)
    (out / ".last.pt.k1ll3d.tmp").write_bytes(b"\x80\x02 truncated")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not list(out.glob(".*.tmp"))

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final"] == ref_metrics["final"]
    assert metrics["best"] == ref_metrics["best"] and metrics["history"] == ref_metrics["history"]
    assert metrics["wall_time_s"]["sessions"] == 3
    assert_same_weights(out / "last.pt", ref_out / "last.pt")
    assert_same_weights(out / "best_mean.pt", ref_out / "best_mean.pt")
    # rows the killed runs wrote after their last checkpoint were cut, so every row appears once
    assert without_timing(read_log(out)) == without_timing(read_log(ref_out))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_before_the_step_and_its_checkpoint(smoke_root: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, bad: float) -> None:
    from mtanet.train import trainer

    calls = {"n": 0, "stepped": []}
    real_losses = trainer.task_losses

    def losses_bad_at_step_5(*args, **kwargs):
        calls["n"] += 1
        losses = real_losses(*args, **kwargs)
        return {t: v * bad for t, v in losses.items()} if calls["n"] == 5 else losses

    real_step = torch.optim.Adam.step

    def recorded_step(self, *args, **kwargs):
        calls["stepped"].append(calls["n"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(trainer, "task_losses", losses_bad_at_step_5)
    monkeypatch.setattr(torch.optim.Adam, "step", recorded_step)
    out = tmp_path / "bad"
    cfg = tiny(smoke_root, out, stage1_epochs=1, stage2_epochs=1, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=r"stage 1, epoch 1, step 5\b"):
        T.train(cfg)
    assert calls["stepped"] == [1, 2, 3, 4]  # the optimiser never took step 5
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["position"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert [r["step"] for r in read_log(out)] == [2, 4]
    assert not list(out.glob("best_*.pt")) and not (out / "metrics.json").exists()


# --------------------------------------------------------------------------------------------------- evaluation


def test_evaluate_scores_and_submission_files(reference, smoke_root: Path, tmp_path: Path) -> None:
    from mtanet.cli import main
    from mtanet.data import load_frames, read_annotation_file

    ref_out, metrics, _ = reference
    out = tmp_path / "eval"
    assert main(["evaluate", str(ref_out / "best_mean.pt"), "--data-root", str(smoke_root), "--split", "val",
                 "-o", str(out), "--batch-size", "64", "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    result = json.loads((out / "scores.json").read_text())
    # the same frames and model as the trainer's validation at the best-mean epoch
    best = metrics["history"][metrics["best"]["mean"]["epoch"] - 1]
    for key in ("va", "au", "au_tuned", "expr", "mean"):
        assert result["headline"][key] == pytest.approx(best[key], abs=1e-6), key
    assert set(result["headline_all_frames"]) == set(result["headline"])

    frames = load_frames(smoke_root, "val")
    headers = {"VA_Set": "valence,arousal", "AU_Set": ",".join(AU_NAMES_2020), "EXPR_Set": ",".join(EXPR_NAMES_2020)}
    filled_somewhere = 0
    for folder, task in (("VA_Set", "va"), ("AU_Set", "au"), ("EXPR_Set", "expr")):
        names = sorted(frames.loc[frames[f"split_{task}"] == "val", "name"].unique())
        assert sorted(p.stem for p in (out / folder).glob("*.txt")) == names
        for name in names:
            n = len(read_annotation_file(smoke_root / "annotations" / folder / "Validation_Set" / f"{name}.txt",
                                         task)[1])
            lines = (out / folder / f"{name}.txt").read_text().splitlines()
            assert lines[0] == headers[folder] and len(lines) == n + 1
            body = lines[1:]
            if task == "va":
                values = np.array([[float(x) for x in line.split(",")] for line in body])
                assert values.shape == (n, 2) and np.all(np.abs(values) <= 1)
            elif task == "au":
                assert all(len(line.split(",")) == 8 and set(line.split(",")) <= {"0", "1"} for line in body)
            else:
                assert all(line in {str(c) for c in range(7)} for line in body)
            # fill rule: a frame without a face repeats the previous face's line, or the first face's before it
            g = frames[frames["name"] == name]
            faces = np.sort(g.loc[g["image"] != "", "frame"].to_numpy())
            for k in range(1, n + 1):
                if k in faces:
                    continue
                source = faces[faces < k].max() if (faces < k).any() else faces.min()
                assert body[k - 1] == body[source - 1], (folder, name, k)
                filled_somewhere += 1
    assert filled_somewhere > 0  # the smoke set has frames without a face, so the rule was exercised


def test_predict_frames_alignment_and_no_face_fallback(reference, smoke_root: Path, tmp_path: Path) -> None:
    from mtanet.data import load_frames
    from mtanet.models import load_model

    out, _, _ = reference
    table = load_frames(smoke_root, "val")
    frames = table[table["name"].isin(sorted(table["name"].unique())[:2])].reset_index(drop=True)
    preds = predict_frames(load_model(out / "last.pt"), frames, smoke_root, image_size=32, batch_size=16)
    has_image = (frames["image"] != "").to_numpy()
    assert preds["va"].shape == (len(frames), 2) and preds["au"].shape == (len(frames), 8)
    assert np.isnan(preds["expr"][~has_image]).all() and np.isfinite(preds["expr"][has_image]).all()
    assert np.allclose(preds["expr"][has_image].sum(axis=1), 1, atol=1e-5)
    assert (preds["au"][has_image] > 0).all() and (preds["au"][has_image] < 1).all()

    # a name without any face gets the training-set constants
    blind = {t: np.full((len(table), p.shape[1]), np.nan, np.float32) for t, p in preds.items()}
    fallback = {"va_mean": [0.1, -0.2], "au_prevalence": [0.9] * 4 + [0.1] * 4, "expr_majority": 4}
    summary = write_submission(table, blind, tmp_path / "sub", smoke_root, split="val", fallback=fallback)
    for folder, task, line in (("VA_Set", "va", "0.100000,-0.200000"), ("AU_Set", "au", "1,1,1,1,0,0,0,0"),
                               ("EXPR_Set", "expr", "4")):
        files = sorted((tmp_path / "sub" / folder).glob("*.txt"))
        assert files and len(summary[task]["names_without_face"]) == len(files)
        for path in files:
            assert set(path.read_text().splitlines()[1:]) == {line}


# --------------------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(reference, tmp_path: Path) -> None:
    _, _, cfg = reference
    out = tmp_path / "ddp"
    ddp_cfg = {**cfg, "output_dir": str(out), "stage1_epochs": 1, "stage2_epochs": 1}
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mtanet.cli", "train",
                           *as_cli(ddp_cfg)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"output_dir"') == 1  # only rank 0 reports
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddp"]["world_size"] == 2 and metrics["ddp"]["backend"] == "gloo"
    assert metrics["ddp"]["max_abs_weight_diff_across_ranks"] == 0.0  # every rank ends with the same weights
    rows = read_log(out)
    assert [(r["kind"], r["step"]) for r in rows] == [("step", 2), ("step", 4), ("step", 6), ("epoch", 6),
                                                      ("step", 8), ("step", 10), ("step", 12), ("epoch", 12)]
    # Same global batches, initial weights and augmentation as the one-process run; BatchNorm statistics and the
    # CCC are per rank slice, so the losses are close but not equal.
    ref_rows = {r["step"]: r for r in read_log(reference[0]) if r["kind"] == "step"}
    for r in rows[:3]:
        assert r["loss_total"] == pytest.approx(ref_rows[r["step"]]["loss_total"], rel=0.15)


def test_expression_class_weights_follow_the_training_labels() -> None:
    from mtanet.train import TrainConfig

    labels = np.array([0] * 6 + [1] * 3 + [2] * 1)
    assert expression_class_weights(labels, 4, "none") is None
    balanced = expression_class_weights(labels, 4, "balanced").tolist()
    assert balanced == pytest.approx([10 / 24, 10 / 12, 10 / 4, 0.0])  # class 3 never occurs
    assert expression_class_weights(labels, 4, "sqrt").tolist() == pytest.approx(np.sqrt(balanced).tolist())
    with pytest.raises(ConfigError, match="expr_class_weight"):
        TrainConfig(expr_class_weight="inverse")


def test_au_positive_weights_balance_each_au() -> None:
    labels = np.array([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0]])
    assert au_positive_weights(labels, "none") is None
    assert au_positive_weights(labels, "balanced").tolist() == pytest.approx([3.0, 1.0, 1 / 3])
    assert au_positive_weights(labels, "sqrt").tolist() == pytest.approx([3 ** 0.5, 1.0, (1 / 3) ** 0.5])


@pytest.mark.parametrize("packed", [False, True], ids=["jpeg", "packed-cache"])
def test_batched_fetch_equals_collated_items_bit_for_bit(smoke_root: Path, tmp_path: Path, packed: bool) -> None:
    # The training loader fetches a whole batch at once (KeyedFrames.__getitems__): one cache read and batched
    # float arithmetic. It must give exactly what the per-item path gives, or runs would change with the loader.
    from torch.utils.data import default_collate

    from mtanet.data import FrameDataset, build_packed_cache, read_split
    from mtanet.tasks import AU_NAMES_2020

    frames = read_split(smoke_root, "train").frames
    augment = FaceAugment(48)
    dataset = FrameDataset(frames, smoke_root, AU_NAMES_2020, image_size=48, transform=augment)
    if packed:
        dataset.packed = build_packed_cache(dataset, tmp_path / "cache.npy")
    keyed = KeyedFrames(dataset, augment)
    rows = np.random.default_rng(3).choice(len(dataset), size=24)
    rows[5] = rows[4]  # a frame twice in one batch, as the task-balanced sampler can draw it
    items = [(int(r), (0, 1, 2, j)) for j, r in enumerate(rows)]
    one_by_one = default_collate([keyed[item] for item in items])
    batched = keyed.__getitems__(items)
    assert batched[0].shape == (24, 3, 48, 48)
    assert torch.equal(batched[0], one_by_one[0])
    assert not torch.equal(batched[0][4], batched[0][5])  # same frame, other slot: other augmentation
    assert_same_batch(batched, one_by_one)
    # validation's batches: no transform, scaling and resizing once per batch
    plain = FrameDataset(frames, smoke_root, AU_NAMES_2020, image_size=48, packed=dataset.packed)
    assert_same_batch(plain.batch(rows.tolist()), default_collate([plain[int(r)] for r in rows]))
    # training without augmentation goes through the same batched fetch
    unaugmented = KeyedFrames(plain, None)
    assert_same_batch(unaugmented.__getitems__(items), default_collate([unaugmented[item] for item in items]))


def test_batched_fetch_of_jpgs_of_different_sizes(smoke_root: Path, tmp_path: Path) -> None:
    # A jpg of another size (a bad crop in real data) is resized on its own, as the per-item path does.
    from PIL import Image
    from torch.utils.data import default_collate

    from mtanet.data import FrameDataset, decode_image_file, read_split
    from mtanet.tasks import AU_NAMES_2020

    frames = read_split(smoke_root, "train").frames
    frames = frames[frames["image"] != ""].head(4).reset_index(drop=True)
    for k, rel in enumerate(frames["image"]):
        image = decode_image_file(smoke_root / rel)
        if k == 2:
            image = image[:, :100, :90].contiguous()
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / rel, quality=95)
    dataset = FrameDataset(frames, tmp_path, AU_NAMES_2020, image_size=48)
    batch = dataset.batch([0, 1, 2, 3])
    assert batch[0].shape == (4, 3, 48, 48)
    assert_same_batch(batch, default_collate([dataset[i] for i in range(4)]))
    assert_same_batch(dataset.batch([0, 1, 3]), default_collate([dataset[i] for i in (0, 1, 3)]))


def assert_same_batch(got_batch, want_batch) -> None:
    assert got_batch[0].dtype == want_batch[0].dtype and torch.equal(got_batch[0], want_batch[0])
    for got, want in zip(got_batch[1:], want_batch[1:]):
        assert got.keys() == want.keys()
        for task in want:
            assert got[task].dtype == want[task].dtype and torch.equal(got[task], want[task]), task


def test_validation_only_where_asked(smoke_root: Path, tmp_path: Path) -> None:
    # val_every=0: one validation, after the last epoch; the epochs before log their training losses only
    out = tmp_path / "once"
    metrics = T.train(tiny(smoke_root, out, val_every=0, stage1_epochs=2, stage2_epochs=1))
    epochs = [r for r in read_log(out) if r["kind"] == "epoch"]
    assert [("val" in r) for r in epochs] == [False, False, True]
    assert [h["epoch"] for h in metrics["history"]] == [3] and metrics["best"]["mean"]["epoch"] == 3
    assert all(math.isfinite(r["loss_total"]) for r in epochs)
    out = tmp_path / "every2"
    metrics = T.train(tiny(smoke_root, out, val_every=2, stage1_epochs=2, stage2_epochs=1))
    assert [h["epoch"] for h in metrics["history"]] == [2, 3]
