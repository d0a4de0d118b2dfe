"""The paper's two-stage recipe as one resumable, reproducible loop.

The recipe (paper section IV-B, ABAW2020.md section 6), every number a field of :class:`TrainConfig`:

1. **Stage 1**: the plain sum of the task losses, Adam, lr 1e-3, weight decay 1e-3.
2. **Stage 2**: fine-tuning with the uncertainty weighting of eq. 5, SGD (momentum 0.9), lr 1e-4, weight decay 5e-3;
   the log-variances ``s = log sigma^2`` are parameters of this optimiser (without weight decay, which would pull them
   back towards the plain sum).

The learning rate is held constant in each stage by default (the paper gives a rate, no schedule); ``lr_schedule=
"cosine"`` decays each stage to zero. Batches come from :class:`mtanet.data.TaskBalancedBatchSampler`, so every
batch holds labels of every trained task despite the incomplete labels of Aff-Wild2. After each epoch the model is
scored on the validation frames that have an image, with the ABAW 2020 scores of :mod:`mtanet.metrics`.

What a run leaves in its output folder:

- ``config.json``: the run's :class:`TrainConfig`.
- ``log.jsonl``: one JSON object per line, ``kind`` ``"step"`` (every ``log_every`` steps: mean task losses of the
  window ``loss_<task>``, ``loss_total``, ``lr``, effective task weights ``w_<task>``, ``sigma_<task>`` under the
  uncertainty weighting, ``images_per_s``) or ``"epoch"`` (the same over the epoch, plus the validation scores
  ``val_<task>``, ``val_au_tuned``, ``val_mean`` and their full dicts under ``val``).
- ``last.pt``: the resume checkpoint, written atomically every ``checkpoint_every`` steps and at each epoch end:
  model, optimiser, schedule position, loss weighting, sampler position, the RNG states of every rank, the log
  offset, the best scores so far. ``best_va.pt``, ``best_au.pt``, ``best_expr.pt``, ``best_mean.pt``: the model at
  the epoch with the best validation score of that kind, with the tuned AU thresholds.
- ``metrics.json``: final and best validation scores, the per-epoch history, config, versions, git commit,
  hardware and wall times (see :func:`train`).

A run killed at any moment (SIGKILL included) and started again with ``resume=True`` ends with the same weights and
scores as an uninterrupted run on CPU: batches, augmentation and dropout depend only on the seed and the position in
the run (see :class:`mtanet.data.FaceAugment`), and everything else that changes is in the checkpoint.

Under ``torchrun --nproc_per_node N`` the same entry point trains with DistributedDataParallel; every difference
that makes is in :class:`mtanet.train.distributed.Distributed`. The task losses are those of the global batch (each
computed from every rank's sums, :class:`mtanet.losses.GlobalBatch`), so N GPUs train the objective of one GPU;
BatchNorm's batch statistics stay per rank (see there why).

On a GPU the step never waits for the device except on logging and checkpoint steps: the losses weigh rows by their
masks (no boolean indexing), which tasks have labels is read from the batch's masks on the host, the loss
accumulators and the non-finite check live on the device. A non-finite loss sets a flag on the device that makes the
fused optimiser skip that update and every later one (``found_inf``, as ``torch.amp.GradScaler`` does); the next
logging step (or checkpoint, or epoch end) reads the flag and raises :class:`NonFiniteLossError` naming the step, so
the weights are still those before it and no checkpoint holds them. On the CPU, where reading a tensor costs
nothing, every step is checked at once and no update follows a non-finite loss.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mtanet.data import (
    ANNOTATION_DIR,
    FaceAugment,
    FrameDataset,
    TaskBalancedBatchSampler,
    annotation_fingerprint,
    build_packed_cache,
    packed_cache_key,
    read_split,
)
from mtanet.data.augment import finish_on_device
from mtanet.data.loading import FrameLoader, KeyedBatches, KeyedFrames, collate_batched
from mtanet.errors import CheckpointError, ConfigError, DataFormatError, NonFiniteLossError
from mtanet.evaluate import headline, predict_dataset, score_predictions, train_label_stats
from mtanet.losses import (GlobalBatch, UncertaintyWeighting, au_positive_weights, expression_class_weights,
                           make_weighting, task_losses)
from mtanet.models import MTANet, load_vggface2_senet50, save_checkpoint
from mtanet.runtime import cpu_model, git_info, json_clean, resolve_device, usable_cores, versions, write_json
from mtanet.train.config import TrainConfig, flatten
from mtanet.train.distributed import Distributed
from mtanet.train.optim import lr_factor, make_optimizer
from mtanet.train.preflight import require_cuda
from mtanet.provenance import training_provenance
from mtanet.train.pretrained import load_pretrained_backbone
from mtanet.train.state import (
    BEST_KEYS,
    CHECKPOINT,
    CONFIG_FILE,
    LOG_FILE,
    METRICS_FILE,
    JsonlLog,
    read_resume_checkpoint,
    rng_state,
    set_rng_state,
)

__all__ = ["train", "Trainer"]


def train(config: TrainConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Train MTANet as ``config`` says and return the content of ``metrics.json``.

    ``metrics.json`` holds: ``final`` (the last epoch's validation scores, the dicts of :mod:`mtanet.metrics`:
    ``va``, ``au`` at threshold 0.5 (the headline AU score), ``au_tuned`` with per-AU thresholds tuned on
    validation, ``expr``, ``mean``), ``final_headline`` (their single numbers), ``au_thresholds`` (the tuned ones,
    also stored in every checkpoint), ``best`` (per key of :data:`BEST_KEYS`: score, epoch, step, checkpoint file),
    ``history`` (headline scores per epoch), ``config``, ``data`` (frame counts), ``versions``, ``git``,
    ``hardware``, ``wall_time_s``, ``images_per_s`` and, under DDP, ``ddp`` (world size and the largest
    difference of the final weights across ranks, which must be 0).

    Raises:
        ConfigError: an invalid config (an empty ``data_root`` included), or resuming with a config that changes
            what the run computes.
        DeviceUnavailableError: the requested device is not there.
        NonFiniteLossError: a NaN/inf loss (message names stage, epoch and step).
        FileExistsError: ``output_dir`` holds a run and ``resume`` is False.
        CheckpointError: ``last.pt`` exists but cannot be read.
    """
    trainer = Trainer(config)
    try:
        return trainer.run()
    finally:
        trainer.close()


