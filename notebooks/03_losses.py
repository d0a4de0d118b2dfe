# %% [markdown]
# # Losses: from likelihoods to the uncertainty weighting
#
# MTANet {cite:p}`zhang2020mtanet` trains three heads with three losses (section III-B of the paper): categorical
# cross entropy for the seven expressions (eq. 1), binary cross entropy for the eight action units (eq. 2), and one
# minus the concordance correlation coefficient for valence and arousal (eq. 3-4). It first sums them, then fine-tunes
# with the homoscedastic uncertainty weighting of {cite:t}`kendall2018uncertainty` (eq. 5).
#
# This chapter derives each loss from a likelihood (or says where no likelihood stands behind it), and checks every
# formula numerically against the package's code (`mtanet.losses`): each check prints the measured discrepancy and
# asserts it is below a tolerance, so the book does not build if the code drifts from the equations. The literal
# equations used as references are in `mtanet.book.loss_experiments`, written independently of `mtanet.losses`. The
# chapter ends with a short run of the package's trainer in which the learned weights of eq. 5 can be seen moving.

# %% tags=["parameters", "hide-input"]
data_root: str = ""  # an Aff-Wild2 root; empty means the synthetic twin of size synth_size (written on first use)
synth_size: str = "smoke"  # smoke, cpu or gpu: which synthetic set an empty data_root stands for
seed: int = 0  # for every random draw in this chapter
check_rows: int = 64  # rows of the random batches on which the formulas are checked
predictor_r: float = 0.4  # correlation of the weak feature in the MSE-versus-CCC example
mc_batches: int = 4000  # Monte-Carlo batches per batch size in the batch-size bias simulation
mc_max_batch: int = 512  # largest simulated batch size (powers of two from 4)
relax_lr: float = 0.2  # SGD learning rate of s when the task losses are held fixed
relax_steps: int = 200  # SGD steps of that fixed-loss relaxation
backbone: str = "seresnet18"  # a key of mtanet.models.BACKBONES for the training demo
image_size: int = 64  # side of the square images the demo network sees (the crops are 112)
feature_dim: int = 256  # width of the shared feature (1024 in the paper)
batch_size: int = 24  # frames per batch; the task-balanced sampler gives each task a third
steps_sum: int = 10  # stage 1: steps of the plain sum (Adam)
steps_uncertainty: int = 30  # stage 2: steps of eq. 5 (SGD)
lr_sum: float = 1e-3  # stage-1 Adam learning rate, as in the paper (weight decay 1e-3)
lr_finetune: float = 1e-4  # stage-2 SGD learning rate of the network, as in the paper (weight decay 5e-3)
lr_log_vars: float = 0.1  # stage-2 SGD learning rate of s; far above the paper 1e-4 so that s moves within the demo
momentum: float = 0.0  # stage-2 SGD momentum; the paper gives none
smooth: int = 5  # steps in the running means of the training plots
device: str = "cpu"  # cpu or cuda
threads: int = 2  # torch CPU threads

# %% tags=["hide-input"]
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display

from mtanet import losses, synth
from mtanet.book import loss_experiments as X
from mtanet.data import load_frames
from mtanet.metrics import ccc
from mtanet.tasks import EDITIONS

sns.set_theme(context="notebook", style="whitegrid")
torch.set_num_threads(threads)
root = synth.resolve_data_root(data_root, synth_size)
frames = load_frames(root, "train")
ed = EDITIONS[frames.attrs["edition"]]
au_names, expr_names = list(ed.au_names), list(ed.expr_names)
n_au, n_expr = len(au_names), len(expr_names)
mc_sizes = [2**k for k in range(2, int(math.log2(mc_max_batch)) + 1)]
TOL = 1e-6  # every check below runs in float64; a correct formula is off by rounding only (about 1e-15)
gen = torch.Generator().manual_seed(seed)
f64 = torch.float64


def check(what: str, discrepancy: float, tol: float = TOL) -> None:
    """Print a measured discrepancy; fail the build when it reaches the tolerance."""
    print(f"max |diff| {discrepancy:7.1e}  {what}")
    assert discrepancy < tol, f"{what}: discrepancy {discrepancy:.3g} is not below {tol:g}"


display(Markdown(f"**Data:** `{root.name}` ({len(frames)} training frames), ABAW {ed.name} label sets: "
                 f"{n_au} AUs, {n_expr} expressions."))

# %% [markdown]
# ## 1. Classification losses are negative log-likelihoods
#
# ### Eq. 1: cross entropy from the categorical likelihood
#
# The expression head gives logits $x \in \mathbb{R}^C$ ($C = 7$); a softmax turns them into a categorical
# distribution over the classes, $p(c \mid x) = e^{x_c} / \sum_i e^{x_i}$. For independent labeled frames the
# likelihood is a product over frames, so maximising it means minimising the mean of the per-frame negative
# log-likelihood
#
# $$
# -\log p(c \mid x) = -x_c + \log \sum_{i=0}^{C-1} e^{x_i}, \tag{1}
# $$
#
# which is the paper's eq. 1. Its gradient is $\partial / \partial x_i = \mathrm{softmax}(x)_i - [i = c]$: the
# predicted probabilities minus the one-hot label.
#
# ### Eq. 2: binary cross entropy from independent Bernoulli likelihoods
#
# Several action units can be active at once, so the AU head gives one logit $x_k$ per AU and models each AU as a
# Bernoulli variable with $p(y_k = 1 \mid x) = \sigma(x_k)$, the AUs independent *given the image* (they co-occur in
# faces; the shared features carry that). The likelihood of a label vector is
# $\prod_k \sigma(x_k)^{y_k} (1 - \sigma(x_k))^{1 - y_k}$ and its negative log is
#
# $$
# -\sum_{k=0}^{K-1} \left[ y_k \log \sigma(x_k) + (1 - y_k) \log (1 - \sigma(x_k)) \right], \tag{2}
# $$
#
# the paper's eq. 2. The package averages over the $K$ AUs instead of summing: the loss is divided by $K = 8$, a
# constant factor that the uncertainty weighting of section 3 absorbs (its optimum $s^\ast$ just moves by $\log K$).
#
# The check: on a random batch with unlabeled rows, the literal equations (`X.eq1_cross_entropy`, `X.eq2_bce`) agree
# with the likelihoods of `torch.distributions`, and the package's masked losses are their means over the labeled
# rows.

