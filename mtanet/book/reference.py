"""The committed reference sweep: ``python -m mtanet.book --reference-sweep`` (``make reference-sweep``).

The ablation chapter's verdicts rest on a sweep too long for a book build (hours on 2 cores), run once, resumably,
and committed as one small JSON file (``book/results/ablations-reference.json``): one record per run with its row,
seed, configuration, scores on the twin's test split and their video-level intervals, the learned log-variances of
eq. 5, wall time, commit, package versions and hardware (:func:`mtanet.book.sweep.collect`'s columns).

Its settings live in ``notebooks/params/05_ablations/reference.yaml``: the chapter's parameters (shared by every
run) plus ``rows``, ``seeds``, ``more_seeds`` (seeds added to some rows only) and ``jobs``. The `cpu` profile of
the chapter uses the same shared settings, so its runs repeat reference runs exactly (the reproducibility check on
the page).

Runs go seed by seed (every row's seed 0, then every row's seed 1, ...), so that a sweep stopped at any point holds
complete pairs for the comparisons, and the JSON is rewritten after every finished run: stop it at any time (kill
included), commit the file, and start it again later to go on (finished runs are skipped). The committed file is
itself a resume point: on a fresh clone, whose results folder is empty, the runs it holds are kept and not run again
(:func:`committed_runs`), so adding rows or seeds to the settings runs only what is new. A file written with other
shared settings, another family or other data is refused, never mixed in or overwritten.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mtanet import synth
from mtanet.book import sweep
from mtanet.data import annotation_fingerprint
from mtanet.errors import ConfigError
from mtanet.runtime import project_root, work_root

__all__ = ["SETTINGS", "OUTPUT", "settings", "shared_parameters", "more_seeds", "seeds_of", "plan_reference",
           "committed_runs", "export", "run_reference"]

#: The reference sweep's parameters, relative to the checkout.
SETTINGS = Path("notebooks") / "params" / "05_ablations" / "reference.yaml"
#: The committed result, relative to the checkout.
OUTPUT = Path("book") / "results" / "ablations-reference.json"
#: Keys of the settings file that are not parameters of the training chapter.
_MACHINE_PATHS = ("data_root", "output_dir", "cache_dir")
_SWEEP_KEYS = ("rows", "seeds", "more_seeds", "jobs", "family", "reference", "results_dir", "extra_rows", "margin")


def settings(path: str | Path | None = None) -> dict[str, Any]:
    """The settings file as a mapping (see :data:`SETTINGS`)."""
    from mtanet.train.config import read_yaml_mapping

    return dict(read_yaml_mapping(Path(path) if path else project_root() / SETTINGS))


def shared_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """What every run of the sweep shares: the settings without the sweep's own keys, the data root resolved."""
    shared = {k: v for k, v in values.items() if k not in _SWEEP_KEYS}
    shared["data_root"] = str(synth.resolve_data_root(shared.pop("data_root", ""), shared.get("synth_size", "cpu")))
    shared.setdefault("train_options", {})
    return shared


def _int_list(value: Any, what: str) -> list[int]:
    """A list of distinct integers (seeds), or a ConfigError naming ``what``."""
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{what} must be a list of integers, got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{what} lists a seed twice: {value!r}")
    return list(value)


def more_seeds(values: dict[str, Any]) -> dict[str, list] | None:
    """The settings' ``more_seeds`` (``{"rows": [...], "seeds": [...]}``: seeds added to the rows it names, where a
    finer comparison is wanted than the shared seeds resolve), checked; None when there is none.

    Raises:
        ConfigError: it is not that mapping of two lists, names a row not in ``rows`` or twice, or repeats a seed (of
            its own or of ``seeds``).
    """
    more = values.get("more_seeds")
    if more is None:
        return None
    if not isinstance(more, dict) or set(more) != {"rows", "seeds"} or not isinstance(more["rows"], list):
        raise ConfigError(f"more_seeds must be a mapping {{rows: [...], seeds: [...]}} of two lists, got {more!r}")
    seeds = _int_list(more["seeds"], "more_seeds.seeds")
    unknown = [str(row) for row in more["rows"] if row not in values["rows"]]
    twice = sorted({str(row) for row in more["rows"] if more["rows"].count(row) > 1})
    shared_seeds = _int_list(values["seeds"], "seeds")
    again = [seed for seed in seeds if seed in shared_seeds]
    if unknown or twice or again:
        raise ConfigError("more_seeds: " + "; ".join(
            ([f"rows not in the sweep's rows: {', '.join(unknown)}"] if unknown else [])
            + ([f"rows named twice: {', '.join(twice)}"] if twice else [])
            + ([f"seeds already in seeds: {again}"] if again else [])))
    return {"rows": list(more["rows"]), "seeds": seeds}


