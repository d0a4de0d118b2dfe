"""MTANet: multi-task facial affect recognition (Zhang & Gu, FG 2020) as a reproducible research book.

The folders follow the paper, and every import points down this list (``tests/test_structure.py`` checks it):

- ``tasks``, ``errors``, ``runtime``: the vocabulary (tasks, ABAW editions), every error class, and what all layers
  share (cores, devices, atomic writes, JSON, provenance).
- ``data``: the Aff-Wild2 reader, the frame dataset, the task-balanced sampler, augmentation, frame-table statistics;
  ``models``: MTANet, its backbones and weights, checkpoints, introspection; ``losses``: eq. 1-5 and the loss
  weightings; ``metrics``: the ABAW scores.
- ``synth``: SynthAffWild, the synthetic twin in the ABAW 2020 layout; ``evaluate``: a model on a frame table, the
  scores and the submission files; ``inference``: detection, alignment, streamed prediction, ONNX.
- ``train``: the two-stage trainer and its configuration.
- ``cli``: the ``mtanet`` command (the only place that parses arguments); ``book``: the book runner, the ablation
  sweep (``mtanet.sweep``) and what only a chapter computes.

``import mtanet`` loads none of them.
"""

__version__ = "0.1.0"
