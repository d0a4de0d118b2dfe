"""Ablation sweeps under their short name: ``mtanet.sweep.plan``, ``run_sweep``, ``collect`` and the rest.

The code lives in :mod:`mtanet.book.sweep` (the book kit); this module re-exports its public names, which scripts
and the README use.
"""

from __future__ import annotations

from mtanet.book.sweep import (
    FAMILIES,
    HOW_NOT_WHAT,
    KERNEL_LOG_FILE,
    METRICS,
    METRICS_FILE,
    NOTEBOOK_FILE,
    ROWS,
    RUN_FILE,
    SWEEP_OWNED,
    Row,
    SweepConflict,
    SweepRun,
    against_reference,
    collect,
    formatted,
    notebook_parameters,
    plan,
    read_summary,
    results_folder,
    run_sweep,
    summarize,
    write_summary,
)

__all__ = [
    "FAMILIES",
    "HOW_NOT_WHAT",
    "KERNEL_LOG_FILE",
    "METRICS",
    "METRICS_FILE",
    "NOTEBOOK_FILE",
    "ROWS",
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
