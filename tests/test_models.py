"""Tests of mtanet.models: shapes, gradients, checkpoints, the VGGFace2 converter, offline pretrained loading."""

from __future__ import annotations

import json
import pickle
import socket
import warnings

import numpy as np
import pytest
import timm
import torch

from mtanet import models
from mtanet.models import (
    BACKBONES,
    NORMALIZATIONS,
    POOLING_MODES,
    MTANet,
    PretrainedWeightsNotFound,
    convert_senet50_ft,
    count_parameters,
    load_model,
    load_vggface2_senet50,
    macs,
    probabilities,
    read_checkpoint,
    save_checkpoint,
)
from mtanet.errors import CheckpointError
from mtanet.tasks import EDITIONS

BIG = ("senet50", "seresnet50", "resnext50", "resnext50_cbam")
SMALL = tuple(name for name in BACKBONES if name not in BIG)
PAPER_HEADS = {"va": 2, "au": 8, "expr": 7}


@pytest.fixture(scope="module")
def big_models():
    """Each 50-layer model is built once for the whole file (lazily, on first use)."""
    cache: dict[str, MTANet] = {}

    def get(name: str) -> MTANet:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = MTANet(name)
        return cache[name]

    return get


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything opens a connection or resolves a host name."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def empty_caches(monkeypatch, tmp_path):
    """Point the Hugging Face and torch hub caches at empty folders; returns (hf_cache, torch_hub_dir)."""
    import huggingface_hub

    hf_cache, hub_dir = tmp_path / "hf", tmp_path / "torch_hub"
    hf_cache.mkdir()
    hub_dir.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub_dir))
    return hf_cache, hub_dir


