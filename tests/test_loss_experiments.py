"""The loss chapter's helpers: literal equations against the package and torch, closed forms against autograd and
simulation, and the two-stage demo run through the trainer."""

from __future__ import annotations

import json
import math
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mtanet import losses as L
from mtanet.book import loss_experiments as X
from mtanet.errors import ConfigError
from mtanet.metrics import ccc
from mtanet.train import StageConfig
from mtanet.train.optim import make_optimizer


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ----------------------------------------------------------------------------------------------------------------------
# literal equations


def test_eq1_matches_package_and_categorical_likelihood(rng):
    logits = rng.normal(0, 2, (32, 7))
    target = rng.integers(0, 7, 32)
    target[[1, 5, 9]] = -1
    per_row = X.eq1_cross_entropy(logits, target)
    assert np.isnan(per_row[[1, 5, 9]]).all() and np.isfinite(np.delete(per_row, [1, 5, 9])).all()
    package = L.masked_cross_entropy(torch.tensor(logits), torch.tensor(target)).item()
    assert package == pytest.approx(np.nanmean(per_row), abs=1e-12)
    keep = target >= 0
    nll = -torch.distributions.Categorical(logits=torch.tensor(logits[keep])).log_prob(torch.tensor(target[keep]))
    np.testing.assert_allclose(per_row[keep], nll.numpy(), atol=1e-12)


def test_eq2_is_summed_bernoulli_nll_and_package_averages_over_aus(rng):
    logits = rng.normal(0, 3, (20, 8))
    target = rng.integers(0, 2, (20, 8)).astype(float)
    target[3, 2] = -1  # one -1 makes the whole row unlabeled
    per_row = X.eq2_bce(logits, target)
    assert np.isnan(per_row[3]) and np.isfinite(np.delete(per_row, 3)).all()
    package = L.masked_bce(torch.tensor(logits), torch.tensor(target)).item()
    assert package == pytest.approx(np.nanmean(per_row) / 8, abs=1e-12)
    keep = np.isfinite(per_row)
    nll = -torch.distributions.Bernoulli(logits=torch.tensor(logits[keep])).log_prob(torch.tensor(target[keep]))
    np.testing.assert_allclose(per_row[keep], nll.sum(1).numpy(), atol=1e-12)


def test_eq2_stable_for_large_logits():
    per_row = X.eq2_bce(np.array([[800.0, -800.0]]), np.array([[0.0, 1.0]]))
    assert per_row[0] == pytest.approx(1600.0)


def test_eq3_matches_metric_and_loss(rng):
    y = rng.normal(0, 0.4, 100)
    x = 0.5 * y + 0.2 + rng.normal(0, 0.3, 100)
    assert X.eq3_ccc(x, y) == pytest.approx(ccc(y, x), abs=1e-12)
    loss = L.ccc_loss(torch.tensor(x)[:, None], torch.tensor(np.clip(y, -1, 1))[:, None]).item()
    assert loss == pytest.approx(1 - X.eq3_ccc(x, np.clip(y, -1, 1)), abs=1e-12)


def test_ccc_gradient_matches_autograd(rng):
    y = rng.uniform(-1, 1, 50)
    x = torch.tensor(0.3 * y - 0.1 + rng.normal(0, 0.2, 50), requires_grad=True)
    rho = L.ccc_per_dim(x[:, None], torch.tensor(y)[:, None])[0]
    (grad,) = torch.autograd.grad(rho, x)
    np.testing.assert_allclose(X.ccc_gradient(x.detach().numpy(), y), grad.numpy(), atol=1e-12)
    # the gradient's sum is -rho * n * (mean x - mean y) * 2/(nD): it pulls the mean of x towards the mean of y,
    # up when x lies below y (as drawn here) and down once x is shifted above it
    for xs, direction in ((x.detach().numpy(), 1.0), (x.detach().numpy() + 1.0, -1.0)):
        gap, rho = xs.mean() - y.mean(), X.eq3_ccc(xs, y)
        assert np.sign(gap) == -direction and rho > 0
        total = X.ccc_gradient(xs, y).sum()
        assert total == pytest.approx(-rho * 2 * gap / (xs.var() + y.var() + gap ** 2), rel=1e-9)
        assert np.sign(total) == direction


