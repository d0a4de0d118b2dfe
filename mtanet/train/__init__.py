"""Training: the paper's two-stage recipe (:mod:`mtanet.train.trainer`) and its configuration.

- :mod:`~mtanet.train.config`: :class:`TrainConfig`, one typed record of every choice, with a :class:`StageConfig`
  per stage.
- :mod:`~mtanet.train.trainer`: :func:`train` and :class:`Trainer`, the loop, its stages and its checkpoints.
- :mod:`~mtanet.train.optim`: the optimiser of a stage and the learning-rate schedule.
- :mod:`~mtanet.train.state`: RNG states, the log, the resume checkpoint's checks.
- :mod:`~mtanet.train.distributed`: what changes under ``torchrun`` (DDP), in one class.
- :mod:`~mtanet.train.preflight`: is the GPU a run (or a book profile) asks for there? One line that says why not.
- :mod:`~mtanet.train.pretrained`: the backbone's starting weights (``TrainConfig.pretrained``) and their record.

Evaluation of a checkpoint and submission files are in :mod:`mtanet.evaluate`; ``mtanet train`` is
:mod:`mtanet.cli.train`.
"""

from mtanet.train.config import StageConfig, TrainConfig
from mtanet.train.optim import lr_factor
from mtanet.train.state import BEST_KEYS, CHECKPOINT, CONFIG_FILE, LOG_FILE, METRICS_FILE
from mtanet.train.trainer import Trainer, train

__all__ = ["TrainConfig", "StageConfig", "Trainer", "train", "lr_factor", "BEST_KEYS", "CHECKPOINT", "CONFIG_FILE",
           "LOG_FILE", "METRICS_FILE"]
