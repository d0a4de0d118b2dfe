"""The trainer: config, determinism, resume after SIGKILL, NaN stop, checkpoints, logs, evaluation files, DDP.

Every run uses the smoke synthetic set, a small backbone at 32 px, batch 8 and 6 steps per epoch, so a whole
two-stage run (24 steps, 4 validations) takes seconds. One reference run is shared by the tests that only read it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
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
from mtanet.errors import CheckpointError, ConfigError, DataFormatError, DeviceUnavailableError, NonFiniteLossError
from mtanet.evaluate import headline, predict_frames, write_submission
from mtanet.losses import au_positive_weights, expression_class_weights
from mtanet.runtime import resolve_device
from mtanet.tasks import AU_NAMES_2020

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
    with pytest.raises(DeviceUnavailableError, match="TrainConfig.device='cuda' asks for a GPU, but CUDA is not available: "):
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


def test_resume_refuses_a_checkpoint_changed_after_it_was_written(reference, tmp_path: Path, damage,
                                                                    snapshot, capsys: pytest.CaptureFixture) -> None:
    import shutil

    from mtanet.cli import main

    out, _, cfg = reference
    for name in ("last.pt", *(f"best_{k}.pt" for k in T.BEST_KEYS)):  # every checkpoint the trainer writes
        assert torch.load(out / name, map_location="cpu", weights_only=True)["digest"].startswith("sha256:"), name
    run = tmp_path / "run"
    shutil.copytree(out, run)
    damage.flip_checkpoint_tensor(run / "last.pt")  # 4 KB inside a weight: torch.load alone reads it
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="digest mismatch"):
        T.train({**cfg, "output_dir": str(run), "resume": True})
    assert main(["train", *as_cli({**cfg, "output_dir": str(run)}), "--resume"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtanet: error:"), captured.err
    assert str(run / "last.pt") in lines[0] and "digest mismatch" in lines[0]
    assert snapshot(run) == before  # nothing written, truncated or removed


# --------------------------------------------------------------------------------------------------- runs compared


@pytest.mark.slow
def test_same_seed_same_numbers_even_with_a_loader_worker(reference, tmp_path: Path) -> None:
    out, metrics, cfg = reference
    # one loader process instead of none: augmentation is keyed by position in the run, so nothing may change
    again = T.train({**cfg, "output_dir": str(tmp_path / "again"), "num_workers": 1})
    assert again["final"] == metrics["final"] and again["history"] == metrics["history"]
    assert without_timing(read_log(tmp_path / "again")) == without_timing(read_log(out))
    assert_same_weights(tmp_path / "again" / "last.pt", out / "last.pt")


@pytest.mark.slow
def test_two_loader_workers_give_the_same_run(reference, tmp_path: Path) -> None:
    # several loader processes (the GPU default) must not change a number either: each batch is keyed by position
    out, metrics, cfg = reference
    again = T.train({**cfg, "output_dir": str(tmp_path / "workers"), "num_workers": 2})
    assert again["hardware"]["num_workers"] == 2
    assert again["final"] == metrics["final"] and again["history"] == metrics["history"]
    assert without_timing(read_log(tmp_path / "workers")) == without_timing(read_log(out))
    assert_same_weights(tmp_path / "workers" / "last.pt", out / "last.pt")


class _Stopped(Exception):
    """Raised by a test right after a checkpoint: a run stopped there, to be resumed."""


@pytest.mark.slow
@pytest.mark.parametrize("option", ["amp", "channels_last"])
def test_gpu_options_train_and_resume_on_cpu(option: str, reference, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 autocast and the channels-last layout are the GPU defaults; both run on CPU too, so they are trained here
    ref_out, ref_metrics, ref_cfg = reference
    cfg = {**ref_cfg, option: True, "output_dir": str(tmp_path / "whole")}
    trainer = T.Trainer(cfg)
    try:
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv2d))
        if option == "channels_last":  # the model really is in that layout
            assert conv.weight.is_contiguous(memory_format=torch.channels_last)
            assert not conv.weight.is_contiguous()
        whole = trainer.run()
    finally:
        trainer.close()
    assert whole["hardware"]["amp_bf16" if option == "amp" else "channels_last"] is True
    epochs = [r for r in read_log(tmp_path / "whole") if r["kind"] == "epoch"]
    assert epochs[1]["loss_total"] < 0.9 * epochs[0]["loss_total"]  # stage 1 learns
    assert all(math.isfinite(h["mean"]) for h in whole["history"])
    if option == "amp":  # bfloat16 arithmetic really ran, in training and in validation: the numbers are not fp32's
        first_step = [r for r in read_log(tmp_path / "whole") if r["kind"] == "step"][0]
        ref_first_step = [r for r in read_log(ref_out) if r["kind"] == "step"][0]
        assert first_step["step"] == ref_first_step["step"] == 2
        assert first_step["loss_total"] != ref_first_step["loss_total"]
        assert whole["history"] != ref_metrics["history"]

    # stopped right after the mid-epoch checkpoint of step 4, then resumed: the same run as the uninterrupted one
    real_save = T.Trainer._save_checkpoint

    def save_then_stop(self):
        real_save(self)
        if self.step == 4:
            raise _Stopped

    out = tmp_path / "resumed"
    monkeypatch.setattr(T.Trainer, "_save_checkpoint", save_then_stop)
    with pytest.raises(_Stopped):
        T.train({**cfg, "output_dir": str(out)})
    monkeypatch.undo()
    resumed = T.train({**cfg, "output_dir": str(out), "resume": True})
    assert resumed["final"] == whole["final"] and resumed["history"] == whole["history"]
    assert resumed["wall_time_s"]["sessions"] == 2
    assert without_timing(read_log(out)) == without_timing(read_log(tmp_path / "whole"))
    assert_same_weights(out / "last.pt", tmp_path / "whole" / "last.pt")


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
    headers = {"VA_Set": "valence,arousal", "AU_Set": "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25",
               "EXPR_Set": "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise"}  # the challenge's, not ours
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


@pytest.mark.parametrize("kind", ["flipped weights", "truncated", "empty"])
def test_evaluate_refuses_a_damaged_checkpoint(reference, smoke_root: Path, tmp_path: Path, damage,
                                               capsys: pytest.CaptureFixture, kind: str) -> None:
    from mtanet.cli import main
    from mtanet.evaluate import evaluate

    ref_out, _, _ = reference
    bad = tmp_path / "best_mean.pt"
    bad.write_bytes((ref_out / "best_mean.pt").read_bytes())
    if kind == "flipped weights":
        damage.flip_checkpoint_tensor(bad)
    elif kind == "truncated":
        damage.truncate(bad)
    else:
        damage.empty(bad)
    expected = "digest mismatch" if kind == "flipped weights" else "cannot be read as a checkpoint"
    with pytest.raises(CheckpointError, match=expected):
        evaluate(bad, data_root=smoke_root, output_dir=tmp_path / "api", device="cpu", progress=False)
    out = tmp_path / "eval"
    assert main(["evaluate", str(bad), "--data-root", str(smoke_root), "-o", str(out), "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtanet: error:"), captured.err
    assert str(bad) in lines[0] and expected in lines[0] and captured.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_mean.pt"]  # no scores, no submission files


def test_submission_files_hold_the_models_predictions(reference, smoke_root: Path, tmp_path: Path) -> None:
    # The files read back, line by line, against the checkpoint's own predictions made here: valence then arousal,
    # an AU is 1 where its probability reaches the checkpoint's tuned threshold, the expression is the most probable.
    from mtanet.data import load_frames
    from mtanet.evaluate import evaluate
    from mtanet.models import load_model

    checkpoint = reference[0] / "best_mean.pt"
    out = tmp_path / "eval"
    result = evaluate(checkpoint, data_root=smoke_root, split="val", output_dir=out, batch_size=64, device="cpu",
                      threads=1, progress=False)
    thresholds = np.asarray(torch.load(checkpoint, map_location="cpu", weights_only=True)["au_thresholds"])
    assert result["au_thresholds"] == thresholds.tolist() and len(set(thresholds.tolist())) > 1
    frames = load_frames(smoke_root, "val")
    preds = predict_frames(load_model(checkpoint), frames, smoke_root, image_size=32, batch_size=64)
    checked = {"va": 0, "au": 0, "expr": 0}
    for folder, task, header in (("VA_Set", "va", "valence,arousal"),
                                 ("AU_Set", "au", "AU1,AU2,AU4,AU6,AU12,AU15,AU20,AU25"),
                                 ("EXPR_Set", "expr", "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise")):
        files = sorted((out / folder).glob("*.txt"))
        assert files, folder
        for path in files:
            lines = path.read_text().splitlines()
            assert lines[0] == header
            rows = np.flatnonzero(((frames["name"] == path.stem) & (frames["image"] != "")).to_numpy())
            for row in rows:
                k = int(frames["frame"].iloc[row])
                if k >= len(lines):
                    continue  # a frame past the annotation file's end has no line
                line, pred = lines[k], preds[task][row]
                if task == "va":
                    np.testing.assert_allclose([float(x) for x in line.split(",")], np.clip(pred, -1, 1), atol=1e-6)
                elif task == "au":
                    assert line == ",".join(str(int(p >= t)) for p, t in zip(pred, thresholds)), (path.name, k)
                else:
                    assert line == str(int(np.argmax(pred))), (path.name, k)
                checked[task] += 1
    assert all(n > 50 for n in checked.values()), checked


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


# A test-only driver that torchrun starts once per rank: it trains with mtanet.train.Trainer, as `mtanet train` does,
# and saves what that rank itself holds, so the test compares the ranks instead of trusting the trainer's report.
DDP_DRIVER = '''
import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mtanet.data.loading import KeyedFrames
from mtanet.errors import NonFiniteLossError
from mtanet.train import Trainer
from mtanet.train import trainer as trainer_module

args = json.loads(Path(sys.argv[1]).read_text())
record = {"batches": [], "stepped": [], "calls": 0, "error": None}

real_getitems = KeyedFrames.__getitems__


def recorded_getitems(self, items):  # the rows (and augmentation keys) this rank really trained on
    record["batches"].append([(int(row), [int(k) for k in key]) for row, key in items])
    return real_getitems(self, items)


real_losses = trainer_module.task_losses


def counted_losses(*a, **kw):
    record["calls"] += 1
    losses = real_losses(*a, **kw)
    if args["nan_at"] == [trainer.dist.rank, record["calls"]]:  # a NaN on this rank only
        losses = {t: v * float("nan") for t, v in losses.items()}
    return losses


real_save = Trainer._save_checkpoint


def save_then_maybe_die(self):
    real_save(self)
    if self.step == args["kill_after_checkpoint"]:
        dist.barrier()  # every rank is past the checkpoint; then each is killed, as by kill -9
        os.kill(os.getpid(), signal.SIGKILL)


KeyedFrames.__getitems__ = recorded_getitems
trainer_module.task_losses = counted_losses
Trainer._save_checkpoint = save_then_maybe_die
for optimizer in (torch.optim.Adam, torch.optim.SGD):
    def stepped(self, *a, _real=optimizer.step, **kw):
        record["stepped"].append(record["calls"])  # the optimiser stepped after this many loss evaluations
        return _real(self, *a, **kw)
    optimizer.step = stepped

trainer = Trainer(args["config"])
rank = trainer.dist.rank
try:
    trainer.run()
except NonFiniteLossError as err:
    record["error"] = str(err)
finally:
    trainer.close()
torch.save({"state_dict": trainer.model.state_dict(),
            "weightings": {k: w.state_dict() for k, w in trainer.weightings.items()}, **record},
           Path(args["dump"]) / f"rank{rank}.pt")
sys.exit(3 if record["error"] else 0)
'''


def run_ddp_driver(tmp_path: Path, name: str, cfg: dict, *, nan_at: list[int] | None = None,
                   kill_after_checkpoint: int | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``cfg`` trained by two gloo ranks under torchrun; returns the process and what each rank saved."""
    driver = tmp_path / "ddp_driver.py"
    driver.write_text(DDP_DRIVER)
    dump = tmp_path / f"{name}-ranks"
    dump.mkdir()
    args = tmp_path / f"{name}.json"
    args.write_text(json.dumps({"config": cfg, "dump": str(dump), "nan_at": nan_at,
                                "kill_after_checkpoint": kill_after_checkpoint}))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node", "2", str(driver), str(args)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank waits for the others forever: torchrun stops its workers on SIGTERM
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise AssertionError(f"{name}: the ranks did not finish within 300 s (one waits for another?)") from None
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    ranks = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(dump.glob("rank*.pt"))]
    return done, ranks


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {different[:5]} differ"


def parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without BatchNorm's running statistics (per rank within an epoch under DDP)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


@pytest.fixture(scope="module")
def ddp_run(smoke_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[dict]]:
    """One uninterrupted two-rank run of a stage-1 and a stage-2 epoch, with what each rank holds at the end."""
    tmp = tmp_path_factory.mktemp("ddp")
    cfg = tiny(smoke_root, tmp / "run", stage1_epochs=1, stage2_epochs=1)
    done, ranks = run_ddp_driver(tmp, "uninterrupted", cfg)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(ranks) == 2
    return tmp / "run", cfg, ranks


@pytest.mark.slow
def test_ddp_ranks_train_their_own_slices_and_end_with_the_same_weights(ddp_run, smoke_root: Path) -> None:
    from mtanet.data import FrameDataset, TaskBalancedBatchSampler, read_split

    out, cfg, (rank0, rank1) = ddp_run
    # every rank holds the same model and the same eq. 5 log-variances, which stage 2 moved off their start
    assert_same_tensors(rank0["state_dict"], rank1["state_dict"], "model weights of rank 0 and rank 1")
    for kind in rank0["weightings"]:
        assert_same_tensors(rank0["weightings"][kind], rank1["weightings"][kind], f"{kind} weighting of the ranks")
    log_vars = rank0["weightings"]["uncertainty"]["log_vars"]
    assert (log_vars != 0).all(), log_vars
    last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert_same_tensors(rank0["state_dict"], last["state_dict"], "rank 0 and last.pt")
    assert_same_tensors(rank0["weightings"]["uncertainty"], last["weightings"]["uncertainty"], "eq. 5 in last.pt")

    # each rank fetched its own slots of the global batch, and together exactly the one-process run's batch
    frames = read_split(smoke_root, "train").frames
    masks = FrameDataset(frames, smoke_root, AU_NAMES_2020).masks
    sampler = TaskBalancedBatchSampler({t: masks[t] for t in ("va", "au", "expr")}, 8, num_batches=6, seed=0)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += [(epoch, b, batch.tolist()) for b, batch in enumerate(sampler.global_batches())]
    assert len(rank0["batches"]) == len(rank1["batches"]) == len(expected) == 12
    for (epoch, b, global_rows), mine, theirs in zip(expected, rank0["batches"], rank1["batches"]):
        assert [key for _, key in mine] == [[0, epoch, b, slot] for slot in (0, 2, 4, 6)]
        assert [key for _, key in theirs] == [[0, epoch, b, slot] for slot in (1, 3, 5, 7)]
        by_slot = {key[3]: row for row, key in mine + theirs}
        assert [by_slot[slot] for slot in range(8)] == global_rows, (epoch, b)