def test_eq5_sigma_form_matches_uncertainty_weighting():
    w = L.UncertaintyWeighting().double()
    s = {"va": 0.4, "au": -1.2, "expr": 0.7}
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([s[t] for t in w.tasks], dtype=torch.float64))
    losses = {"va": 0.6, "au": 0.3, "expr": 1.7}
    package = w({t: torch.tensor(v, dtype=torch.float64) for t, v in losses.items()}).item()
    assert package == pytest.approx(X.eq5_total(losses, s), abs=1e-12)
    # a wrong factor would be caught: the classification form applied to VA differs
    assert X.eq5_total(losses, s, kinds={"va": "classification"}) != pytest.approx(package, abs=1e-3)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_optimal_log_var_is_where_the_gradient_vanishes(kind):
    task = "va" if kind == "regression" else "expr"
    for loss in (0.05, 0.7, 3.0):
        s_star = X.optimal_log_var(loss, kind)
        w = L.UncertaintyWeighting((task,)).double()
        with torch.no_grad():
            w.log_vars.fill_(s_star)
        w({task: torch.tensor(loss, dtype=torch.float64)}).backward()
        assert abs(w.log_vars.grad.item()) < 1e-12
        # the effective weight at the optimum is 1 / (2L) for either kind
        assert w.weights()[task] == pytest.approx(0.5 / loss)
    np.testing.assert_allclose(X.optimal_log_var(np.array([0.5, 2.0]), kind),
                               np.log((1 if kind == "regression" else 2) * np.array([0.5, 2.0])))
    with pytest.raises(ValueError, match="kind must be 'regression' or 'classification', got 'ordinal'"):
        X.optimal_log_var(1.0, "ordinal")


def test_relax_log_vars_converges_with_time_constant_two_over_lr():
    losses = {"va": 0.3, "au": 0.2, "expr": 1.5}
    trace = X.relax_log_vars(losses, steps=400, lr=0.2)
    assert len(trace) == 401 and (trace.iloc[0] == 0).all()
    for t, v in losses.items():
        assert trace[f"s_{t}"].iloc[-1] == pytest.approx(X.optimal_log_var(v, X.DEFAULT_KINDS[t]), abs=1e-8)
    # near the optimum the distance shrinks by 1 - lr/2 per step
    star = X.optimal_log_var(1.5, "classification")
    d = (trace["s_expr"] - star).abs().to_numpy()
    assert d[61] / d[60] == pytest.approx(1 - 0.2 / 2, abs=1e-3)


def test_scaled_softmax_approximation_exact_only_at_sigma_one():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(64, 7, generator=g, dtype=torch.float64) * 2
    c = torch.randint(0, 7, (64,), generator=g)
    exact, approx = X.scaled_softmax_nll(f, c, 1.0)
    assert exact == pytest.approx(approx, abs=1e-12)
    exact, approx = X.scaled_softmax_nll(f, c, 2.0)
    assert abs(exact - approx) > 0.05


# ----------------------------------------------------------------------------------------------------------------------
# MSE against CCC, batch bias


def test_example_predictors_rank_differently_under_mse_and_ccc(rng):
    y = np.clip(np.cumsum(rng.normal(0, 0.05, 500)), -1, 1)
    table = X.compare_predictors(y, X.example_predictors(y, r=0.4, seed=1))
    const, matched, ls = table.loc["constant mean"], table.loc["variance-matched z"], table.loc["least squares on z"]
    assert const["CCC"] == pytest.approx(0.0, abs=1e-12) and const["MSE"] == pytest.approx(y.var())
    assert matched["Pearson r"] == pytest.approx(0.4, abs=1e-9) and matched["CCC"] == pytest.approx(0.4, abs=1e-9)
    assert const["MSE"] < matched["MSE"] and const["CCC"] < matched["CCC"]
    # least squares has the lowest MSE of the three but a CCC of 2r^2 / (1 + r^2) < r
    assert ls["MSE"] < const["MSE"] and ls["CCC"] == pytest.approx(2 * 0.16 / 1.16, abs=1e-9)
    assert table.loc["shifted by 0.3", "Pearson r"] == pytest.approx(1.0) and table.loc["shifted by 0.3", "CCC"] < 1
    assert table.loc["half amplitude", "C_b"] == pytest.approx(2 / (0.5 + 2.0))  # scale error only
    varying = table.drop(index="constant mean")
    np.testing.assert_allclose(varying["CCC"], varying["Pearson r"] * varying["C_b"], atol=1e-12)
    assert np.isnan(const["C_b"])
    with pytest.raises(ValueError, match=r"r must lie in \(0, 1\), got 1.0"):
        X.example_predictors(y, r=1.0)


