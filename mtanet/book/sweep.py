"""Ablation sweeps: the training notebook executed once per configuration and seed, and the table they make.

A sweep is a list of :class:`SweepRun` (a row of the table, a seed, and the training notebook's parameters). Each
run gets its own folder ``<results>/<row>/seed<k>/`` holding

- ``sweep_run.json``: the row, the seed and the exact parameters, written before the run starts;
- ``run.ipynb``: the training notebook as papermill executed it (its narrative, tables and, unless dropped, figures);
- ``metrics.json``: written by :func:`mtanet.train.train` at the end (the scores, the config, versions, hardware);
- ``kernel.log``: the kernel process's own stderr (start-up warnings; a native crash would show here).

That folder is the results channel: :func:`collect` reads ``metrics.json`` files, nothing else, so every number of
the table comes from a stored run. A run whose ``metrics.json`` exists is skipped, so an interrupted sweep resumes
where it stopped; the run that was cut off restarts from its own ``last.pt`` (the notebook trains with
``resume=True``), and its finished neighbours are not redone. A folder whose ``sweep_run.json`` holds other
parameters is an error, never silently reused: results of two configurations must not share a row.

Runs execute on this machine (``jobs`` kernels at a time) or, with ``run_sweep(..., executor="slurm", slurm={...})``,
as one Slurm job array submitted through submitit; each job executes its run into the same folder the same way, so
both paths leave the same files and either can resume the other's sweep.

Rows (:data:`ROWS`) follow the paper: Table I's three backbones, and the comparisons it discusses without
tabulating them (sum-only fine-tuning against eq. 5's uncertainty weighting, each single-task network against the
multi-task one, average pooling against the avg+max neck). Every row changes one thing against ``senet``, the
paper's configuration. Backbones come from a family (:data:`FAMILIES`): the paper's 50-layer networks, or matched
half-width 26-layer members of the same designs for CPU budgets.

Any :class:`mtanet.train.TrainConfig` field can be varied, not only the training notebook's parameters: a row's
``train_options`` (and a ``train_options`` mapping among the shared parameters, for every run) reach the notebook's
``train_options`` parameter, which it merges into its config last. A parameter the notebook does not declare is an
error before anything runs, never a value that is silently ignored.
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mtanet.book.build import execute
from mtanet.errors import ConfigError, NotebookFailed, SweepConflict
from mtanet.runtime import atomic_path, json_clean, project_root, usable_cores, work_root, write_json
from mtanet.train import BEST_KEYS, CHECKPOINT, TrainConfig

__all__ = [
    "EXECUTORS",
    "FAMILIES",
    "HOW_NOT_WHAT",
    "EXECUTION_FIELDS",
    "in_row_order",
    "KERNEL_LOG_FILE",
    "METRICS",
    "METRICS_FILE",
    "HELD_OUT_FILE",
    "SCORED_CHECKPOINT",
    "check_scored_at_end",
    "NOTEBOOK_FILE",
    "ROWS",
    "CONTRASTS",
    "Contrast",
    "TABLE_I_ROWS",
    "contrasts",
    "reproducibility",
    "same_settings",
    "RUN_FILE",
    "SWEEP_OWNED",
    "Row",
    "SweepConflict",
    "SweepRun",
    "against_reference",
    "collect",
    "formatted",
    "notebook_parameters",
    "plan",
    "read_summary",
    "results_folder",
    "run_sweep",
    "summarize",
    "write_summary",
]

RUN_FILE = "sweep_run.json"
NOTEBOOK_FILE = "run.ipynb"
METRICS_FILE = "metrics.json"
#: Written by the training chapter after training: the scores on held-out data nothing was chosen on (the twin's test
#: split; a fold of validation on real data), with the checkpoint and AU thresholds chosen on validation.
HELD_OUT_FILE = "held_out.json"
KERNEL_LOG_FILE = "kernel.log"

#: Backbone of each Table I design, per family. ``paper``: the paper's networks. ``small``: half-width ResNet-26
#: bottleneck networks with the same block designs (SE, ResNeXt with 32 groups, ResNeXt + CBAM), for CPU budgets.
#: Besides Table I's three designs, the two that make a 2 x 2 factorial of attention (none, SE) and cardinality (1,
#: 32) with CBAM beside SE: ``resnet`` and ``seresnext``. In the ``paper`` family ``se`` is the paper's SENet-50,
#: whose VGGFace2 port also puts the stride on the first 1x1 convolution (the others on the 3x3); the ``small`` family
#: differs only in the block.
FAMILIES: dict[str, dict[str, str]] = {
    "paper": {"resnet": "resnet50", "se": "senet50", "resnext": "resnext50", "seresnext": "seresnext50",
              "resnext_cbam": "resnext50_cbam"},
    "small": {"resnet": "resnet26_half", "se": "seresnet26_half", "resnext": "resnext26_half",
              "seresnext": "seresnext26_half", "resnext_cbam": "resnext26_half_cbam"},
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One configuration of the table: what it changes against the reference row ``senet``."""

    name: str
    label: str
    group: str
    #: notebook parameters this row sets; ``backbone`` names a design of :data:`FAMILIES`, resolved per family
    changes: Mapping[str, Any]
    #: the tasks this row is scored on (a single-task network only has its own head)
    tasks: tuple[str, ...] = ("va", "au", "expr")
    #: :class:`mtanet.train.TrainConfig` fields this row sets beyond the notebook's parameters (any field, e.g.
    #: ``{"stage2_lr": 3e-4}``); they reach the notebook's ``train_options`` parameter and win over its own settings
    train_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: share of the sweep's steps per epoch this row trains (a single-task row at 1/3 sees as many frames of its
    #: task as the three-task network, whose batches give each task a third)
    step_share: float = 1.0
    #: factor on the shared parameters' ``stage2_epochs`` (3: stage 2 three times as long as the other rows')
    stage2_share: float = 1.0


