"""Look inside an MTANet: shapes, parameters and multiply-adds per stage, and the attention gates of a batch.

The architecture chapter only formats and plots what these functions return, so its numbers are tested:

- :func:`stage_table` partitions a model into stem, backbone stages, neck branches and heads, with the shape that
  enters and leaves each part on a real batch; its parameters and MACs add up to the whole model's.
- :func:`model_costs`, :func:`neck_table`, :func:`heads_table` and :func:`normalization_table` are the size tables.
- :func:`capture_attention` records the sigmoid gates of every squeeze-and-excitation and CBAM module in one forward
  pass; :func:`gate_summary` and :func:`upsample_maps` turn them into what the chapter plots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from timm.layers.cbam import ChannelAttn, SpatialAttn
from timm.layers.squeeze_excite import SEModule
from timm.models.senet import SEModule as LegacySEModule
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from mtanet.models.mtanet import NORMALIZATIONS, POOLING_MODES, MTANet, PoolingNeck, count_parameters, macs
from mtanet.tasks import EDITIONS

__all__ = [
    "backbone_stages",
    "stage_table",
    "model_costs",
    "neck_table",
    "heads_table",
    "normalization_table",
    "AttentionRecord",
    "attention_modules",
    "capture_attention",
    "gate_summary",
    "upsample_maps",
    "stage_gates",
    "undo_zero_init_last",
]


def _shape(t: torch.Tensor) -> str:
    """Shape of one item of a batch, e.g. ``2048x4x4``."""
    return "x".join(str(s) for s in t.shape[1:])


def backbone_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The four residual stages of a timm backbone, in order: ``layer1..layer4`` (ResNet, SENet) or ``stages.i``
    (ByobNet). Everything before the first stage is the stem."""
    if all(hasattr(backbone, f"layer{i}") for i in range(1, 5)):
        return [(f"layer{i}", getattr(backbone, f"layer{i}")) for i in range(1, 5)]
    if isinstance(getattr(backbone, "stages", None), nn.Sequential):
        return [(f"stages.{i}", stage) for i, stage in enumerate(backbone.stages)]
    raise ValueError(f"cannot find the stages of a {type(backbone).__name__}: expected layer1..4 or stages")


def _flop_counts(model: nn.Module, images: torch.Tensor) -> tuple[dict[str, int], int]:
    """FLOPs per module path (relative to ``model``) and in total, for one forward pass on ``images``."""
    with FlopCounterMode(display=False) as counter:
        model(images)
    prefix = type(model).__name__ + "."
    counts = counter.get_flop_counts()
    per_module = {k[len(prefix):]: sum(v.values()) for k, v in counts.items() if k.startswith(prefix)}
    return per_module, counter.get_total_flops()