def test_batch_ccc_bias_below_population_and_shrinking():
    df = X.batch_ccc_bias([4, 16, 256], n_batches=3000, seed=0)
    rho = df["population"].iloc[0]
    assert rho == pytest.approx(X.population_ccc(0.35, 0.6, 0.1, 0.25))
    gap = rho - df["mean"]
    assert (gap > 3 * df["sem"]).iloc[:2].all()
    assert gap.iloc[0] > gap.iloc[1] > gap.iloc[2]
    # the 1/b expansion tracks the simulation from moderate batch sizes on; its first-order part alone does not
    err = (df["mean"] - df["expected"]).abs()
    assert (err.iloc[1:] < 4 * df["sem"].iloc[1:] + 1e-3).all()
    assert (df["mean"] - df["first_order"]).abs().iloc[1] > 5 * df["sem"].iloc[1]
    pd.testing.assert_frame_equal(df, X.batch_ccc_bias([4, 16, 256], n_batches=3000, seed=0))
    chunked = X.batch_ccc_bias([16], n_batches=3000, seed=1, max_elements=5000)  # 312 batches per chunk
    assert abs(chunked["mean"].iloc[0] - df["mean"].iloc[1]) < 5 * df["sem"].iloc[1]


def test_batch_ccc_bias_on_a_torch_device_draws_the_same_distribution():
    """The chapter's device (cuda in the gpu profile) draws with torch there; checked here with torch on the CPU."""
    numpy_draws = X.batch_ccc_bias([4, 64], n_batches=4000, seed=0)
    torch_draws = X.batch_ccc_bias([4, 64], n_batches=4000, seed=0, device="cpu", max_elements=10_000)
    assert not np.allclose(torch_draws["mean"], numpy_draws["mean"], rtol=0, atol=1e-12)  # other draws...
    both = np.sqrt(numpy_draws["sem"] ** 2 + torch_draws["sem"] ** 2)
    assert ((torch_draws["mean"] - numpy_draws["mean"]).abs() < 4 * both).all()  # ...of the same distribution
    assert ((torch_draws["mean"] - torch_draws["expected"]).abs().iloc[1] < 4 * torch_draws["sem"].iloc[1] + 1e-3)
    pd.testing.assert_frame_equal(torch_draws, X.batch_ccc_bias([4, 64], n_batches=4000, seed=0, device="cpu",
                                                                max_elements=10_000))  # seeded


def test_batch_ccc_expected_limits():
    var_x, var_y, cov, d = 0.1, 0.12, 0.07, 0.1
    rho = 2 * cov / (var_x + var_y + d**2)
    assert X.batch_ccc_expected(var_x, var_y, cov, d, 1e12) == pytest.approx(rho)
    assert X.batch_ccc_expected(var_x, var_y, cov, d, 10, second_order=False) == pytest.approx(rho * 9 / (10 - rho))
    # a perfect predictor has CCC 1 in every batch: no bias at any size
    assert X.batch_ccc_expected(0.1, 0.1, 0.1, 0.0, np.array([4, 32])) == pytest.approx([1.0, 1.0])


def test_population_ccc_matches_a_large_sample(rng):
    y = rng.normal(0, 0.35, 400_000)
    x = 0.6 * y + 0.1 + rng.normal(0, 0.25, y.size)
    assert X.eq3_ccc(x, y) == pytest.approx(X.population_ccc(0.35, 0.6, 0.1, 0.25), abs=3e-3)


# ----------------------------------------------------------------------------------------------------------------------
# the two-stage demo, through the trainer