# %%
logits_expr = 2.0 * torch.randn(check_rows, n_expr, generator=gen, dtype=f64)
target_expr = torch.randint(0, n_expr, (check_rows,), generator=gen)
target_expr[::4] = -1  # every fourth frame has no expression label
logits_au = 2.0 * torch.randn(check_rows, n_au, generator=gen, dtype=f64)
target_au = torch.randint(0, 2, (check_rows, n_au), generator=gen).to(f64)
target_au[1::5] = -1  # every fifth frame has no AU label

eq1_rows = X.eq1_cross_entropy(logits_expr.numpy(), target_expr.numpy())
eq2_rows = X.eq2_bce(logits_au.numpy(), target_au.numpy())
keep_expr, keep_au = target_expr >= 0, (target_au >= 0).all(1)
categorical = torch.distributions.Categorical(logits=logits_expr[keep_expr])
bernoulli = torch.distributions.Bernoulli(logits=logits_au[keep_au])
check("eq. 1 = -log p of the categorical (softmax) likelihood",
      np.abs(eq1_rows[keep_expr] + categorical.log_prob(target_expr[keep_expr]).numpy()).max())
check("eq. 2 = -log p of independent Bernoulli likelihoods, summed over AUs",
      np.abs(eq2_rows[keep_au] + bernoulli.log_prob(target_au[keep_au]).sum(1).numpy()).max())
check("masked_cross_entropy = mean of eq. 1 over labeled rows",
      abs(losses.masked_cross_entropy(logits_expr, target_expr).item() - np.nanmean(eq1_rows)))
check(f"masked_bce = mean of eq. 2 over labeled rows, divided by K = {n_au}",
      abs(losses.masked_bce(logits_au, target_au).item() - np.nanmean(eq2_rows) / n_au))
print(f"labeled rows: {int(keep_expr.sum())}/{check_rows} (EXPR), {int(keep_au.sum())}/{check_rows} (AU)")

# %% [markdown]
# ### Unlabeled frames, and a batch with none labeled
#
# Aff-Wild2 labels each task on different videos, so most frames miss some task's label; the files mark them with
# sentinels (-1 for AU and EXPR, -5 for VA). The loss of a task is the mean over its labeled rows $M$ only,
# $L = \frac{1}{|M|} \sum_{n \in M} \ell_n$: a sentinel must never reach the formula (with $y_k = -1$, eq. 2 becomes
# $\log\sigma(x_k) - 2\log(1 - \sigma(x_k))$, which has no lower bound).
#
# When a batch holds no labeled row for a task, that mean is $0/0$. PyTorch answers NaN, and NaN does not stay in
# its task: multiplied by any weight, even zero, it is still NaN, and the backward pass writes NaN into every shared
# weight of the network. The right value is zero: the likelihood of no observation is an empty product, 1, whose
# negative log is 0, with zero gradient. The package returns exactly that, as a zero that stays in the graph, so
# `backward()` still runs.

# %%
no_label_logits = torch.randn(6, n_expr, generator=gen, dtype=f64, requires_grad=True)
no_label_va = torch.zeros(6, 2, dtype=f64, requires_grad=True)
no_labels = {"expr": torch.full((6,), -1), "au": torch.full((6, n_au), -1.0, dtype=f64),
             "va": torch.full((6, 2), -5.0, dtype=f64)}
naive = F.cross_entropy(no_label_logits[:0], no_labels["expr"][:0])  # a mean over zero rows
print(f"naive mean over zero rows: {naive.item()}; times a zero weight: {(0.0 * naive).item()}")
safe = {"expr": losses.masked_cross_entropy(no_label_logits, no_labels["expr"]),
        "au": losses.masked_bce(no_label_logits[:, :1].expand(6, n_au), no_labels["au"]),
        "va": losses.ccc_loss(no_label_va, no_labels["va"])}
sum(safe.values()).backward()
print("package, all rows unlabeled:", {t: v.item() + 0.0 for t, v in safe.items()})  # + 0.0 prints -0.0 as 0.0
assert math.isnan(naive.item()), "the naive mean was expected to be NaN"
assert all(v.item() == 0.0 for v in safe.values()), "an all-unlabeled batch must give a zero loss"
for name, g in (("expr/au logits", no_label_logits.grad), ("va predictions", no_label_va.grad)):
    assert g is not None and torch.all(g == 0), f"{name}: gradient must be exactly zero, got {g}"
print("gradients reach the inputs and are exactly zero (not NaN)")

