"""The committed reference sweep: ``python -m mtanet.book --reference-sweep`` (``make reference-sweep``).

The ablation chapter's verdicts rest on a sweep too long for a book build (hours on 2 cores), run once, resumably,
and committed as one small JSON file (``book/results/ablations-reference.json``): one record per run with its row,
seed, configuration, scores on the twin's test split and their video-level intervals, the learned log-variances of
eq. 5, wall time, commit, package versions and hardware (:func:`mtanet.book.sweep.collect`'s columns).

Its settings live in ``notebooks/params/05_ablations/reference.yaml``: the chapter's parameters (shared by every
run) plus ``rows``, ``seeds`` and ``jobs``. The `cpu` profile of the chapter uses the same shared settings, so its
runs repeat reference runs exactly (the reproducibility check on the page).

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

__all__ = ["SETTINGS", "OUTPUT", "settings", "shared_parameters", "plan_reference", "committed_runs", "export",
           "run_reference"]

#: The reference sweep's parameters, relative to the checkout.
SETTINGS = Path("notebooks") / "params" / "05_ablations" / "reference.yaml"
#: The committed result, relative to the checkout.
OUTPUT = Path("book") / "results" / "ablations-reference.json"
#: Keys of the settings file that are not parameters of the training chapter.
_MACHINE_PATHS = ("data_root", "output_dir", "cache_dir")
_SWEEP_KEYS = ("rows", "seeds", "jobs", "family", "reference", "results_dir", "extra_rows", "margin")


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


def plan_reference(values: dict[str, Any], rows: Sequence[str] | None = None) -> tuple[list[sweep.SweepRun], Path]:
    """The runs, seed by seed, and the results folder (the one chapter 05 would use for the same settings)."""
    shared = shared_parameters(values)
    family = values.get("family", "small")
    chosen = list(rows or values["rows"])
    runs = [run for seed in values["seeds"] for run in sweep.plan(chosen, [seed], shared, family=family)]
    return runs, sweep.results_folder(shared, family)


def _shown(shared: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in shared.items() if k != "data_root"}


def committed_runs(values: dict[str, Any], output: Path) -> pd.DataFrame:
    """The runs ``output`` already holds that this sweep plans: its rows and seeds, scored on the sweep's checkpoint.

    Raises:
        ConfigError: ``output`` is no reference sweep's results file (not JSON, or no ``runs``), or it was written
            with other shared settings, another family, or on other annotations than the settings' data root holds:
            its runs are another experiment, to be moved away, not mixed in.
    """
    if not output.is_file():
        return pd.DataFrame(columns=["row", "seed"])
    try:
        runs, meta = sweep.read_summary(output)
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{output}: not a reference sweep's results file ({err}); move it away to start "
                          "afresh") from None
    if runs.empty:
        return pd.DataFrame(columns=["row", "seed"])
    shared = shared_parameters(values)
    family = values.get("family", "small")
    if meta.get("shared") != _shown(shared) or meta.get("family") != family:
        raise ConfigError(f"{output}: its runs were made with other settings (family {meta.get('family')!r}, shared "
                          f"{meta.get('shared')}) than {SETTINGS} (family {family!r}, shared {_shown(shared)}); move "
                          "it away to start afresh, or pass --output")
    fingerprint = annotation_fingerprint(shared["data_root"])
    other_data = sorted(set(map(str, runs["data_sha256"])) - {fingerprint})
    if other_data:
        raise ConfigError(f"{output}: its runs were trained on other annotations ({', '.join(other_data)}) "
                          f"than {shared['data_root']} holds ({fingerprint}); move it away to start afresh, or pass "
                          "--output")
    planned = runs["row"].isin(values["rows"]) & runs["seed"].isin(values["seeds"])
    at_end = runs["checkpoint"] == sweep.SCORED_CHECKPOINT if "checkpoint" in runs else False
    return runs[planned & at_end].reset_index(drop=True)


def export(values: dict[str, Any], results_dir: Path, output: Path) -> int:
    """Write the finished runs of ``results_dir``, with those ``output`` already holds and this folder does not
    (:func:`committed_runs`), to ``output``; returns how many runs it holds."""
    runs = sweep.collect(results_dir, values["rows"])
    # the record is committed: no path of the machine that ran it (same_settings ignores these fields anyway)
    runs["config"] = [{k: v for k, v in (c or {}).items() if k not in _MACHINE_PATHS} for c in runs["config"]]
    kept = committed_runs(values, output)
    here = set(zip(runs["row"], runs["seed"].astype(int)))
    kept = kept[[(r, int(s)) not in here for r, s in zip(kept["row"], kept["seed"])]]
    if len(kept):
        runs = pd.concat([runs.drop(columns=["folder"]), kept], ignore_index=True)
        order = {name: i for i, name in enumerate(sweep.ROWS)}
        runs = runs.sort_values(["row", "seed"], key=lambda c: c.map(order) if c.name == "row" else c,
                                ignore_index=True)
    shared = shared_parameters(values)
    bounds_file = Path(shared["data_root"]) / synth.CEILING_FILE
    bounds = json.loads(bounds_file.read_text())["splits"].get("test") if bounds_file.is_file() else None
    sweep.write_summary(runs, output, shared=_shown(shared), family=values.get("family", "small"),
                        rows=list(values["rows"]), seeds=list(values["seeds"]), bounds=bounds,
                        written=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    return len(runs)


def run_reference(values: dict[str, Any], output: Path, *, rows: Sequence[str] | None = None, hours: float = 0.0,
                  notebook: Path | None = None, log: Any = print) -> int:
    """Run the reference sweep's unfinished runs, ``jobs`` at a time, seed by seed, rewriting ``output`` after each
    group that ran; start none after ``hours`` (0: no limit). Returns the number of finished runs in ``output``."""
    runs, results_dir = plan_reference(values, rows)
    committed = committed_runs(values, output)
    done = set(zip(committed["row"], committed["seed"].astype(int)))
    runs = [run for run in runs if (run.row, run.seed) not in done]
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
