"""MTANet: multi-task facial affect recognition (Zhang & Gu, FG 2020) as a reproducible research book.

Modules (imported lazily, so ``import mtanet`` stays cheap):

- ``tasks``: task names and ABAW editions; ``data``: the Aff-Wild2 reader, dataset, task-balanced sampler;
- ``synth`` and ``synth_render``: SynthAffWild, the synthetic twin in the ABAW 2020 layout;
- ``models``: MTANet and its backbones; ``losses``: CCC, masked CE/BCE, sum and uncertainty weighting;
- ``metrics``: the ABAW 2020 (and 2022+) scores; ``train``: the two-stage trainer, evaluation, submission files;
- ``faces``, ``predict``, ``export``: detection, alignment, streamed inference, ONNX;
- ``sweep``: ablation sweeps (the training notebook per configuration and seed) and their tables;
- ``book``: the book build; ``explore``, ``inspect_model``, ``loss_experiments``, ``media``, ``paper``: what the
  chapters compute.
"""

__version__ = "0.1.0"
