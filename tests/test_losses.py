"""Task losses and loss weightings against plain numpy formulas, gradcheck and the closed-form optimum of eq. 5."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.func import functional_call

from mtanet import losses as L
from mtanet import metrics as M


def np_ccc(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    sxy = np.mean((x - x.mean()) * (y - y.mean()))
    return 2 * sxy / (x.var() + y.var() + (x.mean() - y.mean()) ** 2)


def np_ce(logits, target):
    """Eq. 1 per row: -x[class] + log sum exp x."""
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return -logits[np.arange(len(target)), target] + lse


def np_bce(logits, y, pos_weight=None):
    """Eq. 2 per entry, optionally with a positive weight."""
    pw = 1.0 if pos_weight is None else pos_weight
    log_sig = -np.logaddexp(0, -logits)  # log sigmoid(x)
    log_one_minus = -np.logaddexp(0, logits)  # log(1 - sigmoid(x))
    return -(pw * y * log_sig + (1 - y) * log_one_minus)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _va(gen, b=64, dtype=torch.float64):
    t = torch.rand(b, 2, generator=gen, dtype=dtype) * 2 - 1
    p = (0.5 * t + 0.3 * torch.randn(b, 2, generator=gen, dtype=dtype)).requires_grad_()
    return p, t


# ----------------------------------------------------------------------------------------------------------------------
# CCC loss


def test_ccc_loss_matches_numpy_and_metric(gen):
    p, t = _va(gen)
    loss = L.ccc_loss(p, t)
    pn, tn = p.detach().numpy(), t.numpy()
    expected = 1 - 0.5 * (np_ccc(pn[:, 0], tn[:, 0]) + np_ccc(pn[:, 1], tn[:, 1]))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert loss.item() == pytest.approx(1 - M.va_score(tn, pn)["score"], abs=1e-12)


def test_ccc_loss_ignores_sentinel_and_masked_rows(gen):
    p, t = _va(gen, b=40)
    t_s = t.clone()
    t_s[:10] = -5.0  # sentinel rows
    t_s[10, 1] = float("nan")  # NaN in one column
    mask = torch.ones(40, dtype=torch.bool)
    mask[30:] = False  # caller mask narrows further
    loss = L.ccc_loss(p, t_s, mask)
    keep = slice(11, 30)
    pn, tn = p.detach().numpy()[keep], t.numpy()[keep]
    expected = 1 - 0.5 * (np_ccc(pn[:, 0], tn[:, 0]) + np_ccc(pn[:, 1], tn[:, 1]))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    loss.backward()
    assert torch.all(p.grad[:11] == 0) and torch.all(p.grad[30:] == 0)
    assert torch.all(torch.isfinite(p.grad)) and p.grad[11:30].abs().sum() > 0


def test_ccc_loss_all_masked_is_zero_with_grad(gen):
    p, t = _va(gen, b=8)
    loss = L.ccc_loss(p, torch.full_like(t, -5.0))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(p.grad, torch.zeros_like(p))
    p.grad = None
    loss = L.ccc_loss(p, t, torch.zeros(8, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p))


def test_ccc_loss_constant_and_degenerate_cases():
    t = torch.tensor([[0.1, -0.3], [0.5, 0.2], [-0.4, 0.9]], dtype=torch.float64)
    p = torch.full_like(t, 0.2).requires_grad_()
    loss = L.ccc_loss(p, t)  # constant prediction: CCC 0 in both dimensions
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.all(torch.isfinite(p.grad)) and p.grad.abs().sum() > 0  # it can still learn to spread out
    # one labeled row: both "columns" constant; unequal -> CCC 0, identical -> CCC 1 (as metrics.ccc), never NaN
    one = torch.tensor([[0.3, 0.3]], dtype=torch.float64, requires_grad=True)
    loss = L.ccc_loss(one, torch.tensor([[0.3, -0.2]], dtype=torch.float64))
    assert loss.item() == pytest.approx(1 - 0.5 * (1 + 0))
    assert M.ccc([0.3], [0.3]) == 1.0 and M.ccc([-0.2], [0.3]) == 0.0
    loss.backward()
    assert torch.all(torch.isfinite(one.grad))


def test_ccc_loss_gradcheck(gen):
    p, t = _va(gen, b=12)
    mask = torch.ones(12, dtype=torch.bool)
    mask[::4] = False
    t = t.clone()
    t[1] = -5.0
    assert torch.autograd.gradcheck(lambda x, y: L.ccc_loss(x, y, mask), (p, t.requires_grad_()))


def test_ccc_loss_shape_errors():
    with pytest.raises(ValueError, match=r"pred \(4, 2\) and target \(4, 3\) differ"):
        L.ccc_loss(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="mask"):
        L.ccc_loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(5, dtype=torch.bool))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(3, 30).flatmap(
        lambda n: st.tuples(
            arrays(np.float64, (n, 2), elements=st.floats(-3, 3)), arrays(np.float64, (n, 2), elements=st.floats(-1, 1))
        )
    )
)
def test_ccc_loss_property(pt):
    p, t = pt
    loss = L.ccc_loss(torch.from_numpy(p), torch.from_numpy(t)).item()
    assert 0.0 <= loss <= 2.0 + 1e-12
    assert loss == pytest.approx(1 - M.va_score(t, p)["score"], abs=1e-9)
    assert L.ccc_loss(torch.from_numpy(t), torch.from_numpy(t)).item() == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------------------------------------
# cross entropy and BCE


def test_masked_cross_entropy_matches_eq1(gen):
    logits = torch.randn(20, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (20,), generator=gen)
    target[[2, 5, 11]] = -1
    mask = torch.ones(20, dtype=torch.bool)
    mask[15:] = False
    loss = L.masked_cross_entropy(logits, target, mask)
    keep = (target != -1) & mask
    per_row = np_ce(logits.detach().numpy()[keep.numpy()], target[keep].numpy())
    assert loss.item() == pytest.approx(per_row.mean(), abs=1e-12)
    # without a mask only the sentinel rows go
    keep = (target != -1).numpy()
    ref = np_ce(logits.detach().numpy()[keep], target.numpy()[keep]).mean()
    assert L.masked_cross_entropy(logits, target).item() == pytest.approx(ref, abs=1e-12)


def test_masked_cross_entropy_class_weight(gen):
    logits = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    target = torch.randint(0, 7, (30,), generator=gen)
    target[:5] = -1
    w = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    t = target[5:].numpy()
    per_row = np_ce(logits.numpy()[5:], t)
    expected = (w.numpy()[t] * per_row).sum() / w.numpy()[t].sum()
    assert L.masked_cross_entropy(logits, target, weight=w).item() == pytest.approx(expected, abs=1e-12)


def test_masked_bce_matches_eq2(gen):
    logits = torch.randn(16, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    target = (torch.rand(16, 8, generator=gen) < 0.3).double()
    target[3, 5] = -1  # one -1 makes the whole row unlabeled
    target[7] = -1
    loss = L.masked_bce(logits, target)
    keep = np.ones(16, bool)
    keep[[3, 7]] = False
    ref = np_bce(logits.detach().numpy()[keep], target.numpy()[keep]).mean()
    assert loss.item() == pytest.approx(ref, abs=1e-12)
    loss.backward()
    assert torch.all(logits.grad[[3, 7]] == 0) and torch.all(torch.isfinite(logits.grad))


def test_masked_bce_pos_weight_and_entry_mask(gen):
    logits = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    target = (torch.rand(10, 4, generator=gen) < 0.5).double()
    pw = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    ref = np_bce(logits.numpy(), target.numpy(), pw.numpy()).mean()
    assert L.masked_bce(logits, target, pos_weight=pw).item() == pytest.approx(ref, abs=1e-12)
    # a (B, K) mask selects entries; a (B,) mask selects rows
    entry = torch.rand(10, 4, generator=gen) < 0.5
    ref = np_bce(logits.numpy(), target.numpy())[entry.numpy()].mean()
    assert L.masked_bce(logits, target, entry).item() == pytest.approx(ref, abs=1e-12)
    rows = torch.arange(10) < 4
    ref = np_bce(logits.numpy()[:4], target.numpy()[:4]).mean()
    assert L.masked_bce(logits, target, rows).item() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("which", ["ce", "bce"])
def test_classification_losses_all_unlabeled_zero_with_grad(which):
    if which == "ce":
        logits = torch.randn(5, 7, requires_grad=True)
        loss = L.masked_cross_entropy(logits, torch.full((5,), -1))
    else:
        logits = torch.randn(5, 8, requires_grad=True)
        loss = L.masked_bce(logits, torch.full((5, 8), -1.0))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_losses_gradcheck_classification(gen):
    logits = torch.randn(6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -1, 6, 2, 2])
    assert torch.autograd.gradcheck(lambda x: L.masked_cross_entropy(x, target), (logits,))
    au_logits = torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    au = torch.tensor([[0, 1, 1], [1, 1, 0], [-1, 0, 0], [0, 0, 0], [1, 0, 1], [0, 1, 0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: L.masked_bce(x, au), (au_logits,))


# ----------------------------------------------------------------------------------------------------------------------
# task_losses


def _batch(gen, b=12):
    pred = {
        "va": torch.randn(b, 2, generator=gen, requires_grad=True),
        "au": torch.randn(b, 8, generator=gen, requires_grad=True),
        "expr": torch.randn(b, 7, generator=gen, requires_grad=True),
    }
    target = {
        "va": torch.rand(b, 2, generator=gen) * 2 - 1,
        "au": (torch.rand(b, 8, generator=gen) < 0.3).float(),
        "expr": torch.randint(0, 7, (b,), generator=gen),
    }
    target["va"][:3] = -5.0
    target["au"][4:6] = -1.0
    target["expr"][::3] = -1
    return pred, target


def test_task_losses_match_individual_losses(gen):
    pred, target = _batch(gen)
    mask = {"expr": torch.arange(12) < 8}
    out = L.task_losses(pred, target, mask)
    assert list(out) == ["va", "au", "expr"]
    assert out["va"].item() == pytest.approx(L.ccc_loss(pred["va"], target["va"]).item())
    assert out["au"].item() == pytest.approx(L.masked_bce(pred["au"], target["au"]).item())
    ref_expr = L.masked_cross_entropy(pred["expr"], target["expr"], mask["expr"])
    assert out["expr"].item() == pytest.approx(ref_expr.item())
    # the caller mask was really used: it changes the EXPR loss
    assert out["expr"].item() != pytest.approx(L.masked_cross_entropy(pred["expr"], target["expr"]).item())
    # only the tasks present in pred
    assert list(L.task_losses({"au": pred["au"]}, target)) == ["au"]
    with pytest.raises(KeyError):
        L.task_losses({"pose": pred["va"]}, {"pose": target["va"]})


def test_task_losses_skip_empty(gen):
    pred, target = _batch(gen)
    target["va"][:] = -5.0
    out = L.task_losses(pred, target)
    assert out["va"].item() == 0.0 and out["va"].requires_grad
    assert list(L.task_losses(pred, target, skip_empty=True)) == ["au", "expr"]
    mask = {"expr": torch.zeros(12, dtype=torch.bool)}
    assert list(L.task_losses(pred, target, mask, skip_empty=True)) == ["au"]


# ----------------------------------------------------------------------------------------------------------------------
# weightings


def _losses(va=0.7, au=0.4, expr=1.3, dtype=torch.float64):
    return {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in (("va", va), ("au", au), ("expr", expr))}


def test_sum_weighting():
    w = L.SumWeighting()
    ls = _losses()
    assert w(ls).item() == pytest.approx(0.7 + 0.4 + 1.3)
    assert w({"au": ls["au"]}).item() == pytest.approx(0.4)
    assert w.weights() == {"va": 1.0, "au": 1.0, "expr": 1.0}
    assert list(w.parameters()) == []


def test_uncertainty_at_init_is_half_va_plus_rest():
    w = L.UncertaintyWeighting()
    ls = _losses()
    assert w(ls).item() == pytest.approx(0.5 * 0.7 + 0.4 + 1.3, abs=1e-6)
    assert w.weights() == pytest.approx({"va": 0.5, "au": 1.0, "expr": 1.0})
    assert w.sigmas() == pytest.approx({"va": 1.0, "au": 1.0, "expr": 1.0})


def test_uncertainty_formula_at_arbitrary_s():
    w = L.UncertaintyWeighting()
    s = torch.tensor([0.3, -0.8, 1.1])
    with torch.no_grad():
        w.log_vars.copy_(s)
    ls = _losses()
    s_va, s_au, s_ex = s.tolist()
    expected = (
        0.5 * math.exp(-s_va) * 0.7 + math.exp(-s_au) * 0.4 + math.exp(-s_ex) * 1.3 + 0.5 * (s_va + s_au + s_ex)
    )
    assert w(ls).item() == pytest.approx(expected, rel=1e-6)
    assert w.weights() == pytest.approx({"va": 0.5 * math.exp(-s_va), "au": math.exp(-s_au), "expr": math.exp(-s_ex)})
    assert w.sigmas() == pytest.approx({"va": math.exp(s_va / 2), "au": math.exp(s_au / 2), "expr": math.exp(s_ex / 2)})
    # an absent task contributes neither its loss nor its regulariser
    assert w({"au": ls["au"]}).item() == pytest.approx(math.exp(-s_au) * 0.4 + 0.5 * s_au, rel=1e-6)


def test_uncertainty_gradcheck():
    w = L.UncertaintyWeighting().double()
    s = torch.tensor([0.2, -0.5, 0.9], dtype=torch.float64, requires_grad=True)
    ls = torch.tensor([0.7, 0.4, 1.3], dtype=torch.float64, requires_grad=True)

    def f(log_vars, losses):
        return functional_call(w, {"log_vars": log_vars}, ({"va": losses[0], "au": losses[1], "expr": losses[2]},))

    assert torch.autograd.gradcheck(f, (s, ls))


@pytest.mark.parametrize(
    "task, value, optimum", [("va", 0.7, math.log(0.7)), ("au", 0.4, math.log(0.8)), ("expr", 1.3, math.log(2.6))]
)
def test_uncertainty_optimum_of_s(task, value, optimum):
    # d/ds [0.5 e^-s L + 0.5 s] = 0 -> s = log L (regression); d/ds [e^-s L + 0.5 s] = 0 -> s = log 2L
    w = L.UncertaintyWeighting().double()
    loss = {task: torch.tensor(value, dtype=torch.float64)}
    i = w.tasks.index(task)
    with torch.no_grad():
        w.log_vars[i] = optimum
    w(loss).backward()
    assert w.log_vars.grad[i].item() == pytest.approx(0.0, abs=1e-12)
    # and it is a minimum that an optimiser actually finds from s = 0
    w = L.UncertaintyWeighting().double()
    opt = torch.optim.SGD(w.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        w(loss).backward()
        opt.step()
    assert w.log_vars[i].item() == pytest.approx(optimum, abs=1e-6)


def test_uncertainty_kinds_argument():
    w = L.UncertaintyWeighting(kinds={"va": "classification", "au": "regression"})
    ls = _losses()
    assert w(ls).item() == pytest.approx(0.7 + 0.5 * 0.4 + 1.3, abs=1e-6)
    with pytest.raises(ValueError, match="kind of task 'va' must be 'regression' or 'classification', got 'ordinal'"):
        L.UncertaintyWeighting(kinds={"va": "ordinal"})
    with pytest.raises(KeyError):
        L.UncertaintyWeighting(kinds={"pose": "regression"})
    with pytest.raises(KeyError):
        L.UncertaintyWeighting(tasks=("va",))({"au": ls["au"]})


def test_uncertainty_parameters_reach_optimiser_and_state_dict_round_trips():
    w = L.UncertaintyWeighting()
    params = list(w.parameters())
    assert len(params) == 1 and params[0] is w.log_vars and params[0].requires_grad
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.1, 0.2, -0.3]))
    sd = w.state_dict()
    assert set(sd) == {"log_vars", "factors"}
    w2 = L.make_weighting("uncertainty", ("va", "au", "expr"))
    w2.load_state_dict(sd)
    ls = _losses()
    assert w2(ls).item() == pytest.approx(w(ls).item())
    assert w2.weights() == pytest.approx(w.weights())


def test_make_weighting():
    assert isinstance(L.make_weighting("sum", ("va", "au")), L.SumWeighting)
    u = L.make_weighting("uncertainty", ("au", "expr"), init_log_var=1.0)
    assert isinstance(u, L.UncertaintyWeighting) and isinstance(u, L.LossWeighting)
    assert u.weights() == pytest.approx({"au": math.exp(-1.0), "expr": math.exp(-1.0)})
    with pytest.raises(ValueError, match="unknown loss weighting"):
        L.make_weighting("gradnorm", ("va",))


def test_end_to_end_backward_reaches_heads_and_log_vars(gen):
    pred, target = _batch(gen)
    w = L.UncertaintyWeighting()
    total = w(L.task_losses(pred, target))
    total.backward()
    for t in ("va", "au", "expr"):
        assert torch.all(torch.isfinite(pred[t].grad)) and pred[t].grad.abs().sum() > 0
    assert torch.all(torch.isfinite(w.log_vars.grad)) and w.log_vars.grad.abs().sum() > 0


@pytest.mark.parametrize("kind, c", [("regression", 0.5), ("classification", 1.0)])
def test_the_stationary_log_variance_is_where_eq5s_gradient_in_s_vanishes(kind: str, c: float) -> None:
    """``s* = log(2 c L)`` is the minimum of ``c e^{-s} L + s/2`` over ``s`` (the trainer starts and measures eq. 5
    there); a task without a positive loss has none."""
    weighting = L.UncertaintyWeighting(["va", "au"], kinds={"va": kind, "au": kind})
    star = weighting.stationary_log_vars({"va": 0.37, "au": None})
    assert star["au"] is None and star["va"] == pytest.approx(math.log(2 * c * 0.37))
    s = torch.tensor(star["va"], dtype=torch.float64, requires_grad=True)
    (c * torch.exp(-s) * 0.37 + 0.5 * s).backward()
    assert abs(float(s.grad)) < 1e-12
    np.testing.assert_allclose(L.stationary_log_var(np.array([0.37, 1.2]), kind), np.log(2 * c * np.array([0.37, 1.2])))
    with pytest.raises(ValueError, match="ordinal"):
        L.stationary_log_var(1.0, "ordinal")