#: The rows, in table order. ``senet`` is the paper's full configuration; :data:`CONTRASTS` says which rows are
#: compared and what each comparison answers.
ROWS: dict[str, Row] = {r.name: r for r in (
    Row("senet", "SE-ResNet (paper's MTANet)", "backbone", {"backbone": "se"}),
    Row("resnet", "ResNet (no attention)", "backbone", {"backbone": "resnet"}),
    Row("resnext", "ResNeXt", "backbone", {"backbone": "resnext"}),
    Row("seresnext", "SE-ResNeXt", "backbone", {"backbone": "seresnext"}),
    Row("resnext_cbam", "ResNeXt + CBAM", "backbone", {"backbone": "resnext_cbam"}),
    Row("sum_only", "summed loss in both stages", "loss weighting", {"backbone": "se", "stage2_weighting": "sum"}),
    Row("fixed_weights", "eq. 5 with s fixed at 0: weights (0.5, 1, 1)", "loss weighting", {"backbone": "se"},
        train_options={"init_log_var": 0.0, "lr_log_vars": 0.0}),
    Row("va_only", "valence-arousal only, equal steps", "single task", {"backbone": "se", "tasks": ["va"]}, ("va",)),
    Row("au_only", "action units only, equal steps", "single task", {"backbone": "se", "tasks": ["au"]}, ("au",)),
    Row("expr_only", "expressions only, equal steps", "single task", {"backbone": "se", "tasks": ["expr"]},
        ("expr",)),
    Row("va_only_frames", "valence-arousal only, equal frames", "single task", {"backbone": "se", "tasks": ["va"]},
        ("va",), step_share=1 / 3),
    Row("au_only_frames", "action units only, equal frames", "single task", {"backbone": "se", "tasks": ["au"]},
        ("au",), step_share=1 / 3),
    Row("expr_only_frames", "expressions only, equal frames", "single task", {"backbone": "se", "tasks": ["expr"]},
        ("expr",), step_share=1 / 3),
    Row("avg_pool", "average pooling only", "neck", {"backbone": "se", "pooling": "avg"}),
    Row("avgmax_add", "avg + max added, not concatenated", "neck", {"backbone": "se", "pooling": "avgmax_add"}),
    Row("eq5_long", "eq. 5 learned, stage 2 three times longer", "loss weighting", {"backbone": "se"},
        stage2_share=3),
    Row("sum_long", "summed loss in both stages, stage 2 three times longer", "loss weighting",
        {"backbone": "se", "stage2_weighting": "sum"}, stage2_share=3),
)}
_ROW_RANK = {name: i for i, name in enumerate(ROWS)}

#: The paper's Table I rows, in its order.
TABLE_I_ROWS: tuple[str, ...] = ("resnext", "resnext_cbam", "senet")


@dataclasses.dataclass(frozen=True)
class Contrast:
    """One comparison: ``row`` minus ``versus``, two rows that differ in the factor ``question`` names."""

    row: str
    versus: str
    question: str


_STEPS = "at equal steps (the single-task network sees 3x the frames of its task)"
_FRAMES = "at equal frames of its task (a third of the steps)"

#: Every comparison the chapter reads, each isolating one factor (the first two are the paper's Table I reading,
#: where two factors change at once: the table says so beside them).
CONTRASTS: tuple[Contrast, ...] = (
    Contrast("resnext_cbam", "senet", "Table I as printed: ResNeXt + CBAM vs SENet (cardinality and attention "
                                      "type change together)"),
    Contrast("resnext", "senet", "Table I as printed: ResNeXt vs SENet (cardinality 32 without attention vs SE at "
                                 "cardinality 1: two factors)"),
    Contrast("senet", "resnet", "SE attention at cardinality 1"),
    Contrast("seresnext", "resnext", "SE attention at cardinality 32"),
    Contrast("resnext_cbam", "resnext", "CBAM attention at cardinality 32"),
    Contrast("resnext_cbam", "seresnext", "CBAM vs SE attention at cardinality 32"),
    Contrast("resnext", "resnet", "cardinality 32 vs 1, no attention"),
    Contrast("sum_only", "senet", "the plain sum in stage 2 vs eq. 5 learned"),
    Contrast("fixed_weights", "senet", "eq. 5's starting weights (0.5, 1, 1) held fixed vs learned"),
    *(Contrast(f"{t}_only", "senet", f"one network for {t} vs one for three, {_STEPS}") for t in ("va", "au", "expr")),
    *(Contrast(f"{t}_only_frames", "senet", f"one network for {t} vs one for three, {_FRAMES}")
      for t in ("va", "au", "expr")),
    Contrast("avg_pool", "senet", "average pooling only vs the neck's avg + max"),
    Contrast("avgmax_add", "senet", "avg and max added vs concatenated"),
    Contrast("sum_long", "eq5_long", "the plain sum in stage 2 vs eq. 5 learned, stage 2 three times longer"),
    Contrast("eq5_long", "senet", "stage 2 with eq. 5 three times longer vs as long as the other rows'"),
)


def contrasts(rows: Iterable[str], extra: Iterable[str] = ()) -> list[Contrast]:
    """The :data:`CONTRASTS` whose two rows are both among ``rows``, and ``row`` vs ``senet`` for each of ``extra``
    (rows of the user's own, e.g. the notebook's ``extra_rows``)."""
    present = set(rows) | set(extra)
    chosen = [c for c in CONTRASTS if c.row in present and c.versus in present]
    chosen += [Contrast(r, "senet", "training options changed against senet") for r in extra if "senet" in present]
    return chosen


