"""What a GPU run needs, checked on the CPU: no host-device synchronisation inside a training step (counted), the
mask-weighted losses equal to the boolean-indexed ones, uint8 batches finished on the device equal to the float path,
the non-finite guard on the device, resuming with fewer visible GPUs, the batch/rank check, the device preflight and
the VGGFace2 ``pretrained`` option."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mtanet import losses as L
from mtanet.data import FaceAugment, FrameDataset, build_packed_cache, read_split
from mtanet.data.augment import finish_on_device
from mtanet.data.loading import KeyedFrames
from mtanet.errors import ConfigError, DeviceUnavailableError, NonFiniteLossError
from mtanet.models import MTANet
from mtanet.tasks import AU_NAMES_2020, LABEL_SENTINEL
from mtanet.train import TrainConfig, Trainer
from mtanet.train import preflight as P
from mtanet.train import state as S
from mtanet.train import trainer as trainer_module
from mtanet.train.distributed import Distributed
from mtanet.train.pretrained import file_sha256, load_pretrained_backbone

REPO = Path(__file__).resolve().parents[1]


def tiny(root: Path, out: Path, **changes) -> dict:
    cfg = dict(data_root=str(root), backbone="seresnet18", image_size=32, batch_size=8, feature_dim=64,
               steps_per_epoch=4, stage1_epochs=1, stage2_epochs=1, threads=1, num_workers=0, log_every=3,
               checkpoint_every=0, eval_batch_size=64, output_dir=str(out), progress=False, device="cpu")
    cfg.update(changes)
    return cfg


# ------------------------------------------------------------------------------------------- counting syncs

#: aten operations that make the host wait for a GPU: a scalar read (item, bool, float), or an output whose size
#: depends on the data (nonzero, boolean-mask indexing, masked_select, unique)
SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique_dim", "_unique2",
           "unique_consecutive", "repeat_interleave"}


class SyncCounter(TorchDispatchMode):
    """Counts, while active, the operations that would synchronise with a GPU (as torch.cuda.set_sync_debug_mode
    would report them there): those of :data:`SYNCING`, indexing with a boolean mask, and ``tolist``/``cpu``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._patched: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING:
            self.calls.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.calls.append(f"{name}[bool]")
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in ("tolist", "cpu"):
            real = getattr(torch.Tensor, method)
            self._patched.append((method, real))

            def counted(tensor, *a, _real=real, _name=method, **kw):
                self.calls.append(_name)
                return _real(tensor, *a, **kw)
            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, real in self._patched:
            setattr(torch.Tensor, method, real)
        self._patched.clear()
        return super().__exit__(*exc)


def test_the_counter_sees_what_would_sync() -> None:
    x, mask = torch.randn(6, 2), torch.tensor([True, False, True, True, False, False])
    with SyncCounter() as counter:
        x[mask].mean()
        bool(mask.any())
        x.sum().item()
        x.tolist()
        torch.where(mask[:, None], x, 0.0).sum(0)  # the mask-weighted form: nothing
    assert counter.calls == ["index[bool]", "_local_scalar_dense", "_local_scalar_dense", "tolist"], counter.calls


