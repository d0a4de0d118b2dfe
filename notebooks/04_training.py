# %% [markdown]
# # Training: the two-stage recipe
#
# MTANet is trained in two stages {cite:p}`zhang2020mtanet`: first with the plain sum of the three task losses
# (Adam, learning rate 1e-3, weight decay 1e-3), then fine-tuned with the uncertainty weighting of eq. 5
# {cite:p}`kendall2018uncertainty` (SGD, learning rate 1e-4, weight decay 5e-3), whose learnable log-variances join
# the optimiser. This chapter runs that recipe with `mtanet.train.train`, on a GPU kernel when there is one, and reads
# the result: learning curves, the task weights stage 2 learns, and the scores on people the network never saw,
# with every choice (the checkpoint, the AU thresholds) made on validation and the score reported on the twin's test
# split, against its floor and reference (or against the paper's numbers on real data). The last section lists every
# place where this implementation departs from the paper or fills a gap it leaves.
#
# Everything the recipe leaves open (epochs, batch size, augmentation, schedule) is a field of `TrainConfig`; the
# profiles pick sizes that fit their machine, and the page states them. The parameters below are the fields a profile
# usually changes; `train_options` sets any other field (it is how the ablation sweep varies, say, `stage2_lr`).

# %% tags=["parameters", "hide-input"]
data_root: str = ""  # an Aff-Wild2 root; empty means the synthetic twin of size synth_size
synth_size: str = "smoke"  # smoke, cpu or gpu
device: str = "auto"  # cpu, cuda, cuda:N or auto
backbone: str = "seresnet18"  # a key of mtanet.models.BACKBONES; the paper uses senet50
image_size: int = 48  # input side in pixels; the paper uses 112
batch_size: int = 32  # global batch
steps_per_epoch: int = 15  # batches per epoch; 0 means cover the largest task pool once
stage1_epochs: int = 2  # summed loss, Adam
stage2_epochs: int = 1  # uncertainty weighting, SGD
lr_schedule: str = "constant"  # constant (the paper names none) or cosine, per stage
tasks: list = ["va", "au", "expr"]  # heads and losses to train; one task gives a single-task network
pooling: str = "avgmax_concat"  # the neck: avgmax_concat (the paper), avg or avgmax_add
dropout: float = 0.5  # dropout of the neck (the paper names dropout, not its rate)
stage2_weighting: str = "uncertainty"  # uncertainty (eq. 5) or sum (no re-weighting in stage 2)
expr_class_weight: str = "none"  # none (eq. 1 as printed), balanced or sqrt: counters the rare expressions
au_pos_weight: str = "none"  # none (eq. 2 as printed), balanced or sqrt: counters the rare AUs
lr_log_vars: float = 0.0  # learning rate of the log-variances in stage 2; 0 means the stage learning rate
cache_dir: str = ""  # folder of uint8 image caches, relative to the checkout or $MTANET_WORK; empty: decode jpgs
threads: int = 0  # torch CPU threads; 0 means all cores
num_workers: int = -1  # loader processes; -1 means the trainer default for the device
output_dir: str = ""  # run folder; empty means runs/book/04_training-PROFILE-HASH under the checkout or $MTANET_WORK
seed: int = 0  # initialisation, batches, augmentation
held_out_checkpoint: str = ""  # model scored on held-out data; empty: best_mean.pt on the twin, last.pt on real data
train_options: dict = {}  # any other TrainConfig fields, e.g. {"stage2_lr": 3e-4}; applied last, so they win
videos_to_plot: int = 3  # held-out videos shown over time

# %% tags=["hide-input"]
import hashlib
import json
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from IPython.display import Markdown, display
from sklearn.metrics import confusion_matrix

from mtanet import synth
from mtanet.book import paper, record_run, sweep, work_root
from mtanet.data import label_arrays, read_split
from mtanet.evaluate import (headline, held_out_folds, predict_frames, score_predictions, va_agreement,
                             video_intervals)
