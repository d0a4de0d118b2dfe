"""The backbone's starting weights named by :attr:`mtanet.train.TrainConfig.pretrained`, with a record of them.

The paper starts SE-ResNet-50 from VGGFace2 weights (the cydonia999 port's ``senet50_ft`` pickle). Unpickling can run
code, so training reads the *converted* weights, a plain state dict written once with::

    torch.save(mtanet.models.convert_senet50_ft("senet50_ft_weight.pkl"), "senet50_ft.pt")

and read back with ``torch.load(weights_only=True)``. ``metrics.json`` records the file and its SHA-256, so a score
says which weights it started from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from mtanet.errors import CheckpointError, ConfigError
from mtanet.models import read_state_dict

__all__ = ["load_pretrained_backbone", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_pretrained_backbone(model: nn.Module, spec: str) -> dict[str, Any] | None:
    """Load ``spec`` (a ``TrainConfig.pretrained`` value) into ``model`` (an :class:`mtanet.models.MTANet`).

    ``""``: nothing (``None``). ``"imagenet"``: timm's weights, which the model loaded when it was built (the record
    says so). A path: converted VGGFace2 SE-ResNet-50 weights, loaded strictly into the backbone (the identity
    classifier ``last_linear.*`` left out) and the input normalisation set to ``"vggface2"``.

    Returns:
        ``{"source", "path", "sha256"}`` for ``metrics.json``, or ``None``.

    Raises:
        ConfigError: the file is missing, is not a state dict, or does not fit the backbone (names the keys).
        CheckpointError: the file cannot be read (or was changed after ``save_checkpoint`` wrote it).
    """
    if not spec:
        return None
    if spec == "imagenet":
        return {"source": "imagenet (timm weights from the local cache)", "path": None, "sha256": None}
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"TrainConfig.pretrained={spec!r}: no such file; convert the VGGFace2 pickle once with "
                          "torch.save(mtanet.models.convert_senet50_ft(PICKLE), PATH) and give PATH")
    try:
        state = read_state_dict(path)
    except CheckpointError as err:
        raise CheckpointError(f"TrainConfig.pretrained: {err}") from err
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ConfigError(f"TrainConfig.pretrained={spec!r} is not a state dict of tensors (write it with "
                          "torch.save(mtanet.models.convert_senet50_ft(PICKLE), PATH))")
    state = {k: v for k, v in state.items() if not k.startswith("last_linear.")}
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        problems = "; ".join(part for part in (
            f"missing {len(missing)} key(s) such as {missing[:3]}" if missing else "",
            f"{len(unexpected)} unknown key(s) such as {unexpected[:3]}" if unexpected else "",
            f"{len(shapes)} shape(s) differ, such as {shapes[:2]}" if shapes else "") if part)
        raise ConfigError(f"TrainConfig.pretrained={spec!r} does not match the {model.config['backbone']} "
                          f"backbone: {problems}")
    model.backbone.load_state_dict(state, strict=True)
    model.set_input_norm("vggface2")
    return {"source": "vggface2 senet50_ft (converted)", "path": str(path.resolve()), "sha256": file_sha256(path)}