def check_forward_backward(model: MTANet, size: int) -> None:
    torch.manual_seed(1)
    model.train()
    images = torch.rand(2, 3, size, size)
    out = model(images)
    assert set(out) == set(model.config["num_outputs"])
    for task, n in model.config["num_outputs"].items():
        assert out[task].shape == (2, n)
        assert torch.isfinite(out[task]).all()
    assert out["va"].abs().max() <= 1
    model.zero_grad()
    sum(o.square().mean() for o in out.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", SMALL)
def test_small_backbone_forward_backward(name):
    check_forward_backward(MTANet(name, dropout=0.2), size=64)


@pytest.mark.parametrize("name", BIG)
def test_big_backbone_forward_backward(big_models, name):
    model = big_models(name)
    assert model.neck.avg_fc.in_features == model.backbone.num_features == 2048
    check_forward_backward(model, size=64)


def test_va_is_bounded_even_for_large_inputs():
    model = MTANet("senet18").eval()
    with torch.no_grad():
        model.heads["va"].bias.fill_(50.0)
        va = model(torch.rand(2, 3, 32, 32))["va"]
    assert (va.abs() <= 1).all() and torch.allclose(va, torch.ones_like(va))


@pytest.mark.parametrize("pooling", POOLING_MODES)
@pytest.mark.parametrize("feature_dim", [1024, 256])
def test_pooling_modes_give_feature_dim(pooling, feature_dim):
    model = MTANet("resnet18_cbam", pooling=pooling, feature_dim=feature_dim).eval()
    with torch.no_grad():
        feats = model.features(torch.rand(3, 3, 32, 32))
    assert feats.shape == (3, feature_dim)
    assert (feats >= 0).all()  # ReLU is the last step of every neck
    assert all(head.in_features == feature_dim for head in model.heads.values())


def test_avgmax_concat_is_two_projected_branches():
    model = MTANet("senet18", pooling="avgmax_concat", dropout=0.0).eval()
    neck = model.neck
    assert (neck.avg_fc.in_features, neck.avg_fc.out_features) == (512, 512)
    assert (neck.max_fc.in_features, neck.max_fc.out_features) == (512, 512)
    fmap = torch.randn(2, 512, 3, 3)
    want = torch.cat([torch.relu(neck.avg_fc(fmap.mean((2, 3)))), torch.relu(neck.max_fc(fmap.amax((2, 3))))], 1)
    assert torch.allclose(neck(fmap), want)
    with pytest.raises(ValueError, match="even"):
        MTANet("senet18", feature_dim=1023)


@pytest.mark.parametrize("edition", ["2020", "2021", "2022"])
def test_heads_follow_the_edition(edition):
    num_outputs = EDITIONS[edition].num_outputs
    model = MTANet("senet18", num_outputs=num_outputs)
    assert {task: head.out_features for task, head in model.heads.items()} == num_outputs
    out = model.eval()(torch.rand(1, 3, 32, 32))
    assert {task: o.shape[1] for task, o in out.items()} == num_outputs
    if edition == "2022":
        assert (num_outputs["au"], num_outputs["expr"]) == (12, 8)


def test_only_named_tasks_get_heads():
    model = MTANet("senet18", num_outputs={"expr": 7}).eval()
    assert list(model.heads) == ["expr"]
    assert set(model(torch.rand(1, 3, 32, 32))) == {"expr"}


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(backbone="vgg16"), "unknown backbone 'vgg16'"), (dict(pooling="attention"), "unknown pooling 'attention'"),
     (dict(num_outputs={"gaze": 2}), r"num_outputs must name some of the tasks .*\['gaze'\]"),
     (dict(input_norm="caffe"), "unknown input_norm 'caffe'")],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MTANet(**{"backbone": "senet18", **kwargs})


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MTANet("senet18", num_outputs=EDITIONS["2021"].num_outputs, pooling="avgmax_add", feature_dim=256)
    model.train()
    model(torch.rand(4, 3, 32, 32))  # moves the BatchNorm running statistics away from their defaults
    model.set_input_norm("vggface2")  # the normalisation must travel with the weights
    model.eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = model(images)

    path = save_checkpoint(model, tmp_path / "ckpt.pt", extra={"epoch": 3, "metrics": {"va": 0.25}})
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["metrics"] == {"va": 0.25}
    assert raw["config"] == model.config
    json.dumps(raw["config"])

    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.config["input_norm"] == "vggface2"
    with torch.no_grad():
        got = loaded(images)
    assert all(torch.equal(got[t], want[t]) for t in want)

    # weights_path: a checkpoint, or a plain state dict; the normalisation name follows the loaded buffers
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    for source in (path, tmp_path / "plain.pt"):
        rebuilt = MTANet("senet18", num_outputs=EDITIONS["2021"].num_outputs, pooling="avgmax_add",
                         feature_dim=256, weights_path=source).eval()
        assert rebuilt.config["input_norm"] == "vggface2"
        with torch.no_grad():
            got = rebuilt(images)
        assert all(torch.equal(got[t], want[t]) for t in want)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "plain.pt"]  # no temporary file left
    with pytest.raises(ValueError, match=r"extra must not override \['state_dict'\]"):
        save_checkpoint(model, tmp_path / "bad.pt", extra={"state_dict": {}})


def _small_checkpoint(path, **extra):
    torch.manual_seed(0)
    model = MTANet("senet18", feature_dim=64).eval()
    return model, save_checkpoint(model, path, extra=extra or None)


def test_every_reader_refuses_a_checkpoint_with_flipped_weight_bytes(tmp_path, damage):
    model, path = _small_checkpoint(tmp_path / "ckpt.pt", epoch=3)
    assert torch.load(path, weights_only=True)["digest"].startswith("sha256:")
    record = damage.flip_checkpoint_tensor(path)  # 4 KB inside the largest weight
    raw = torch.load(path, weights_only=True)  # what issue 15 met: torch reads it without a word
    changed = [k for k, v in model.state_dict().items() if not torch.equal(raw["state_dict"][k], v)]
    assert len(changed) == 1, record
    for read in (read_checkpoint, load_model, lambda p: MTANet("senet18", feature_dim=64, weights_path=p),
                 models.read_state_dict):
        with pytest.raises(CheckpointError) as err:
            read(path)
        message = str(err.value)
        assert str(path) in message and "digest mismatch" in message and "Restore it" in message
        assert "\n" not in message