def seeds_of(values: dict[str, Any]) -> dict[str, list[int]]:
    """Each row's seeds, in the order they run: ``seeds`` for every row, then :func:`more_seeds`'s for the rows it
    names."""
    shared_seeds = _int_list(values["seeds"], "seeds")
    seeds = {row: list(shared_seeds) for row in values["rows"]}
    more = more_seeds(values)
    for row in (more or {}).get("rows", []):
        seeds[row] += more["seeds"]
    return seeds


def plan_reference(values: dict[str, Any], rows: Sequence[str] | None = None) -> tuple[list[sweep.SweepRun], Path]:
    """The runs, seed by seed (every row's seed, in the settings' row order, before the next seed; the shared seeds
    before ``more_seeds``), and the results folder (the one chapter 05 would use for the same settings).

    Raises:
        ConfigError: ``rows`` names a row the settings do not hold (its seeds are unknown).
    """
    shared = shared_parameters(values)
    family = values.get("family", "small")
    chosen = list(rows or values["rows"])
    seeds = seeds_of(values)
    if unknown := [row for row in chosen if row not in seeds]:
        raise ConfigError(f"rows not in the reference settings' rows: {', '.join(map(str, unknown))}")
    every_seed = list(dict.fromkeys(seed for row in chosen for seed in seeds[row]))
    runs = [run for seed in every_seed
            for run in sweep.plan([row for row in chosen if seed in seeds[row]], [seed], shared, family=family)]
    return runs, sweep.results_folder(shared, family)


def _shown(shared: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in shared.items() if k != "data_root"}


def _named(runs: pd.DataFrame) -> str:
    return ", ".join(f"{r}/seed{s}" for r, s in zip(runs["row"], runs["seed"]))


def committed_runs(values: dict[str, Any], output: Path, fingerprint: str | None = None) -> pd.DataFrame:
    """Every run ``output`` holds, once it is shown to belong to this sweep (none when there is no such file).
    ``fingerprint``: the digest of the settings' annotations, when the caller has it already.

    Raises:
        ConfigError: naming ``output``: it is no reference sweep's results file (not JSON, no ``meta`` or ``runs``,
            records without ``row``, ``seed``, ``config`` or ``data_sha256``); it was written with other shared
            settings (those that change what a run computes) or another family; it holds a run twice, or runs
            without the digest of their annotations, or trained on other annotations than the settings' data root
            holds. Its runs are then another experiment or a damaged record, to be mended or moved away, never mixed in.
    """
    if not output.is_file():
        return pd.DataFrame(columns=["row", "seed"])
    try:
        runs, meta = sweep.read_summary(output)
        if not isinstance(meta, dict) or not isinstance(meta.get("shared"), dict):
            raise TypeError("no meta.shared mapping")
        missing = [c for c in ("row", "seed", "config", "data_sha256") if c not in runs.columns]
        if len(runs) and missing:
            raise KeyError(f"records without {', '.join(missing)}")
        if len(runs) and runs["seed"].isna().any():
            raise ValueError("records without a seed")
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{output}: not a reference sweep's results file ({err}); move it away to start "
                          "afresh") from None
    shared, family = _shown(shared_parameters(values)), values.get("family", "small")
    theirs = meta["shared"]
    differ = sorted(k for k in (set(theirs) | set(shared)) - sweep.EXECUTION_FIELDS if theirs.get(k) != shared.get(k))
    if differ or meta.get("family") != family:
        what = [f"{k} {theirs.get(k)!r} there, {shared.get(k)!r} in the settings" for k in differ]
        if meta.get("family") != family:
            what.insert(0, f"family {meta.get('family')!r} there, {family!r} in the settings")
        raise ConfigError(f"{output}: its runs were made with other settings ({'; '.join(what)}); move it away to "
                          "start afresh, or pass --output")
    if runs.empty:
        return pd.DataFrame(columns=["row", "seed"])
    runs["seed"] = runs["seed"].astype(int)
    twice = runs[runs.duplicated(["row", "seed"], keep="first")]
    if len(twice):
        raise ConfigError(f"{output}: runs recorded twice: {_named(twice)}; keep one record of each")
    no_digest = runs[runs["data_sha256"].isna()]
    if len(no_digest):
        raise ConfigError(f"{output}: runs without the digest of their annotations: {_named(no_digest)}; they cannot "
                          "be shown to use this data")
    fingerprint = fingerprint or annotation_fingerprint(_data_root(values))
    other = runs[runs["data_sha256"] != fingerprint]
    if len(other):
        raise ConfigError(f"{output}: runs trained on other annotations ({', '.join(sorted(set(other['data_sha256'])))}"
                          f") than {_data_root(values)} holds ({fingerprint}): {_named(other)}; move it away to "
                          "start afresh, or pass --output")
    return runs