from mtanet.metrics import tune_au_thresholds
from mtanet.models import load_model
from mtanet.runtime import write_json
from mtanet.train import TrainConfig, train

sns.set_theme(context="notebook", style="whitegrid")
root = synth.resolve_data_root(data_root, synth_size)
is_synthetic = (root / synth.MANIFEST_FILE).exists()
config = TrainConfig.from_dict({
    "data_root": str(root), "backbone": backbone, "image_size": image_size, "batch_size": batch_size,
    "steps_per_epoch": steps_per_epoch or None, "stage1_epochs": stage1_epochs, "stage2_epochs": stage2_epochs,
    "lr_schedule": lr_schedule, "tasks": list(tasks), "pooling": pooling, "dropout": dropout,
    "stage2_weighting": stage2_weighting, "lr_log_vars": lr_log_vars or None, "expr_class_weight": expr_class_weight,
    "au_pos_weight": au_pos_weight, "cache_dir": str(work_root() / cache_dir) if cache_dir else "",
    "threads": threads or None, "num_workers": None if num_workers < 0 else num_workers, "device": device,
    "seed": seed, "progress": False, **train_options})
# The run folder is named by the configuration, so re-running the book resumes (or reuses) the same run.
digest = hashlib.sha1(json.dumps({k: v for k, v in config.to_dict().items() if k not in TrainConfig.RESUMABLE_CHANGES},
                                 sort_keys=True).encode()).hexdigest()[:10]
run_dir = Path(output_dir) if output_dir else work_root() / "runs" / "book" / f"04_training-{synth_size}-{digest}"
config = config.replace(output_dir=str(run_dir), resume=True)
shown = ["tasks", "backbone", "pooling", "dropout", "image_size", "batch_size", "steps_per_epoch", "stage1_epochs",
         "stage1_optimizer", "stage1_lr", "stage1_weight_decay", "stage2_epochs", "stage2_weighting",
         "stage2_optimizer", "stage2_lr", "stage2_weight_decay", "lr_schedule", "expr_class_weight", "au_pos_weight",
         "augment", "device", "seed"]
flat = config.to_flat_dict()  # the stages' fields as stage1_lr, ..., as the parameters and train_options name them
shown += [k for k in train_options if k not in shown and k in flat]  # whatever else train_options changed
display(pd.Series({k: flat[k] for k in shown}, name="value").to_frame())

# %% [markdown]
# ## Train
#
# `train` writes `log.jsonl` (a row per logged step and per epoch), checkpoints (`last.pt` for resuming,
# `best_<score>.pt` per validation score) and `metrics.json`. A run that was interrupted, even by SIGKILL, resumes
# from its last checkpoint and ends with the same numbers.

# %%
started = time.perf_counter()
result = train(config)
elapsed = time.perf_counter() - started
if not output_dir:  # the book's own run: the chapter on real faces uses this model (a sweep's runs are not noted)
    record_run("04_training", synth_size, run_dir)
hardware = result["hardware"]
display(Markdown(f"Trained in **{result['wall_time_s']['total']:.0f} s** on `{hardware['device_name']}` "
                 f"({hardware['device']}, {hardware['torch_threads']} threads, {hardware['num_workers']} loader "
                 f"workers), {result['images_trained']} images at {result['images_per_s']:.0f} images/s. This call "
                 f"took {elapsed:.0f} s: a finished run is reused, not retrained."))

# %% [markdown] tags=["report"]
# ## Learning curves
#
# Per-task training losses (stage 1 sums them with weight 1; stage 2 weighs them) and the validation scores after
# every epoch ({numref}`fig-04-curves`).

# %% tags=["report"]
log = pd.read_json(run_dir / "log.jsonl", lines=True)
steps = log[log["kind"] == "step"]
epochs = log[log["kind"] == "epoch"].reset_index(drop=True)
stage2_start = steps.loc[steps["stage"] == 2, "step"].min() if (steps["stage"] == 2).any() else None
fig, axes = plt.subplots(1, 2, figsize=(12, 3.5))
for task in config.tasks:
    axes[0].plot(steps["step"], steps[f"loss_{task}"], label=task)