# %% [markdown]
# ## 2. The concordance correlation coefficient
#
# For predictions $x$ and labels $y$ over $n$ frames, with population moments (divide by $n$, as the ABAW score
# does {cite:p}`kollias2020abaw`) $\bar x = \frac1n \sum_i x_i$, $s_x^2 = \frac1n \sum_i (x_i - \bar x)^2$ and
# $s_{xy} = \frac1n \sum_i (x_i - \bar x)(y_i - \bar y)$, Lin's concordance correlation coefficient
# {cite:p}`lin1989ccc` and the valence-arousal loss are
#
# $$
# \rho_c = \frac{2 s_{xy}}{s_x^2 + s_y^2 + (\bar x - \bar y)^2}, \qquad
# L_{va} = 1 - \tfrac12 (\rho_v + \rho_a). \tag{3-4}
# $$
#
# No likelihood stands behind eq. 4: it is the challenge's score turned into a loss, so training optimises what is
# scored. Two rewritings show what it measures. Since
# $\frac1n \sum_i (x_i - y_i)^2 = s_x^2 + s_y^2 - 2 s_{xy} + (\bar x - \bar y)^2$, the denominator is
# $\mathrm{MSE} + 2 s_{xy}$ and
#
# $$
# \rho_c = \frac{2 s_{xy}}{\mathrm{MSE} + 2 s_{xy}},
# $$
#
# the MSE measured against the covariance the prediction achieves. And $\rho_c = r \, C_b$, Pearson's $r$ times
# Lin's bias-correction factor $C_b = 2 / (v + 1/v + u^2)$ with scale $v = s_x / s_y$ and location
# $u = (\bar x - \bar y) / \sqrt{s_x s_y}$: $C_b = 1$ only when the prediction has the spread and the mean of the
# labels.
#
# The check: the literal eq. 3 on the training valence labels against a noisy prediction, against the
# package's loss (`losses.ccc_loss`), the score (`metrics.ccc`) and both rewritings.

# %%
va_labeled = frames[["valence", "arousal"]].dropna()
y_val = va_labeled["valence"].to_numpy(np.float64)  # every VA-labeled training frame, videos concatenated
predictors = X.example_predictors(y_val, r=predictor_r, seed=seed)
x_val = predictors["variance-matched z"]
rho = X.eq3_ccc(x_val, y_val)
pair = torch.tensor(np.stack([x_val, x_val], 1)), torch.tensor(np.stack([y_val, y_val], 1))
mse = np.mean((x_val - y_val) ** 2)
s_xy = np.mean((x_val - x_val.mean()) * (y_val - y_val.mean()))
check("eq. 4: ccc_loss = 1 - eq. 3", abs(losses.ccc_loss(*pair).item() - (1 - rho)))
check("metrics.ccc (the ABAW score) = eq. 3", abs(ccc(y_val, x_val) - rho))
check("rho_c = 2 s_xy / (MSE + 2 s_xy)", abs(2 * s_xy / (mse + 2 * s_xy) - rho))
table = X.compare_predictors(y_val, predictors)
check("rho_c = Pearson r * C_b", abs(table.loc["variance-matched z", "Pearson r"] * table.loc["variance-matched z",
                                                                                               "C_b"] - rho))
print(f"{len(y_val)} valence labels, mean {y_val.mean():+.3f}, std {y_val.std():.3f}")

# %% [markdown]
# ### Why CCC and not MSE
#
# The MSE-optimal prediction is the conditional mean of the label given the input. When the input says little about
# the label, as a weak model's features do, the conditional mean stays close to the overall mean: MSE rewards
# predictions that hug the mean and barely move. CCC scores exactly that as a failure.
#
# Take a weak feature $z$ whose correlation with the valence labels is $r$ = `predictor_r`, and five predictors:
#
# - **constant mean**: $\bar y$ everywhere, ignoring the input: MSE $= s_y^2$, CCC $= 0$;
# - **least squares on z**: the MSE-optimal line $\bar y + \beta (z - \bar z)$ has slope $r s_y / s_z$, so its
#   spread is $r s_y$: MSE $= (1 - r^2) s_y^2$, the lowest of all, but CCC $= 2r^2 / (1 + r^2) < r$;
# - **variance-matched z**: the same signal stretched to the labels' spread: CCC $= r$, but MSE $= 2(1 - r) s_y^2$,
#   which exceeds the constant's $s_y^2$ whenever $r < 1/2$;
# - **half amplitude** and **shifted by 0.3**: the labels themselves with a scale or a location error ($r = 1$): CCC
#   drops through $C_b$ alone.
#
# {numref}`fig-03-mse-ccc` shows three of them against the labels, and every score.

# %% tags=["hide-input"]
display(table[["MSE", "Pearson r", "C_b", "CCC", "mean", "std"]].round(4))

# %% tags=["hide-input"]
show = slice(0, min(250, len(y_val)))
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1]})
axes[0].plot(y_val[show], color="k", lw=1.5, label="label (valence)")
for name, color in (("constant mean", "tab:red"), ("least squares on z", "tab:orange"),
                    ("variance-matched z", "tab:blue")):
    axes[0].plot(predictors[name][show], color=color, lw=1, alpha=0.85, label=name)