def _data_root(values: dict[str, Any]) -> str:
    """The data root the settings resolve to (the twin of their ``synth_size`` when they name none)."""
    return shared_parameters(values)["data_root"]


#: Notebook parameters and the :class:`mtanet.train.TrainConfig` fields (``metrics.json``'s ``config``) they set.
_CONFIG_OF = {"backbone": ("backbone",), "image_size": ("image_size",), "batch_size": ("batch_size",),
              "steps_per_epoch": ("steps_per_epoch",), "pooling": ("pooling",), "tasks": ("tasks",),
              "seed": ("seed",), "stage1_epochs": ("stage1", "epochs"), "stage2_epochs": ("stage2", "epochs"),
              "stage2_weighting": ("stage2", "weighting"), "lr_schedule": ("lr_schedule",)}


def _disagreements(config: Any, parameters: dict[str, Any]) -> list[str]:
    """Where a record's ``config`` differs from what its planned run's parameters would set."""
    if not isinstance(config, dict):
        return ["no config recorded"]
    wanted = {_CONFIG_OF[k]: v for k, v in parameters.items() if k in _CONFIG_OF}
    wanted.update({(k,): v for k, v in (parameters.get("train_options") or {}).items()})
    out = []
    for path, value in wanted.items():
        there: Any = config
        for key in path:
            there = there.get(key) if isinstance(there, dict) else None
        if there != value:
            out.append(f"{'.'.join(path)} {there!r}, planned {value!r}")
    return out


def _check_against_plan(committed: pd.DataFrame, runs: Sequence[sweep.SweepRun], output: Path) -> None:
    """Refuse committed records of a planned (row, seed) whose configuration is not what the plan now runs (a row or
    a family redefined since): they would be kept as if they were the new experiment."""
    planned = {(run.row, run.seed): dict(run.parameters) for run in runs}
    odd = []
    for record in committed.to_dict("records"):
        parameters = planned.get((record["row"], int(record["seed"])))
        if parameters is not None and (why := _disagreements(record.get("config"), parameters)):
            odd.append(f"{record['row']}/seed{record['seed']} ({'; '.join(why)})")
    if odd:
        raise ConfigError(f"{output}: runs recorded with another configuration than the settings plan for them: "
                          f"{', '.join(odd)}; move the file away to start afresh, or pass --output")