@pytest.mark.parametrize(("steps_sum", "steps_uncertainty"), [(10, 30), (60, 180), (300, 1000), (7, 5), (0, 4), (4, 0)])
def test_weighting_demo_config_keeps_the_stage_lengths(tmp_path, steps_sum, steps_uncertainty):
    cfg = X.weighting_demo_config(tmp_path / "root", tmp_path / "run", steps_sum=steps_sum,
                                  steps_uncertainty=steps_uncertainty, lr_sum=2e-3, lr_finetune=3e-4,
                                  lr_log_vars=0.05, momentum=0.5, seed=3, dropout=0.25)
    assert cfg.steps_per_epoch == math.gcd(steps_sum, steps_uncertainty)
    assert cfg.stage1.epochs * cfg.steps_per_epoch == steps_sum
    assert cfg.stage2.epochs * cfg.steps_per_epoch == steps_uncertainty
    assert (cfg.stage1.weighting, cfg.stage1.optimizer, cfg.stage1.lr, cfg.stage1.weight_decay) == ("sum", "adam",
                                                                                                    2e-3, 1e-3)
    assert (cfg.stage2.weighting, cfg.stage2.optimizer, cfg.stage2.lr, cfg.stage2.weight_decay) == ("uncertainty",
                                                                                                    "sgd", 3e-4, 5e-3)
    assert (cfg.lr_log_vars, cfg.momentum, cfg.seed, cfg.dropout) == (0.05, 0.5, 3, 0.25)
    # no augmentation, a log row per step, validation only after the last epoch, checkpoints at epoch ends only
    assert (cfg.augment, cfg.log_every, cfg.val_every, cfg.checkpoint_every, cfg.progress) == (False, 1, 0, 0, False)
    assert cfg.data_root == str(tmp_path / "root") and cfg.output_dir == str(tmp_path / "run")


def test_weighting_demo_config_refuses_nothing_to_train(tmp_path):
    with pytest.raises(ConfigError, match="both 0"):
        X.weighting_demo_config(tmp_path, tmp_path / "run", steps_sum=0, steps_uncertainty=0)
    with pytest.raises(ConfigError, match=">= 0"):
        X.weighting_demo_config(tmp_path, tmp_path / "run", steps_sum=-1, steps_uncertainty=4)
    with pytest.raises(ConfigError, match="did you mean"):
        X.weighting_demo_config(tmp_path, tmp_path / "run", bach_size=4)


def test_read_step_log_turns_sigma_into_s(tmp_path):
    cfg = X.weighting_demo_config(tmp_path, tmp_path / "run", steps_sum=1, steps_uncertainty=2)
    sigma = {"va": 0.9, "au": 1.0, "expr": 1.3}
    rows = [
        {"kind": "step", "stage": 1, "epoch": 1, "step": 1, "loss_va": 0.8, "loss_au": 0.6, "loss_expr": 1.9,
         "loss_total": 3.3, "lr": 1e-3, "w_va": 1.0, "w_au": 1.0, "w_expr": 1.0, "images_per_s": 5.0},
        {"kind": "epoch", "stage": 1, "epoch": 1, "step": 1, "loss_va": 0.8, "val_mean": 0.1},
        {"kind": "step", "stage": 2, "epoch": 2, "step": 2, "loss_va": None, "loss_au": 0.5, "loss_expr": 1.7,
         "loss_total": 2.0, "lr": 1e-4, **{f"w_{t}": 0.4 for t in sigma},
         **{f"sigma_{t}": v for t, v in sigma.items()}},
    ]
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = X.read_step_log(path, cfg)
    assert list(log["step"]) == [1, 2] and list(log["stage"]) == ["sum", "uncertainty"]
    assert {"total", "lr", "loss_va", "w_expr", "s_au", "sigma_expr"} <= set(log.columns)
    assert log.loc[0, ["s_va", "s_au", "s_expr", "sigma_va", "sigma_au", "sigma_expr"]].isna().all()
    for t, v in sigma.items():
        assert log.loc[1, f"s_{t}"] == pytest.approx(2 * math.log(v), abs=1e-15)
        assert log.loc[1, f"sigma_{t}"] == v
    assert math.isnan(log.loc[1, "loss_va"]) and log.loc[1, "total"] == 2.0 and log.loc[1, "lr"] == 1e-4


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_trainer_stage2_optimizer_drives_s_to_its_closed_form(momentum):
    # the trainer's stage-2 optimiser with the task losses held fixed (a frozen network): every s reaches log(2cL),
    # which it would miss if the optimiser put weight decay on s
    losses = {"va": 0.3, "au": 0.2, "expr": 1.5}
    weighting = L.UncertaintyWeighting().double()
    network = nn.Linear(2, 2)  # in the first group; it gets no gradient, so SGD leaves it alone
    stage = StageConfig(epochs=1, weighting="uncertainty", optimizer="sgd", lr=1e-4, weight_decay=5e-3)
    opt = make_optimizer(stage, network, weighting, momentum=momentum, lr_log_vars=0.5)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[1]["lr"] == 0.5
    before = [p.detach().clone() for p in network.parameters()]
    fixed = {t: torch.tensor(v, dtype=torch.float64) for t, v in losses.items()}
    for _ in range(400):
        opt.zero_grad(set_to_none=True)
        weighting(fixed).backward()
        opt.step()
    for i, t in enumerate(weighting.tasks):
        star = X.optimal_log_var(losses[t], X.DEFAULT_KINDS[t])
        assert weighting.log_vars[i].item() == pytest.approx(star, abs=1e-6)
        assert weighting.weights()[t] == pytest.approx(0.5 / losses[t], rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, network.parameters()))