axes[0].set(xlabel="labeled frame (videos concatenated)", ylabel="valence", title="Three predictions of valence")
axes[0].legend(fontsize=8, ncol=2, loc="lower left")
bars = table[["MSE", "CCC"]].copy()
bars["MSE"] /= y_val.var()
bars.rename(columns={"MSE": "MSE / var(y)"}).plot.barh(ax=axes[1], color=["tab:gray", "tab:green"])
axes[1].invert_yaxis()
axes[1].set(title="Lower MSE is not higher CCC", xlabel="")
axes[1].legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-03-mse-ccc)=
# Three predictions of the valence labels (left), and MSE (relative to the label variance) against CCC for all five
# predictors (right): the least-squares line has the lowest MSE and not the highest CCC.

# %%
const, matched, lsq = (table.loc[k] for k in ("constant mean", "variance-matched z", "least squares on z"))
assert const["MSE"] < matched["MSE"] and const["CCC"] < matched["CCC"], "MSE and CCC should rank these two apart"
assert lsq["MSE"] == table["MSE"].drop(["half amplitude", "shifted by 0.3"]).min()
check("CCC of the least-squares line = 2 r^2 / (1 + r^2)", abs(lsq["CCC"] - 2 * predictor_r**2 / (1 + predictor_r**2)))

# %% [markdown]
# ### The gradient of the CCC
#
# Write $\rho_c = N / D$ with $N = 2 s_{xy}$ and $D = s_x^2 + s_y^2 + (\bar x - \bar y)^2$. Differentiating with
# respect to one prediction $x_i$ (the terms through $\bar x$ cancel in $s_{xy}$ and $s_x^2$, because deviations
# from a mean sum to zero):
#
# $$
# \frac{\partial s_{xy}}{\partial x_i} = \frac{y_i - \bar y}{n}, \qquad
# \frac{\partial s_x^2}{\partial x_i} = \frac{2 (x_i - \bar x)}{n}, \qquad
# \frac{\partial (\bar x - \bar y)^2}{\partial x_i} = \frac{2 (\bar x - \bar y)}{n},
# $$
#
# so $\partial D / \partial x_i = 2 (x_i - \bar y) / n$ and
#
# $$
# \frac{\partial \rho_c}{\partial x_i} = \frac{1}{D} \frac{\partial N}{\partial x_i}
#   - \frac{N}{D^2} \frac{\partial D}{\partial x_i}
#   = \frac{2}{n D} \left[ (y_i - \bar y) - \rho_c \, (x_i - \bar y) \right].
# $$
#
# Three things follow. Summed over the batch, the gradient is $-2 \rho_c (\bar x - \bar y) / D$: it moves the mean of
# the predictions to the mean of the labels. It vanishes only where $x_i - \bar y = (y_i - \bar y) / \rho_c$ for every
# $i$, whose CCC is $2\rho_c / (1 + \rho_c^2)$; that equals $\rho_c$ only for $\rho_c = 1$, i.e. $x = y$, so the only
# stationary point with $\rho_c > 0$ is the perfect prediction. And every frame's gradient depends on the whole batch
# through $\bar y$, $D$ and $\rho_c$: the CCC is not a sum over frames, which is the root of the next section.
#
# The check: the closed form (`X.ccc_gradient`) against autograd through the package's `ccc_per_dim`.

# %%
x_t = torch.tensor(x_val[:, None], requires_grad=True)
(autograd,) = torch.autograd.grad(losses.ccc_per_dim(x_t, torch.tensor(y_val[:, None]))[0], x_t)
closed_form = X.ccc_gradient(x_val, y_val)
check("d rho_c / d x_i: closed form vs. autograd", np.abs(closed_form - autograd[:, 0].numpy()).max(), tol=1e-12)
check("sum of the gradient = -2 rho_c (mean x - mean y) / D",
      abs(closed_form.sum() + 2 * rho * (x_val.mean() - y_val.mean()) / (mse + 2 * s_xy)), tol=1e-12)

# %% [markdown]
# ### The batch-size bias of the CCC loss
#
# Training sees the CCC of a batch, not of the whole set. Because the CCC is a ratio of batch statistics, the mean of
# the batch CCCs of a fixed predictor is *lower* than its CCC over the whole set, so the loss being minimised is
# biased. For $b$ i.i.d. pairs the bias can be worked out to order $1/b$. The population moments of a batch shrink
# by $(b-1)/b$, and the squared difference of batch means gains the variance of $\bar x - \bar y$:
# $\mathbb{E}[(\bar x - \bar y)^2] = d^2 + \mathrm{var}(x - y)/b$. So $\mathbb{E}[N] = 2 s_{xy}(b-1)/b$ and
# $\mathbb{E}[D] = S - 2 s_{xy}/b$ with $S$ the set's denominator, whose ratio is $\rho_c (b-1)/(b - \rho_c)$. The
# ratio of two noisy quantities adds a second term of the same order (delta method), and for Gaussian data
#
# $$
# \mathbb{E}[\rho_c^{(b)}] \approx \rho_c \frac{b - 1}{b - \rho_c}
#   + \frac{\rho_c \, b\,\mathrm{Var}(D) - b\,\mathrm{Cov}(N, D)}{b \, S^2},
# $$
#
# with $b\,\mathrm{Var}(D) = 2 s_x^4 + 2 s_y^4 + 4 s_{xy}^2 + 4 d^2 \mathrm{var}(x - y)$ and
# $b\,\mathrm{Cov}(N, D) = 4 s_{xy} (s_x^2 + s_y^2)$. The gap to $\rho_c$ falls as $1/b$; the spread of the batch CCC
# falls only as $1/\sqrt b$.
#
# The simulation draws `mc_batches` batches of each size from a fixed predictor $x = 0.6\,y + 0.1 + \varepsilon$,
# $y \sim \mathcal N(0, 0.35^2)$, $\varepsilon \sim \mathcal N(0, 0.25^2)$, and compares the mean batch CCC with
# the whole-set value and the expansion ({numref}`fig-03-batch-bias`).

