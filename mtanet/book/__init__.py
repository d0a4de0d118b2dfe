"""The book kit: what builds the book and what only its chapters compute.

- :mod:`~mtanet.book.build`: py:percent notebooks executed by papermill per profile, then Jupyter Book HTML
  (``python -m mtanet.book --profile cpu``, see :mod:`mtanet.book.__main__`); :func:`record_run` and
  :func:`recorded_run` let a later chapter use the model an earlier one trained.
- :mod:`~mtanet.book.sweep`: ablation sweeps, the training chapter executed per configuration and seed, and their
  tables (also importable as :mod:`mtanet.sweep`).
- :mod:`~mtanet.book.explore`, :mod:`~mtanet.book.loss_experiments`, :mod:`~mtanet.book.paper`,
  :mod:`~mtanet.book.media`: what the data, loss, training, ablation and real-face chapters compute or show.

Nothing in the core package (data, models, training, inference) imports this package.
"""

from __future__ import annotations

from mtanet.book.build import (
    CELL_TIMEOUT_S,
    KERNEL_NAME,
    PROFILES,
    build,
    execute,
    notebooks,
    parameters_for,
    record_run,
    recorded_run,
    render_html,
    stage_sources,
    toc_chapters,
)
from mtanet.errors import NotebookFailed, SweepConflict
from mtanet.runtime import project_root, work_root

__all__ = [
    "CELL_TIMEOUT_S",
    "KERNEL_NAME",
    "PROFILES",
    "NotebookFailed",
    "SweepConflict",
    "build",
    "execute",
    "notebooks",
    "parameters_for",
    "project_root",
    "record_run",
    "recorded_run",
    "render_html",
    "stage_sources",
    "toc_chapters",
    "work_root",
]
