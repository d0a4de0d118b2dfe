"""MTANet: a shared CNN encoder with one small head per ABAW task (paper section III-A).

- :mod:`mtanet.models.mtanet`: the network (backbones, pooling neck, heads), :func:`probabilities`, size and cost.
- :mod:`mtanet.models.weights`: timm pretrained weights from the local cache (nothing is downloaded) and the VGGFace2
  SENet-50 of the paper.
- :mod:`mtanet.models.checkpoint`: :func:`save_checkpoint` and :func:`load_model`.
- :mod:`mtanet.models.integrity`: the SHA-256 digest every checkpoint carries, checked at every read.
- :mod:`mtanet.models.inspect`: what the architecture chapter shows (stage shapes, size tables, attention gates);
  import it by name, it is not loaded here.
"""

from mtanet.errors import PretrainedWeightsNotFound
from mtanet.models.checkpoint import load_model, model_from_checkpoint, read_checkpoint, save_checkpoint
from mtanet.models.mtanet import (
    BACKBONES,
    NORMALIZATIONS,
    PAPER_BACKBONES,
    POOLING_MODES,
    MTANet,
    PoolingNeck,
    build_backbone,
    count_parameters,
    macs,
    probabilities,
)
from mtanet.models.weights import convert_senet50_ft, load_vggface2_senet50, read_state_dict, write_converted_senet50

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "POOLING_MODES",
    "NORMALIZATIONS",
    "PretrainedWeightsNotFound",
    "PoolingNeck",
    "MTANet",
    "build_backbone",
    "probabilities",
    "save_checkpoint",
    "load_model",
    "read_checkpoint",
    "model_from_checkpoint",
    "read_state_dict",
    "convert_senet50_ft",
    "load_vggface2_senet50",
    "write_converted_senet50",
    "count_parameters",
    "macs",
]