# %%
bias = X.batch_ccc_bias(mc_sizes, mc_batches, seed=seed, device=None if device == "cpu" else device)  # numpy on cpu
rho_pop = bias["population"].iloc[0]

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
ax = axes[0]
ax.fill_between(bias["batch_size"], bias["q05"], bias["q95"], color="tab:blue", alpha=0.15,
                label="5-95% of batch CCCs")
ax.plot(bias["batch_size"], bias["mean"], "o-", color="tab:blue", label="mean batch CCC (simulated)")
ax.plot(bias["batch_size"], bias["expected"], "--", color="k", label="1/b expansion")
ax.plot(bias["batch_size"], bias["first_order"], ":", color="gray", label="ratio of expectations only")
ax.axhline(rho_pop, color="tab:red", lw=1.2, label=f"CCC over the whole set ({rho_pop:.3f})")
ax.set(xscale="log", xlabel="batch size b", ylabel="CCC", title="Batch CCC of one fixed predictor")
ax.set_xticks(mc_sizes, [str(b) for b in mc_sizes])
ax.legend(fontsize=8, loc="lower right")
ax = axes[1]
gap = rho_pop - bias["mean"]
ax.errorbar(bias["batch_size"], gap, yerr=2 * bias["sem"], fmt="o", color="tab:blue", label="simulated gap (2 SE)")
ax.plot(bias["batch_size"], rho_pop - bias["expected"], "--", color="k", label="1/b expansion")
ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="CCC over the set - mean batch CCC",
       title="The bias falls as 1/b")
ax.set_xticks(mc_sizes, [str(b) for b in mc_sizes])
ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-03-batch-bias)=
# The CCC of batches of one fixed predictor against the batch size (left: mean and 5-95% range of the simulated batch
# CCCs, the 1/b expansion, the whole-set CCC), and the gap between the whole-set CCC and the mean batch CCC (right).

# %%
display(bias.set_index("batch_size")[["mean", "sem", "std", "expected", "population"]].round(4).T)

small = bias[bias["batch_size"] <= 32]
assert (rho_pop - small["mean"] > 3 * small["sem"]).all(), "small batches should score below the whole set"
assert gap.iloc[0] > gap.iloc[2] > gap.iloc[4], "the gap should shrink as the batch grows"
moderate = bias[bias["batch_size"] >= 16]
worst = ((moderate["mean"] - moderate["expected"]).abs() / (4 * moderate["sem"] + 2e-3)).max()
print(f"1/b expansion vs. simulation (b >= 16): worst error is {worst:.2f} of the allowed 4 SE + 0.002")
assert worst < 1, "the 1/b expansion should match the simulation from b = 16 on"

# %% [markdown]
# On Aff-Wild2 the bias is worse than in this i.i.d. simulation: consecutive frames of a video are nearly
# identical, so a batch drawn from few videos holds fewer independent samples than frames. Large batches, drawn
# across many videos, keep the loss close to the score; and with incomplete labels only the VA-labeled rows of a
# batch enter its CCC. The task-balanced sampler (`mtanet.data.TaskBalancedBatchSampler`) guarantees each task a
# third of every batch, so valence-arousal never gets a batch of two or three rows, where the batch CCC is mostly
# noise:

# %%
va_rows = batch_size // 3
for rows in (3, va_rows, 3 * va_rows):
    expected = X.batch_ccc_expected(*X.simulation_moments(), rows)
    print(f"{rows:4d} VA rows per batch: expected batch CCC {expected:.3f} vs. {rho_pop:.3f} over the set")

# %% [markdown]
# ## 3. Eq. 5: weighting the tasks by their uncertainty
#
# {cite:t}`kendall2018uncertainty` give each task a likelihood with a noise scale $\sigma_t$ that does not depend on
# the input (homoscedastic) and learn $\sigma_t$ with the network.
#
# **Regression.** With a Gaussian likelihood $p(y \mid f, \sigma) = \mathcal N(y; f, \sigma^2)$,
#
# $$
# -\log p(y \mid f, \sigma) = \frac{(y - f)^2}{2\sigma^2} + \log\sigma + \tfrac12 \log 2\pi,
# $$
#
# and the mean over a batch, with $L$ the mean squared error, is $\frac{1}{2\sigma^2} L + \log\sigma$ plus a constant.
#
# **Classification.** With a scaled softmax (a Boltzmann distribution at temperature $\sigma^2$),
# $p(c \mid f, \sigma) = \mathrm{softmax}(f / \sigma^2)_c$,
#
# $$
# -\log p(c \mid f, \sigma) = \frac{1}{\sigma^2} L(f)
#   + \log \frac{\sum_i e^{f_i / \sigma^2}}{\left(\sum_i e^{f_i}\right)^{1/\sigma^2}}
#   \approx \frac{1}{\sigma^2} L(f) + \log\sigma,
# $$
#
# where $L(f)$ is the cross entropy of eq. 1 and the last step is Kendall et al.'s approximation, exact at
# $\sigma = 1$ only. The AU loss is given the same form.
#
# With the tasks independent given the shared features, the joint negative log-likelihood is the sum, the paper's eq. 5:
#
# $$
# L_{weighted} = \frac{1}{2\sigma_{va}^2} L_{va} + \frac{1}{\sigma_{au}^2} L_{au} + \frac{1}{\sigma_{expr}^2} L_{expr}
#   + \log\sigma_{va} + \log\sigma_{au} + \log\sigma_{expr}. \tag{5}
# $$
#
# Two caveats. $L_{va}$ is $1 - \mathrm{CCC}$, not a squared error, so the Gaussian derivation motivates its
# $\frac{1}{2\sigma^2}$ form but does not derive it. And the classification form rests on the approximation above.
#
# The checks: the Gaussian identity exactly, against `torch.distributions.Normal`; the softmax approximation, how far
# it is off away from $\sigma = 1$.

