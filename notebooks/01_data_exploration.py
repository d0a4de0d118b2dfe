# %% [markdown]
# # Data: Aff-Wild2 and its synthetic twin
#
# MTANet {cite:p}`zhang2020mtanet` learns three tasks from the 112x112 aligned face crops of Aff-Wild2
# {cite:p}`kollias2019affwild2,kollias2018affwild2ext`: valence and arousal (continuous, in [-1, 1]), eight action
# units (binary), and seven basic expressions (one class per frame). This chapter reads a dataset root with the
# package's reader, `mtanet.data.load_frames`, and shows what is in it: how many videos and frames each task has, how
# the labels overlap, how they are distributed, and what the faces look like.
#
# Aff-Wild2 is distributed under a signed licence, so by default this chapter runs on **SynthAffWild**, a synthetic
# twin written in the exact ABAW 2020 on-disk layout (`mtanet synth ROOT`). Point `data_root` at a real Aff-Wild2
# root and every cell below runs unchanged on it.

# %% tags=["parameters"]
data_root: str = ""  # an Aff-Wild2 root; empty means the synthetic twin of size synth_size (written on first use)
synth_size: str = "smoke"  # smoke, cpu or gpu: which synthetic set an empty data_root stands for
edition: str = ""  # empty means detect it from folder names and headers; or 2020, 2021, 2022
grid_faces: int = 24  # faces in the sample grid
baseline_max_frames: int = 2000  # labeled frames per task and split for the raw-pixel linear baseline
baseline_side: int = 32  # the baseline sees grayscale images downsampled to side x side
seed: int = 0  # for every random choice in this chapter

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from mtanet import synth
from mtanet.book import explore
from mtanet.data import read_split, stats

sns.set_theme(context="notebook", style="whitegrid")
root = synth.resolve_data_root(data_root, synth_size)
is_synthetic = (root / synth.MANIFEST_FILE).exists()
tables = {split: read_split(root, split, edition=edition or None) for split in ("train", "val")}
frames = {split: t.frames for split, t in tables.items()}
ed = tables["train"].edition
au_names, expr_names = list(ed.au_names), list(ed.expr_names)
display(Markdown(
    f"**Data:** `{root.name}`, ABAW {ed.name} layout "
    + ("(**synthetic**: SynthAffWild, not real faces)" if is_synthetic else "(real data)")
    + f"; {len(au_names)} AUs, {len(expr_names)} expression classes."))

# %% [markdown]
# ## What the reader read, and what it skipped
#
# The reader never drops anything silently: whatever it skips (a value outside its range, an image past the end of
# the annotations, a video that is in one task's validation split and another task's training split) is counted in
# its load report. A clean dataset prints no skips except the cross-task masking, which is deliberate.

# %%
for split, table in tables.items():
    print(f"[{split}]", table.report)

# %% [markdown]
# ## Videos and frames per task and split
#
# Task membership is per annotation file, not per video: a person can be annotated for valence-arousal and not for
# expressions. `labeled_with_image` is what a model can learn from; labeled frames without a face image stay in the
# table because the ABAW scores count every annotated frame.

# %%
summary = stats.split_summary(frames, au_names)
summary

# %%
fig, ax = plt.subplots(figsize=(7, 3))
summary["labeled_frames"].unstack("split").plot.barh(ax=ax)
ax.set_xlabel("labeled frames")
ax.set_title("Labeled frames per task and split")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Label coverage and cross-task overlap
#
# Each frame carries labels for a subset of the tasks. The training sampler (`TaskBalancedBatchSampler`) builds
# every batch from equal shares of frames labeled for each task, so every task has labels in every batch although
# few frames are labeled for all three.

# %%
combos = stats.task_combinations(frames["train"], au_names)
fig, ax = plt.subplots(figsize=(7, 3))
combos.plot.bar(ax=ax, color="tab:blue")
ax.set_ylabel("training frames")
ax.set_title("Which tasks label a training frame")
plt.xticks(rotation=0)
plt.tight_layout()
plt.show()
overlap = tables["train"].report.cross_task_overlap
display(Markdown(f"**Cross-task overlap:** {overlap['name'].nunique()} names are in one task's training split and "
                 "another task's validation split; their training labels are masked (counted above) so that no "
                 "validation video is ever trained on. `load_frames(..., allow_cross_task_leak=True)` keeps them."))
overlap.head(10)