@pytest.mark.parametrize("what", ["one bit of a buffer", "an extra value", "the config"])
def test_the_digest_covers_every_tensor_and_the_rest_of_the_payload(tmp_path, what):
    _, path = _small_checkpoint(tmp_path / "ckpt.pt", epoch=3, metrics={"va": 0.25})
    raw = torch.load(path, weights_only=True)
    if what == "one bit of a buffer":  # a small tensor: the digest is not only over the large ones
        var = [v for k, v in raw["state_dict"].items() if k.endswith("running_var")][-1]
        var.view(torch.int32)[0] ^= 1
    elif what == "an extra value":
        raw["metrics"]["va"] = 0.5
    else:
        raw["config"]["feature_dim"] = 32
    torch.save(raw, path)  # the old digest travels with the changed content
    with pytest.raises(CheckpointError, match="digest mismatch"):
        read_checkpoint(path)


def test_the_digest_tells_apart_what_serialises_alike():
    from mtanet.models.integrity import payload_digest

    same_bytes = [torch.zeros(2, 3), torch.zeros(3, 2), torch.zeros(6, dtype=torch.int32), torch.zeros(6)]
    values = [[1], (1,), [1.0], [True], ["1"], [None], {"a": 1}, {"a": [1]}, [[1], []], [[], [1]], *same_bytes]
    digests = [payload_digest({"x": v}) for v in values]
    assert len(set(digests)) == len(values)
    assert payload_digest({"x": torch.arange(4.0)}) == payload_digest({"x": torch.arange(4.0)[None][0]})
    assert payload_digest({"x": 1, "digest": "sha256:old"}) == payload_digest({"x": 1})  # never covers itself


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "a plain tensor"])
def test_unreadable_or_foreign_files_are_a_checkpoint_error_naming_the_file(tmp_path, damage, kind):
    _, path = _small_checkpoint(tmp_path / "ckpt.pt")
    if kind == "truncated":
        damage.truncate(path)
    elif kind == "empty":
        damage.empty(path)
    elif kind == "text":
        path.write_text("epoch: 3\n")
    else:
        torch.save(torch.zeros(3), path)
    for read in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError) as err:
            read(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        assert ("not an MTANet checkpoint" if kind == "a plain tensor" else "cannot be read") in str(err.value)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")


def _without_dac_capabilities() -> None:
    """Runs in the child before exec: root reads any file; dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from
    the bounding set makes it obey file modes like a plain user (the project's Python lives below /root, so the
    child cannot become ``nobody``)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP


def test_an_unreadable_checkpoint_is_one_line_about_reading_not_about_its_content(tmp_path):
    import os
    import subprocess
    import sys

    _, path = _small_checkpoint(tmp_path / "ckpt.pt")
    path.chmod(0)
    script = ("import sys\nfrom mtanet.errors import CheckpointError\nfrom mtanet.models import load_model\n"
              "try:\n    open(sys.argv[1], 'rb').close()\nexcept PermissionError:\n    pass\nelse:\n"
              "    sys.exit(3)\ntry:\n    load_model(sys.argv[1])\nexcept CheckpointError as err:\n    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120,
                          preexec_fn=_without_dac_capabilities if os.geteuid() == 0 else None)
    if done.returncode == 3:
        pytest.skip("this process reads a mode-000 file even without the DAC capabilities")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{path} cannot be read (Permission denied); check that it is readable"


def test_a_checkpoint_without_a_digest_loads_with_a_warning_until_saved_again(tmp_path):
    model, _ = _small_checkpoint(tmp_path / "new.pt")
    old = tmp_path / "old.pt"
    torch.save({"config": model.config, "state_dict": model.state_dict(), "epoch": 1}, old)  # before digests
    with pytest.warns(UserWarning, match=r"old\.pt carries no digest"):
        loaded = load_model(old)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    save_checkpoint(loaded, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(old)
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a plain state dict is no checkpoint: read as it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MTANet("senet18", feature_dim=64, weights_path=tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="digest"):
        save_checkpoint(model, tmp_path / "x.pt", extra={"digest": "mine"})


# ----------------------------------------------------------------------------------------------- VGGFace2 weights


def to_cydonia_key(key: str) -> str:
    """timm legacy_seresnet50 name -> cydonia999 senet50_ft pickle name (the inverse of ABAW2020.md's map)."""
    if key.startswith("layer0."):
        return key[len("layer0."):]
    if key.startswith("last_linear."):
        return "fc." + key[len("last_linear."):]
    return key.replace(".se_module.fc1.", ".conv4.").replace(".se_module.fc2.", ".conv5.")


@pytest.fixture(scope="module")
def senet50_reference():
    return timm.create_model("legacy_seresnet50", pretrained=False, num_classes=8631)


@pytest.fixture(scope="module")
def senet50_ft_pickle(senet50_reference, tmp_path_factory):
    """A synthetic senet50_ft pickle: the port's key names and shapes, random float32 arrays, no BN counters."""
    rng = np.random.default_rng(0)
    weights = {}
    for key, value in senet50_reference.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var"):
            array = rng.uniform(0.5, 2.0, size=tuple(value.shape)).astype(np.float32)
        else:
            array = (0.01 * rng.standard_normal(size=tuple(value.shape), dtype=np.float32)).astype(np.float32)
        weights[to_cydonia_key(key)] = array
    assert weights["fc.weight"].shape == (8631, 2048)
    assert weights["layer1.0.conv4.weight"].shape == (16, 256, 1, 1)
    assert "conv1.weight" in weights and "bn1.running_mean" in weights
    path = tmp_path_factory.mktemp("vggface2") / "senet50_ft_weight.pkl"
    with open(path, "wb") as f:
        pickle.dump(weights, f, protocol=2)
    return path, weights


def test_convert_senet50_ft_strict_loads(senet50_reference, senet50_ft_pickle):
    path, weights = senet50_ft_pickle
    state = convert_senet50_ft(path)
    assert set(state) == set(senet50_reference.state_dict())
    senet50_reference.load_state_dict(state, strict=True)
    landed = senet50_reference.state_dict()
    checks = {
        "layer2.1.se_module.fc1.weight": "layer2.1.conv4.weight",
        "layer4.2.se_module.fc2.bias": "layer4.2.conv5.bias",
        "layer0.bn1.running_var": "bn1.running_var",
        "layer3.0.downsample.1.running_mean": "layer3.0.downsample.1.running_mean",
        "last_linear.weight": "fc.weight",
    }
    for timm_key, cydonia_key in checks.items():
        assert torch.equal(landed[timm_key], torch.from_numpy(weights[cydonia_key])), timm_key
    # the first convolution now reads RGB: its input channels are reversed
    assert torch.equal(landed["layer0.conv1.weight"][:, 0], torch.from_numpy(weights["conv1.weight"][:, 2]))
    assert torch.equal(convert_senet50_ft(weights, bgr_to_rgb=False)["layer0.conv1.weight"],
                       torch.from_numpy(weights["conv1.weight"]))


def test_converted_conv1_on_rgb_matches_the_bgr_port():
    """The port computes conv(BGR*255 - mean_bgr, W); ours conv(normalize(RGB), W converted) must agree."""
    torch.manual_seed(0)
    w_bgr = torch.randn(8, 3, 7, 7)
    w_rgb = convert_senet50_ft({"conv1.weight": w_bgr.numpy()})["layer0.conv1.weight"]
    rgb = torch.rand(1, 3, 16, 16)
    mean_bgr = torch.tensor([91.4953, 103.8827, 131.0912]).view(1, 3, 1, 1)
    port = torch.nn.functional.conv2d(rgb.flip(1) * 255 - mean_bgr, w_bgr)
    model = MTANet("senet18", input_norm="vggface2")
    ours = torch.nn.functional.conv2d(model.normalize(rgb), w_rgb)
    assert torch.allclose(ours, port, rtol=1e-4, atol=1e-2)


def test_load_vggface2_senet50(big_models, senet50_ft_pickle):
    path, weights = senet50_ft_pickle
    model = big_models("senet50")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        load_vggface2_senet50(model, path)
        state = model.backbone.state_dict()
        assert torch.equal(state["layer3.2.se_module.fc2.weight"], torch.from_numpy(weights["layer3.2.conv5.weight"]))
        assert not any(k.startswith("last_linear") for k in state)
        assert model.config["input_norm"] == "vggface2"
        gray = model.normalize(torch.full((1, 3, 2, 2), 0.5))
        want = 127.5 - torch.tensor(NORMALIZATIONS["vggface2"]["mean"]).view(1, 3, 1, 1)
        assert torch.allclose(gray, want.expand_as(gray))
        assert torch.allclose(want.flatten(), torch.tensor([127.5 - 131.0912, 127.5 - 103.8827, 127.5 - 91.4953]))
    finally:
        model.load_state_dict(saved)
        model.set_input_norm("imagenet")
    with pytest.raises(ValueError, match="senet50"):
        load_vggface2_senet50(MTANet("senet18"), weights)


def test_default_normalisation_is_imagenet():
    model = MTANet("resnext26")
    assert model.config["input_norm"] == "imagenet" and float(model.input_scale) == 1.0
    got = model.normalize(torch.full((1, 3, 1, 1), 0.5)).flatten()
    mean, std = torch.tensor(timm.data.IMAGENET_DEFAULT_MEAN), torch.tensor(timm.data.IMAGENET_DEFAULT_STD)
    assert torch.allclose(got, (0.5 - mean) / std)
    assert {"input_mean", "input_std", "input_scale"} <= set(model.state_dict())


# ------------------------------------------------------------------------------------------- pretrained, offline


@pytest.mark.parametrize("name", ["resnet18_cbam", "senet18"])  # a Hugging Face source and a URL-only source
def test_pretrained_without_local_file_raises_offline(name, no_network, empty_caches):
    with pytest.raises(PretrainedWeightsNotFound, match="nothing is downloaded") as err:
        MTANet(name, pretrained=True)
    hf_cache, hub_dir = empty_caches
    assert str(hf_cache) in str(err.value) or str(hub_dir) in str(err.value)


def test_pretrained_without_any_source_says_so(no_network, empty_caches):
    with pytest.raises(PretrainedWeightsNotFound, match="no pretrained weights"):
        MTANet("seresnet18", pretrained=True)


def test_pretrained_from_local_caches(no_network, empty_caches):
    import safetensors.torch

    hf_cache, hub_dir = empty_caches
    # Hugging Face cache layout for timm/resnet18.a1_in1k, with its 1000-class head; CBAM keys stay random.
    resnet18 = timm.create_model("resnet18", pretrained=False).state_dict()
    resnet18["layer1.0.conv1.weight"].fill_(0.125)
    repo = hf_cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(resnet18, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model = MTANet("resnet18_cbam", pretrained=True)
    assert torch.all(model.backbone.layer1[0].conv1.weight == 0.125)
    assert model.config["pretrained"] is True

    # torch hub cache for the URL-only legacy_seresnet18 weights
    legacy = timm.create_model("legacy_seresnet18", pretrained=False).state_dict()
    legacy["layer0.conv1.weight"].fill_(-0.5)
    (hub_dir / "checkpoints").mkdir()
    torch.save(legacy, hub_dir / "checkpoints" / "seresnet18-4bb0ce65.pth")
    model = MTANet("senet18", pretrained=True)
    assert torch.all(model.backbone.layer0.conv1.weight == -0.5)


# ---------------------------------------------------------------------------------------------------- size, cost


def test_parameter_counts_match_abaw2020(big_models):
    assert abs(count_parameters(big_models("resnext50").backbone) - 22.98e6) < 0.05e6
    assert abs(count_parameters(big_models("resnext50_cbam").backbone) - 25.50e6) < 0.05e6
    # neck (2 x Linear(2048, 512)) and heads (Linear(1024, 2 + 8 + 7)) of the paper's configuration
    model = big_models("resnext50")
    assert count_parameters(model) - count_parameters(model.backbone) == 2 * (2048 * 512 + 512) + 1024 * 17 + 17
    frozen = MTANet("senet18")
    frozen.backbone.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == count_parameters(frozen) - count_parameters(frozen.backbone)


def test_macs_counts_multiply_adds():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=False)
    assert macs(conv, image_size=112) == 112 * 112 * 8 * 3 * 9
    model = MTANet("senet18").train()
    small, large = macs(model, 56), macs(model, 112)
    assert model.training  # the mode is restored
    assert 3.5 * small < large < 4.5 * small


# ------------------------------------------------------------------------------------------------- probabilities


def test_probabilities_match_an_independent_computation():
    gen = torch.Generator().manual_seed(0)
    outputs = {"va": torch.rand(5, 2, generator=gen) * 2 - 1, "au": torch.randn(5, 8, generator=gen) * 4,
               "expr": torch.randn(5, 7, generator=gen) * 4}
    before = {k: v.clone() for k, v in outputs.items()}
    got = probabilities(outputs)
    assert set(got) == set(outputs) and got is not outputs
    x = outputs["au"].double().numpy()
    np.testing.assert_allclose(got["au"].numpy(), 1 / (1 + np.exp(-x)), rtol=1e-6, atol=1e-7)
    z = outputs["expr"].double().numpy()
    e = np.exp(z - z.max(axis=1, keepdims=True))
    np.testing.assert_allclose(got["expr"].numpy(), e / e.sum(axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert torch.equal(got["va"], outputs["va"])
    assert all(torch.equal(outputs[k], before[k]) for k in before)  # the input is left as it was
    # any subset of the heads; float64 in, float64 out, and the same as float32 up to rounding
    only_expr = probabilities({"expr": outputs["expr"].double()})
    assert set(only_expr) == {"expr"} and only_expr["expr"].dtype == torch.float64
    np.testing.assert_allclose(only_expr["expr"].numpy(), e / e.sum(axis=1, keepdims=True), rtol=1e-12)
    assert probabilities({"au": outputs["au"].half()})["au"].dtype == torch.float16
    assert probabilities({}) == {}
    # on a model's outputs: AU in (0, 1), expression rows sum to 1, VA untouched
    model = MTANet("seresnet18_half").eval()
    with torch.no_grad():
        raw = model(torch.rand(2, 3, 64, 64, generator=gen))
    p = probabilities(raw)
    assert torch.all((p["au"] > 0) & (p["au"] < 1)) and torch.allclose(p["expr"].sum(dim=1), torch.ones(2))
    assert torch.equal(p["va"], raw["va"])


def test_package_reexports_its_public_names():
    import mtanet.errors
    from mtanet.models import checkpoint, mtanet as net, weights

    for name in models.__all__:
        assert getattr(models, name) is not None, name
    assert models.PretrainedWeightsNotFound is mtanet.errors.PretrainedWeightsNotFound
    internal = {"load_timm_pretrained"}  # what MTANet(pretrained=True) calls
    assert (set(net.__all__) | set(checkpoint.__all__) | set(weights.__all__)) - internal <= set(models.__all__)