@pytest.mark.slow
def test_ddp_resume_after_sigkill_equals_uninterrupted(ddp_run, tmp_path: Path) -> None:
    ref_out, ref_cfg, ref_ranks = ddp_run
    out = tmp_path / "run"
    cfg = {**ref_cfg, "output_dir": str(out)}
    # both ranks killed (SIGKILL) right after the mid-epoch checkpoint of step 4
    done, ranks = run_ddp_driver(tmp_path, "killed", cfg, kill_after_checkpoint=4)
    assert done.returncode != 0 and ranks == []
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=True)["position"]["step"] == 4
    done, ranks = run_ddp_driver(tmp_path, "resumed", {**cfg, "resume": True})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank, (resumed, reference) in enumerate(zip(ranks, ref_ranks)):
        assert_same_tensors(resumed["state_dict"], reference["state_dict"], f"rank {rank}'s weights")
        for kind in reference["weightings"]:
            assert_same_tensors(resumed["weightings"][kind], reference["weightings"][kind], f"rank {rank} {kind}")
        assert resumed["batches"] == reference["batches"][4:]  # the resumed run starts at step 5
    metrics, ref_metrics = (json.loads((d / "metrics.json").read_text()) for d in (out, ref_out))
    assert metrics["final"] == ref_metrics["final"]
    assert metrics["history"] == ref_metrics["history"] and metrics["best"] == ref_metrics["best"]
    assert metrics["wall_time_s"]["sessions"] == 2
    assert without_timing(read_log(out)) == without_timing(read_log(ref_out))
    assert_same_weights(out / "last.pt", ref_out / "last.pt")


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_every_rank_before_the_step(smoke_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = tiny(smoke_root, out, stage1_epochs=1, stage2_epochs=1)
    done, ranks = run_ddp_driver(tmp_path, "nan", cfg, nan_at=[1, 5])  # rank 1's 5th loss is NaN, rank 0's is not
    assert done.returncode != 0 and len(ranks) == 2, done.stderr[-3000:]
    for rank in ranks:
        # rank 0's own loss was finite: it says where the NaN was, not a number of its own
        assert rank["error"].startswith("non-finite loss on rank 1 of 2 at stage 1, epoch 1, step 5 "), rank["error"]
        assert rank["stepped"] == [1, 2, 3, 4]  # no rank took step 5
    # so the weights are still those of step 4's checkpoint on every rank (BatchNorm statistics are per rank)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["position"]["step"] == 4
    for rank in ranks:
        assert_same_tensors(parameters(rank["state_dict"]), parameters(ckpt["state_dict"]), "a rank and last.pt")
    assert not list(out.glob("best_*.pt")) and not (out / "metrics.json").exists()


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


# --------------------------------------------------------------------------------------------------- data faults


def test_cache_dir_never_serves_old_pixels(smoke_root: Path, tmp_path: Path) -> None:
    from PIL import Image

    from mtanet.data import decode_image_file

    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    cache = tmp_path / "cache"

    def first_image(out: str) -> tuple[Path, np.ndarray]:
        trainer = T.Trainer(tiny(root, tmp_path / out, cache_dir=str(cache)))
        try:
            path = root / trainer.train_set.paths[0]
            return path, np.array(trainer.train_set.packed[0])
        finally:
            trainer.close()

    path, cached = first_image("one")
    assert np.array_equal(cached, decode_image_file(path).permute(1, 2, 0).numpy())
    pixels = np.random.default_rng(1).integers(0, 256, cached.shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=95)  # replaced in place: same name, other pixels
    _, again = first_image("two")
    new = decode_image_file(path).permute(1, 2, 0).numpy()
    assert not np.array_equal(new, cached) and np.array_equal(again, new)
    assert len(list(cache.glob("train-*.npy"))) == 2  # the old cache is left, never reused


def test_resume_refuses_other_data_and_follows_a_moved_copy(reference, smoke_root: Path, tmp_path: Path) -> None:
    ref_out, _, cfg = reference
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "config.json", "log.jsonl"):  # the finished run, without its metrics
        shutil.copy2(ref_out / name, out / name)
    edited = tmp_path / "edited"
    shutil.copytree(smoke_root, edited)
    label = next((edited / "annotations" / "EXPR_Set" / "Validation_Set").glob("*.txt"))
    lines = label.read_text().splitlines()
    label.write_text("\n".join(lines[:1] + ["6" if lines[1] != "6" else "5"] + lines[2:]) + "\n")  # one label
    with pytest.raises(ConfigError, match=r"cannot resume .*last\.pt on data_root .*edited: its annotation files "
                                          r"differ from those the run was trained on"):
        T.train({**cfg, "output_dir": str(out), "resume": True, "data_root": str(edited)})
    assert json.loads((out / "config.json").read_text())["data_root"] == str(smoke_root)

    moved = tmp_path / "moved"
    shutil.copytree(smoke_root, moved)
    metrics = T.train({**cfg, "output_dir": str(out), "resume": True, "data_root": str(moved)})
    config = json.loads((out / "config.json").read_text())
    assert config["data_root"] == metrics["config"]["data_root"] == metrics["data"]["root"] == str(moved)
    assert metrics["data"]["annotations_sha256"] == torch.load(ref_out / "last.pt", weights_only=True)["data"][
        "annotations_sha256"]


