"""Weights from files, never from the network: timm's pretrained backbones from the local Hugging Face or torch hub
cache, the VGGFace2 SENet-50 of the paper (the cydonia999 ``senet50_ft`` pickle), and plain state-dict files.

This module knows nothing of :class:`~mtanet.models.MTANet`; it loads into any module with the right layout.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import huggingface_hub
import numpy as np
import torch
from timm.layers.cbam import CbamModule
from timm.models import load_state_dict
from torch import nn

from mtanet.errors import PretrainedWeightsNotFound
from mtanet.models.integrity import load_checked
from mtanet.runtime import atomic_path

__all__ = [
    "PretrainedWeightsNotFound",
    "load_timm_pretrained",
    "read_state_dict",
    "convert_senet50_ft",
    "write_converted_senet50",
    "load_vggface2_senet50",
]


# ----------------------------------------------------------------------------------------- timm weights, offline


def _local_pretrained_file(pretrained_cfg: Mapping[str, Any]) -> Path:
    """Find the weights a timm ``pretrained_cfg`` points at in the local caches, never touching the network."""
    arch = pretrained_cfg.get("architecture", "this model")
    looked: list[str] = []
    if pretrained_cfg.get("file"):
        if Path(pretrained_cfg["file"]).is_file():
            return Path(pretrained_cfg["file"])
        looked.append(str(pretrained_cfg["file"]))
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        repo_id, _, revision = hub_id.partition("@")
        names = [pretrained_cfg["hf_hub_filename"]] if pretrained_cfg.get("hf_hub_filename") else [
            "model.safetensors", "pytorch_model.bin"]
        for name in names:
            hit = huggingface_hub.try_to_load_from_cache(repo_id, name, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
            looked.append(
                f"Hugging Face cache {huggingface_hub.constants.HF_HUB_CACHE}: repo {repo_id}, file {name} "
                f"(`huggingface-cli download {repo_id} {name}` writes it there)"
            )
    url = pretrained_cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if cached.is_file():
            return cached
        looked.append(f"{cached} (the file of {url})")
    if not looked:
        raise PretrainedWeightsNotFound(f"timm has no pretrained weights for {arch}; use pretrained=False")
    raise PretrainedWeightsNotFound(
        f"pretrained weights for {arch} are not in the local cache, and nothing is downloaded. Put the file at one "
        "of these places (fetch it on a machine with network access and copy the cache over), or use "
        "pretrained=False:\n  " + "\n  ".join(looked)
    )


def load_timm_pretrained(backbone: nn.Module, model_name: str) -> None:
    """Load cached timm weights into ``backbone``, dropping the classifier; only CBAM modules may stay random.

    Raises:
        PretrainedWeightsNotFound: the weights are not in the local cache (nothing is downloaded).
    """
    cfg = backbone.pretrained_cfg
    state = load_state_dict(str(_local_pretrained_file(cfg)), weights_only=True)
    classifiers = cfg.get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifiers)}
    result = backbone.load_state_dict(state, strict=False)
    # A CBAM variant reuses the plain network's weights; its attention modules have none (ABAW2020.md section 5).
    cbam = {f"{name}." for name, mod in backbone.named_modules() if isinstance(mod, CbamModule)}
    missing = [k for k in result.missing_keys if not any(k.startswith(p) for p in cbam)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"pretrained weights for {model_name} do not fit the backbone: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


# ------------------------------------------------------------------------------------------------ state dict files


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a :func:`~mtanet.models.save_checkpoint` file (its digest checked), or the file itself
    when it is a plain state dict. Read on the CPU with ``torch.load(weights_only=True)``, so a file cannot run code.

    Raises:
        CheckpointError: the file cannot be read or was changed after it was written (digest mismatch).
    """
    ckpt = load_checked(path, "cpu")
    if isinstance(ckpt, dict) and "state_dict" in ckpt and "config" in ckpt:
        return ckpt["state_dict"]
    return ckpt


# ------------------------------------------------------------------------------------- VGGFace2 SENet-50 weights