# %%
f_reg = torch.randn(check_rows, generator=gen, dtype=f64)
y_reg = f_reg + 0.7 * torch.randn(check_rows, generator=gen, dtype=f64)
sq_err = ((y_reg - f_reg) ** 2).mean().item()
gauss = max(abs(-torch.distributions.Normal(f_reg, sig).log_prob(y_reg).mean().item()
                - (sq_err / (2 * sig**2) + math.log(sig) + 0.5 * math.log(2 * math.pi))) for sig in (0.3, 1.0, 2.5))
check("Gaussian NLL = L / (2 sigma^2) + log sigma + const, sigma in (0.3, 1, 2.5)", gauss)

softmax_rows = []
for sig in (0.5, 0.8, 1.0, 1.25, 2.0):
    exact, approx = X.scaled_softmax_nll(logits_expr[keep_expr], target_expr[keep_expr], sig)
    softmax_rows.append({"sigma": sig, "exact NLL": exact, "L / sigma^2 + log sigma": approx,
                         "difference": approx - exact})
softmax_table = pd.DataFrame(softmax_rows).set_index("sigma")
display(softmax_table.round(4))
check("softmax approximation is exact at sigma = 1", abs(softmax_table.loc[1.0, "difference"]))

# %% [markdown]
# ### The implementation: $s = \log \sigma^2$
#
# Learning $\sigma$ directly would divide by zero if it reached 0 and needs a positivity constraint. The package
# learns $s_t = \log \sigma_t^2$, unconstrained, starting at $s_t = 0$ ($\sigma_t = 1$). With
# $\frac{1}{2\sigma^2} = \frac12 e^{-s}$ and $\log\sigma = \frac12 s$, eq. 5 reads
#
# $$
# L_{weighted} = \tfrac12 e^{-s_{va}} L_{va} + e^{-s_{au}} L_{au} + e^{-s_{expr}} L_{expr}
#   + \tfrac12 (s_{va} + s_{au} + s_{expr}),
# $$
#
# i.e. $c_t e^{-s_t} L_t + \frac12 s_t$ per task with $c_t = \frac12$ (regression) or $1$ (classification); the
# effective weight of a task is $w_t = c_t e^{-s_t}$ (`UncertaintyWeighting.weights()`).
#
# **The optimum of $s$ for a fixed loss.** $\frac{d}{ds} \left[ c e^{-s} L + \frac12 s \right] = -c e^{-s} L + \frac12$
# vanishes at $s^\ast = \log (2cL)$: $s^\ast = \log L$ for regression and $s^\ast = \log 2L$ for classification. The
# second derivative there is $c e^{-s^\ast} L = \frac12 > 0$, a minimum, with the same curvature for every task.
#
# At the optimum the weight is $w^\ast = c e^{-s^\ast} = \frac{1}{2L}$ for both kinds, and the objective becomes
# $\frac12 + \frac12 \log(2cL)$: with every $s$ at its optimum the network minimises $\frac12 \sum_t \log L_t$ plus a
# constant. Each task's gradient is divided by twice its own loss, so multiplying a task's loss by a constant (the
# $1/K$ of the averaged BCE, or the factor $\frac12$ of eq. 5 itself) changes $s^\ast$ and nothing else. The
# distinction between $c = \frac12$ and $c = 1$ only matters while $s$ is away from its optimum.
#
# **How fast $s$ gets there.** With plain SGD at learning rate $\eta$ and curvature $\frac12$, the distance to
# $s^\ast$ shrinks by a factor $1 - \eta/2$ per step: a time constant of $2/\eta$ steps, 20,000 at the paper's
# $\eta = 10^{-4}$. The trainer's SGD has momentum $\beta = 0.9$ (the paper names none); on a quadratic whose
# $\eta \times$ curvature is this small, heavy-ball momentum multiplies the effective step by $1/(1-\beta) = 10$, so the
# time constant is $2(1-\beta)/\eta$: about 2,000 steps (64,000 frames at 32 a batch), even for a loss that stays
# put. The simulation below is plain SGD, whose rate is the simpler one to check.
#
# The checks: `UncertaintyWeighting.forward` against eq. 5 in the paper's $\sigma$ form (`X.eq5_total`); its
# `weights()` against $1/(2\sigma^2)$ and $1/\sigma^2$; its gradient with respect to $s$ at the closed-form
# $s^\ast$; and plain SGD on $s$ alone, with the losses held fixed, converging to $s^\ast$ ({numref}`fig-03-relax`).

# %%
weighting = losses.UncertaintyWeighting().double()
tasks = weighting.tasks
s_random = {t: v for t, v in zip(tasks, (torch.randn(len(tasks), generator=gen, dtype=f64)).tolist())}
l_random = {t: v for t, v in zip(tasks, (0.05 + 2 * torch.rand(len(tasks), generator=gen, dtype=f64)).tolist())}
with torch.no_grad():
    weighting.log_vars.copy_(torch.tensor([s_random[t] for t in tasks], dtype=f64))
