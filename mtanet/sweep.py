"""Ablation sweeps under their short name: ``mtanet.sweep.plan``, ``run_sweep``, ``collect`` and the rest.

The code lives in :mod:`mtanet.book.sweep` (the book kit); this module re-exports exactly its ``__all__``, which
scripts and the README use, so a name added there is public here without a second list to keep in step.
"""

from __future__ import annotations

from mtanet.book import sweep as _sweep
from mtanet.book.sweep import *  # noqa: F403 - the book sweep's __all__, nothing else

__all__ = list(_sweep.__all__)
