"""The VGGFace2 start (issue 16): the converter checked against an independent SE-ResNet-50 of the original port.

``SenetPort`` below is written here from the description of the ``senet50_ft`` Caffe->PyTorch port
(cydonia999/VGGFace2-pytorch, ``models/senet.py``), with that port's parameter names: ``conv1``/``bn1`` stem, a
ceil-mode 3x3/2 max pool without padding, bottlenecks whose stride sits on the first 1x1 convolution and whose
squeeze-excitation convolutions are ``conv4`` (reduce by 16) and ``conv5`` (expand), ``downsample.0``/``.1``, a
7x7 average pool and ``fc``. It takes BGR images, as the port does. Nothing of timm or of the converter's key map is
used to build it, so a wrong key in :func:`mtanet.models.weights.convert_senet50_ft` (or a right key with swapped
tensors of equal shape, such as ``bn1`` and ``bn2``) changes the outputs and fails here.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.nn import functional as F

from mtanet.models import MTANet
from mtanet.models import read_state_dict
from mtanet.models.weights import convert_senet50_ft, load_vggface2_senet50, write_converted_senet50

IDENTITIES = 8631  # VGGFace2's training identities: the port's classifier width


class PortBottleneck(nn.Module):
    """The port's SE bottleneck: 1x1 (stride) -> 3x3 -> 1x1 x4, SE by conv4/conv5 on the pooled map, then the
    gated residual sum."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        width = planes * 4
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv4 = nn.Conv2d(width, width // 16, 1, bias=True)
        self.conv5 = nn.Conv2d(width // 16, width, 1, bias=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        gate = torch.sigmoid(self.conv5(F.relu(self.conv4(y.mean(dim=(2, 3), keepdim=True)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(gate * y + shortcut)


class SenetPort(nn.Module):
    """SE-ResNet-50 of the port: blocks 3-4-6-3, planes 64-128-256-512."""

    def __init__(self, num_classes: int = IDENTITIES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        inplanes = 64
        for index, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
            layer = [PortBottleneck(inplanes, planes, stride, downsample)]
            inplanes = planes * 4
            layer += [PortBottleneck(inplanes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.fc = nn.Linear(2048, num_classes)

    def features(self, bgr: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(bgr)))
        x = F.max_pool2d(x, 3, stride=2, padding=0, ceil_mode=True)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, bgr: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.features(bgr), 7, stride=1)  # the port's fixed head: 224x224 inputs only
        return self.fc(x.flatten(1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, BatchNorm statistics and affine parameters included, so that no tensor can stand
    in for another; scaled so that activations stay finite through 16 blocks."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=gen))
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.02)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def port() -> SenetPort:
    torch.manual_seed(0)
    return randomize(SenetPort())


@pytest.fixture(scope="module")
def port_pickle(port: SenetPort, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The port's weights file as it is published: ``{name: ndarray}``, no BatchNorm counters, a pickle."""
    weights = {k: v.numpy().copy() for k, v in port.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("vggface2") / "senet50_ft_weight.pkl"
    with open(path, "wb") as f:
        pickle.dump(weights, f)
    return path, weights


def bgr_input(size: int, batch: int = 2) -> torch.Tensor:
    """Pixels on the 0-255 scale minus the port's BGR mean, as the port is fed."""
    gen = torch.Generator().manual_seed(1)
    mean = torch.tensor([91.4953, 103.8827, 131.0912]).view(1, 3, 1, 1)
    return torch.rand((batch, 3, size, size), generator=gen) * 255.0 - mean


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> bool:
    """Equal up to float32 rounding through 50 layers: every difference below ``rel`` of the largest value."""
    assert got.shape == want.shape
    return float((got - want).abs().max()) <= rel * float(want.abs().max())


def test_the_port_model_has_the_published_key_names(port: SenetPort) -> None:
    keys = set(port.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv4.weight", "layer1.0.conv5.bias",
                "layer3.5.conv3.weight", "layer4.0.downsample.0.weight", "layer4.0.downsample.1.running_mean",
                "fc.weight", "fc.bias"):
        assert key in keys, key
    assert port.fc.weight.shape == (IDENTITIES, 2048)
    assert sum(p.numel() for p in port.parameters()) == pytest.approx(43.8e6, rel=0.01)  # SE-ResNet-50 + 8631 ids


@pytest.mark.parametrize("source", ["pickle file", "dict"])
def test_converted_weights_give_the_port_s_outputs(port: SenetPort, port_pickle, source: str) -> None:
    path, weights = port_pickle
    state = convert_senet50_ft(path if source == "pickle file" else weights)  # BGR -> RGB by default
    timm_model = timm.create_model("legacy_seresnet50", pretrained=False, num_classes=IDENTITIES).eval()
    timm_model.load_state_dict(state, strict=True)
    bgr = bgr_input(224)
    with torch.inference_mode():
        want = port(bgr)
        got = timm_model(bgr.flip(1))  # the converted first convolution takes RGB
        assert close(got, want), float((got - want).abs().max())
        # at the 112x112 crops of this project: the 2048x4x4 feature maps agree too
        small = bgr_input(112)
        assert close(timm_model.forward_features(small.flip(1)), port.features(small))
    keep_bgr = convert_senet50_ft(weights, bgr_to_rgb=False)
    timm_model.load_state_dict(keep_bgr, strict=True)
    with torch.inference_mode():
        assert close(timm_model(bgr), want)


@pytest.mark.parametrize("swap", [("layer2.1.bn1.", "layer2.1.bn2."), ("layer3.0.conv4.", "layer3.1.conv4."),
                                  ("layer1.0.downsample.1.", "layer1.0.bn3.")])
def test_a_tensor_in_the_wrong_place_changes_the_outputs(port: SenetPort, port_pickle, swap) -> None:
    """What this comparison catches: two tensors of one shape exchanged (a key map that confuses them)."""
    _, weights = port_pickle
    a, b = swap
    swapped = dict(weights)
    for key in [k for k in weights if k.startswith(a)]:
        other = b + key[len(a):]
        swapped[key], swapped[other] = weights[other], weights[key]
    timm_model = timm.create_model("legacy_seresnet50", pretrained=False, num_classes=IDENTITIES).eval()
    timm_model.load_state_dict(convert_senet50_ft(swapped), strict=True)  # the shapes fit: only outputs tell
    bgr = bgr_input(224)
    with torch.inference_mode():
        want = port(bgr)
        assert not close(timm_model(bgr.flip(1)), want, rel=1e-2)  # far beyond rounding


@pytest.mark.parametrize("form", ["original pickle", "converted file"])
def test_load_vggface2_senet50_gives_mtanet_the_port_s_features(port: SenetPort, port_pickle, tmp_path: Path,
                                                                form: str) -> None:
    path, _ = port_pickle
    if form == "converted file":  # what TrainConfig.pretrained names: read with torch.load(weights_only=True)
        converted = write_converted_senet50(path, tmp_path / "senet50_ft.pt")
        assert [p.name for p in tmp_path.iterdir()] == ["senet50_ft.pt"]  # written atomically, nothing beside
        state = read_state_dict(converted)
        assert all(torch.equal(state[k], v) for k, v in convert_senet50_ft(path).items())
        path = converted
    model = load_vggface2_senet50(MTANet("senet50", feature_dim=32), path).eval()
    assert model.config["input_norm"] == "vggface2"
    bgr = bgr_input(112)
    with torch.inference_mode():
        assert close(model.backbone.forward_features(bgr.flip(1)), port.features(bgr))
    with pytest.raises(ValueError, match="backbone 'senet50'"):
        load_vggface2_senet50(MTANet("seresnet18_half", feature_dim=16), path)