package_total = weighting({t: torch.tensor(v, dtype=f64) for t, v in l_random.items()}).item()
check("UncertaintyWeighting.forward = eq. 5 in the sigma form", abs(package_total - X.eq5_total(l_random, s_random)))
sigma_form = {t: (0.5 if X.DEFAULT_KINDS[t] == "regression" else 1.0) / math.exp(s_random[t]) for t in tasks}
check("weights() = 1 / (2 sigma^2) for VA, 1 / sigma^2 for AU and EXPR",
      max(abs(weighting.weights()[t] - sigma_form[t]) for t in tasks))

grid = np.geomspace(0.02, 3.0, 25)
worst_grad, worst_weight = 0.0, 0.0
for t in tasks:
    for loss_value in grid:
        w_t = losses.UncertaintyWeighting((t,)).double()
        with torch.no_grad():
            w_t.log_vars.fill_(X.optimal_log_var(loss_value, X.DEFAULT_KINDS[t]))
        w_t({t: torch.tensor(loss_value, dtype=f64)}).backward()
        worst_grad = max(worst_grad, abs(w_t.log_vars.grad.item()))
        worst_weight = max(worst_weight, abs(w_t.weights()[t] - 1 / (2 * loss_value)))
check("gradient of eq. 5 w.r.t. s at s* = log L (VA), log 2L (AU, EXPR), L in [0.02, 3]", worst_grad, tol=1e-12)
check("weight at the optimum = 1 / (2L) for every task", worst_weight)

fixed_losses = {"va": 0.4, "au": 0.25, "expr": 1.2}
relax = X.relax_log_vars(fixed_losses, steps=relax_steps, lr=relax_lr)
s_star = {t: X.optimal_log_var(v, X.DEFAULT_KINDS[t]) for t, v in fixed_losses.items()}
check(f"SGD on s alone ({relax_steps} steps, lr {relax_lr}) reaches s*",
      max(abs(relax[f"s_{t}"].iloc[-1] - s_star[t]) for t in tasks))

# %% tags=["hide-input"]
colors = dict(zip(tasks, ("tab:blue", "tab:orange", "tab:green")))
tau = 2 / relax_lr
fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
for t in tasks:
    axes[0].plot(relax.index, relax[f"s_{t}"], color=colors[t], label=f"{t}: L = {fixed_losses[t]}")
    axes[0].axhline(s_star[t], color=colors[t], ls="--", lw=1)
    axes[1].plot(relax.index, (relax[f"s_{t}"] - s_star[t]).abs(), color=colors[t], label=t)
far = max(abs(relax[f"s_{t}"].iloc[20] - s_star[t]) for t in tasks)
axes[1].plot(relax.index[20:], far * (1 - relax_lr / 2) ** (relax.index[20:] - 20), color="k", ls=":", lw=1.2,
             label="(1 - lr / 2) per step")
axes[0].axvline(tau, color="gray", ls=":", lw=1, label=f"time constant 2 / lr = {tau:g}")
axes[0].set(xlim=(0, min(relax_steps, 8 * tau)), xlabel="SGD step", ylabel="s = log sigma^2",
            title="s relaxes to s* (dashed: log L or log 2L)")
axes[1].set(yscale="log", ylim=(1e-12, None), xlabel="SGD step", ylabel="|s - s*|",
            title="Distance to the closed-form optimum")
for ax in axes:
    ax.legend(fontsize=8, loc="center right" if ax is axes[0] else "upper right")
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-03-relax)=
# SGD on the uncertainty parameters alone, the three task losses held fixed: each $s_t$ relaxes to its closed-form
# optimum (left, dashed), and the distance shrinks by the factor $1 - \eta/2$ per step (right).

# %% [markdown]
# ## 4. The learned weights during training
#
# A miniature of the paper's schedule, run by the package's trainer (`mtanet.train.train`, the loop of the training
# chapter): a freshly initialised MTANet (backbone `backbone` at `image_size` pixels, shared feature `feature_dim`)
# is trained on the training split for `steps_sum` steps with the plain sum of the three losses (Adam at `lr_sum`,
# weight decay 1e-3; the paper's 1e-3 and 1e-3), then for `steps_uncertainty` steps with eq. 5 (SGD, network at
# `lr_finetune`, weight decay 5e-3; the paper's 1e-4 and 5e-3). The paper gives one learning rate for the
# fine-tuning; at 1e-4 the $s_t$ would need about 2,000 steps (with momentum 0.9; section 3) to move, so here they
# get their own, `lr_log_vars`, and no weight decay (which would pull every $s_t$ back to 0, the plain sum). They
# start at 0 here, so that they can be seen relaxing towards $s^\ast$; the training chapter starts them at $s^\ast$
# of the stage-1 losses instead (`init_log_var="stationary"`).
#
# The trainer counts whole epochs, of one length for both stages, so an epoch here is the greatest common divisor of
# `steps_sum` and `steps_uncertainty` steps and each stage lasts exactly the steps asked for. Every batch comes from
# the task-balanced sampler (reseeded at every epoch), so every task has labels in every step; the network has its
# dropout, the images no augmentation. The trainer writes a row to its `log.jsonl` after every step (steps count
# from 1): the step's task losses, the effective weights $w_t$ and, under eq. 5, $\sigma_t$, from which
# $s_t = 2 \ln \sigma_t$. It validates once, after the last step (those scores are not used here). The run is
# deterministic given `seed` on a given machine and thread count: on the CPU the trainer switches on torch's
# deterministic algorithms (`mtanet.book.loss_experiments.run_weighting_demo`).