def test_a_training_step_never_waits_for_the_device(smoke_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step of both stages (uint8 batches finished on the device, gradient clipping, the non-finite guard on
    the device, eq. 5) runs with zero syncs; only the logging steps read the device."""
    steps: list[list[str]] = []
    logs: list[list[str]] = []
    real_step, real_log = Trainer._train_step, Trainer._log_step

    def counted_step(self, *a, **kw):
        with SyncCounter() as counter:
            real_step(self, *a, **kw)
        steps.append(counter.calls)

    def counted_log(self, *a, **kw):
        with SyncCounter() as counter:
            real_log(self, *a, **kw)
        logs.append(counter.calls)

    monkeypatch.setattr(Trainer, "_train_step", counted_step)
    monkeypatch.setattr(Trainer, "_log_step", counted_log)
    trainer = Trainer(tiny(smoke_root, tmp_path / "run", device_augment=True, grad_clip=1.0))
    trainer.guard_on_device = True  # the GPU's way (fused optimisers, found_inf), which the CPU does not need
    try:
        metrics = trainer.run()
    finally:
        trainer.close()
    assert len(steps) == 8 and all(calls == [] for calls in steps), steps
    assert len(logs) == 2 and all(logs), logs  # steps 3 and 6 log, and the counter does see their reads
    assert metrics["hardware"]["device_augment"] is True
    assert 0.0 <= metrics["data_wait_share"] < 1.0


def test_a_non_finite_loss_skips_the_update_on_the_device_and_stops_at_the_next_log(
        smoke_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_losses = trainer_module.task_losses

    def nan_at_step_4(*a, **kw):
        calls["n"] += 1
        losses = real_losses(*a, **kw)
        return {t: v * float("nan") for t, v in losses.items()} if calls["n"] == 4 else losses

    snapshots: list[dict[str, torch.Tensor]] = []
    real_step = Trainer._train_step

    def remembered_step(self, *a, **kw):
        real_step(self, *a, **kw)
        snapshots.append({k: v.detach().clone() for k, v in self.model.named_parameters()})

    monkeypatch.setattr(trainer_module, "task_losses", nan_at_step_4)
    monkeypatch.setattr(Trainer, "_train_step", remembered_step)
    out = tmp_path / "run"
    trainer = Trainer(tiny(smoke_root, out, log_every=2, stage1_epochs=2, stage2_epochs=0, checkpoint_every=2))
    trainer.guard_on_device = True
    try:
        with pytest.raises(NonFiniteLossError, match=r"^non-finite loss nan at stage 1, epoch 1, step 4 "):
            trainer.run()
    finally:
        trainer.close()
    # steps 1-3 moved the weights; step 4's update was skipped on the device, and the check of its logging step
    # stopped the run before anything was saved
    assert len(snapshots) == 4
    assert any(not torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[2])
    assert all(torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[3])
    assert torch.load(out / "last.pt", weights_only=True)["position"]["step"] == 2


# ------------------------------------------------------------------------------------------- the losses


def boolean_indexed(pred, target, mask, expr_weight, au_pos_weight):
    """The losses as they were computed before (rows selected with boolean masks), the reference."""
    out = {}
    m = mask["va"] & ((target["va"] >= -1) & (target["va"] <= 1)).all(1)
    if m.any():
        p, t = pred["va"][m], target["va"][m]
        mx, my = p.mean(0), t.mean(0)
        vx, vy = ((p - mx) ** 2).mean(0), ((t - my) ** 2).mean(0)
        cov = ((p - mx) * (t - my)).mean(0)
        out["va"] = 1 - (2 * cov / (vx + vy + (mx - my) ** 2)).mean()
    else:
        out["va"] = pred["va"].sum() * 0
    m = mask["au"] & (target["au"] != LABEL_SENTINEL).all(1)
    per = F.binary_cross_entropy_with_logits(pred["au"], target["au"], pos_weight=au_pos_weight, reduction="none")
    out["au"] = per[m].mean() if m.any() else pred["au"].sum() * 0
    m = mask["expr"] & (target["expr"] != LABEL_SENTINEL)
    out["expr"] = F.cross_entropy(pred["expr"][m], target["expr"][m], weight=expr_weight) if m.any() \
        else pred["expr"].sum() * 0
    return out


@pytest.mark.parametrize("seed", range(6))
def test_mask_weighted_losses_equal_the_boolean_indexed_ones(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    batch = 16
    target = {"va": torch.rand(batch, 2, generator=g) * 2 - 1, "au": (torch.rand(batch, 8, generator=g) < .3).float(),
              "expr": torch.randint(0, 7, (batch,), generator=g)}
    drop = {t: torch.rand(batch, generator=g) < (0.5 if seed < 5 else 1.0) for t in target}  # seed 5: no labels
    target["va"][drop["va"]] = float("nan") if seed % 2 else -5.0
    target["au"][drop["au"]] = -1.0
    target["expr"][drop["expr"]] = -1
    mask = {t: ~drop[t] for t in target}
    weights = {"expr_weight": torch.rand(7, generator=g) + 0.1, "au_pos_weight": torch.rand(8, generator=g) + 0.5}
    leaves = {"va": torch.randn(batch, 2, generator=g), "au": torch.randn(batch, 8, generator=g),
              "expr": torch.randn(batch, 7, generator=g)}
    got_pred = {t: v.clone().requires_grad_() for t, v in leaves.items()}
    want_pred = {t: v.clone().requires_grad_() for t, v in leaves.items()}
    got = L.task_losses(got_pred, target, mask, **weights)
    want = boolean_indexed(want_pred, target, mask, weights["expr_weight"], weights["au_pos_weight"])
    for task in target:
        torch.testing.assert_close(got[task], want[task], rtol=1e-6, atol=1e-6, msg=task)
        (g_got,) = torch.autograd.grad(got[task], got_pred[task])
        (g_want,) = torch.autograd.grad(want[task], want_pred[task], allow_unused=True)
        assert torch.isfinite(g_got).all(), task  # a NaN or -5 of an unlabeled row never reaches the gradient
        torch.testing.assert_close(g_got, torch.zeros_like(g_got) if g_want is None else g_want, rtol=1e-5,
                                   atol=1e-7, msg=task)


# ------------------------------------------------------------------------------------------- uint8 batches


@pytest.mark.parametrize("packed", [False, True])
def test_uint8_batches_finished_on_the_device_equal_the_float_path(smoke_root: Path, tmp_path: Path,
                                                                   packed: bool) -> None:
    frames = read_split(smoke_root, "train").frames
    augment = FaceAugment(48)
    dataset = FrameDataset(frames, smoke_root, AU_NAMES_2020, image_size=48, transform=augment)
    if packed:
        dataset.packed = build_packed_cache(dataset, tmp_path / "cache.npy")
    rows = np.random.default_rng(5).choice(len(dataset), size=16)
    items = [(int(r), (0, 2, 7, j)) for j, r in enumerate(rows)]
    floats = KeyedFrames(dataset, augment).__getitems__(items)
    images, factors, targets, masks = KeyedFrames(dataset, augment, uint8=True).__getitems__(items)
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 48, 48) and factors.shape == (16, 2)
    finished = finish_on_device(images, factors, 48)
    torch.testing.assert_close(finished, floats[0], rtol=0, atol=2e-6)
    for task in floats[1]:
        assert torch.equal(targets[task], floats[1][task]) and torch.equal(masks[task], floats[2][task])
    # without augmentation (and resized from the 112 px source on the device): the plain scaling
    plain = FrameDataset(frames, smoke_root, AU_NAMES_2020, image_size=48, packed=dataset.packed)
    images, factors, _, _ = KeyedFrames(plain, None, uint8=True).__getitems__(items)
    assert factors is None and images.dtype == torch.uint8
    torch.testing.assert_close(finish_on_device(images, None, 48), KeyedFrames(plain, None).__getitems__(items)[0],
                               rtol=0, atol=2e-6)


# ------------------------------------------------------------------------------------------- resume, ranks


def test_resume_restores_cuda_states_of_the_devices_that_are_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    saved = S.rng_state(cuda=False)
    saved["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(4)]  # written with 4 visible GPUs
    restored: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # resumed under CUDA_VISIBLE_DEVICES=0,1
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("would index a missing GPU"))
    assert S.set_rng_state(saved) == 2
    assert restored == [(0, 0), (1, 1)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)  # more GPUs than at save time: the saved ones
    restored.clear()
    assert S.set_rng_state(saved) == 4 and restored == [(i, i) for i in range(4)]


@pytest.mark.parametrize("world", [3, 5, 6, 7])
def test_a_global_batch_the_ranks_cannot_share_is_refused_at_start(world: int, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Distributed, "from_env", classmethod(lambda cls: cls(0, world, 0, world)))
    missing = tmp_path / "no-data-here"  # refused before the data is read (and before any process group)
    with pytest.raises(ConfigError, match=rf"batch_size=256 does not divide evenly across the {world} processes"):
        Trainer(tiny(missing, tmp_path / "run", batch_size=256))
    assert not (tmp_path / "run").exists()
    TrainConfig(**tiny(missing, tmp_path / "run", batch_size=256)).check_world(8)  # 8 ranks share 256


def test_loader_workers_follow_the_cores_of_each_rank() -> None:
    from mtanet.train.trainer import default_workers

    assert [default_workers(cores, True) for cores in (1, 2, 3, 16, 64)] == [1, 1, 2, 8, 8]  # one core launches
    assert default_workers(16, False) == 0  # the CPU decodes in the main process


def test_deterministic_mode_on_cuda_fixes_the_cublas_workspace(monkeypatch: pytest.MonkeyPatch) -> None:
    from mtanet.train.trainer import apply_determinism

    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        apply_determinism(False, cuda=True)
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ and torch.backends.cudnn.benchmark
        apply_determinism(True, cuda=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.benchmark
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice stays
        apply_determinism(True, cuda=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[1], saved[2]


# ------------------------------------------------------------------------------------------- device preflight


def test_preflight_names_the_driver_and_torch_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(P, "driver_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(P, "driver_version", lambda: "550.54.15")
    with pytest.raises(DeviceUnavailableError) as err:
        P.require_cuda()
    message = str(err.value)
    assert "\n" not in message
    assert "built for CUDA 13.0" in message and "driver 550.54.15 supports CUDA up to 12.4" in message
    assert "whl/cu124" in message
    monkeypatch.setattr(P, "driver_cuda_version", lambda: None)
    monkeypatch.setattr(P, "driver_version", lambda: None)
    assert "no NVIDIA driver found" in P.cuda_diagnosis()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in P.cuda_diagnosis()

    # a profile's files: cuda needs the GPU, auto and cpu do not
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "gpu.yaml").write_text("device: auto\n")
    (tmp_path / "b" / "gpu.yaml").write_text("synth_size: gpu\ndevice: cuda\n")
    assert P.check_profile_devices([tmp_path / "a" / "gpu.yaml"]) == []
    with pytest.raises(DeviceUnavailableError, match=r"b/gpu.yaml \(device: cuda\) asks for a GPU"):
        P.check_profile_devices(sorted(tmp_path.glob("*/gpu.yaml")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert P.check_profile_devices(sorted(tmp_path.glob("*/gpu.yaml"))) == [str(tmp_path / "b" / "gpu.yaml")]


def test_the_gpu_profiles_ask_for_cuda_and_the_packed_cache() -> None:
    import yaml

    for chapter in ("04_training", "05_ablations"):
        params = yaml.safe_load((REPO / "notebooks" / "params" / chapter / "gpu.yaml").read_text())
        assert params["device"] == "cuda" and params["cache_dir"], chapter
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="asks for a GPU, but CUDA is not available"):
            P.check_profile_devices((REPO / "notebooks" / "params").glob("*/gpu.yaml"))


# ------------------------------------------------------------------------------------------- pretrained


def test_pretrained_vggface2_weights_load_strictly_with_their_digest(tmp_path: Path) -> None:
    source = MTANet("senet50", num_outputs={"va": 2}, feature_dim=16)
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.add_(0.01)
    converted = {**source.backbone.state_dict(), "last_linear.weight": torch.zeros(3, 2048),
                 "last_linear.bias": torch.zeros(3)}
    path = tmp_path / "senet50_ft.pt"
    torch.save(converted, path)
    model = MTANet("senet50", num_outputs={"va": 2}, feature_dim=16)
    record = load_pretrained_backbone(model, str(path))
    assert record == {"source": "vggface2 senet50_ft (converted)", "path": str(path.resolve()),
                      "sha256": file_sha256(path)}
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="no such file"):
        load_pretrained_backbone(model, str(tmp_path / "missing.pt"))
    del converted["layer1.0.conv1.weight"]
    torch.save(converted, path)
    with pytest.raises(ConfigError, match=r"does not match the senet50 backbone: missing 1 key\(s\) such as "
                                          r"\['layer1.0.conv1.weight'\]"):
        load_pretrained_backbone(model, str(path))
    with pytest.raises(ConfigError, match="need backbone senet50"):
        TrainConfig(data_root="x", backbone="seresnet18", pretrained=str(path))
    # the older boolean spelling still reads
    assert TrainConfig(data_root="x", pretrained=True).pretrained == "imagenet"
    assert TrainConfig(data_root="x", pretrained="false").pretrained == ""


def test_the_trainer_loads_pretrained_weights_before_stage_1_and_records_them(smoke_root: Path,
                                                                            tmp_path: Path) -> None:
    source = MTANet("senet50", num_outputs={"va": 2}, feature_dim=16)
    with torch.no_grad():
        for p in source.backbone.parameters():
            p.mul_(-1.0)
    path = tmp_path / "senet50_ft.pt"
    torch.save(source.backbone.state_dict(), path)
    trainer = Trainer(tiny(smoke_root, tmp_path / "run", backbone="senet50", pretrained=str(path)))
    try:
        assert trainer.opt_stage is None  # nothing trained yet: the weights are the backbone's start
        for k, v in source.backbone.state_dict().items():
            assert torch.equal(trainer.model.backbone.state_dict()[k], v), k
        record = trainer._metrics(None)["pretrained"]
        assert record["sha256"] == file_sha256(path) and record["path"] == str(path.resolve())
        assert json.loads((tmp_path / "run" / "config.json").read_text())["pretrained"] == str(path)
    finally:
        trainer.close()


# ------------------------------------------------------------------------------------------- the GPU check script


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py --dry-run: every check of the first GPU session, on the CPU with tiny sizes."""
    import subprocess
    import sys

    out = tmp_path / "results" / "gpu_check.json"
    page = (REPO / "book" / "performance.md").read_text()
    recorded = {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("gpu_check*")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    results = json.loads(out.read_text())
    assert results["dry_run"] is True and results["preflight"]["torch"] == torch.__version__
    runs = [v for k, v in results.items() if k.startswith("train_workers_")]
    assert len(runs) == 2  # two worker counts (1 and 0 on two cores)
    for run in runs:
        assert run["returncode"] == 0 and run["steps"] == 6 and run["syncs_in_steps"] == 0
        assert run["metrics"]["images_per_s"] > 0 and 0 <= run["metrics"]["data_wait_share"] < 1
        assert run["metrics"]["hardware"]["device_augment"] is True
    assert runs[0]["weights_sha256"] == runs[1]["weights_sha256"]  # the worker count never changes the numbers
    assert results["deterministic"]["same_weights"] is True
    resume = results["resume_narrower"]
    assert resume["killed_returncode"] == -9 and resume["resumed_returncode"] == 0 and resume["resumed_steps"] == 4
    ddp = results["torchrun_2gpu"]
    assert ddp["returncode"] == 0 and ddp["metrics"]["ddp"]["max_abs_weight_diff_across_ranks"] == 0.0
    assert results["predict_cuda"]["returncode"] == 0
    assert out.with_suffix(".md").read_text().startswith("## The GPU check")
    assert (REPO / "book" / "performance.md").read_text() == page  # a dry run never writes the page
    # nor the repository's results (a real GPU run's stay as they are)
    assert {p: p.stat().st_mtime_ns for p in (REPO / "benchmarks" / "results").glob("gpu_check*")} == recorded