axes[0].set(xlabel="step", ylabel="training loss", title="Training losses per task")
for task in config.tasks:
    axes[1].plot(epochs["step"], epochs[f"val_{task}"], marker="o", label=task)
axes[1].set(xlabel="step", ylabel="ABAW 2020 score", title="Validation scores per epoch")
for ax in axes:
    if stage2_start is not None:
        ax.axvline(stage2_start, ls="--", c="gray")
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown] tags=["report", "figure-caption"]
# (fig-04-curves)=
# Training losses per task (left) and validation scores after every epoch (right); the dashed line marks the start
# of stage 2.

# %% [markdown] tags=["report"]
# ## What stage 2 learns: the task weights
#
# Eq. 5 gives each task a weight $1/(2\sigma^2)$ (valence-arousal) or $1/\sigma^2$ (AU, expression) and a penalty
# $\log\sigma$. At the paper's stage-2 rate the log-variances $s = \log\sigma^2$ relax with a time constant of
# about 2,000 steps (chapter 03), so started at 0 they would hardly move and stage 2 would keep the weights
# $(0.5, 1, 1)$. Here each $s$ starts at the stationary point $s^\ast = \log(2cL)$ for its task's mean training loss
# over the last stage-1 epoch (`init_log_var="stationary"`, one of the departures listed at the end), and eq. 5 moves
# it from there. The effective weights logged during stage 2, and where $s$ ended against $s^\ast$ for the last
# stage-2 epoch's loss:

# %% tags=["report"]
weights = steps[steps["stage"] == 2]
if len(weights):
    fig, ax = plt.subplots(figsize=(7, 3))
    for task in config.tasks:
        ax.plot(weights["step"], weights[f"w_{task}"], label=task)
    ax.set(xlabel="step", ylabel="effective weight", title="Uncertainty weights in stage 2")
    ax.legend()
    plt.tight_layout()
    plt.show()
    display(weights[["step"] + [f"w_{t}" for t in config.tasks]].iloc[[0, -1]].set_index("step").round(4))
    learned = result.get("uncertainty") or {}
    if learned.get("distance"):
        display(pd.DataFrame({"start": learned.get("start_log_vars"), "end": learned["log_vars"],
                              "s* (last epoch's loss)": learned["stationary_log_vars"],
                              "end - s*": learned["distance"]}).T.round(3))
else:
    display(Markdown("Stage 2 did not run (`stage2_epochs` = 0)."))

# %% [markdown] tags=["report"]
# ## Results on data nothing was chosen on
#
# The trainer kept the checkpoint of the epoch with the best mean validation score (`best_mean.pt`), and the per-AU
# thresholds are tuned on validation (each AU's threshold maximises its share of the ABAW 2020 AU score). Both
# choices are then applied once to the twin's **test** split: people the network never saw, whose labels played no
# part in training or selection. On real Aff-Wild2, whose test labels are not public, the validation videos are split
# by name into two folds (`mtanet.evaluate.held_out_folds`); the last checkpoint is used (no selection), the thresholds
# are tuned on the `select` fold and the scores are reported on the `report` fold. The ablation sweep scores
# `last.pt` (`held_out_checkpoint`): it compares whole recipes, and a best epoch that falls in stage 1 would make,
# say, eq. 5 and the summed loss the very same model. The scores go to the run folder as `held_out.json`, which the
# sweep reads.

# %%
device = hardware["device"]
val = read_split(root, "val").frames
test_split = read_split(root, "test").frames
if len(test_split):
    select, report, checkpoint, report_name = val, test_split, "best_mean.pt", "test"
else:
    folds = held_out_folds(val)
    select, report, checkpoint, report_name = folds["select"], folds["report"], "last.pt", "validation, report fold"