#: The columns :func:`collect` reads from each run's final validation scores, per task.
METRICS: dict[str, tuple[str, ...]] = {
    "va": ("valence", "arousal", "va"),
    "au": ("au", "au_f1", "au_accuracy"),
    "expr": ("expr", "expr_f1", "expr_accuracy"),
}


#: Parameters that change how a run executes, not what it computes: they may differ when a sweep is resumed, and
#: they do not name its results folder.
HOW_NOT_WHAT: frozenset[str] = frozenset({"cache_dir", "threads", "num_workers"})

#: Settings (parameters, and :class:`mtanet.train.TrainConfig` fields) that say where and how a run executed, not
#: what it computed: two runs that differ only in these are the same experiment. The reproducibility check compares
#: such runs across machines, and a committed reference sweep may be resumed with other values of them. Wider than
#: :data:`HOW_NOT_WHAT` (the device and the evaluation batch change the last bits of a score, so they still name
#: another results folder); narrower than :attr:`TrainConfig.RESUMABLE_CHANGES`, which also lets a training run resume
#: with mixed precision or compilation switched: those change more than the last bits, so runs that differ in them
#: are not repeats of one another.
EXECUTION_FIELDS: frozenset[str] = HOW_NOT_WHAT | frozenset({"data_root", "output_dir", "progress", "device", "resume",
                                                             "eval_batch_size", "log_every", "checkpoint_every"})

#: What the sweep decides for each run: neither the shared parameters' nor a row's ``train_options`` may set them
#: (a seed there would give every seed of a row the same run).
SWEEP_OWNED: frozenset[str] = frozenset({"seed", "output_dir", "resume"})


#: The checkpoint every sweep run is scored on, unless the shared parameters name another: a sweep compares whole
#: recipes, and a best epoch that falls in stage 1 would score, say, eq. 5 and the summed loss on the very same model.
SCORED_CHECKPOINT = "last.pt"


def _with_defaults(base: Mapping[str, Any]) -> dict[str, Any]:
    """The shared parameters with the sweep's defaults for what they leave out (:data:`SCORED_CHECKPOINT`)."""
    return {"held_out_checkpoint": SCORED_CHECKPOINT, **base}


def check_scored_at_end(runs: pd.DataFrame, rows: Iterable[str]) -> None:
    """Refuse to compare runs of ``rows`` that were not all scored on :data:`SCORED_CHECKPOINT`.

    Raises:
        ValueError: naming the runs scored on another checkpoint (a best epoch that may fall in stage 1, where rows
            that differ only in stage 2 are one model) or on none recorded (a run older than the record).
    """
    chosen = runs[runs["row"].isin(set(rows))]
    recorded = chosen["checkpoint"] if "checkpoint" in chosen else pd.Series(None, index=chosen.index, dtype=object)
    scored_on = recorded.where(recorded.notna(), "none recorded")
    odd = chosen.assign(checkpoint=scored_on)[scored_on != SCORED_CHECKPOINT]
    if len(odd):
        named = ", ".join(f"{r.row}/seed{r.seed} ({r.checkpoint})" for r in odd.itertuples())
        raise ValueError(f"runs not scored on {SCORED_CHECKPOINT}, so not comparable: {named}; rerun them with the "
                         "sweep's default held_out_checkpoint")


def _what_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that decide a run's results: :data:`HOW_NOT_WHAT` left out, also among ``train_options``."""
    out = {k: v for k, v in parameters.items() if k not in HOW_NOT_WHAT}
    if isinstance(out.get("train_options"), Mapping):
        options = {k: v for k, v in out["train_options"].items() if k not in HOW_NOT_WHAT}
        if options:
            out["train_options"] = options
        else:
            del out["train_options"]
    return out


def _what(record: Mapping[str, Any]) -> dict[str, Any]:
    return {**record, "parameters": _what_parameters(record["parameters"])}