def export(values: dict[str, Any], results_dir: Path, output: Path) -> int:
    """Write the finished runs of ``results_dir`` (of the settings' rows and seeds) and every record ``output``
    already holds that none of them replaces (:func:`committed_runs`: rows since left out of the settings and runs
    scored on another checkpoint included; nothing is dropped) to ``output``; returns how many runs it holds.

    Raises:
        ConfigError: a finished run of ``results_dir`` was trained on other annotations than the settings' data root
            holds (a twin written again at the same path): naming its folder.
    """
    runs = sweep.collect(results_dir, values["rows"])
    seeds = seeds_of(values)
    planned = pd.Series([int(seed) in seeds.get(row, []) for row, seed in zip(runs["row"], runs["seed"])],
                        index=runs.index, dtype=bool)
    runs = runs[planned]
    fingerprint = annotation_fingerprint(_data_root(values))
    stale = runs[runs["data_sha256"] != fingerprint]
    if len(stale):
        raise ConfigError(f"{', '.join(stale['folder'])}: trained on other annotations than "
                          f"{_data_root(values)} holds; move these runs away and start again")
    # the record is committed: no path of the machine that ran it (same_settings ignores these fields anyway)
    runs = runs.assign(config=[{k: v for k, v in (c or {}).items() if k not in _MACHINE_PATHS}
                               for c in runs["config"]]).drop(columns=["folder"])
    kept = committed_runs(values, output, fingerprint)
    here = set(zip(runs["row"], runs["seed"].astype(int)))
    kept = kept[[(r, int(s)) not in here for r, s in zip(kept["row"], kept["seed"])]]
    runs = sweep.in_row_order(pd.concat([runs, kept], ignore_index=True) if len(kept) else runs)
    shared = shared_parameters(values)
    bounds_file = Path(shared["data_root"]) / synth.CEILING_FILE
    bounds = json.loads(bounds_file.read_text())["splits"].get("test") if bounds_file.is_file() else None
    sweep.write_summary(runs, output, shared=_shown(shared), family=values.get("family", "small"),
                        rows=list(values["rows"]), seeds=list(values["seeds"]),
                        **({"more_seeds": more} if (more := more_seeds(values)) else {}), bounds=bounds,
                        written=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    return len(runs)


def run_reference(values: dict[str, Any], output: Path, *, rows: Sequence[str] | None = None, hours: float = 0.0,
                  notebook: Path | None = None, log: Any = print) -> int:
    """Run the reference sweep's unfinished runs, ``jobs`` at a time, seed by seed, rewriting ``output`` after each
    group that ran; start none after ``hours`` (0: no limit). Returns the number of finished runs in ``output``."""
    runs, results_dir = plan_reference(values, rows)
    committed = committed_runs(values, output)
    _check_against_plan(committed, runs, output)
    # a record scored on another checkpoint is run again, and the new run replaces it in the file
    at_end = committed[committed["checkpoint"] == sweep.SCORED_CHECKPOINT] if "checkpoint" in committed else \
        committed.iloc[0:0]
    done = set(zip(at_end["row"], at_end["seed"].astype(int)))
    again = [r.key for r in runs if (r.row, r.seed) in set(zip(committed["row"], committed["seed"])) - done]
    runs = [run for run in runs if (run.row, run.seed) not in done]
    if again:
        log(f"reference sweep: {', '.join(again)} were scored on another checkpoint than {sweep.SCORED_CHECKPOINT}: "
            "run again, their records replaced")
    jobs = max(1, int(values.get("jobs", 1)))
    shown = results_dir.relative_to(work_root()) if results_dir.is_relative_to(work_root()) else results_dir
    log(f"reference sweep: {len(runs)} runs to go ({len(done)} already in {output.name}), {jobs} at a time, into "
        f"{shown}; results -> {output}")
    started = time.monotonic()
    for first in range(0, len(runs), jobs):
        if hours and time.monotonic() - started > hours * 3600:
            log(f"reference sweep: stopped after {hours} h; run it again to go on")
            break
        status = sweep.run_sweep(runs[first:first + jobs], results_dir, notebook=notebook, jobs=jobs,
                                 drop_tags=("report",), log=log)
        if (status["status"] == "ran").any():
            log(f"  {export(values, results_dir, output)} runs in {output.name}")
    finished = export(values, results_dir, output)
    log(f"reference sweep: {finished} finished runs in {output}")
    return finished