checkpoint = held_out_checkpoint or checkpoint
if not (run_dir / checkpoint).is_file():
    raise FileNotFoundError(f"held_out_checkpoint {checkpoint!r}: no such checkpoint in {run_dir} (the trainer writes "
                            "last.pt and best_<score>.pt)")
model = load_model(run_dir / checkpoint).to(device)  # scored on the device that trained it
au_names = list(read_split(root, "val").edition.au_names)


def labelled(frames: pd.DataFrame) -> pd.DataFrame:
    """The rows that carry a label of a task this network has: the only ones any score reads."""
    _, task_masks = label_arrays(frames, au_names)
    return frames[np.any([task_masks[t] for t in config.tasks], axis=0)]


def predict(frames: pd.DataFrame) -> dict:
    # with a cache folder, each split's jpgs are decoded once for every run that scores it (the sweep's many runs)
    # loader processes pay off on a GPU; on the CPU with a cache they cost more to start than they save
    workers = hardware["num_workers"] if str(device).startswith("cuda") else 0
    return predict_frames(model, frames, root, image_size=config.image_size, batch_size=128, num_workers=workers,
                          cache_dir=config.cache_dir or None)


select, report = labelled(select), labelled(report)
preds = predict(report)
targets, masks = label_arrays(report, au_names)
has_face = ~np.isnan(next(iter(preds.values()))).any(axis=1)  # rows the face detector found: predicted by every head
# AU at 0.5 here; the thresholds tuned on validation come in the next cell (the sweep, which reads this file, skips it)
at_half = {k: v for k, v in score_predictions(report, preds, thresholds=[0.5] * len(au_names)).items()
           if k != "au_tuned"}
# which videos happen to be held out moves a score as much as the seed does: a video-level bootstrap interval per task
held_out = {"split": report_name, "checkpoint": checkpoint, "scores": at_half,
            "intervals": video_intervals(report, preds, thresholds=0.5, seed=0)}
write_json(run_dir / sweep.HELD_OUT_FILE, held_out)
final = headline(at_half)

# %% [markdown] tags=["report"]
# The per-AU thresholds, tuned on validation and then applied to the reported split (`au_tuned` below):

# %% tags=["report"]
preds_select = predict(select)
thresholds = None
if "au" in config.tasks:
    select_targets, select_masks = label_arrays(select, au_names)
    rows = select_masks["au"] & ~np.isnan(preds_select["au"]).any(axis=1)
    thresholds = tune_au_thresholds(select_targets["au"][rows], preds_select["au"][rows], objective="abaw2020")
select_scores = score_predictions(select, preds_select, thresholds=thresholds)
scores = score_predictions(report, preds, thresholds=thresholds)
final = headline(scores)
write_json(run_dir / sweep.HELD_OUT_FILE, {**held_out, "scores": scores, "selection_scores": select_scores,
                                           "au_thresholds": None if thresholds is None else thresholds.tolist()})
display(pd.DataFrame({"selection (validation)": headline(select_scores), f"reported ({report_name})": final})
        .round(3).rename(index={"au": "au (threshold 0.5)", "au_tuned": "au (thresholds from validation)"}))
display(Markdown(f"95% intervals on {report_name} from resampling its videos (AU at 0.5): " + ", ".join(
    f"**{t}** {ci['score']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] ({ci['videos']} videos)"
    for t, ci in held_out["intervals"].items()) + "."))

# %% tags=["report"]
if is_synthetic:
    bounds = json.loads((root / synth.CEILING_FILE).read_text())["splits"]["test"]
    comparison = paper.against_reference({t: final[t] for t in config.tasks}, bounds)
    display(comparison.round(3))
    closed = comparison["gap_closed"]
    display(Markdown(
        "Share of the gap from the floor (the best constant) to the reference (the noise-free labels) that this run "
        "closes on test: " + ", ".join(f"**{t}** {v:.0%}" for t, v in closed.items())
        + "."))
    short = [t for t, v in closed.items() if v < 0.5]
    display(Markdown(
        f"The `cpu` profile's goal is at least half of the gap on every task. This run (profile `{synth_size}`) "
        + ("meets it." if not short else f"does **not** meet it on {', '.join(short)}: on this twin, whose test "
           "people are new to the network and whose faces carry clutter, occluders and alignment error, a half-width "
           "SE-ResNet-18 at 64 px and a few thousand steps learns the tasks only partly (for valence-arousal, the "
           "section *People it trained on and new people* below sets the people it trained on beside new ones). How "
           "much of the gap the `gpu` profile (SENet-50 at 112 px on the large set) closes has not been measured "
           "yet.")))