def _check_train_options(options: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ConfigError` unless ``options`` are valid :class:`TrainConfig` fields the sweep does not own."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where}: train_options must be a mapping of TrainConfig fields, got {options!r}")
    owned = sorted(set(options) & SWEEP_OWNED)
    if owned:
        raise ConfigError(f"{where}: train_options sets {owned}, which the sweep sets for each run")
    try:
        TrainConfig.from_dict({"data_root": ".", **options})  # unknown keys and bad values fail here, not mid-sweep
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One execution of the training notebook: a row, a seed and the notebook's full parameters."""

    row: str
    seed: int
    parameters: Mapping[str, Any]

    @property
    def key(self) -> str:
        return f"{self.row}/seed{self.seed}"

    def folder(self, results_dir: str | os.PathLike[str]) -> Path:
        return Path(results_dir) / self.row / f"seed{self.seed}"

    def record(self) -> dict[str, Any]:
        return {"row": self.row, "seed": self.seed, "parameters": dict(self.parameters)}


def plan(rows: Iterable[str | Row], seeds: Iterable[int], base: Mapping[str, Any],
         family: str = "paper") -> list[SweepRun]:
    """The runs of a sweep: every row with every seed, on the training notebook's ``base`` parameters.

    Args:
        rows: names of :data:`ROWS`, or :class:`Row` objects (a row of your own, e.g. ``Row("lr3e-4", "stage 2 at
            3e-4", "learning rate", {"backbone": "se"}, train_options={"stage2_lr": 3e-4})``).
        seeds: training seeds (initialisation, batches, augmentation, dropout).
        base: parameters shared by every run (data, image size, batch, epochs, ...); a row's changes override them.
            Its ``train_options`` (TrainConfig fields, any of them) apply to every run; a row's ``train_options``
            are merged over them.
        family: a key of :data:`FAMILIES`, which resolves each row's backbone design to a network.

    Raises:
        ValueError: an unknown row, family or design, or seeds that are not distinct.
        mtanet.errors.ConfigError: ``train_options`` that are no TrainConfig fields, hold invalid values, or set
            what the sweep sets per run (:data:`SWEEP_OWNED`).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; choose one of {sorted(FAMILIES)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and not empty, got {seeds}")
    shared = {k: v for k, v in _with_defaults(base).items() if k != "train_options"}
    shared_options = base.get("train_options") or {}
    _check_train_options(shared_options, "the shared parameters")
    runs = []
    for entry in rows:
        row = entry if isinstance(entry, Row) else ROWS.get(entry)
        if row is None:
            raise ValueError(f"unknown row {entry!r}; choose from {list(ROWS)} or pass a Row")
        changes = dict(row.changes)
        if changes.get("backbone") not in FAMILIES[family]:
            raise ValueError(f"row {row.name!r}: its backbone must name a design of {sorted(FAMILIES[family])}, "
                             f"got {changes.get('backbone')!r}")
        changes["backbone"] = FAMILIES[family][changes["backbone"]]
        options = {**shared_options, **row.train_options}
        _check_train_options(options, f"row {row.name!r}")
        if row.step_share != 1.0 and shared.get("steps_per_epoch"):
            changes["steps_per_epoch"] = max(1, round(shared["steps_per_epoch"] * row.step_share))
        if row.stage2_share != 1.0:
            if "stage2_epochs" not in shared:
                raise ValueError(f"row {row.name!r} scales stage 2: the shared parameters must name stage2_epochs")
            changes["stage2_epochs"] = max(1, round(shared["stage2_epochs"] * row.stage2_share))
        for seed in seeds:
            # no train_options key when there are none: the records and folders of earlier sweeps stay valid
            runs.append(SweepRun(row.name, seed, {**shared, **changes, "seed": seed,
                                                  **({"train_options": options} if options else {})}))
    return runs


def notebook_parameters(notebook: str | os.PathLike[str]) -> set[str]:
    """The names a py:percent notebook's cell tagged ``parameters`` assigns (what papermill may set)."""
    import jupytext  # here, not at the top: only a sweep about to run reads notebooks, and jupytext is slow to import

    cells = [c for c in jupytext.read(Path(notebook)).cells if "parameters" in c.metadata.get("tags", ())]
    if len(cells) != 1:
        raise ValueError(f"{notebook}: needs exactly one cell tagged parameters, found {len(cells)}")
    names = set()
    for node in ast.parse(cells[0].source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _status(run: SweepRun, folder: Path) -> str:
    """``done`` (results stored), ``partial`` (started, no results) or ``new``; raises on other parameters."""
    record = folder / RUN_FILE
    if record.is_file():
        stored = json.loads(record.read_text())
        if _what(stored) != _what(json.loads(json.dumps(run.record()))):
            raise SweepConflict(f"{record}: this folder holds run {stored} but the sweep asks for {run.record()}; "
                                "move it away or use another results folder")
    elif folder.exists() and any(folder.iterdir()):
        raise SweepConflict(f"{folder}: not empty and has no {RUN_FILE}; not a run folder of a sweep")
    if (folder / METRICS_FILE).is_file():
        return "done"
    return "partial" if record.is_file() else "new"


def run_sweep(runs: Sequence[SweepRun], results_dir: str | os.PathLike[str], *,
              notebook: str | os.PathLike[str] | None = None, jobs: int = 1, drop_tags: Sequence[str] = (),
              keep_checkpoints: bool = False, timeout: int | None = None,
              log: Callable[[str], None] | None = print, executor: str = "local",
              slurm: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Execute every run that has no stored results; returns one row per run with its status and wall time.

    Runs execute on this machine by default. With ``executor="slurm"`` each run is a task of one Slurm job array
    submitted through submitit (installed separately: ``pip install submitit``); this process waits for them and
    returns the same table, and the run folders hold the same files, so resuming, :func:`collect` and a later local
    sweep over the same folder work alike. The results folder must be on a file system the compute nodes share, and
    the nodes must run this checkout's Python environment (submitit starts the jobs with this interpreter).

    Args:
        runs: from :func:`plan`.
        results_dir: where the run folders live (created).
        notebook: the py:percent notebook to execute; default: the book's training chapter.
        jobs: runs executed at the same time, each in its own kernel; each kernel then gets ``cores // jobs``
            torch threads unless the parameters set ``threads``. With ``executor="slurm"``: the most array tasks
            running at once (``slurm_array_parallelism``) unless ``slurm`` sets it; each run then gets the cores of
            its node that Slurm grants it (``cpus_per_task``).
        drop_tags: cells with any of these tags are left out of the executed runs (the training chapter tags its
            figures ``report``; a sweep only needs the scores).
        keep_checkpoints: keep each finished run's ``*.pt`` files (a sweep only needs ``metrics.json``; the
            checkpoints of a 50-layer network take about 100 MB each).
        timeout: seconds one cell may run.
        log: called with one line per started and finished run; ``None`` for silence.
        executor: ``"local"`` (this machine, ``jobs`` threads each driving a kernel) or ``"slurm"``.
        slurm: with ``executor="slurm"``, the submitit parameters: ``timeout_min`` (required: minutes one run may
            take; submitit's default of a few minutes would end most training runs), the generic ones of
            ``submitit.AutoExecutor`` (``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``name``, ...), Slurm's own
            with or without their ``slurm_`` prefix (``partition``, ``account``, ``additional_parameters``, ...),
            ``folder`` (submitit's scripts and job logs; default ``<results_dir>/_submitit/<job id>``) and
            ``cluster`` (default: Slurm; ``"local"`` runs the same jobs as local processes, for testing).

    Raises:
        SweepConflict: a run folder holds another configuration (checked for every run before anything starts).
        mtanet.errors.ConfigError: a run to execute has a parameter the notebook does not declare (a TrainConfig
            field belongs in ``train_options``); an unknown ``executor``, ``slurm`` parameters without
            ``executor="slurm"``, invalid submitit parameters, submitit not installed or no Slurm cluster found (all
            checked before any run starts).
        mtanet.errors.NotebookFailed: a run failed; the runs started before it still finish and keep their results.
        RuntimeError: a Slurm job ended without a result (time limit, cancelled, node failure); its run folder keeps
            its partial state and the next call resumes it.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"run_sweep: executor={executor!r} is not one of {list(EXECUTORS)}")
    if slurm is not None and executor != "slurm":
        raise ConfigError(f"run_sweep: slurm parameters are given but executor={executor!r}; "
                          "pass executor='slurm' to submit the runs through submitit")
    notebook = Path(notebook) if notebook else project_root() / "notebooks" / "04_training.py"
    results_dir = Path(results_dir)
    keys = [r.key for r in runs]
    if len(set(keys)) != len(keys):
        raise ValueError("two runs of the sweep share a row and a seed")
    statuses = {r.key: _status(r, r.folder(results_dir)) for r in runs}  # every conflict before any work
    todo = [r for r in runs if statuses[r.key] != "done"]
    if todo:  # papermill would inject an undeclared parameter as a variable nothing reads: refuse it instead
        declared = notebook_parameters(notebook)
        for run in todo:
            unknown = sorted(set(run.parameters) - declared)
            if unknown:
                hint = " (TrainConfig fields go in train_options)" if "train_options" in declared else ""
                raise ConfigError(f"{run.key}: {notebook.name} declares no parameter {', '.join(unknown)}{hint}")
    say = log or (lambda _: None)
    if executor == "slurm":
        submitter = _slurm_executor(slurm or {}, results_dir, jobs) if todo else None
        where = f"as a job array on {submitter.cluster}" if submitter is not None else "on Slurm"
        say(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run {where} "
            f"into {results_dir}")
        wall = _run_on_slurm(submitter, todo, results_dir, notebook, statuses, timeout=timeout,
                             drop_tags=tuple(drop_tags), keep_checkpoints=keep_checkpoints, say=say) if todo else {}
    else:
        threads = max(1, usable_cores() // max(1, jobs))
        say(f"sweep: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run with {jobs} at a "
            f"time into {results_dir}")
        wall = {}

        def one(run: SweepRun) -> None:
            folder = _prepare(run, results_dir)
            say(f"  start {run.key} ({'resuming' if statuses[run.key] == 'partial' else 'new'})")
            wall[run.key] = _execute_run(notebook, folder, run.parameters, threads=threads, timeout=timeout,
                                         drop_tags=tuple(drop_tags), keep_checkpoints=keep_checkpoints)
            say(f"  done  {run.key} in {wall[run.key]:.0f} s")

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [pool.submit(one, r) for r in todo]
            errors = [f.exception() for f in futures]  # waits for all: a failure does not cancel finished work
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
    return pd.DataFrame([{"run": r.key, "row": r.row, "seed": r.seed,
                          "status": "reused" if statuses[r.key] == "done" else "ran",
                          "seconds": wall.get(r.key)} for r in runs])


#: Where :func:`run_sweep` can execute runs.
EXECUTORS = ("local", "slurm")


def _prepare(run: SweepRun, results_dir: Path) -> Path:
    """The run's folder, created, with its record written before anything runs (what :func:`_status` checks)."""
    folder = run.folder(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / RUN_FILE, run.record())
    return folder


def _execute_run(notebook: Path, folder: Path, parameters: Mapping[str, Any], *, threads: int | None,
                 timeout: int | None, drop_tags: tuple[str, ...], keep_checkpoints: bool) -> float:
    """Execute one run's notebook into its folder (in this process's thread, or in a Slurm job); its wall time.

    ``threads=None``: the cores this process may use (a Slurm job's allocation).
    """
    parameters = {"threads": threads or usable_cores(), **parameters, "output_dir": str(folder.resolve())}
    seconds = execute(notebook, folder / NOTEBOOK_FILE, parameters, timeout=timeout, drop_tags=drop_tags,
                      kernel_log=folder / KERNEL_LOG_FILE)
    if not (folder / METRICS_FILE).is_file():
        raise RuntimeError(f"{folder / NOTEBOOK_FILE}: the notebook ran but wrote no {METRICS_FILE} in "
                           f"{folder}; it must train into its output_dir parameter")
    if not keep_checkpoints:  # the trainer's checkpoints only, never another .pt of the folder
        for name in (CHECKPOINT, *(f"best_{key}.pt" for key in BEST_KEYS)):
            (folder / name).unlink(missing_ok=True)
    return seconds


def _slurm_task(notebook: str, folder: str, parameters: dict[str, Any], timeout: int | None,
                drop_tags: tuple[str, ...], keep_checkpoints: bool) -> dict[str, Any]:
    """What one Slurm job runs: :func:`_execute_run`, its failure returned as a value.

    The error comes back as its class name and message, not as submitit's wrapped traceback, so the sweep raises
    the same :class:`NotebookFailed` as a local run (the traceback is in the run's ``run.ipynb`` and the job log).
    """
    try:
        return {"seconds": _execute_run(Path(notebook), Path(folder), parameters, threads=None, timeout=timeout,
                                        drop_tags=drop_tags, keep_checkpoints=keep_checkpoints)}
    except Exception as err:  # noqa: BLE001 - every failure is reported to the sweep, which raises it
        return {"error": type(err).__name__, "message": str(err)}


#: submitit.AutoExecutor's own parameters; any other key of ``slurm`` is Slurm's (prefixed ``slurm_`` if it is not)
_GENERIC_SUBMITIT = frozenset({"name", "timeout_min", "mem_gb", "nodes", "cpus_per_task", "gpus_per_node",
                               "tasks_per_node", "stderr_to_stdout"})


def _slurm_executor(slurm: Mapping[str, Any], results_dir: Path, jobs: int) -> Any:
    """A ``submitit.AutoExecutor`` set up from ``slurm`` (see :func:`run_sweep`); ConfigError on bad parameters."""
    try:
        import submitit  # here: only a sweep sent to Slurm needs it, and it is an optional package
    except ImportError:
        raise ConfigError("run_sweep: executor='slurm' needs the submitit package (pip install submitit)") from None
    if not isinstance(slurm, Mapping):
        raise ConfigError(f"run_sweep: slurm must be a mapping of submitit parameters, got {slurm!r}")
    options = dict(slurm)
    folder = Path(options.pop("folder", None) or results_dir / "_submitit" / "%j")
    cluster = options.pop("cluster", None)
    if "timeout_min" not in options:
        raise ConfigError("run_sweep: slurm needs timeout_min (minutes one run may take); submitit's default of a "
                          "few minutes would end most training runs")
    parameters = {"name": "mtanet-sweep", "slurm_array_parallelism": max(1, jobs)}
    for key, value in options.items():
        generic_or_prefixed = key in _GENERIC_SUBMITIT or key.split("_", 1)[0] in ("slurm", "local", "debug")
        parameters[key if generic_or_prefixed else f"slurm_{key}"] = value
    try:
        submitter = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except (RuntimeError, ValueError) as err:  # no sbatch/srun here, or an unknown cluster name
        raise ConfigError(f"run_sweep: executor='slurm': {err} (slurm={{'cluster': 'local'}} runs the jobs as "
                          "local processes)") from None
    try:
        submitter.update_parameters(**parameters)
    except (NameError, ValueError, TypeError) as err:
        raise ConfigError(f"run_sweep: slurm parameters rejected by submitit: {str(err).splitlines()[0]}") from None
    return submitter


def _run_on_slurm(submitter: Any, todo: Sequence[SweepRun], results_dir: Path, notebook: Path,
                  statuses: Mapping[str, str], *, timeout: int | None, drop_tags: tuple[str, ...],
                  keep_checkpoints: bool, say: Callable[[str], None]) -> dict[str, float]:
    """Submit ``todo`` as one job array, wait for every task, return their wall times; raise the first failure
    after all have ended (as the local path does: a failure does not cancel the others)."""
    import submitit.helpers

    folders = [_prepare(run, results_dir) for run in todo]
    jobs = submitter.map_array(
        _slurm_task, [str(notebook.resolve())] * len(todo), [str(f.resolve()) for f in folders],
        [dict(r.parameters) for r in todo], [timeout] * len(todo), [drop_tags] * len(todo),
        [keep_checkpoints] * len(todo))
    by_id = {job.job_id: run for job, run in zip(jobs, todo)}
    for job, run in zip(jobs, todo):
        say(f"  submitted {run.key} as job {job.job_id} "
            f"({'resuming' if statuses[run.key] == 'partial' else 'new'})")
    wall: dict[str, float] = {}
    failures: list[Exception] = []
    local = submitter.cluster in ("local", "debug")
    for job in submitit.helpers.as_completed(jobs, poll_frequency=1 if local else 30):
        run = by_id[job.job_id]
        try:
            outcome = job.result()
        except Exception as err:  # noqa: BLE001 - the job died: time limit, cancelled, out of memory, node failure
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            failures.append(RuntimeError(f"{run.key}: Slurm job {job.job_id} ended without a result ({first}); "
                                         f"its log: {job.paths.stderr}; the next sweep resumes this run"))
            say(f"  lost  {run.key} (job {job.job_id})")
            continue
        if "error" in outcome:
            kind = NotebookFailed if outcome["error"] == "NotebookFailed" else RuntimeError
            failures.append(kind(outcome["message"]) if kind is NotebookFailed
                            else kind(f"{run.key}: {outcome['error']}: {outcome['message']}"))
            say(f"  failed {run.key} (job {job.job_id})")
            continue
        wall[run.key] = outcome["seconds"]
        say(f"  done  {run.key} in {wall[run.key]:.0f} s (job {job.job_id})")
    if failures:
        raise failures[0]
    return wall


def _run_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The score columns of one run from a ``final``-like dict of ABAW score records (``metrics.json``'s ``final``,
    or ``held_out.json``'s ``scores``)."""
    final = metrics.get("final") or {}
    out: dict[str, float] = {}
    if "va" in final:
        out.update(valence=final["va"]["ccc_valence"], arousal=final["va"]["ccc_arousal"], va=final["va"]["score"])
    if "au" in final:
        out.update(au=final["au"]["score"], au_f1=final["au"]["f1_mean"], au_accuracy=final["au"]["accuracy"])
    if "expr" in final:
        out.update(expr=final["expr"]["score"], expr_f1=final["expr"]["f1_macro"],
                   expr_accuracy=final["expr"]["accuracy"])
    return out


def collect(results_dir: str | os.PathLike[str], rows: Iterable[str] | None = None) -> pd.DataFrame:
    """Every finished run under ``results_dir`` as one table row: row, seed, scores, where they were scored, cost.

    The scores are the held-out ones the training chapter wrote (:data:`HELD_OUT_FILE`: the twin's test split, with
    the thresholds chosen on validation), ``scored_on`` names that split and ``checkpoint`` the model scored (a sweep's
    runs score ``last.pt``, see :func:`plan`). A run without that file
    (made before it existed) gives the *last* epoch's validation scores (``metrics.json``'s ``final``), not the best
    epoch's, so no run is picked on the frames it is scored on; ``scored_on`` then says ``val (last epoch)``. Columns
    ``val_va``, ``val_au``, ``val_expr`` are always that last epoch's validation scores (the same model as
    ``last.pt``; AU at threshold 0.5). Runs without ``metrics.json`` (unfinished) are left out.
    """
    wanted = set(rows) if rows is not None else None
    records = []
    for record_path in sorted(Path(results_dir).glob(f"*/seed*/{RUN_FILE}")):
        folder = record_path.parent
        if not (folder / METRICS_FILE).is_file():
            continue
        record = json.loads(record_path.read_text())
        if wanted is not None and record["row"] not in wanted:
            continue
        metrics = json.loads((folder / METRICS_FILE).read_text())
        hardware = metrics.get("hardware") or {}
        held_out = folder / HELD_OUT_FILE
        intervals: dict[str, float] = {}
        # the same model's headline scores on the validation people (the trainer's last evaluation, no selection):
        # beside the test people's, they show how much a score owes to which people a split holds
        last_epoch = _run_metrics(metrics)
        if held_out.is_file():
            scored = json.loads(held_out.read_text())
            scores, scored_on = _run_metrics({"final": scored["scores"]}), scored["split"]
            checkpoint = scored.get("checkpoint")
            for task, ci in (scored.get("intervals") or {}).items():
                intervals.update({f"{task}_low": ci["low"], f"{task}_high": ci["high"]})
        else:
            scores, scored_on, checkpoint = last_epoch, "val (last epoch)", None
        validation = {f"val_{t}": v for t, v in last_epoch.items() if t in METRICS}
        uncertainty = metrics.get("uncertainty") or {}
        learned = {f"s_{t}": v for t, v in (uncertainty.get("log_vars") or {}).items()}
        learned.update({f"s_star_{t}": v for t, v in (uncertainty.get("stationary_log_vars") or {}).items()})
        provenance = metrics.get("provenance") or {}
        records.append({
            "row": record["row"], "seed": record["seed"], **scores, **intervals, **validation, "scored_on": scored_on,
            "checkpoint": checkpoint,
            "edition": (metrics.get("data") or {}).get("edition"),
            "backbone": metrics["config"]["backbone"], "image_size": metrics["config"]["image_size"],
            "steps": metrics.get("steps"), "train_seconds": (metrics.get("wall_time_s") or {}).get("total"),
            "device_name": hardware.get("device_name"), **learned,
            "data_sha256": (metrics.get("data") or {}).get("annotations_sha256"),
            "commit": (metrics.get("git") or provenance.get("mtanet") or {}).get("commit"),
            "versions": metrics.get("versions") or provenance.get("versions"),
            # the run's folder is the column "folder"; without it, two runs of one experiment have equal configs
            "config": {k: v for k, v in metrics["config"].items() if k != "output_dir"},
            "hardware": hardware or None,
            "folder": str(folder),
        })
    columns = ["row", "seed", *[m for ms in METRICS.values() for m in ms],
               *[f"{t}_{end}" for t in METRICS for end in ("low", "high")], *[f"val_{t}" for t in METRICS],
               "scored_on", "checkpoint", "edition",
               "backbone", "image_size", "steps", "train_seconds", "device_name",
               *[f"{kind}_{t}" for kind in ("s", "s_star") for t in METRICS], "data_sha256", "commit", "versions",
               "config", "hardware", "folder"]
    return in_row_order(pd.DataFrame.from_records(records, columns=columns))


def _row_rank(row: str) -> int:
    """A row's place in :data:`ROWS`; a row outside it (from another version of the project) comes after them all."""
    return _ROW_RANK.get(row, len(_ROW_RANK))


def in_row_order(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs sorted by row in :data:`ROWS` order, then by seed; rows outside :data:`ROWS` last, in name order."""
    ranked = runs.assign(_rank=runs["row"].map(_row_rank))
    return ranked.sort_values(["_rank", "row", "seed"], ignore_index=True).drop(columns="_rank")


def summarize(runs: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1) and number of seeds of each metric per row, in :data:`ROWS` order.

    Columns are a two-level index ``(metric, mean|std|n)``. A metric a row was not trained for is NaN.
    """
    metrics = list(metrics or [m for ms in METRICS.values() for m in ms])
    grouped = runs.groupby("row", sort=False)[metrics]
    table = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.count()}, axis=1)
    table = table.swaplevel(axis=1).reindex(columns=pd.MultiIndex.from_product([metrics, ["mean", "std", "n"]]))
    return table.loc[sorted(table.index, key=lambda r: (_row_rank(r), r))]


_ROUNDING = 1e-9  # scores live in [-1, 1]; spreads and differences below this are float rounding


def against_reference(runs: pd.DataFrame, reference: str = "senet", metrics: Sequence[str] = ("va", "au", "expr"),
                      z: float = 2.0) -> pd.DataFrame:
    """Each row's difference from the reference row per metric, against the seed noise.

    The noise of a difference of two means is its standard error ``sqrt(s_a^2/n_a + s_b^2/n_b)`` (seed standard
    deviations ``s``, ``n`` seeds); a difference counts as *larger than the seed noise* when it exceeds ``z`` of
    them (``z = 2`` is about a 95% two-sided interval when the noise is normal). The Welch t-test's p-value is given
    too. Needs at least two seeds per row.

    Returns one row per (row, metric) with: ``difference`` (row minus reference), ``noise`` (the standard error),
    ``ratio`` (difference / noise), ``p_value``, ``beyond_noise`` (bool).
    """
    ref = runs[runs["row"] == reference]
    if ref.empty:
        raise ValueError(f"the reference row {reference!r} has no finished runs")
    out = []
    for row in [r for r in dict.fromkeys(runs["row"]) if r != reference]:
        this = runs[runs["row"] == row]
        for metric in metrics:
            a, b = this[metric].dropna().to_numpy(float), ref[metric].dropna().to_numpy(float)
            if len(a) < 2 or len(b) < 2:
                continue
            diff = float(a.mean() - b.mean())
            noise = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
            # seeds that all land on the same score (e.g. the trivial AU predictor) differ by float rounding only:
            # that is no spread and no difference (else rounding jitter could count as beyond the seed noise)
            noise = 0.0 if noise < _ROUNDING else noise
            diff = 0.0 if abs(diff) < _ROUNDING else diff
            with warnings.catch_warnings():
                # one row's seeds all on the same score (its variance is rounding) is a valid case for Welch's test,
                # which then rests on the other row's spread; scipy warns of cancellation in that row's moments
                warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
                p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if noise > 0 else (0.0 if diff else 1.0)
            out.append({"row": row, "metric": metric, "difference": diff, "noise": noise,
                        "ratio": diff / noise if noise > 0 else math.copysign(math.inf, diff) if diff else 0.0,
                        "p_value": p, "beyond_noise": abs(diff) > z * noise})
    return pd.DataFrame(out, columns=["row", "metric", "difference", "noise", "ratio", "p_value", "beyond_noise"])


def formatted(summary: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``mean ± std`` strings per row and metric (``-`` where the row has no such score), for display."""
    cells = {}
    for metric in metrics:
        mean, std = summary[(metric, "mean")], summary[(metric, "std")]
        cells[metric] = [("-" if np.isnan(m) else f"{m:.{digits}f}" + ("" if np.isnan(s) else f" ± {s:.{digits}f}"))
                         for m, s in zip(mean, std)]
    return pd.DataFrame(cells, index=summary.index)


def results_folder(base: Mapping[str, Any], family: str, root: str | os.PathLike[str] | None = None) -> Path:
    """``runs/sweep/<synth_size>-<family>-<hash>`` under ``root`` (default :func:`mtanet.runtime.work_root`: the
    checkout, or ``$MTANET_WORK``): one folder per set of shared parameters.

    Changing a shared parameter (image size, epochs, ...) starts a new folder instead of clashing with the runs of
    the old one; adding rows or seeds keeps the folder, so finished runs are reused.
    """
    # the family's networks, not just its name, so a redefined family never meets the runs of the old one
    what = _what_parameters(_with_defaults(base))
    text = json.dumps({"family": family, "backbones": FAMILIES.get(family), **{k: what[k] for k in sorted(what)}},
                      sort_keys=True, default=str)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return Path(root or work_root()) / "runs" / "sweep" / f"{base.get('synth_size', 'data')}-{family}-{digest}"


_SAME = 1e-9  # scores closer than this are the same score (reruns differ in the last bits)


def same_settings(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Whether two runs' ``config`` dicts (``metrics.json``) describe the same experiment, execution fields aside."""
    if not isinstance(a, Mapping) or not isinstance(b, Mapping):
        return False
    keys = (set(a) | set(b)) - EXECUTION_FIELDS
    return all(a.get(k) == b.get(k) for k in keys)


def reproducibility(runs: pd.DataFrame, reference: pd.DataFrame,
                    metrics: Sequence[str] = ("va", "au", "expr")) -> pd.DataFrame:
    """Each run of ``runs`` beside the reference sweep's run of the same row and seed, when both ran the same
    experiment (:func:`same_settings`, same annotations): the two scores, their difference, and whether this run's
    score lies inside the reference run's video-bootstrap interval and inside the range of the reference row's
    seeds. Runs without such a twin in the reference are left out (an empty table: nothing comparable ran)."""
    lines = []
    by_key = {(r["row"], int(r["seed"])): r for r in reference.to_dict("records")}
    for run in runs.to_dict("records"):
        ref = by_key.get((run["row"], int(run["seed"])))
        if ref is None or not same_settings(run.get("config"), ref.get("config")) \
                or run.get("data_sha256") != ref.get("data_sha256"):
            continue
        seeds = reference[reference["row"] == run["row"]]
        for m in metrics:
            here, there = run.get(m), ref.get(m)
            if here is None or there is None or pd.isna(here) or pd.isna(there):
                continue
            low, high = ref.get(f"{m}_low"), ref.get(f"{m}_high")
            lines.append({"row": run["row"], "seed": int(run["seed"]), "metric": m, "here": float(here),
                          "reference": float(there), "diff": float(here) - float(there),
                          "in_video_interval": bool(low is not None and not pd.isna(low) and low <= here <= high),
                          # to the last bits: a rerun of the very run differs there (other CPU kernels, threads)
                          "in_seed_range": bool(seeds[m].min() - _SAME <= here <= seeds[m].max() + _SAME),
                          "reference_seeds": int(seeds[m].notna().sum())})
    return pd.DataFrame(lines, columns=["row", "seed", "metric", "here", "reference", "diff", "in_video_interval",
                                        "in_seed_range", "reference_seeds"])


def write_summary(runs: pd.DataFrame, path: str | os.PathLike[str], **meta: Any) -> Path:
    """Store a sweep's per-run scores and its context (parameters, hardware, time) as one small JSON file.

    This is what gets committed as a reference (e.g. a GPU sweep, ``book/results/ablations-gpu.json``): a few KB, no
    checkpoints, and :func:`read_summary` turns it back into the table :func:`collect` gives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(runs.drop(columns=["folder"], errors="ignore").to_json(orient="records"))
    text = json.dumps(json_clean({"meta": meta, "runs": records}), indent=1, default=str) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def read_summary(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The runs table and the context stored by :func:`write_summary`."""
    data = json.loads(Path(path).read_text())
    return pd.DataFrame.from_records(data["runs"]), data.get("meta", {})