# %%
started = time.perf_counter()
log = X.run_weighting_demo(
    root, backbone=backbone, image_size=image_size, feature_dim=feature_dim, batch_size=batch_size,
    steps_sum=steps_sum, steps_uncertainty=steps_uncertainty, lr_sum=lr_sum, lr_finetune=lr_finetune,
    lr_log_vars=lr_log_vars, momentum=momentum, seed=seed, device=device, threads=threads)
assert list(log["stage"]) == ["sum"] * steps_sum + ["uncertainty"] * steps_uncertainty, "stage lengths differ"
print(f"{len(log)} steps and one validation pass in {time.perf_counter() - started:.1f} s "
      f"({backbone}, {image_size} px, batch {batch_size}, {device})")

# %% tags=["hide-input"]
loss_mean = log[[f"loss_{t}" for t in tasks]].rolling(smooth, min_periods=1).mean()
stage2 = log["stage"] == "uncertainty"
switch = steps_sum + 0.5  # the trainer's steps count from 1
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), sharex=True)
for t in tasks:
    c = colors[t]
    axes[0].plot(log["step"], log[f"loss_{t}"], color=c, alpha=0.25, lw=0.8)
    axes[0].plot(log["step"], loss_mean[f"loss_{t}"], color=c, label=t)
    axes[1].plot(log["step"], log[f"w_{t}"], color=c, label=f"{t}: weight")
    # the weight each task would have if its s sat at the optimum for its current (smoothed) loss
    axes[1].plot(log["step"][stage2], 0.5 / loss_mean[f"loss_{t}"][stage2], color=c, ls="--", lw=1)
    axes[2].plot(log["step"], log[f"sigma_{t}"], color=c, label=t)
axes[0].set(title=f"Task losses (running mean of {smooth})", ylabel="loss")
axes[1].set(title="Effective weights; dashed: 1 / (2 L), their optimum", ylabel="weight")
axes[2].set(title="sigma = exp(s / 2) (stage 2 only)", ylabel="sigma")
for ax in axes:
    ax.axvline(switch, color="gray", ls=":", lw=1)
    ax.set_xlabel("step (left of the dotted line: plain sum; right: eq. 5)")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-03-training)=
# The miniature training run: task losses (left), effective weights with their optimum $1/(2L)$ dashed (middle), and
# $\sigma_t$ (right); left of the dotted line the plain sum, right of it eq. 5.

# %%
tail = log[stage2].tail(max(1, min(2 * smooth, int(stage2.sum()))))
summary = pd.DataFrame({
    "mean loss (last steps)": {t: tail[f"loss_{t}"].mean() for t in tasks},
    "s at the end": {t: log[f"s_{t}"].iloc[-1] for t in tasks},
    "s* for that loss": {t: X.optimal_log_var(tail[f"loss_{t}"].mean(), X.DEFAULT_KINDS[t]) for t in tasks},
    "weight at the end": {t: log[f"w_{t}"].iloc[-1] for t in tasks},
    "weight at s*, 1 / (2L)": {t: 0.5 / tail[f"loss_{t}"].mean() for t in tasks},
})
display(summary.round(3))
start = {t: 0.5 if X.DEFAULT_KINDS[t] == "regression" else 1.0 for t in tasks}
gained = [t for t in tasks if summary.loc[t, "weight at the end"] > start[t]]
lost = [t for t in tasks if t not in gained]
display(Markdown(f"**This run:** weight gained by {', '.join(gained) or 'no task'}, lost by "
                 f"{', '.join(lost) or 'no task'} (relative to the start of stage 2: 0.5 for VA, 1 for AU and EXPR)."))
moved = summary["s at the end"].abs().max()
print(f"largest |s| after {steps_uncertainty} steps of eq. 5: {moved:.3f}")
assert moved > 0.05, "the uncertainty parameters did not move"
for t in tasks:
    target = summary.loc[t, "s* for that loss"]
    if abs(target) > 0.1:
        assert abs(summary.loc[t, "s at the end"] - target) < abs(target), f"{t}: s did not move towards s*"

# %% [markdown]
# The weights move the way section 3 predicts: every $s_t$ heads for $\log(2 c_t L_t)$ of its task's current loss,
# so every weight heads for $1/(2 L_t)$. Stage 2 starts from $w_{va} = \frac12$ and $w_{au} = w_{expr} = 1$, so the VA
# weight grows while $L_{va} < 1$ (a batch CCC above 0), and a classification weight grows only while its loss is
# below $\frac12$: the AU loss (BCE averaged over AUs, mostly easy negatives) usually is, the expression loss (cross
# entropy from about $\log 7 \approx 1.95$ down) usually is not. At equilibrium every weighted loss $w_t L_t$ is
# $\frac12$, whatever the scale of the task's loss; the dashed lines of {numref}`fig-03-training` show how closely the
# weights follow that target.
#
# This is also eq. 5's weak point with a CCC loss: $s^\ast = \log L_{va}$ has no lower bound, so as the VA loss
# approaches 0 (a network that fits its training videos well, or batches of a few near-identical frames) the VA
# weight $1/(2 L_{va})$ grows without limit, and the $s_t$ chase each batch's loss rather than the set's. Whether
# eq. 5 helps on Aff-Wild2 is a question for the training chapters; this one only shows that the package computes
# what the equations say.