# %% [markdown]
# ## Expressions and action units
#
# As in Aff-Wild2, Neutral dominates the expression labels and Disgust and Fear are rare: accuracy rewards predicting
# Neutral, which is why the ABAW 2020 expression score weighs macro-F1 by 0.67.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for split, style in (("train", dict(color="tab:blue")), ("val", dict(color="tab:orange"))):
    dist = stats.expression_distribution(frames[split], expr_names)
    (dist / max(dist.sum(), 1)).plot.bar(ax=axes[0], alpha=0.6, label=split, **style)
    stats.au_prevalence(frames[split], au_names).plot.bar(ax=axes[1], alpha=0.6, label=split, **style)
axes[0].set_title("Expression share of labeled frames")
axes[1].set_title("AU prevalence")
for ax in axes:
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
plt.tight_layout()
plt.show()

# %% [markdown]
# Action units co-occur the way facial expressions combine them: the table shows P(column AU | row AU)
# over AU-labeled training frames (e.g. AU6, the cheek raiser, mostly appears with AU12, the smile).

# %%
co = stats.au_cooccurrence(frames["train"], au_names)
fig, ax = plt.subplots(figsize=(6, 5))
sns.heatmap(co, annot=True, fmt=".2f", cmap="viridis", vmin=0, vmax=1, ax=ax, cbar_kws={"label": "P(col | row)"})
ax.set_title("AU co-occurrence (training)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Valence and arousal on the circumplex
#
# Russell's circumplex {cite:p}`russell1980circumplex` places affect on a disc: valence left to right, arousal bottom
# to top. The density of labeled frames, with the mean position of each expression where both labels exist:

# %%
train = frames["train"]
va = train[["valence", "arousal"]].dropna()
fig, ax = plt.subplots(figsize=(5.5, 5.5))
ax.hexbin(va["valence"], va["arousal"], gridsize=30, extent=(-1, 1, -1, 1), bins="log", cmap="Blues", mincnt=1)
ax.add_patch(plt.Circle((0, 0), 1, fill=False, color="gray", lw=1))
both = train[(train["expression"] >= 0)].dropna(subset=["valence", "arousal"])
for code, group in both.groupby("expression"):
    ax.annotate(expr_names[code], group[["valence", "arousal"]].mean(), ha="center", fontsize=9, weight="bold")
ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel="valence", ylabel="arousal", aspect="equal",
       title="Valence-arousal density (training, log scale)")
plt.show()

# %% [markdown]
# ## Sequence lengths
#
# Aff-Wild2 is video: labels vary smoothly in time and consecutive frames are highly correlated, so the effective
# number of independent samples is much smaller than the frame count. Frames without a face (no jpg) appear in runs.

# %%
lengths = pd.concat([stats.sequence_lengths(f).assign(split=s) for s, f in frames.items()])
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
sns.histplot(lengths, x="frames", hue="split", ax=axes[0], bins=20)
sns.histplot(lengths, x="no_face_share", hue="split", ax=axes[1], bins=20)
axes[0].set_title("Frames per name")
axes[1].set_title("Share of frames without a face")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Sample faces
#
# A grid of training frames with their labels (`V`/`A` valence and arousal, the expression, the active AUs; `-` where
# a task is unlabeled).

# %%
def label_text(row: pd.Series) -> str:
    va_text = f"V{row.valence:+.2f} A{row.arousal:+.2f}" if np.isfinite(row.valence) else "V/A -"
    expr_text = expr_names[row.expression] if row.expression >= 0 else "expr -"
    aus = [a for a in au_names if row[a] == 1]
    au_text = ("AU " + ",".join(a[2:] for a in aus)) if row[au_names[0]] >= 0 and aus else (
        "no AU" if row[au_names[0]] >= 0 else "AU -")
    return f"{va_text}\n{expr_text}\n{au_text}"


sample = stats.sample_rows(train, grid_faces, seed=seed, au_names=au_names)
images = explore.load_images(root, sample["image"].tolist())
cols = 8
rows = int(np.ceil(len(sample) / cols))
fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.2))
for ax in np.ravel(axes):
    ax.axis("off")
for ax, img, (_, row) in zip(np.ravel(axes), images, sample.iterrows()):
    ax.imshow(img)
    ax.set_title(label_text(row), fontsize=6.5)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Browse a video
#
# Choose a name and scrub its frames; the plot marks the current frame on the label time series. The HTML book shows
# the first frame of the first video; run the notebook in JupyterLab to scrub (the widget redraws a PNG, so it needs
# no output capture and works the same under papermill).

