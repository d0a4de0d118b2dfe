"""MTANet: multi-task facial affect recognition (Zhang & Gu, FG 2020) as a reproducible research book.

Modules (imported lazily, so ``import mtanet`` stays cheap):
``tasks`` (task names, editions), ``data`` (Aff-Wild2 reader, dataset, sampler), ``synth`` (the synthetic twin),
``models`` (MTANet), ``losses``, ``metrics`` (ABAW 2020 scores), ``book`` (the book build).
"""

__version__ = "0.1.0"
