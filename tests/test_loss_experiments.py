"""The loss chapter's helpers: literal equations against the package and torch, closed forms against autograd and
simulation, and the two-stage training loop on tiny tensors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mtanet import losses as L
from mtanet.book import loss_experiments as X
from mtanet.metrics import ccc


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
    # the gradient's sum is -rho * n * (mean x - mean y) * 2/(nD): it pulls the mean of x towards the mean of y
    assert X.ccc_gradient(x.detach().numpy(), y).sum() > 0 if x.mean() < y.mean() else True


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
    with pytest.raises(ValueError):
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
    with pytest.raises(ValueError):
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
# the training loop on tiny tensors


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3 * 4 * 4, 16)
        self.heads = nn.ModuleDict({"va": nn.Linear(16, 2), "au": nn.Linear(16, 8), "expr": nn.Linear(16, 7)})

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        out = {t: head(h) for t, head in self.heads.items()}
        out["va"] = torch.tanh(out["va"])
        return out


def _tiny_batches(seed=0, b=12):
    g = torch.Generator().manual_seed(seed)
    while True:
        images = torch.rand(b, 3, 4, 4, generator=g)
        targets = {"va": torch.rand(b, 2, generator=g) * 2 - 1, "au": torch.randint(0, 2, (b, 8), generator=g).float(),
                   "expr": torch.randint(0, 7, (b,), generator=g)}
        rows = torch.arange(b)
        masks = {"va": rows % 3 != 0, "au": rows % 2 == 0, "expr": torch.ones(b, dtype=torch.bool)}
        yield images, targets, masks


def _run(**kw):
    torch.manual_seed(0)
    return X.two_stage_training(TinyNet(), _tiny_batches(), **{"steps_sum": 3, "steps_uncertainty": 5, **kw})


def test_two_stage_training_log_and_determinism():
    log, w = _run()
    assert len(log) == 8 and list(log["stage"]) == ["sum"] * 3 + ["uncertainty"] * 5
    assert (log.loc[log.stage == "sum", ["w_va", "w_au", "w_expr"]] == 1.0).all().all()
    assert log.loc[log.stage == "sum", "s_va"].isna().all()
    assert log.loc[log.stage == "uncertainty", "s_va"].notna().all()
    assert np.isfinite(log[["loss_va", "loss_au", "loss_expr", "total"]].to_numpy()).all()
    last = log.iloc[-1]
    for i, t in enumerate(w.tasks):
        assert last[f"s_{t}"] == pytest.approx(w.log_vars[i].item())
        assert last[f"w_{t}"] == pytest.approx(w.weights()[t])
        assert last[f"sigma_{t}"] == pytest.approx(math.exp(0.5 * w.log_vars[i].item()))
    assert (log.loc[log.stage == "uncertainty", ["s_va", "s_au", "s_expr"]].abs() > 0).all().all()
    log2, _ = _run()
    pd.testing.assert_frame_equal(log, log2)


def test_two_stage_training_s_reaches_closed_form_when_network_is_frozen():
    # network frozen (lr 0) and one batch repeated: the losses are constants and every s must reach its optimum
    batch = next(_tiny_batches())
    torch.manual_seed(0)
    model = TinyNet()
    log, w = X.two_stage_training(model, iter([batch] * 300), steps_sum=0, steps_uncertainty=300, lr_finetune=0.0,
                                  weight_decay_finetune=0.0, lr_log_vars=0.5)
    model.train()
    for t in w.tasks:
        loss = log[f"loss_{t}"].iloc[-1]
        assert log[f"loss_{t}"].std() < 1e-6
        assert log[f"s_{t}"].iloc[-1] == pytest.approx(X.optimal_log_var(loss, X.DEFAULT_KINDS[t]), abs=1e-4)


def test_two_stage_training_sum_stage_only_moves_no_s():
    log, w = _run(steps_uncertainty=0)
    assert len(log) == 3 and torch.all(w.log_vars == 0)


@pytest.mark.slow
def test_run_weighting_demo_on_smoke_data(smoke_root):
    from mtanet.data import load_frames
    from mtanet.tasks import EDITIONS

    frames = load_frames(smoke_root, "train")
    ed = EDITIONS["2020"]
    kw = dict(backbone="seresnet18", image_size=32, feature_dim=32, batch_size=6, steps_sum=1, steps_uncertainty=2)
    log, w = X.run_weighting_demo(smoke_root, frames, ed.au_names, len(ed.expr_names), **kw)
    assert len(log) == 3 and np.isfinite(log[["loss_va", "loss_au", "loss_expr"]].to_numpy()).all()
    log2, _ = X.run_weighting_demo(smoke_root, frames, ed.au_names, len(ed.expr_names), **kw)
    pd.testing.assert_frame_equal(log, log2)