# %%
import io

import ipywidgets as widgets

names = sorted(train["name"].unique())


def frame_figure(name: str, frame: int) -> plt.Figure:
    video = train[train["name"] == name].set_index("frame")
    frame = min(frame, int(video.index.max()))
    fig, (ax_img, ax_ts) = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 3]})
    row = video.loc[frame] if frame in video.index else None
    if row is not None and row["image"]:
        ax_img.imshow(explore.load_images(root, [row["image"]])[0])
        ax_img.set_title(label_text(row), fontsize=8)
    else:
        ax_img.text(0.5, 0.5, "no face\n(no jpg)", ha="center", va="center")
    ax_img.axis("off")
    ax_ts.plot(video.index, video["valence"], label="valence")
    ax_ts.plot(video.index, video["arousal"], label="arousal")
    expr = video["expression"].where(video["expression"] >= 0)
    ax_ts.scatter(video.index, expr / max(len(expr_names) - 1, 1) * 2 - 1, s=2, c="k", label="expression (scaled)")
    ax_ts.axvline(frame, color="red")
    ax_ts.set(ylim=(-1.1, 1.1), xlabel="frame", title=name)
    ax_ts.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig


def png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


name_box = widgets.Dropdown(options=names, value=names[0], description="name")
frame_slider = widgets.IntSlider(value=1, min=1, max=int(train.loc[train["name"] == names[0], "frame"].max()),
                                 description="frame", continuous_update=False)
picture = widgets.Image(value=png(frame_figure(names[0], 1)), format="png")


def redraw(_change=None) -> None:
    frame_slider.max = int(train.loc[train["name"] == name_box.value, "frame"].max())
    picture.value = png(frame_figure(name_box.value, frame_slider.value))


name_box.observe(redraw, names="value")
frame_slider.observe(redraw, names="value")
display(widgets.VBox([widgets.HBox([name_box, frame_slider]), picture]))
frame_figure(names[0], 1)
plt.show()

# %% [markdown]
# ## How hard is it? The synthetic set's ceiling and floors
#
# The annotations of SynthAffWild are noisy versions of latent labels that the renderer draws into the faces, so the
# best any model can score is the score of the latent labels against the annotations: the *ceiling*. The *trivial
# predictors* (a constant valence-arousal, the majority expression, AU prevalence or "always present") are the floor.
# Both are computed on validation by the generator and stored beside the data. All scores are on the ABAW 2020 scale:
# VA = mean CCC, AU = 0.5 mean F1 + 0.5 accuracy, EXPR = 0.67 macro-F1 + 0.33 accuracy.

# %%
if is_synthetic:
    ceiling = json.loads((root / synth.CEILING_FILE).read_text())
    table = pd.DataFrame({"ceiling (latent labels)": ceiling["ceiling_score"],
                          "best trivial predictor": ceiling["trivial_best"]}).T
    display(table.round(3))
else:
    display(Markdown("Real data: no latent labels, so no ceiling; the trivial predictors still apply."))

# %% [markdown]
# A linear model on raw pixels is the next floor: if it came close to the ceiling, the task would be too easy to say
# anything about a CNN. Linear least-squares models (ridge regression for valence-arousal, ridge classifiers for the
# expressions and for each AU) on grayscale images downsampled to `baseline_side` pixels.

# %%
baseline = explore.pixel_baseline(root, frames["train"], frames["val"], au_names, num_expressions=len(expr_names),
                                  side=baseline_side, max_frames=baseline_max_frames, seed=seed)
rows = {"linear on raw pixels": {t: r["score"] for t, r in baseline.items()}}
if is_synthetic:
    rows = {"ceiling (latent labels)": ceiling["ceiling_score"], **rows,
            "best trivial predictor": ceiling["trivial_best"]}
comparison = pd.DataFrame(rows).T[["va", "au", "expr"]]
display(comparison.round(3))
fig, ax = plt.subplots(figsize=(7, 3))
comparison.T.plot.bar(ax=ax)
ax.set(ylabel="ABAW 2020 score (validation)", title="Ceiling, pixel baseline and trivial floor")
plt.xticks(rotation=0)
plt.tight_layout()
plt.show()

# %% [markdown]
# On the synthetic set the pixel baseline stays well below the ceiling: pose, lighting, identity and occlusion vary
# far more than the expression-driven pixels, so a linear model on raw pixels cannot isolate the facial actions.
# The next chapters train MTANet to close that gap.