SMOKE_DEMO = dict(backbone="seresnet18", image_size=32, feature_dim=32, batch_size=6, lr_log_vars=0.1, momentum=0.0)


@pytest.mark.slow
def test_run_weighting_demo_through_the_trainer(smoke_root, tmp_path, monkeypatch):
    # 2 + 3 steps: one step per epoch, so the stages are 2 and 3 epochs of the trainer
    kw = dict(SMOKE_DEMO, steps_sum=2, steps_uncertainty=3)
    log = X.run_weighting_demo(smoke_root, output_dir=tmp_path / "run", **kw)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 5 and metrics["steps_per_epoch"] == 1 and metrics["final_epoch"] == 5
    assert [h["epoch"] for h in metrics["history"]] == [5]  # validated once, after the last epoch
    assert list(log["step"]) == [1, 2, 3, 4, 5] and list(log["stage"]) == ["sum"] * 2 + ["uncertainty"] * 3
    assert np.isfinite(log[["loss_va", "loss_au", "loss_expr", "total"]].to_numpy()).all()
    sum_stage, eq5 = log[log.stage == "sum"], log[log.stage == "uncertainty"]
    assert (sum_stage[["w_va", "w_au", "w_expr"]] == 1.0).all().all() and (sum_stage["lr"] == 1e-3).all()
    assert sum_stage[[f"{k}_{t}" for k in ("s", "sigma") for t in ("va", "au", "expr")]].isna().all().all()
    assert (eq5["lr"] == 1e-4).all()
    factor = {"va": 0.5, "au": 1.0, "expr": 1.0}
    for t, c in factor.items():
        assert eq5[f"s_{t}"].notna().all() and (eq5[f"s_{t}"].abs() > 0).all()
        np.testing.assert_allclose(eq5[f"sigma_{t}"], np.exp(eq5[f"s_{t}"] / 2), rtol=1e-12)
        np.testing.assert_allclose(eq5[f"w_{t}"], c * np.exp(-eq5[f"s_{t}"]), rtol=1e-5)
        # stage 1 moved no s: the first step of eq. 5 (plain SGD) starts from s = 0, where ds = lr (c L - 1/2)
        first = eq5.iloc[0]
        assert first[f"s_{t}"] == pytest.approx(0.1 * (c * first[f"loss_{t}"] - 0.5), rel=1e-4, abs=1e-6)
    # the last row holds the run's final s, as its resume checkpoint does
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    final = state["weightings"]["uncertainty"]["log_vars"].double().numpy()
    np.testing.assert_allclose(log[["s_va", "s_au", "s_expr"]].iloc[-1].to_numpy(), final, rtol=1e-5, atol=1e-7)
    # the same seed gives the same log; the temporary run folder is removed
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    again = X.run_weighting_demo(smoke_root, **kw)
    pd.testing.assert_frame_equal(log, again)
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
def test_run_weighting_demo_sum_stage_only_moves_no_s(smoke_root, tmp_path):
    log = X.run_weighting_demo(smoke_root, output_dir=tmp_path / "run", steps_sum=3, steps_uncertainty=0,
                               **SMOKE_DEMO)
    assert list(log["step"]) == [1, 2, 3] and (log["stage"] == "sum").all()
    assert log[[f"{k}_{t}" for k in ("s", "sigma") for t in ("va", "au", "expr")]].isna().all().all()
    assert (log[["w_va", "w_au", "w_expr"]] == 1.0).all().all()
    # the uncertainty parameters of the run were never trained
    state = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    assert torch.all(state["weightings"]["uncertainty"]["log_vars"] == 0)
