"""Tests of mtanet.models.inspect: stage shapes, size tables and attention capture, on the small backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtanet.models import inspect as im
from mtanet.models import MTANet, count_parameters, macs


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def senet18() -> MTANet:
    torch.manual_seed(0)
    return MTANet("senet18")


def test_backbone_stages_finds_four_stages():
    assert [n for n, _ in im.backbone_stages(MTANet("senet18").backbone)] == ["layer1", "layer2", "layer3", "layer4"]
    assert [n for n, _ in im.backbone_stages(MTANet("resnext26").backbone)] == [f"stages.{i}" for i in range(4)]
    with pytest.raises(ValueError, match="cannot find the stages"):
        im.backbone_stages(torch.nn.Linear(2, 2))


def test_stage_table_shapes_and_partition(senet18, images):
    senet18.train()
    table = im.stage_table(senet18, images).set_index("part")
    assert senet18.training  # mode restored
    assert table.loc["stem", "input"] == "3x112x112"
    assert table.loc["stem", "output"] == "64x28x28"
    assert table.loc["layer1", "output"] == "64x28x28"
    assert table.loc["layer2", "output"] == "128x14x14"
    assert table.loc["layer3", "output"] == "256x7x7"
    assert table.loc["layer4", "output"] == "512x4x4"
    assert table.loc["neck avg_fc", "input"] == "512" and table.loc["neck avg_fc", "output"] == "512"
    assert table.loc["neck max_fc", "output"] == "512"
    assert table.loc["neck output", "input"] == "512x4x4" and table.loc["neck output", "output"] == "1024"
    assert [table.loc[f"head {t}", "output"] for t in ("va", "au", "expr")] == ["2", "8", "7"]
    # the rows partition the model: parameters and MACs add up to the whole
    assert table["parameters"].sum() == count_parameters(senet18)
    assert table["macs"].sum() == macs(senet18, 112)
    assert (table["macs"] >= 0).all()
    assert table.loc["neck avg_fc", "parameters"] == 512 * 512 + 512
    assert table.loc["neck avg_fc", "macs"] == 512 * 512
    assert table.loc["head au", "macs"] == 1024 * 8
    assert not senet18._forward_hooks and not senet18.neck._forward_hooks  # hooks removed


def test_stage_table_single_branch_neck(images):
    model = MTANet("resnext26", pooling="avg", num_outputs={"expr": 8})
    table = im.stage_table(model, images[:1]).set_index("part")
    assert table.loc["stem", "output"] == "64x28x28"
    assert table.loc["stages.3", "output"] == "2048x4x4"
    assert table.loc["neck fc", "input"] == "2048" and table.loc["neck fc", "output"] == "1024"
    assert table.loc["head expr", "output"] == "8"
    assert "head va" not in table.index
    assert table["parameters"].sum() == count_parameters(model)
    assert table["macs"].sum() == macs(model, 112)


def test_model_costs(senet18):
    costs = im.model_costs(senet18, 112)
    assert costs["feature_map"] == "512x4x4"
    assert costs["params_neck"] == 2 * (512 * 512 + 512)
    assert costs["params_heads"] == 1025 * (2 + 8 + 7)
    assert costs["params_backbone"] + costs["params_neck"] + costs["params_heads"] == costs["params_total"]
    assert costs["params_total"] == count_parameters(senet18)
    assert costs["macs"] == macs(senet18, 112)
    assert im.model_costs(senet18, 64)["feature_map"] == "512x2x2"


def test_neck_table_measures_every_mode():
    table = im.neck_table(2048, 1024, 4)
    assert list(table.index) == ["avgmax_concat", "avg", "avgmax_add"]
    assert (table["output"] == 1024).all()
    # two 2048->512 layers or one 2048->1024 layer: the same number of weights
    assert (table["parameters"] == 2 * (2048 * 512 + 512)).all()
    assert table.loc["avgmax_concat", "linear_layers"] == "avg_fc 2048->512, max_fc 2048->512"
    assert table.loc["avg", "linear_layers"] == "fc 2048->1024"


def test_heads_table_per_edition():
    table = im.heads_table(1024)
    assert table.loc["2020", ["va_outputs", "au_outputs", "expr_outputs"]].tolist() == [2, 8, 7]
    assert table.loc["2021", ["va_outputs", "au_outputs", "expr_outputs"]].tolist() == [2, 12, 7]
    assert table.loc["2022", ["va_outputs", "au_outputs", "expr_outputs"]].tolist() == [2, 12, 8]
    assert table.loc["2020", "head_parameters"] == 1025 * 17
    assert table.loc["2022", "expr_names"].split()[-1] == "Other"


def test_normalization_table():
    table = im.normalization_table()
    assert table.loc[("imagenet", "R"), "at_0"] == pytest.approx(-0.485 / 0.229)
    assert table.loc[("imagenet", "B"), "at_1"] == pytest.approx((1 - 0.406) / 0.225)
    assert table.loc[("vggface2", "R"), "at_1"] == pytest.approx(255 - 131.0912)
    assert table.loc[("vggface2", "B"), "at_0"] == pytest.approx(-91.4953)


@pytest.mark.parametrize("name, kinds", [
    ("senet18", {"se": 8}),
    ("seresnet18", {"se": 8}),
    ("resnet18_cbam", {"cbam_channel": 8, "cbam_spatial": 8}),
    ("resnext26", {}),
])
def test_attention_modules_found(name, kinds):
    found = im.attention_modules(MTANet(name).backbone)
    counts: dict[str, int] = {}
    for _, kind, gate in found:
        counts[kind] = counts.get(kind, 0) + 1
        assert type(gate).__name__ == "Sigmoid"  # torch.nn.Sigmoid or timm.layers.activations.Sigmoid
    assert counts == kinds


def test_capture_attention_se(senet18, images):
    records = im.capture_attention(senet18, images)
    assert [r.module for r in records][:2] == ["layer1.0.se_module", "layer1.1.se_module"]
    assert [(r.stage, r.block) for r in records][-1] == ("layer4", 1)
    widths = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    for r in records:
        assert r.kind == "se" and r.gate.shape == (3, widths[r.stage])
        assert ((r.gate > 0) & (r.gate < 1)).all()
    # the captured gate is what the module multiplied the features by
    block = senet18.backbone.layer1[0].se_module
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.update(x=a[0], y=out))
    senet18.eval()
    with torch.no_grad():
        senet18(images)
    handle.remove()
    torch.testing.assert_close(seen["y"], seen["x"] * records[0].gate[:, :, None, None])
    assert not block.sigmoid._forward_hooks


def test_capture_attention_cbam_and_zero_init(images):
    torch.manual_seed(0)
    model = MTANet("resnet18_cbam")
    records = im.capture_attention(model, images)
    spatial = [r for r in records if r.kind == "cbam_spatial"]
    assert [tuple(r.gate.shape) for r in spatial[::2]] == [(3, 28, 28), (3, 14, 14), (3, 7, 7), (3, 4, 4)]
    # timm's zero_init_last: a fresh block's CBAM sees zeros, so its channel gates are exactly sigmoid(0)
    for r in records:
        if r.kind == "cbam_channel":
            assert torch.equal(r.gate, torch.full_like(r.gate, 0.5))
    changed = im.undo_zero_init_last(model)
    assert changed == [f"backbone.layer{s}.{b}.bn2" for s in range(1, 5) for b in range(2)]
    assert im.undo_zero_init_last(model) == []
    records = im.capture_attention(model, images)
    channel = [r.gate for r in records if r.kind == "cbam_channel"]
    assert all(g.std() > 0.01 for g in channel)
    assert im.undo_zero_init_last(MTANet("senet18")) == []  # the legacy SENet starts without zeroed BatchNorms


def test_gate_summary_against_numpy():
    gate = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.5, 0.7]])
    rec = [im.AttentionRecord("layer2.0.se", "layer2", 0, "se", gate),
           im.AttentionRecord("layer2.0.sp", "layer2", 0, "cbam_spatial", torch.rand(2, 4, 4))]
    summary = im.gate_summary(rec)
    assert len(summary) == 1
    row = summary.iloc[0]
    g = gate.numpy().astype(float)
    assert row["channels"] == 3 and row["stage"] == "layer2"
    assert row["mean"] == pytest.approx(g.mean())
    assert row["std"] == pytest.approx(g.std())
    assert row["across_images"] == pytest.approx(np.mean([0.1, 0.0, 0.1]))
    assert row["across_channels"] == pytest.approx(np.std([0.2, 0.5, 0.8]))
    assert (row["min"], row["max"]) == pytest.approx((0.1, 0.9))


def test_stage_gates_and_upsample():
    recs = [im.AttentionRecord(f"layer1.{b}.se", "layer1", b, "se", torch.full((2, 4), 0.5)) for b in range(2)]
    recs.append(im.AttentionRecord("layer2.0.se", "layer2", 0, "se", torch.full((2, 8), 0.25)))
    pooled = im.stage_gates(recs, "se")
    assert list(pooled) == ["layer1", "layer2"]
    assert pooled["layer1"].shape == (16,) and pooled["layer2"].shape == (16,)
    assert im.stage_gates(recs, "cbam_channel") == {}
    maps = im.upsample_maps(torch.full((2, 4, 4), 0.3), 112)
    assert maps.shape == (2, 112, 112)
    np.testing.assert_allclose(maps, 0.3, rtol=1e-6)
