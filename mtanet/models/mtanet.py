"""MTANet: a shared CNN encoder with one small head per ABAW task (paper section III-A).

The pieces, in the order a batch meets them:

1. **Input normalisation**, stored as buffers so it travels with the weights: images arrive as float RGB in [0, 1]
   and become ``(x * input_scale - input_mean) / input_std`` (ImageNet statistics for timm weights, Caffe-style
   ``x * 255 - mean`` for the VGGFace2 SENet-50 of the paper; see :data:`NORMALIZATIONS`).
2. **Backbone**, a timm model built without its pooling and classifier (:data:`BACKBONES`); it yields a
   ``(B, C, h, w)`` map with ``C = backbone.num_features`` (2048 for the 50-layer networks; 4x4 at 112x112 input).
3. **Neck** (:class:`PoolingNeck`), pooling and a ReLU-activated projection to ``feature_dim`` (1024 in the paper).
4. **Heads**, one ``nn.Linear(feature_dim, n)`` per task named in ``num_outputs``; VA goes through ``tanh``.

Nothing here downloads: ``pretrained=True`` only reads weights already in the local Hugging Face or torch hub cache
(:mod:`mtanet.models.weights`). :func:`probabilities` turns head outputs into what they predict.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mtanet.errors import ConfigError
from mtanet.models.weights import load_timm_pretrained, read_state_dict
from mtanet.tasks import TASKS

__all__ = [
    "BACKBONES",
    "PAPER_BACKBONES",
    "POOLING_MODES",
    "NORMALIZATIONS",
    "PoolingNeck",
    "MTANet",
    "build_backbone",
    "count_parameters",
    "macs",
    "probabilities",
]

_RESNET26_HALF = dict(model_name="resnet26", channels=(32, 64, 128, 256), stem_width=32)

#: Backbone name -> keyword arguments of ``timm.create_model`` (``model_name`` included).
BACKBONES: dict[str, dict[str, Any]] = {
    # The three backbones of the paper's Table I (ABAW2020.md section 5).
    "senet50": dict(model_name="legacy_seresnet50"),  # SE-ResNet-50 with the VGGFace2 port's layout (the paper's)
    "seresnet50": dict(model_name="seresnet50"),  # timm's modern SE-ResNet-50 (stride on the 3x3 conv)
    "resnet50": dict(model_name="resnet50"),  # no attention, cardinality 1: the factorial's baseline
    "resnext50": dict(model_name="resnext50_32x4d"),
    "seresnext50": dict(model_name="seresnext50_32x4d"),
    "resnext50_cbam": dict(model_name="resnext50_32x4d", block_args=dict(attn_layer="cbam")),
    # Small members of the same families, for CPU tests and smoke runs; not used in the paper.
    "senet18": dict(model_name="legacy_seresnet18"),
    "seresnet18": dict(model_name="seresnet18"),  # timm has no pretrained weights for this one
    # SE-ResNet-18 at half width (channels 32-64-128-256, 2.8M parameters): 2.4x the training speed of seresnet18
    # at 64 px on 2 CPU cores; the training chapter's cpu profile
    "seresnet18_half": dict(model_name="seresnet18", channels=(32, 64, 128, 256), stem_width=32),
    "resnet18_cbam": dict(model_name="resnet18", block_args=dict(attn_layer="cbam")),
    "resnext26": dict(model_name="resnext26ts"),  # timm's ByobNet ResNeXt-26 (tiered stem, SiLU)
    # Table I's three designs at depth 26 and half width (ResNet-26: bottleneck blocks 2-2-2-2, planes 32-64-128-256,
    # 1024-d output), identical but for the block: SE, ResNeXt 32 groups, ResNeXt + CBAM. The ablation chapter's
    # CPU family: about 4x cheaper than the full-width ResNet-26.
    "resnet26_half": dict(**_RESNET26_HALF),
    "seresnet26_half": dict(**_RESNET26_HALF, block_args=dict(attn_layer="se")),
    "seresnext26_half": dict(**_RESNET26_HALF, cardinality=32, base_width=4, block_args=dict(attn_layer="se")),
    "resnext26_half": dict(**_RESNET26_HALF, cardinality=32, base_width=4),
    "resnext26_half_cbam": dict(**_RESNET26_HALF, cardinality=32, base_width=4, block_args=dict(attn_layer="cbam")),
}

#: The backbones of the paper's Table I, in its row order.
PAPER_BACKBONES: tuple[str, ...] = ("resnext50", "resnext50_cbam", "senet50")

#: Neck variants; see :class:`PoolingNeck`. The first is the default and our reading of the paper.
POOLING_MODES: tuple[str, ...] = ("avgmax_concat", "avg", "avgmax_add")

#: Input normalisation presets: ``(x * scale - mean) / std`` for ``x`` in [0, 1], channels in RGB order.
NORMALIZATIONS: dict[str, dict[str, Any]] = {
    "imagenet": dict(
        mean=tuple(timm.data.IMAGENET_DEFAULT_MEAN), std=tuple(timm.data.IMAGENET_DEFAULT_STD), scale=1.0
    ),
    # VGGFace2 Caffe models (ABAW2020.md section 4): 0-255 pixels minus the RGB mean, no std division.
    "vggface2": dict(mean=(131.0912, 103.8827, 91.4953), std=(1.0, 1.0, 1.0), scale=255.0),
}


def build_backbone(name: str) -> nn.Module:
    """The timm model registered as ``name``, without pooling and classifier, randomly initialised."""
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    kwargs = copy.deepcopy(BACKBONES[name])  # timm must not share the registry's nested dicts
    return timm.create_model(pretrained=False, num_classes=0, global_pool="", **kwargs)


class PoolingNeck(nn.Module):
    """Pool the backbone map and project it to ``feature_dim`` features.

    The paper (III-A): "An average pooling and max pooling layer with dropout and ReLU activation function followed
    by backbone ... produces a 1024-d feature map after concatenation." It names no linear layer, but the
    concatenation of two poolings of a 2048-channel map is 4096-d, so to reach 1024-d after concatenating, each
    branch must be projected to 512. Our reading, ``"avgmax_concat"`` (the default)::

        GAP(C) -> Dropout -> Linear(C, feature_dim/2) -> ReLU  ┐
        GMP(C) -> Dropout -> Linear(C, feature_dim/2) -> ReLU  ┴ concat -> feature_dim

    Alternatives, for ablation:

    - ``"avg"``: ``GAP(C) -> Dropout -> Linear(C, feature_dim) -> ReLU``.
    - ``"avgmax_add"``: timm's ``avgmax`` pooling, ``(GAP + GMP) / 2``, then
      ``Dropout -> Linear(C, feature_dim) -> ReLU``. (The halving only rescales the input of the linear layer.)
    """

    def __init__(self, in_channels: int, feature_dim: int = 1024, pooling: str = "avgmax_concat", dropout: float = 0.5):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING_MODES)}")
        if pooling == "avgmax_concat" and feature_dim % 2:
            raise ConfigError(f"pooling 'avgmax_concat' needs an even feature_dim, got {feature_dim}")
        self.pooling = pooling
        self.out_features = feature_dim
        self.dropout = nn.Dropout(dropout)
        if pooling == "avgmax_concat":
            self.avg_fc = nn.Linear(in_channels, feature_dim // 2)
            self.max_fc = nn.Linear(in_channels, feature_dim // 2)
        else:
            self.fc = nn.Linear(in_channels, feature_dim)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        avg = fmap.mean(dim=(2, 3))
        if self.pooling == "avg":
            return F.relu(self.fc(self.dropout(avg)))
        mx = fmap.amax(dim=(2, 3))
        if self.pooling == "avgmax_add":
            return F.relu(self.fc(self.dropout(0.5 * (avg + mx))))
        return torch.cat([F.relu(self.avg_fc(self.dropout(avg))), F.relu(self.max_fc(self.dropout(mx)))], dim=1)


class MTANet(nn.Module):
    """Multi-task affect network: backbone, pooling neck, one linear head per task.

    Args:
        backbone: a key of :data:`BACKBONES` (``"senet50"`` is the paper's).
        num_outputs: head width per task, e.g. ``EDITIONS["2021"].num_outputs``; only these tasks get heads.
        pooling: one of :data:`POOLING_MODES` (see :class:`PoolingNeck`).
        feature_dim: width of the shared feature (1024 in the paper).
        dropout: dropout probability in the neck.
        input_norm: a key of :data:`NORMALIZATIONS`; ``None`` means ``"imagenet"`` (timm's weights). Loading the
            VGGFace2 SENet-50 with :func:`~mtanet.models.load_vggface2_senet50` switches it to ``"vggface2"``.
        pretrained: load timm's ImageNet weights for the backbone from the local cache; raises
            :class:`~mtanet.errors.PretrainedWeightsNotFound` (and downloads nothing) when they are not there.
        weights_path: a :func:`~mtanet.models.save_checkpoint` file or a plain ``state_dict`` of this model, loaded strictly
            after ``pretrained``.

    ``forward`` takes float RGB images ``(B, 3, H, W)`` in [0, 1] and returns a dict: ``"va"`` ``(B, 2)`` in [-1, 1]
    (tanh), ``"au"`` ``(B, K)`` logits, ``"expr"`` ``(B, C)`` logits. ``config`` holds the constructor arguments
    (JSON-serialisable) so that :func:`~mtanet.models.load_model` can rebuild the model from a checkpoint.
    """

    def __init__(
        self,
        backbone: str = "senet50",
        num_outputs: Mapping[str, int] | None = None,
        pooling: str = "avgmax_concat",
        feature_dim: int = 1024,
        dropout: float = 0.5,
        input_norm: str | None = None,
        pretrained: bool = False,
        weights_path: str | os.PathLike | None = None,
    ):
        super().__init__()
        num_outputs = dict(num_outputs if num_outputs is not None else {"va": 2, "au": 8, "expr": 7})
        unknown = set(num_outputs) - set(TASKS)
        if unknown or not num_outputs:
            raise ValueError(f"num_outputs must name some of the tasks {TASKS}, got {sorted(num_outputs)}")
        if any(not isinstance(n, int) or n < 1 for n in num_outputs.values()):
            raise ValueError(f"head widths must be positive ints, got {num_outputs}")
        input_norm = "imagenet" if input_norm is None else input_norm
        if input_norm not in NORMALIZATIONS:
            raise ValueError(f"unknown input_norm {input_norm!r}; choose one of {sorted(NORMALIZATIONS)}")

        self.config: dict[str, Any] = dict(
            backbone=backbone,
            num_outputs={task: int(n) for task, n in num_outputs.items()},
            pooling=pooling,
            feature_dim=int(feature_dim),
            dropout=float(dropout),
            input_norm=input_norm,
            pretrained=bool(pretrained),
            weights_path=None if weights_path is None else str(weights_path),
        )
        self.backbone = build_backbone(backbone)
        self.neck = PoolingNeck(self.backbone.num_features, feature_dim, pooling, dropout)
        self.heads = nn.ModuleDict({task: nn.Linear(feature_dim, n) for task, n in num_outputs.items()})

        self.register_buffer("input_mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("input_std", torch.ones(1, 3, 1, 1))
        self.register_buffer("input_scale", torch.ones(()))
        self.set_input_norm(input_norm)

        if pretrained:
            load_timm_pretrained(self.backbone, BACKBONES[backbone]["model_name"])
        if weights_path is not None:
            self.load_state_dict(read_state_dict(weights_path))
            self.config["input_norm"] = self._current_norm_name()

    def set_input_norm(self, name: str) -> None:
        """Set the normalisation buffers (and ``config``) to the :data:`NORMALIZATIONS` preset ``name``."""
        norm = NORMALIZATIONS[name]
        with torch.no_grad():
            self.input_mean.copy_(torch.tensor(norm["mean"]).view(1, 3, 1, 1))
            self.input_std.copy_(torch.tensor(norm["std"]).view(1, 3, 1, 1))
            self.input_scale.fill_(norm["scale"])
        self.config["input_norm"] = name

    def _current_norm_name(self) -> str | None:
        """The preset the buffers hold (they may come from loaded weights); ``None`` when they match none."""
        for name, norm in NORMALIZATIONS.items():
            if (
                torch.allclose(self.input_mean.flatten().cpu(), torch.tensor(norm["mean"]))
                and torch.allclose(self.input_std.flatten().cpu(), torch.tensor(norm["std"]))
                and float(self.input_scale) == norm["scale"]
            ):
                return name
        return None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] RGB images to what the backbone was trained on."""
        return (images * self.input_scale - self.input_mean) / self.input_std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The shared ``(B, feature_dim)`` representation the heads read."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(images.shape)}")
        return self.neck(self.backbone.forward_features(self.normalize(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        out = {task: head(feats) for task, head in self.heads.items()}
        if "va" in out:
            out["va"] = torch.tanh(out["va"])
        return out


def probabilities(outputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Head outputs as what they predict: ``va`` as is (already in [-1, 1] by ``tanh``), ``au`` per-unit
    probabilities (sigmoid of the logits), ``expr`` class probabilities (softmax over dim 1).

    ``outputs`` is a dict like :meth:`MTANet.forward` returns, with any subset of the heads; other keys pass through
    unchanged. Floating tensors keep their dtype and device (cast to ``float64`` first for float64 results); numpy
    callers wrap arrays with ``torch.from_numpy``.
    """
    out = dict(outputs)
    if "au" in out:
        out["au"] = torch.sigmoid(out["au"])
    if "expr" in out:
        out["expr"] = torch.softmax(out["expr"], dim=1)
    return out


# ------------------------------------------------------------------------------------------------- size and cost


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def macs(model: nn.Module, image_size: int = 112) -> int:
    """Multiply-accumulates of one forward pass on one ``image_size`` square RGB image.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; pooling, activations
    and normalisation are not counted), halved to turn FLOPs into MACs. Runs in eval mode without gradients.
    """
    param = next(model.parameters())
    images = torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