else:
    table = paper.table_i()
    va_scores = scores.get("va", {})
    table.loc[f"this run ({report_name})"] = {"valence": va_scores.get("ccc_valence"),
                                              "arousal": va_scores.get("ccc_arousal"), "va": final["va"],
                                              "au": final["au"], "expr": final["expr"]}
    display(table.round(3))

# %% [markdown] tags=["report"]
# ### Expressions: confusion matrix

# %% tags=["report"]
if "expr" in config.tasks:
    rows = masks["expr"] & has_face
    expr_names = read_split(root, "val").edition.expr_names  # the header names of this root
    cm = confusion_matrix(targets["expr"][rows], preds["expr"][rows].argmax(1), labels=range(len(expr_names)),
                          normalize="true")
    fig, ax = plt.subplots(figsize=(6, 5))
    sns.heatmap(cm, annot=True, fmt=".2f", cmap="Blues", xticklabels=expr_names, yticklabels=expr_names, ax=ax,
                vmin=0, vmax=1)
    ax.set(xlabel="predicted", ylabel="annotated", title=f"Expression confusion, {report_name} (rows sum to 1)")
    plt.tight_layout()
    plt.show()

# %% [markdown] tags=["report"]
# ### Action units: F1 per AU

# %% tags=["report"]
if "au" in config.tasks:
    f1 = pd.DataFrame({"F1 at 0.5": scores["au"]["f1_per_au"],
                       "F1 at thresholds from validation": scores["au_tuned"]["f1_per_au"]}, index=au_names)
    f1.plot.bar(figsize=(8, 3), rot=0, title=f"F1 per AU ({report_name})")
    plt.tight_layout()
    plt.show()

# %% [markdown] tags=["report"]
# ### Valence and arousal: predictions on the circumplex and over time

# %% tags=["report"]
if "va" in config.tasks:
    va_rows = masks["va"] & has_face
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (j, name) in zip(axes, enumerate(["valence", "arousal"])):
        ax.hexbin(targets["va"][va_rows, j], preds["va"][va_rows, j], gridsize=30, extent=(-1, 1, -1, 1), bins="log",
                  cmap="Blues", mincnt=1)
        ax.plot([-1, 1], [-1, 1], c="gray", lw=1)
        ax.set(xlabel=f"annotated {name}", ylabel=f"predicted {name}", aspect="equal",
               title=f"{name}: CCC {scores['va'][f'ccc_{name}']:.3f}")
    plt.tight_layout()
    plt.show()

# %% tags=["report"]
if "va" in config.tasks:
    va_names = report.loc[va_rows, "name"].value_counts().index[:videos_to_plot]
    fig, axes = plt.subplots(len(va_names), 1, figsize=(11, 2.4 * len(va_names)), squeeze=False)
    for ax, name in zip(axes[:, 0], va_names):
        rows_of = (report["name"] == name).to_numpy()
        frame = report.loc[rows_of, "frame"].to_numpy()
        for j, (label, color) in enumerate((("valence", "tab:blue"), ("arousal", "tab:orange"))):
            ax.plot(frame, report.loc[rows_of, label], c=color, label=f"annotated {label}")
            ax.plot(frame, preds["va"][rows_of, j], c=color, ls="--", label=f"predicted {label}")
        ax.set(ylim=(-1.05, 1.05), title=name, ylabel="value")
    axes[0, 0].legend(ncol=4, fontsize=8, loc="lower left")
    axes[-1, 0].set_xlabel("frame")
    plt.tight_layout()
    plt.show()