def test_a_task_without_labels_in_a_split_is_an_error_before_training(smoke_root: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from mtanet.cli import main

    root = tmp_path / "root"
    shutil.copytree(smoke_root, root)
    shutil.rmtree(root / "annotations" / "EXPR_Set" / "Validation_Set")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".notes.tmp").write_text("mine")  # the trainer removes its own leftovers only
    (out / ".last.pt.k1ll3d.tmp").write_text("")
    with pytest.raises(DataFormatError, match=r"EXPR_Set/Validation_Set: no val frame has both an image and a "
                                              r"label for expr, so expr could not be scored .*tasks=va,au"):
        T.train(tiny(root, out))
    assert not (out / "last.pt").exists() and not (out / "log.jsonl").exists()
    assert (out / ".notes.tmp").read_text() == "mine" and not (out / ".last.pt.k1ll3d.tmp").exists()
    assert main(["train", *as_cli(tiny(root, out))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtanet: error: ") and "EXPR_Set/Validation_Set" in err and err.count("\n") == 1
    shutil.rmtree(root / "annotations" / "AU_Set" / "Training_Set")
    with pytest.raises(DataFormatError, match=r"AU_Set/Training_Set: no train frame .* label for au, so au could "
                                              r"not be learnt"):
        T.train(tiny(root, out, tasks=["va", "au"]))
    # leaving the tasks out is the explicit way to train on what there is
    trainer = T.Trainer(tiny(root, out, tasks=["va"]))
    trainer.close()


# ------------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_file(smoke_root: Path, tmp_path: Path,
                                                                             monkeypatch, capsys) -> None:
    from mtanet.cli import main

    save = torch.save

    def full(obj, f, *args, **kwargs):  # a checkpoint written to a file: part of it, then the disk is full
        if not hasattr(f, "write"):
            return save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 the first bytes of a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "run"
    assert main(["train", *as_cli(tiny(smoke_root, out, stage1_epochs=1, stage2_epochs=0, steps_per_epoch=2))]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mtanet: error: {out}/"), lines
    assert ".pt: No space left on device (the disk is full" in lines[0]
    assert not list(out.glob("*.pt")) and not list(out.glob(".*"))  # no checkpoint, whole or partial; no temp file
    assert all(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines())  # whole rows only


def test_the_log_keeps_whole_rows_when_the_disk_fills(tmp_path: Path) -> None:
    from mtanet.train.state import JsonlLog

    path = tmp_path / "log.jsonl"
    log = JsonlLog(path, None, True)
    log.write({"step": 1})
    real = log.file

    class Full:  # takes the first bytes of the row, then the disk is full
        def write(self, data):
            real.write(bytes(data[:5]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(real, name)

    log.file = Full()
    with pytest.raises(OSError) as info:
        log.write({"step": 2, "loss": 0.5})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)  # names the log
    log.file = real
    log.write({"step": 3})  # the next row starts where the last whole one ended
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"step": 1}, {"step": 3}]


def test_metrics_json_carries_the_provenance_block_of_the_run(smoke_root: Path, tmp_path: Path) -> None:
    import hashlib

    out = tmp_path / "run"
    T.train(tiny(smoke_root, out, stage1_epochs=1, stage2_epochs=0, steps_per_epoch=2))
    block = json.loads((out / "metrics.json").read_text())["provenance"]
    assert block["runtime"]["engine"] == "torch" and block["runtime"]["device"] == "cpu"
    digest = hashlib.sha256((out / "last.pt").read_bytes()).hexdigest()
    assert digest in json.dumps(block["model"]), "the checkpoint's SHA-256 is not the one of last.pt"
    assert block["au_thresholds"]["source"] == "tuned on validation"
    assert Path(block["input"]["path"]) == smoke_root.resolve()


def test_metrics_json_says_how_far_eq5_is_from_its_stationary_point(smoke_root: Path, tmp_path: Path) -> None:
    """The learned log-variances, the last stage-2 losses and s* = log(2 c L): a fast lr_log_vars brings s close to
    s*, the paper's 1e-4 leaves it near its start (0)."""
    import math

    def record(lr_log_vars: float, out: Path) -> dict:
        T.train(tiny(smoke_root, out, stage1_epochs=1, stage2_epochs=2, steps_per_epoch=6, lr_log_vars=lr_log_vars,
                     init_log_var=0.0))
        return json.loads((out / "metrics.json").read_text())["uncertainty"]

    slow, fast = record(1e-4, tmp_path / "slow"), record(0.5, tmp_path / "fast")
    for rec in (slow, fast):
        for t, factor in (("va", 0.5), ("au", 1.0), ("expr", 1.0)):
            loss = rec["stage2_last_epoch_loss"][t]
            assert rec["stationary_log_vars"][t] == pytest.approx(math.log(2 * factor * loss))
            assert rec["distance"][t] == pytest.approx(rec["log_vars"][t] - rec["stationary_log_vars"][t])
    assert max(abs(v) for v in slow["log_vars"].values()) < 0.01  # 12 steps at 1e-4: eq. 5 not learned
    assert sum(abs(v) for v in fast["distance"].values()) < sum(abs(v) for v in slow["distance"].values())


def test_eq5_starts_at_the_stationary_point_of_the_stage1_losses_and_a_resume_keeps_it(
        smoke_root: Path, tmp_path: Path, monkeypatch) -> None:
    """init_log_var="stationary" (the default): stage 2 starts each s at log(2 c L) for the mean training loss of
    the last stage-1 epoch, so eq. 5 is at its optimum at once, and ends nearer s* than a start at 0. A run stopped at
    the stage boundary and resumed starts from the same s (the stage-1 losses travel in the checkpoint)."""
    import math

    cfg = tiny(smoke_root, tmp_path / "whole", stage1_epochs=1, stage2_epochs=1, steps_per_epoch=6)
    T.train(cfg)
    stage1 = next(r for r in read_log(tmp_path / "whole") if r["kind"] == "epoch" and r["stage"] == 1)
    rec = json.loads((tmp_path / "whole" / "metrics.json").read_text())["uncertainty"]
    for t, factor in (("va", 0.5), ("au", 1.0), ("expr", 1.0)):
        assert rec["start_log_vars"][t] == pytest.approx(math.log(2 * factor * stage1[f"loss_{t}"]), abs=1e-6)
    first_stage2 = next(r for r in read_log(tmp_path / "whole") if r["kind"] == "step" and r["stage"] == 2)
    assert first_stage2["w_expr"] == pytest.approx(1 / (2 * stage1["loss_expr"]), rel=1e-3)

    T.train({**cfg, "output_dir": str(tmp_path / "zero"), "init_log_var": 0.0})
    zero = json.loads((tmp_path / "zero" / "metrics.json").read_text())["uncertainty"]
    assert zero["start_log_vars"] == {"va": 0.0, "au": 0.0, "expr": 0.0}
    assert sum(map(abs, rec["distance"].values())) < 0.5 * sum(map(abs, zero["distance"].values()))

    # stopped right after stage 1's last checkpoint, before stage 2 begins, then resumed
    real_start = T.Trainer._start_stage

    def crash_at_stage2(self, stage, state=None):
        if stage == 2 and state is None:
            raise KeyboardInterrupt("stopped at the stage boundary")
        real_start(self, stage, state)

    cut = {**cfg, "output_dir": str(tmp_path / "cut")}
    monkeypatch.setattr(T.Trainer, "_start_stage", crash_at_stage2)
    with pytest.raises(KeyboardInterrupt):
        T.train(cut)
    monkeypatch.setattr(T.Trainer, "_start_stage", real_start)
    T.train({**cut, "resume": True})
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["uncertainty"]
    assert resumed["start_log_vars"] == rec["start_log_vars"]
    assert resumed["log_vars"] == rec["log_vars"]