_SENET50_FT_KEYS = [  # cydonia999 pickle name -> timm legacy_seresnet50 name (ABAW2020.md section 4)
    (re.compile(r"^conv1\."), "layer0.conv1."),
    (re.compile(r"^bn1\."), "layer0.bn1."),
    (re.compile(r"^(layer\d+\.\d+)\.conv4\."), r"\1.se_module.fc1."),
    (re.compile(r"^(layer\d+\.\d+)\.conv5\."), r"\1.se_module.fc2."),
    (re.compile(r"^fc\."), "last_linear."),
]


def _senet50_ft_key(name: str) -> str:
    for pattern, repl in _SENET50_FT_KEYS:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def convert_senet50_ft(
    pickle_path_or_dict: str | os.PathLike | Mapping[str, Any], bgr_to_rgb: bool = True
) -> dict[str, torch.Tensor]:
    """Convert the VGGFace2 ``senet50_ft`` weights of the cydonia999 port to timm ``legacy_seresnet50`` keys.

    The port stores ``{name: ndarray}`` in a pickle. Keys are mapped as in ABAW2020.md section 4; BatchNorm
    ``num_batches_tracked`` counters, absent from the Caffe-converted file, are added as 0 so a strict load works.

    The port feeds BGR images (``img[:, :, ::-1] - mean_bgr``). With ``bgr_to_rgb`` (the default) the input
    channels of the first convolution are reversed, so the converted network takes RGB images minus the RGB mean,
    which is what :data:`~mtanet.models.NORMALIZATIONS` ``["vggface2"]`` and the rest of this package use.

    Security: unpickling can run arbitrary code. Only pass files you trust (the published weights file), or a
    dict you built yourself.
    """
    if isinstance(pickle_path_or_dict, Mapping):
        weights = pickle_path_or_dict
    else:
        with open(pickle_path_or_dict, "rb") as f:
            weights = pickle.load(f, encoding="latin1")  # noqa: S301 - trusted file, see the docstring
    out: dict[str, torch.Tensor] = {}
    for name, value in weights.items():
        tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        out[_senet50_ft_key(name)] = tensor
    if bgr_to_rgb:
        out["layer0.conv1.weight"] = out["layer0.conv1.weight"].flip(1).contiguous()
    for key in [k for k in out if k.endswith(".running_mean")]:
        out.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
    return out


def write_converted_senet50(pickle_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Convert the port's ``senet50_ft`` pickle once (:func:`convert_senet50_ft`, RGB input) and write the state dict
    with ``torch.save``, atomically: the file that ``TrainConfig.pretrained`` and :func:`load_vggface2_senet50`
    read with ``torch.load(weights_only=True)``, so the pickle (which can run code) is opened only this once.

    Returns the written path. Verified against an independent re-implementation of the port's SE-ResNet-50 in
    ``tests/test_vggface2.py`` (same outputs within float32 rounding).
    """
    state = convert_senet50_ft(pickle_path)
    out = Path(out_path)
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return out


def _is_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive; the port's weights are a plain pickle."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_vggface2_senet50(model: nn.Module, weights: str | os.PathLike | Mapping[str, Any]) -> nn.Module:
    """Load the VGGFace2 SENet-50 (the paper's initialisation) into a ``"senet50"``
    :class:`~mtanet.models.MTANet`, in place, and return it.

    ``weights``: the converted file of :func:`write_converted_senet50` (read with ``torch.load(weights_only=True)``),
    the port's original ``senet50_ft`` pickle (converted on the fly; same security note as
    :func:`convert_senet50_ft`: only pickles you trust), or the port's ``{name: array}`` dict. The backbone is loaded
    strictly (the 8631-identity classifier is dropped) and the input normalisation is set to ``"vggface2"``.
    """
    if model.config["backbone"] != "senet50":
        raise ValueError(f"VGGFace2 SENet-50 weights need backbone 'senet50', not {model.config['backbone']!r}")
    if not isinstance(weights, Mapping) and _is_torch_file(Path(weights)):
        state = read_state_dict(weights)
    else:
        state = convert_senet50_ft(weights)
    state = {k: v for k, v in state.items() if not k.startswith("last_linear.")}
    model.backbone.load_state_dict(state, strict=True)
    model.set_input_norm("vggface2")
    return model