def stage_table(model: MTANet, images: torch.Tensor) -> pd.DataFrame:
    """One row per part of ``model`` on the batch ``images``: what shape enters it, what leaves, its size and cost.

    Rows, in the order a batch meets them: ``stem`` (the backbone before its first stage), the four backbone stages,
    each linear layer of the neck (its input is the pooled vector), ``neck output`` (the concatenation, or the single
    branch), and one row per head. Shapes are per image (the batch dimension dropped). ``parameters`` and ``macs``
    (multiply-accumulates per image, as in :func:`mtanet.models.macs`) partition the model: their sums equal
    :func:`~mtanet.models.count_parameters` and :func:`~mtanet.models.macs` of the whole model. The ``tanh`` of the VA
    head and the input normalisation have no parameters and are not counted.

    Runs in eval mode without gradients; the model's mode is restored.
    """
    stages = backbone_stages(model.backbone)
    neck_linears = [(name, mod) for name, mod in model.neck.named_children() if isinstance(mod, nn.Linear)]
    seen: dict[str, tuple[str, str]] = {}

    def record(name: str):
        def hook(module, args, output):
            seen[name] = (_shape(args[0]), _shape(output))
        return hook

    handles = [mod.register_forward_hook(record(f"backbone.{name}")) for name, mod in stages]
    handles += [mod.register_forward_hook(record(f"neck.{name}")) for name, mod in neck_linears]
    handles.append(model.neck.register_forward_hook(record("neck")))
    handles += [head.register_forward_hook(record(f"heads.{task}")) for task, head in model.heads.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            flops, total = _flop_counts(model, images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    batch = images.shape[0]

    def cost(path: str) -> int:
        return flops.get(path, 0) // (2 * batch)

    stage_params = {name: count_parameters(mod) for name, mod in stages}
    stage_macs = {name: cost(f"backbone.{name}") for name, _ in stages}
    first = f"backbone.{stages[0][0]}"
    # the backbone is entered through forward_features, not __call__, so the counter has no "backbone" entry: the
    # stem's share is what the whole pass costs beyond the stages, the neck and the heads
    rest = sum(stage_macs.values()) + cost("neck") + sum(cost(f"heads.{t}") for t in model.heads)
    rows = [dict(part="stem", module="backbone, before " + stages[0][0], input=_shape(images), output=seen[first][0],
                 parameters=count_parameters(model.backbone) - sum(stage_params.values()),
                 macs=total // (2 * batch) - rest)]
    for name, _ in stages:
        rows.append(dict(part=name, module=f"backbone.{name}", input=seen[f"backbone.{name}"][0],
                         output=seen[f"backbone.{name}"][1], parameters=stage_params[name], macs=stage_macs[name]))
    for name, mod in neck_linears:
        rows.append(dict(part=f"neck {name}", module=f"neck.{name}", input=seen[f"neck.{name}"][0],
                         output=seen[f"neck.{name}"][1], parameters=count_parameters(mod), macs=cost(f"neck.{name}")))
    rows.append(dict(part="neck output", module="neck", input=seen["neck"][0], output=seen["neck"][1],
                     parameters=count_parameters(model.neck) - sum(count_parameters(m) for _, m in neck_linears),
                     macs=cost("neck") - sum(cost(f"neck.{n}") for n, _ in neck_linears)))
    for task, head in model.heads.items():
        rows.append(dict(part=f"head {task}", module=f"heads.{task}", input=seen[f"heads.{task}"][0],
                         output=seen[f"heads.{task}"][1], parameters=count_parameters(head),
                         macs=cost(f"heads.{task}")))
    return pd.DataFrame(rows)


def model_costs(model: MTANet, image_size: int = 112) -> dict[str, int | str]:
    """Parameters of backbone, neck and heads, the backbone's output map and MACs of one ``image_size`` image."""
    with torch.no_grad():
        fmap = model.backbone.forward_features(torch.zeros(1, 3, image_size, image_size))
    return dict(
        feature_map=_shape(fmap),
        params_backbone=count_parameters(model.backbone),
        params_neck=count_parameters(model.neck),
        params_heads=count_parameters(model.heads),
        params_total=count_parameters(model),
        macs=macs(model, image_size),
    )


def neck_table(in_channels: int = 2048, feature_dim: int = 1024, map_size: int = 4) -> pd.DataFrame:
    """The :data:`~mtanet.models.POOLING_MODES` side by side: linear layers, output width and parameters.

    Each neck is built and run on a zero ``(1, in_channels, map_size, map_size)`` map, so the widths are measured,
    not assumed.
    """
    rows = []
    for mode in POOLING_MODES:
        neck = PoolingNeck(in_channels, feature_dim, mode).eval()
        with torch.no_grad():
            out = neck(torch.zeros(1, in_channels, map_size, map_size))
        linears = [f"{n} {m.in_features}->{m.out_features}"
                   for n, m in neck.named_children() if isinstance(m, nn.Linear)]
        rows.append(dict(pooling=mode, linear_layers=", ".join(linears), output=out.shape[1],
                         parameters=count_parameters(neck)))
    return pd.DataFrame(rows).set_index("pooling")


def heads_table(feature_dim: int = 1024) -> pd.DataFrame:
    """Head widths and head parameters (``Linear(feature_dim, n)`` per task) for each ABAW edition."""
    rows = []
    for name, ed in EDITIONS.items():
        widths = ed.num_outputs
        rows.append(dict(edition=name, **{f"{t}_outputs": n for t, n in widths.items()},
                         head_parameters=sum((feature_dim + 1) * n for n in widths.values()),
                         au_names=" ".join(ed.au_names), expr_names=" ".join(ed.expr_names)))
    return pd.DataFrame(rows).set_index("edition")


def normalization_table() -> pd.DataFrame:
    """Per preset and channel: what an input ``x`` in [0, 1] becomes, ``(x * scale - mean) / std``, at 0 and 1."""
    rows = []
    for preset, norm in NORMALIZATIONS.items():
        for c, channel in enumerate("RGB"):
            mean, std, scale = norm["mean"][c], norm["std"][c], norm["scale"]
            rows.append(dict(preset=preset, channel=channel, scale=scale, mean=mean, std=std,
                             at_0=(0.0 - mean) / std, at_1=(scale - mean) / std))
    return pd.DataFrame(rows).set_index(["preset", "channel"])


# ----------------------------------------------------------------------------------------------------- attention


@dataclass
class AttentionRecord:
    """The gate one attention module applied to a batch.

    ``kind`` is ``"se"`` (squeeze-and-excitation), ``"cbam_channel"`` or ``"cbam_spatial"``. ``gate`` is the sigmoid
    output: ``(B, C)`` channel weights, or ``(B, h, w)`` for the spatial map. ``stage`` is the backbone stage the
    module sits in and ``block`` its block index there.
    """

    module: str
    stage: str
    block: int
    kind: str
    gate: torch.Tensor


def attention_modules(backbone: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(path, kind, gate module)`` for every SE and CBAM module of a timm backbone, in forward order.

    The gate module is the sigmoid whose output multiplies the features: ``sigmoid`` of the legacy SENet
    ``SEModule``, ``gate`` of timm's ``SEModule`` and of CBAM's ``ChannelAttn`` / ``SpatialAttn``.
    """
    found = []
    for path, mod in backbone.named_modules():
        if isinstance(mod, LegacySEModule):
            found.append((path, "se", mod.sigmoid))
        elif isinstance(mod, SEModule):
            found.append((path, "se", mod.gate))
        elif isinstance(mod, ChannelAttn):
            found.append((path, "cbam_channel", mod.gate))
        elif isinstance(mod, SpatialAttn):
            found.append((path, "cbam_spatial", mod.gate))
    return found


def _stage_and_block(path: str, stage_names: Sequence[str]) -> tuple[str, int]:
    for name in stage_names:
        if path.startswith(name + "."):
            return name, int(path[len(name) + 1:].split(".")[0])
    return "", -1


def capture_attention(model: MTANet, images: torch.Tensor) -> list[AttentionRecord]:
    """Run ``model`` once on ``images`` (eval mode, no gradients) and return every SE / CBAM gate, in forward order.

    An empty list means the backbone has no such modules (e.g. plain ResNeXt).
    """
    stage_names = [name for name, _ in backbone_stages(model.backbone)]
    records: list[AttentionRecord] = []
    handles = []
    for path, kind, gate in attention_modules(model.backbone):
        stage, block = _stage_and_block(path, stage_names)

        def hook(module, args, output, path=path, kind=kind, stage=stage, block=block):
            value = output.detach().float().cpu()
            value = value[:, 0] if kind == "cbam_spatial" else value.flatten(1)
            records.append(AttentionRecord(path, stage, block, kind, value))

        handles.append(gate.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records


def gate_summary(records: Sequence[AttentionRecord]) -> pd.DataFrame:
    """One row per channel-gate module: where it is, its width, and how its gates spread.

    ``mean``/``std``/``min``/``max`` are over all images and channels. ``across_images`` is the standard deviation
    over the images of the batch, averaged over channels: how much the gate depends on the input (zero for a gate
    that is a fixed per-channel weight). ``across_channels`` is the standard deviation over channels of the
    batch-mean gate: how unequally the module weighs its channels on average.
    """
    rows = []
    for r in records:
        if r.kind == "cbam_spatial":
            continue
        g = r.gate.double()
        rows.append(dict(module=r.module, stage=r.stage, block=r.block, kind=r.kind, channels=g.shape[1],
                         mean=g.mean().item(), std=g.std(unbiased=False).item(), min=g.min().item(),
                         max=g.max().item(), across_images=g.std(dim=0, unbiased=False).mean().item(),
                         across_channels=g.mean(dim=0).std(unbiased=False).item()))
    return pd.DataFrame(rows)


def upsample_maps(gate: torch.Tensor, size: int) -> np.ndarray:
    """Spatial gates ``(B, h, w)`` resized bilinearly to ``(B, size, size)`` for overlaying on the input faces."""
    return F.interpolate(gate[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy()


def stage_gates(records: Sequence[AttentionRecord], kind: str) -> Mapping[str, np.ndarray]:
    """All gate values of ``kind`` pooled per stage (flattened over images, channels and blocks), in stage order."""
    out: dict[str, list[np.ndarray]] = {}
    for r in records:
        if r.kind == kind:
            out.setdefault(r.stage, []).append(r.gate.numpy().ravel())
    return {stage: np.concatenate(values) for stage, values in out.items()}


def undo_zero_init_last(model: nn.Module) -> list[str]:
    """Set the scale of every all-zero BatchNorm to 1, in place; returns the names of the layers changed.

    timm's ResNet and ResNeXt blocks start with the last BatchNorm of each residual branch at zero
    (``zero_init_last``): a fresh block is the identity, and an SE or CBAM module placed after that BatchNorm sees
    only zeros, so every gate is sigmoid(0) = 0.5 and every spatial map is flat. Undoing it gives the untrained
    attention modules real features to react to; trained weights have no all-zero BatchNorm and are left unchanged.
    """
    changed = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.affine and not mod.weight.any():
                mod.weight.fill_(1.0)
                changed.append(name)
    return changed