class Trainer:
    """One training run; :func:`train` is ``Trainer(config).run()``. See the module docstring for the recipe.

    Attributes after construction: ``config``, ``device``, ``model`` (the plain :class:`mtanet.models.MTANet`, also
    under DDP), ``train_frames``/``val_frames`` (frame tables), ``au_names``, ``expr_names``.
    """

    def __init__(self, config: TrainConfig | Mapping[str, Any]):
        self._saved_globals = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
        self.dist = Distributed.from_env()
        self.log = None
        try:
            self._setup(config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config))
        except BaseException:
            self.close()  # leave the process (a notebook kernel, say) as it was
            raise

    # ------------------------------------------------------------------------------------------------------ setup

    def _setup(self, cfg: TrainConfig) -> None:
        started = time.perf_counter()
        self.config = cfg
        if not cfg.data_root:
            raise ConfigError("TrainConfig.data_root is empty: give an Aff-Wild2 root (`mtanet synth ROOT` writes "
                              "the synthetic twin)")
        cfg.check_world(self.dist.world)  # a global batch the ranks cannot share is refused before anything runs
        # the device first: a missing GPU must fail before minutes of data loading, naming why it is missing
        if cfg.device.strip().lower().startswith("cuda"):
            require_cuda(f"TrainConfig.device={cfg.device!r}")
        self.device = resolve_device(cfg.device, self.dist.local_rank if self.dist.active else None)
        self.cuda = self.device.type == "cuda"
        self.amp = self.cuda if cfg.amp is None else cfg.amp
        self.channels_last = self.cuda if cfg.channels_last is None else cfg.channels_last
        self.device_augment = self.cuda if cfg.device_augment is None else cfg.device_augment
        # A non-finite loss skips the update on the device (fused optimisers' found_inf) instead of being read on the
        # host every step: on a GPU that read would wait for the whole step. On the CPU nothing waits, so each step
        # is checked at once (and the optimisers keep their default, unfused kernels, the numbers of earlier runs).
        self.guard_on_device = self.cuda
        cores = max(1, usable_cores() // self.dist.local_world)
        self.threads = cfg.threads or cores
        self.num_workers = default_workers(cores, self.cuda) if cfg.num_workers is None else cfg.num_workers
        torch.set_num_threads(self.threads)
        deterministic = (not self.cuda) if cfg.deterministic is None else cfg.deterministic
        apply_determinism(deterministic, self.cuda)
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.dist.start(self.cuda)
        self.global_batch = GlobalBatch.from_process_group() if self.dist.active else None

        self.out = Path(cfg.output_dir)
        ckpt = self._prepare_output()
        self._setup_data()
        if ckpt is not None:
            self._check_same_data(ckpt)
        self._setup_model(resuming=ckpt is not None)

        # position in the run and what it has measured so far; a checkpoint overrides all of it
        self.epoch, self.batches_done, self.step, self.opt_stage = 0, 0, 0, None
        # mean training losses of the last stage-1 epoch and the s they set (init_log_var="stationary")
        self.stage1_losses: dict[str, float | None] | None = None
        self.stationary_start: dict[str, float] | None = None
        self.optimizer = None
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, dict[str, Any]] = {}
        self.last_val: dict[str, Any] | None = None
        self.au_thresholds: list[float] | None = None
        # data_wait: the part of "train" spent waiting for the loader's next batch (on a GPU, time it idles for data)
        self.timing = {"setup": 0.0, "train": 0.0, "data_wait": 0.0, "validation": 0.0, "total": 0.0, "sessions": 0}
        self.images_trained = 0
        n_acc = len(cfg.tasks) + 1
        self.acc_window = torch.zeros(2, n_acc, dtype=torch.float64, device=self.device)  # sums, counts
        self.acc_epoch = torch.zeros(2, n_acc, dtype=torch.float64, device=self.device)
        # which accumulator entries a step fills, for every pattern of tasks with labels: copied to the device here,
        # once, since a copy from pageable memory inside a step would wait for the GPU
        self._present = {key: torch.tensor([*key, True], dtype=torch.float64).to(self.device)
                         for key in itertools.product((False, True), repeat=len(cfg.tasks))}
        # the first step whose loss was not finite on some rank (0: none), those ranks and this rank's losses there
        self.first_bad = torch.zeros((), dtype=torch.int64, device=self.device)
        self.bad_ranks = torch.zeros(self.dist.world, device=self.device)
        self.bad_losses = torch.zeros(n_acc, dtype=torch.float64, device=self.device)
        # images/s of a log window counts training time only (validation falls between epochs)
        self.window_started, self.window_time, self.window_steps = time.perf_counter(), 0.0, 0
        # dropout streams differ per rank; rank 0's equals a one-process run's
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        log_offset = self._restore(ckpt) if ckpt is not None else 0
        self.log = JsonlLog(self.out / LOG_FILE, log_offset, self.dist.main)
        # An explicit generator: otherwise each new loader iterator draws its worker seed from the global torch RNG,
        # which would shift the dropout stream whenever a resumed run starts mid-epoch.
        self.loader = FrameLoader(  # a worker's error (a corrupt jpg) is raised as itself
            KeyedFrames(self.train_set, self.augment, uint8=self.device_augment),
            batch_sampler=KeyedBatches(self.sampler, cfg.seed),
            collate_fn=collate_batched, num_workers=self.num_workers, pin_memory=self.cuda,
            persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
        self.timing["setup"] += time.perf_counter() - started
        self.timing["sessions"] += 1
        self._session_started = started

    def _prepare_output(self) -> dict[str, Any] | None:
        """Refuse to overwrite a run unless resuming; drop temporary files of interrupted writes; read last.pt."""
        cfg, out = self.config, self.out
        if not cfg.resume and any((out / f).exists() for f in (CHECKPOINT, LOG_FILE, METRICS_FILE)):
            raise FileExistsError(f"{out} already holds a training run; pass resume=True (--resume) to continue it, "
                                  "or choose another output folder")
        self.dist.barrier()  # every rank has looked before rank 0 writes anything
        if self.dist.main:
            out.mkdir(parents=True, exist_ok=True)
            # Leftovers of this run's writes killed half-way (mtanet.runtime.atomic_path names them .<file>.*.tmp),
            # and no other file. They are never read: checkpoints are only ever read under their final name, which
            # os.replace gives a file only once it is complete.
            for name in (CHECKPOINT, CONFIG_FILE, METRICS_FILE, *(f"best_{key}.pt" for key in BEST_KEYS)):
                for tmp in list(out.glob(f".{name}.*.tmp")):
                    tmp.unlink(missing_ok=True)
        self.dist.barrier()
        if cfg.resume and (out / CHECKPOINT).exists():
            return read_resume_checkpoint(out / CHECKPOINT, cfg)
        if self.dist.main:
            write_json(out / CONFIG_FILE, cfg.to_dict())
        return None

    def _setup_data(self) -> None:
        cfg = self.config
        self.root = Path(cfg.data_root).expanduser()
        train_table = read_split(self.root, "train", allow_cross_task_leak=cfg.allow_cross_task_leak)
        val_table = read_split(self.root, "val")
        self.edition = train_table.edition
        self.au_names, self.expr_names = tuple(self.edition.au_names), tuple(self.edition.expr_names)
        self.train_frames, self.val_frames = train_table.frames, val_table.frames
        self.train_stats = train_label_stats(self.train_frames, self.au_names, len(self.expr_names))

        self.augment = FaceAugment(cfg.image_size, cfg.aug_flip, cfg.aug_crop_scale, cfg.aug_brightness,
                                   cfg.aug_contrast) if cfg.augment else None
        self.train_set = FrameDataset(self.train_frames, self.root, self.au_names, image_size=cfg.image_size,
                                      transform=self.augment)
        self.val_set = FrameDataset(self.val_frames, self.root, self.au_names, image_size=cfg.image_size)
        for split, ds in (("train", self.train_set), ("val", self.val_set)):
            self._require_labels(split, ds)
        self.data_fingerprint = annotation_fingerprint(self.root, edition=self.edition)
        targets, masks = self.train_set.targets, self.train_set.masks
        # label weights live on the device once, not copied there every step
        self.expr_weight = _to(expression_class_weights(targets["expr"][masks["expr"]], len(self.expr_names),
                                                        cfg.expr_class_weight), self.device)
        self.au_pos_weight = _to(au_positive_weights(targets["au"][masks["au"]], cfg.au_pos_weight), self.device)
        if cfg.cache_dir:
            for name, ds in (("train", self.train_set), ("val", self.val_set)):
                # the name pins the root and each image file (path, size, mtime, inode): never another's pixels
                path = Path(cfg.cache_dir).expanduser() / f"{name}-{packed_cache_key(ds)}.npy"
                ds.packed = self.dist.main_first(lambda ds=ds, path=path: build_packed_cache(ds, path))
        self.sampler = TaskBalancedBatchSampler(
            {t: masks[t] for t in cfg.tasks}, cfg.batch_size, tasks=cfg.tasks, num_batches=cfg.steps_per_epoch,
            seed=cfg.seed, num_replicas=self.dist.world, rank=self.dist.rank)
        self.steps_per_epoch = self.sampler.num_batches

    def _require_labels(self, split: str, ds: FrameDataset) -> None:
        """Refuse, before any training, a trained task without a labeled frame with an image in ``split``: it could
        not be learnt (train) or scored (val: null scores and no ``best_<task>.pt``). Leaving it out of ``tasks`` is
        the user's explicit choice."""
        for task in self.config.tasks:
            if ds.masks[task].any():
                continue
            folder = self.root / ANNOTATION_DIR / self.edition.task_dirs[task] / self.edition.split_dirs[split]
            others = [t for t in self.config.tasks if t != task]
            fix = f"add {task} labels there" + (f", or leave {task} out: tasks={','.join(others)} "
                                                f"(--tasks {','.join(others)})" if others else "")
            effect = "learnt" if split == "train" else "scored (null scores, no best checkpoint)"
            raise DataFormatError(folder, None, f"no {split} frame has both an image and a label for {task}, so {task} "
                                                f"could not be {effect}; {fix}")

    def _check_same_data(self, ckpt: Mapping[str, Any]) -> None:
        """Refuse to resume on other data than the run's; a moved or copied root (the same annotation fingerprint)
        is accepted, and ``config.json`` then names the new root, as ``metrics.json`` will."""
        path = self.out / CHECKPOINT
        saved = ckpt.get("data") or {}
        old_root = saved.get("root") or str(Path(flatten(ckpt["train_config"]).get("data_root", "")).expanduser())
        if "annotations_sha256" not in saved:  # a checkpoint written before fingerprints: the path must match
            if Path(old_root).resolve() != self.root.resolve():
                raise ConfigError(f"cannot resume {path} on data_root {self.root}: the run was trained on {old_root}; "
                                  "resume with that data_root or start a new output folder")
            return
        if saved["annotations_sha256"] != self.data_fingerprint:
            raise ConfigError(f"cannot resume {path} on data_root {self.root}: its annotation files differ from those "
                              f"the run was trained on ({old_root}); resume with that data, or start a new output "
                              "folder")
        if self.dist.main and Path(old_root).resolve() != self.root.resolve():
            config = self.out / CONFIG_FILE
            recorded = json.loads(config.read_text()) if config.is_file() else self.config.to_dict()
            write_json(config, {**recorded, "data_root": self.config.data_root})

    def _setup_model(self, resuming: bool = False) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in every run with this seed
        self.model = MTANet(cfg.backbone, num_outputs={t: self.edition.num_outputs[t] for t in cfg.tasks},
                            pooling=cfg.pooling, feature_dim=cfg.feature_dim, dropout=cfg.dropout,
                            pretrained=cfg.pretrained == "imagenet")
        if cfg.vggface2_weights:
            load_vggface2_senet50(self.model, cfg.vggface2_weights)
        # a resumed run takes its weights from the checkpoint, and the record of its start from there too: the
        # starting file need not be there any more
        self.pretrained_record = None if resuming else load_pretrained_backbone(self.model, cfg.pretrained)
        if resuming and cfg.pretrained not in ("", "imagenet"):
            self.model.set_input_norm("vggface2")  # its buffers come with the checkpoint; its config says so too
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # one weighting object per kind, shared by the stages that use it (eq. 5's s carries over)
        self.weightings = {
            kind: make_weighting(kind, cfg.tasks, **({"init_log_var": self._fixed_init_log_var()}
                                                     if kind == "uncertainty" else {})).to(self.device)
            for kind in sorted({s.weighting for s in cfg.stages})}
        net = self.dist.wrap(self.model, self.device)
        self.net = torch.compile(net) if cfg.compile else net

    # ------------------------------------------------------------------------------------------------------ the loop

    def stage_of(self, epoch: int) -> int:
        """1 or 2: the stage a (0-based) epoch belongs to."""
        return 1 if epoch < self.config.stage1.epochs else 2

    def _weighting(self, stage: int):
        return self.weightings[self.config.stages[stage - 1].weighting]

    def _fixed_init_log_var(self) -> float:
        """The start of every ``s``: the configured number, or 0 until :meth:`_start_at_stationary_point` moves it."""
        value = self.config.init_log_var
        return 0.0 if value == "stationary" else float(value)

    def _start_at_stationary_point(self, stage: int) -> None:
        """``init_log_var="stationary"``: as stage ``stage`` begins with eq. 5 after the plain sum, set each task's
        ``s`` to ``s* = log(2 c L)`` for its mean training loss ``L`` over the last epoch of the stage before (the
        global batch's mean, the same on every rank). With the paper's stage-2 rate (1e-4, momentum 0.9: a time
        constant of about 2,000 steps, see chapter 03) ``s`` would hardly leave 0, the plain sum's weights; started
        at ``s*`` it is at eq. 5's optimum for the losses stage 2 inherits and follows them from there."""
        if self.config.init_log_var != "stationary" or stage < 2 or self.stage1_losses is None:
            return
        weighting = self._weighting(stage)
        if not isinstance(weighting, UncertaintyWeighting) or \
                self.config.stages[stage - 2].weighting == "uncertainty":
            return
        start = weighting.stationary_log_vars({t: self.stage1_losses.get(f"loss_{t}") for t in weighting.tasks})
        with torch.no_grad():
            for i, t in enumerate(weighting.tasks):
                if start[t] is not None:
                    weighting.log_vars[i] = start[t]
        self.stationary_start = {t: float(weighting.log_vars[i].detach()) for i, t in enumerate(weighting.tasks)}

    def _start_stage(self, stage: int, state: Mapping[str, Any] | None = None) -> None:
        cfg = self.config
        if state is None:  # a fresh start of the stage (a resumed one restores s with the checkpoint)
            self._start_at_stationary_point(stage)
        self.optimizer = make_optimizer(cfg.stages[stage - 1], self.model, self._weighting(stage),
                                        momentum=cfg.momentum, lr_log_vars=cfg.lr_log_vars,
                                        fused=self.guard_on_device)
        if state is not None:
            self.optimizer.load_state_dict(state)
        self.opt_stage = stage

    def run(self) -> dict[str, Any]:
        """Train to the end (or from the checkpoint to the end) and return ``metrics.json``'s content."""
        for epoch in range(self.epoch, self.config.total_epochs):
            stage = self.stage_of(epoch)
            if self.opt_stage != stage:
                self._start_stage(stage)
            self._train_epoch(epoch, stage)
            self._end_epoch(epoch, stage)
        return self._finish()

    def _train_epoch(self, epoch: int, stage: int) -> None:
        cfg, tasks = self.config, self.config.tasks
        weighting = self._weighting(stage)
        stage_start = (0 if stage == 1 else cfg.stage1.epochs) * self.steps_per_epoch
        stage_steps = cfg.stages[stage - 1].epochs * self.steps_per_epoch
        self.sampler.load_state_dict({"epoch": epoch, "seed": cfg.seed}, batches_done=self.batches_done)
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.batches_done, desc=f"stage {stage} epoch {epoch + 1}",
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True)
        started = self.window_started = time.perf_counter()
        batches = iter(self.loader)
        while True:
            waited = time.perf_counter()
            batch = next(batches, None)
            self.timing["data_wait"] += time.perf_counter() - waited
            if batch is None:
                break
            step = self.step + 1
            factor = lr_factor(cfg.lr_schedule, step - 1 - stage_start, stage_steps, cfg.warmup_steps)
            self._train_step(batch, weighting, factor, stage, epoch)
            self.step, self.batches_done, self.window_steps = step, self.batches_done + 1, self.window_steps + 1
            self.images_trained += cfg.batch_size
            bar.update(1)
            if step % cfg.log_every == 0:
                self._raise_if_nonfinite(stage, epoch)
                self._log_step(stage, epoch, weighting, bar)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and self.batches_done < self.steps_per_epoch:
                self._raise_if_nonfinite(stage, epoch)
                self._save_checkpoint()  # the epoch's last step is saved by the epoch end, after validation
        self._raise_if_nonfinite(stage, epoch)
        bar.close()
        self.window_time += time.perf_counter() - self.window_started
        self.timing["train"] += time.perf_counter() - started

    def _train_step(self, batch, weighting, lr_factor_now: float, stage: int, epoch: int) -> None:
        """One optimiser step on one batch, without waiting for the device: nothing here reads a device tensor on
        the host (tested by counting the operations that would, see tests/test_gpu_path.py)."""
        cfg, tasks = self.config, self.config.tasks
        if len(batch) == 4:  # uint8 images and their photometric factors: the float arithmetic on the device
            images, factors, targets, masks = batch
            images = finish_on_device(images.to(self.device, non_blocking=True),
                                      None if factors is None else factors.to(self.device, non_blocking=True),
                                      cfg.image_size)
        else:
            images, targets, masks = batch
            images = images.to(self.device, non_blocking=True)
        # which tasks have labels: read from the host copy of the masks (numpy, never a device sync); over the global
        # batch under DDP every task has labels (the sampler gives each task a share of every global batch)
        has_labels = [True] * len(tasks) if self.global_batch is not None else \
            [bool(masks[t].numpy().any()) for t in tasks]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {t: targets[t].to(self.device, non_blocking=True) for t in tasks}
        masks = {t: masks[t].to(self.device, non_blocking=True) for t in tasks}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            pred = self.net(images)
        # losses in float32: a CCC of bf16 moments is too coarse
        losses = task_losses({t: pred[t].float() for t in tasks}, targets, masks, expr_weight=self.expr_weight,
                             au_pos_weight=self.au_pos_weight, global_batch=self.global_batch)
        labeled = {t: losses[t] for t, has in zip(tasks, has_labels) if has}
        # Tasks without labels in this slice stay out of the weighting (eq. 5's 0.5*s would still pull on them)
        # but their zero losses keep every head in the graph, as DDP needs.
        total = weighting(labeled) if labeled else 0.0
        total = total + sum(losses[t] for t in tasks if t not in labeled)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        row = torch.stack([losses[t].detach() for t in tasks] + [total.detach()]).double()
        stopped = self._flag_nonfinite(row)
        if self.guard_on_device:
            self.optimizer.found_inf = stopped.float()  # the fused kernels skip the update when it is 1
        else:
            self._raise_if_nonfinite(stage, epoch)  # read at once on the CPU: before anything is updated
        self.dist.average_grads(weighting.parameters())
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           cfg.grad_clip, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor_now
        self.optimizer.step()

        present = self._present[tuple(has_labels)]
        for acc in (self.acc_window, self.acc_epoch):
            acc[0] += row * present
            acc[1] += present

    def _flag_nonfinite(self, row: torch.Tensor) -> torch.Tensor:
        """Record, on the device, the first step whose total loss is not finite on some rank; returns the sticky
        "stopped" flag (a device bool). Under DDP the ranks' flags are summed, so every rank stops together and can
        say which rank stopped them."""
        flags = torch.zeros(self.dist.world, device=self.device)
        flags[self.dist.rank] = (~torch.isfinite(row[-1])).float()
        flags = self.dist.sum(flags)
        new = (self.first_bad == 0) & (flags.sum() > 0)
        self.first_bad = torch.where(new, self.step + 1, self.first_bad)
        self.bad_ranks = torch.where(new, flags, self.bad_ranks)
        self.bad_losses = torch.where(new, row, self.bad_losses)
        return self.first_bad > 0

    def _raise_if_nonfinite(self, stage: int, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` if a step's loss was not finite (a host read of the device flag)."""
        step = int(self.first_bad)
        if not step:
            return
        losses = self.bad_losses.tolist()
        parts = ", ".join(f"{t}={v:.4g}" for t, v in zip(self.config.tasks, losses))
        if self.dist.active:  # every rank stops; each names the rank(s) whose loss was not finite
            bad = [rank for rank, value in enumerate(self.bad_ranks.tolist()) if value]
            what, mine = f"on rank {', '.join(map(str, bad))} of {self.dist.world}", f"rank {self.dist.rank}'s"
        else:
            what, mine = str(losses[-1]), "task"
        raise NonFiniteLossError(
            f"non-finite loss {what} at stage {stage}, epoch {epoch + 1}, step {step} ({mine} losses: {parts}); "
            f"stopped before this step's update. The last checkpoint "
            f"({self.out / CHECKPOINT}) holds an earlier step; lower the learning rate or check the data")

    def _mean_losses(self, acc: torch.Tensor) -> dict[str, float | None]:
        sums, counts = self.dist.sum(acc).cpu().tolist()
        names = [f"loss_{t}" for t in self.config.tasks] + ["loss_total"]
        return {n: (s / c if c else None) for n, s, c in zip(names, sums, counts)}

    @staticmethod
    def _weights_row(weighting) -> dict[str, Any]:
        row = {f"w_{t}": w for t, w in weighting.weights().items()}
        if hasattr(weighting, "sigmas"):
            row.update({f"sigma_{t}": s for t, s in weighting.sigmas().items()})
        return row

    def _log_step(self, stage: int, epoch: int, weighting, bar) -> None:
        losses = self._mean_losses(self.acc_window)
        self.acc_window.zero_()
        seconds = self.window_time + time.perf_counter() - self.window_started
        self.log.write({"kind": "step", "stage": stage, "epoch": epoch + 1, "step": self.step, **losses,
                        "lr": self.optimizer.param_groups[0]["lr"], **self._weights_row(weighting),
                        "images_per_s": self.window_steps * self.config.batch_size / max(seconds, 1e-9)})
        bar.set_postfix(loss=f"{losses['loss_total']:.3f}" if losses["loss_total"] is not None else "-")
        self.window_started, self.window_time, self.window_steps = time.perf_counter(), 0.0, 0

    # ------------------------------------------------------------------------------------------------------ epoch end

    def _end_epoch(self, epoch: int, stage: int) -> None:
        self.dist.sync_buffers(self.model)
        train_losses = self._mean_losses(self.acc_epoch)
        self.acc_epoch.zero_()
        if stage == 1:
            self.stage1_losses = train_losses
        every, last = self.config.val_every, epoch + 1 == self.config.total_epochs
        validate = last or (every > 0 and (epoch + 1) % every == 0)
        started = time.perf_counter()
        scores = self._validate() if validate else None
        val_seconds = time.perf_counter() - started
        self.timing["validation"] += val_seconds
        self.epoch, self.batches_done = epoch + 1, 0
        if self.dist.main:
            row = {"kind": "epoch", "stage": stage, "epoch": epoch + 1, "step": self.step, **train_losses,
                   "lr": self.optimizer.param_groups[0]["lr"], **self._weights_row(self._weighting(stage))}
            if scores is not None:
                self._record_validation(epoch, stage, scores)
                row.update({**{f"val_{k}": v for k, v in headline(scores).items()}, "val": scores,
                            "val_seconds": val_seconds})
            self.log.write(row)
        self._save_checkpoint()

    def _record_validation(self, epoch: int, stage: int, scores: dict[str, Any]) -> None:
        """Scores of the epoch into the history; the ``best_<key>.pt`` checkpoints they beat are replaced."""
        self.last_val = scores
        self.au_thresholds = scores["au_tuned"]["thresholds"] if "au_tuned" in scores else None
        head = headline(scores)
        self.history.append({"epoch": epoch + 1, "stage": stage, "step": self.step, **head})
        for key in BEST_KEYS:
            value = head.get(key)
            if value is not None and (key not in self.best or value > self.best[key]["score"]):
                self.best[key] = {"score": value, "epoch": epoch + 1, "step": self.step,
                                  "checkpoint": f"best_{key}.pt"}
                self._save_model(self.out / f"best_{key}.pt", {"scores": scores, "epoch": epoch + 1,
                                                                "step": self.step})

    def _validate(self) -> dict[str, Any]:
        """Predict the validation images (split across ranks) and score them on rank 0."""
        cfg = self.config
        indices = self.dist.shard(len(self.val_set))
        pred = predict_dataset(self.model, self.val_set, indices,
                               batch_size=cfg.eval_batch_size or 2 * cfg.batch_size // self.dist.world,
                               device=self.device, num_workers=self.num_workers, amp=self.amp,
                               channels_last=self.channels_last, progress=cfg.progress and self.dist.main,
                               desc="validation")
        pred = self.dist.gather_predictions(indices, pred)
        return score_predictions(self.val_set.frames, pred) if self.dist.main else {}

    # ------------------------------------------------------------------------------------------------------ checkpoints

    def _save_model(self, path: Path, extra: Mapping[str, Any]) -> None:
        save_checkpoint(self.model, path, {
            "train_config": self.config.to_dict(), "au_thresholds": self.au_thresholds,
            "au_names": list(self.au_names), "expr_names": list(self.expr_names), "edition": self.edition.name,
            "train_label_stats": self.train_stats,
            "data": {"root": str(self.root.resolve()), "annotations_sha256": self.data_fingerprint}, **extra})

    def _save_checkpoint(self) -> None:
        """Everything a resumed run needs, written atomically by rank 0 (every rank contributes its RNG state and its
        loss accumulators: each rank sums the losses of its own slice)."""
        per_rank = self.dist.gather((rng_state(self.cuda), self.acc_window.cpu(), self.acc_epoch.cpu()))
        if not self.dist.main:
            return
        timing = {**self.timing, "total": self.timing["total"] + time.perf_counter() - self._session_started}
        self._save_model(self.out / CHECKPOINT, {
            "position": {"epoch": self.epoch, "batches_done": self.batches_done, "step": self.step,
                         "optimizer_stage": self.opt_stage},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"name": self.config.lr_schedule, "step": self.step},
            "weightings": {k: w.state_dict() for k, w in self.weightings.items()},
            "sampler": {**self.sampler.state_dict(), "epoch": self.epoch, "batches_done": self.batches_done},
            "rng": [rng for rng, _, _ in per_rank],
            "accumulators": {"window": [window for _, window, _ in per_rank],
                             "epoch": [epoch for _, _, epoch in per_rank], "window_steps": self.window_steps},
            "log_offset": self.log.offset,
            "history": self.history, "best": self.best, "last_val": self.last_val,
            "stage1_losses": self.stage1_losses, "stationary_start": self.stationary_start,
            "timing": timing, "images_trained": self.images_trained, "pretrained": self.pretrained_record,
        })

    def _restore(self, ckpt: Mapping[str, Any]) -> int:
        """Continue where ``ckpt`` stopped; returns the log's byte offset at that point."""
        pos = ckpt["position"]
        rng = ckpt["rng"]
        if len(rng) != self.dist.world:
            raise CheckpointError(f"{self.out / CHECKPOINT} was written by {len(rng)} rank(s), this run has "
                              f"{self.dist.world}; resume with the same number of processes")
        self.model.load_state_dict(ckpt["state_dict"])
        for k, state in ckpt["weightings"].items():
            self.weightings[k].load_state_dict(state)
        self.epoch, self.batches_done, self.step = pos["epoch"], pos["batches_done"], pos["step"]
        if pos["optimizer_stage"] is not None and self.epoch < self.config.total_epochs \
                and pos["optimizer_stage"] == self.stage_of(self.epoch):
            self._start_stage(pos["optimizer_stage"], ckpt["optimizer"])
        window, epoch = ckpt["accumulators"]["window"], ckpt["accumulators"]["epoch"]
        if isinstance(window, list):  # one per rank (older checkpoints hold rank 0's only)
            window, epoch = window[self.dist.rank], epoch[self.dist.rank]
        self.acc_window.copy_(window)
        self.acc_epoch.copy_(epoch)
        self.window_steps = ckpt["accumulators"]["window_steps"]
        self.history, self.best, self.last_val = list(ckpt["history"]), dict(ckpt["best"]), ckpt["last_val"]
        self.stage1_losses, self.stationary_start = ckpt.get("stage1_losses"), ckpt.get("stationary_start")
        self.au_thresholds = ckpt["au_thresholds"]
        self.timing = dict(ckpt["timing"])
        self.images_trained = ckpt["images_trained"]
        self.pretrained_record = ckpt.get("pretrained")
        set_rng_state(rng[self.dist.rank])
        return int(ckpt["log_offset"])

    # ------------------------------------------------------------------------------------------------------ the end

    def _finish(self) -> dict[str, Any]:
        ddp = self.dist.weight_spread(self.model)
        metrics = None
        if self.dist.main:
            metrics = json_clean(self._metrics(ddp))
            write_json(self.out / METRICS_FILE, metrics)
        return self.dist.from_main(metrics)

    def _uncertainty_record(self) -> dict[str, Any] | None:
        """Where eq. 5 ended: each task's learned ``s = log sigma^2``, the mean training loss ``L`` of the last
        stage-2 epoch, the stationary point ``s* = log(2 c L)`` of ``c exp(-s) L + s/2`` for that loss (``c`` = 1/2
        for regression, 1 for classification) and ``s - s*``: near 0 when stage 2 was long enough for the weights to
        be learned, near ``-s*`` when the log-variances hardly moved from 0 (the summed loss in disguise)."""
        weighting = self.weightings.get("uncertainty")
        if weighting is None or not (self.out / LOG_FILE).is_file():
            return None
        rows = [json.loads(line) for line in (self.out / LOG_FILE).read_text().splitlines() if line.strip()]
        last = next((r for r in reversed(rows) if r.get("kind") == "epoch" and r.get("stage") == 2), None)
        s = {t: float(weighting.log_vars[i].detach()) for i, t in enumerate(weighting.tasks)}
        record: dict[str, Any] = {"log_vars": s, "init_log_var": self.config.init_log_var,
                                  "start_log_vars": self.stationary_start or
                                  {t: self._fixed_init_log_var() for t in weighting.tasks}}
        if last is not None:
            loss = {t: last.get(f"loss_{t}") for t in weighting.tasks}
            star = weighting.stationary_log_vars(loss)
            record.update(stage2_last_epoch_loss=loss, stationary_log_vars=star,
                          distance={t: None if star[t] is None else s[t] - star[t] for t in weighting.tasks})
        return record

    def _metrics(self, ddp: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.config
        timing = {**self.timing, "total": self.timing["total"] + time.perf_counter() - self._session_started}
        return {
            "final": self.last_val,
            "final_headline": headline(self.last_val or {}),
            "final_epoch": self.epoch,
            "au_thresholds": self.au_thresholds,
            "au_headline": "'au' binarises at 0.5 and is the headline; 'au_tuned' uses per-AU thresholds tuned on "
                           "the same validation frames (optimistic), saved with every checkpoint",
            "best": self.best,
            "history": self.history,
            "steps": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "images_trained": self.images_trained,
            "images_per_s": self.images_trained / timing["train"] if timing["train"] else None,
            # share of the training loop spent waiting for data (on a GPU: the share it idles for input)
            "data_wait_share": timing["data_wait"] / timing["train"] if timing["train"] else None,
            "config": cfg.to_dict(),
            "data": {
                "root": str(self.root), "edition": self.edition.name, "annotations_sha256": self.data_fingerprint,
                "train_images": len(self.train_set), "val_images": len(self.val_set),
                "train_labeled": {t: int(self.train_set.masks[t].sum()) for t in cfg.tasks},
                "val_labeled": {t: int(self.val_set.masks[t].sum()) for t in cfg.tasks},
            },
            "versions": versions(),
            "git": git_info(),
            "pretrained": self.pretrained_record,
            "uncertainty": self._uncertainty_record(),
            # the same block as beside every predictions CSV and in evaluate's scores.json (mtanet.provenance)
            "provenance": training_provenance(
                self.root, str(self.device), au_thresholds=self.au_thresholds, pretrained=self.pretrained_record,
                checkpoint=(self.out / "last.pt") if (self.out / "last.pt").is_file() else None),
            "hardware": {
                "device": str(self.device),
                "device_name": torch.cuda.get_device_name(self.device) if self.cuda else cpu_model(),
                "cpu": cpu_model(), "cpu_cores": usable_cores(), "torch_threads": self.threads,
                "num_workers": self.num_workers, "device_augment": self.device_augment,
                "world_size": self.dist.world, "amp_bf16": self.amp,
                "channels_last": self.channels_last, "compile": cfg.compile,
            },
            "wall_time_s": timing,
            "ddp": ddp,
        }

    def close(self) -> None:
        """Close the log, leave the process group, restore torch's global settings."""
        if self.log is not None:
            self.log.close()
        self.dist.stop()
        threads, deterministic = self._saved_globals
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def apply_determinism(deterministic: bool, cuda: bool) -> None:
    """torch's deterministic algorithms on or off; on CUDA also cuBLAS's workspace and cuDNN's algorithm choice.

    cuBLAS is deterministic only with a fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, kept when the user set
    it), read when its first handle is created: this runs before the run's first matrix product, but a process that
    ran one before (a notebook kernel) keeps its workspace. ``warn_only``: an op without a deterministic CUDA kernel
    warns, naming itself, instead of stopping the run (benchmarks/gpu_check.py lists them).
    """
    if cuda and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if cuda:
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def default_workers(cores: int, cuda: bool) -> int:
    """Loader processes of a rank that has ``cores`` cores: on a GPU all but one (the main process launches the
    kernels), at most 8; on the CPU none, the main process decodes (measured on 2 cores: one worker was 4-7% slower
    than none)."""
    return min(8, max(1, cores - 1)) if cuda else 0


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)