# %% [markdown] tags=["report"]
# ### People it trained on and new people
#
# Much of valence-arousal belongs to the person and the video: a resting mood, how much they talk, the raters'
# biases. Where the predictions agree with the labels (`mtanet.evaluate.va_agreement`): over all frames, with the
# twin's noise-free values, between videos (who runs high or low) and within videos (what changes on a face), on as
# many training videos as the reported split has, and on the reported split.

# %% tags=["report"]
if "va" in config.tasks and is_synthetic:
    train_frames = read_split(root, "train").frames
    new_videos = report.loc[masks["va"], "name"].nunique()
    seen_names = train_frames["name"].drop_duplicates().sample(n=min(new_videos, train_frames["name"].nunique()),
                                                               random_state=0)
    seen = labelled(train_frames[train_frames["name"].isin(seen_names)])
    seen = seen[seen["valence"].notna()]
    agreement = pd.concat({
        "trained on": va_agreement(seen, predict(seen)["va"], synth.load_latent(root, seen)["va"]),
        f"new ({report_name})": va_agreement(report, preds["va"], synth.load_latent(root, report)["va"])})
    display(agreement.round(3))
    seen_a, new_a = agreement.loc["trained on"].loc["arousal"], agreement.loc[f"new ({report_name})"].loc["arousal"]
    display(Markdown(
        f"On the videos it trained on, the predicted arousal follows the annotations (r = {seen_a['frames']:.2f}) "
        + ("more" if seen_a["frames"] > seen_a["noise_free"] else "less")
        + f" closely than the noise-free arousal behind them (r = {seen_a['noise_free']:.2f})"
        + (": the network has learned those people's annotation traces, raters' noise included. "
           if seen_a["frames"] > seen_a["noise_free"] + 0.05 else ". ")
        + f"Between videos the correlation is {seen_a['between_videos']:.2f} on them and "
        f"{new_a['between_videos']:.2f} on new people; within videos (median) {seen_a['within_videos']:.2f} and "
        f"{new_a['within_videos']:.2f}."))

# %% [markdown]
# ## Reading the result
#
# On SynthAffWild a run is read against two numbers per task, both on test: the floor (the best any constant scores)
# and the reference (what the noise-free labels score against the annotators). The `cpu` profile trains a small
# member of the SE-ResNet family at reduced resolution so that the whole book fits a 2-core machine: SE-ResNet-18 at
# half width at 64 px (its parameter file gives the measurements behind that choice). The `gpu` profile uses the
# paper's SENet-50 at 112x112 on the large synthetic set; the VGGFace2 start of the paper needs the converted weights
# (the `pretrained` option), so by default the absolute numbers are not the paper's. On real data the table above puts
# the run beside the paper's Table I.

# %% tags=["report", "remove-input"]
if is_synthetic:
    hardest = closed.idxmin()
    lines = [f"In this run the task furthest from its reference is **{hardest}** ({closed[hardest]:.0%} of the gap "
             "closed)."]
    if "expr" in config.tasks:
        f1_class = pd.Series(scores["expr"]["f1_per_class"], index=list(expr_names))
        weakest = f1_class.nsmallest(3)
        train_counts = read_split(root, "train").frames["expression"].value_counts()
        lines.append(f"The expression classes with the lowest F1 on {report_name} are "
                     + ", ".join(f"{c} ({v:.2f}, {int(train_counts.get(expr_names.index(c), 0))} training frames)"
                                 for c, v in weakest.items())
                     + ": the rare classes have few training frames from few people, too few to generalise to "
                       "new faces.")
    display(Markdown(" ".join(lines)))

# %% [markdown]
# ## Where this implementation departs from the paper
#
# Every choice the paper leaves open, and every place where the code does something other than what the paper
# prints, with the reason (`mtanet.book.paper.DEPARTURES`, the one list the book keeps of them):

# %% tags=["report", "remove-input"]
display(paper.departures())
