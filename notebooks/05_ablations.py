# %% [markdown]
# # Ablations: Table I, regenerated, and the paper's other claims
#
# Table I of the paper {cite:p}`zhang2020mtanet` compares three backbones under the same two-stage recipe:
# ResNeXt-50 {cite:p}`xie2017resnext`, ResNeXt-50 with CBAM attention {cite:p}`woo2018cbam` and SENet-50
# {cite:p}`hu2018senet`. The text also argues for three choices it does not tabulate: fine-tuning with the
# uncertainty weighting of eq. 5 after the summed loss, one network for the three tasks instead of three, and the
# neck's average *and* max pooling. This chapter tests each claim with rows that differ in **one** factor, several
# seeds per row, paired comparisons with a correction for how many are made, and an equivalence margin for "no
# difference".
#
# Every run is the training chapter executed by papermill with the row's parameters (`mtanet.sweep.run_sweep`), into
# its own folder holding the executed notebook, the trainer's `metrics.json` and the held-out scores (`held_out.json`:
# AU thresholds chosen on validation, scores on the twin's test split, each with a video-level bootstrap interval).
# Every run is scored with its last checkpoint (`last.pt`), not its best validation epoch: the rows compare whole
# recipes, and a best epoch that falls in stage 1 would make eq. 5 and the summed loss one and the same model; the
# chapter refuses to compare runs scored otherwise. The tables below are read from those files, never typed in. A run
# with stored results is skipped, so an interrupted sweep resumes where it stopped.
#
# The chapter has two parts. The **reference sweep** is committed (`book/results/ablations-reference.json`, one
# record per run): sized to run for hours on a 2-core machine, it is what the verdicts below rest on. The **sweep of
# this build's profile** then reruns a part of it (the `cpu` profile) and checks that its runs land where the
# reference's did, or runs every row at the paper's size (the `gpu` profile).

# %% tags=["parameters", "hide-input"]
data_root: str = ""  # an Aff-Wild2 root; empty means the synthetic twin of size synth_size
synth_size: str = "smoke"  # smoke, cpu or gpu
family: str = "small"  # paper: the 50-layer networks; small: the same designs, half-width ResNet-26
rows: list = ["senet", "resnext", "resnext_cbam", "sum_only", "va_only", "au_only", "expr_only", "avg_pool"]
seeds: list = [0, 1, 2]  # one run per row and seed
device: str = "auto"  # cpu, cuda, cuda:N or auto
image_size: int = 40  # input side in pixels; from 33 px up the last feature map is 2x2, so max and avg pooling differ
batch_size: int = 32  # global batch
steps_per_epoch: int = 10  # batches per epoch; 0 means cover the largest task pool once
stage1_epochs: int = 2  # summed loss, Adam
stage2_epochs: int = 1  # uncertainty weighting (sum in the sum_only row), SGD
lr_schedule: str = "cosine"  # constant or cosine, per stage
cache_dir: str = ""  # uint8 image caches shared by the runs, relative to the project; empty means decode jpgs
jobs: int = 2  # runs executed at the same time, each kernel with cores / jobs threads
results_dir: str = ""  # empty means runs/sweep/SIZE-FAMILY-HASH under the checkout (or $MTANET_WORK)
reference: str = "book/results/ablations-reference.json"  # committed sweep the verdicts rest on, from the project
margin: float = 0.02  # equivalence margin: a difference inside plus or minus this is no practical difference
train_options: dict = {}  # TrainConfig fields set in every run, e.g. {"warmup_steps": 20}
extra_rows: dict = {}  # more rows: name -> TrainConfig fields changed against senet, e.g. {"lr": {"stage2_lr": 3e-4}}

# %% tags=["hide-input"]
import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from IPython.display import Markdown, display

from mtanet import synth
from mtanet.book import paper, project_root, sweep, work_root
from mtanet.stats import above_floor, both_learned, compare, seeds_for_margin, spread_sources

sns.set_theme(context="notebook", style="whitegrid")
root = synth.resolve_data_root(data_root, synth_size)
shared = {"data_root": str(root), "synth_size": synth_size, "device": device, "image_size": image_size,
          "batch_size": batch_size, "steps_per_epoch": steps_per_epoch, "stage1_epochs": stage1_epochs,
          "stage2_epochs": stage2_epochs, "lr_schedule": lr_schedule, "cache_dir": cache_dir,
          "train_options": train_options}
designs = {**sweep.ROWS, **{name: sweep.Row(name, ", ".join(f"{k} = {v}" for k, v in options.items()),
                                            "training options", {"backbone": "se"}, train_options=options)
                            for name, options in extra_rows.items()}}
names = [*rows, *extra_rows]
runs = sweep.plan([designs[name] for name in names], seeds, shared, family=family)
out = sweep.results_folder(shared, family) if not results_dir else work_root() / results_dir
label = {name: row.label for name, row in designs.items()}
HEADLINE = ["va", "au", "expr"]


def verdict_table(verdicts: pd.DataFrame, learned: pd.DataFrame | None = None) -> pd.DataFrame:
    """compare()'s lines with the question each contrast answers and, given above_floor()'s table, whether both rows
    learned the task (False: a verdict between networks at the floor, which says nothing), for display."""
    questions = {(c.row, c.versus): c.question for c in sweep.CONTRASTS}
    shown = verdicts.assign(question=[questions.get((r, v), "training options changed against senet")
                                      for r, v in zip(verdicts["row"], verdicts["versus"])])
    columns = ["row", "versus", "n", "diff", "ci_low", "ci_high", "p_holm", "verdict"]
    if learned is not None:
        shown, columns = shown.assign(**{"both learned": both_learned(shown, learned)}), [*columns, "both learned"]
    return shown.set_index(["question", "metric"])[columns].round(3)


# %% [markdown]
# ## What each row changes
#
# Every comparison below is between two rows that differ in one factor. The backbone rows form a 2 x 2 factorial of
# attention (none, SE) and cardinality (1, 32), with CBAM beside SE at cardinality 32; in the `small` family (the CPU
# profiles) the five networks differ only in their block, in the `paper` family the SENet-50 of the paper also puts
# its stride on the first 1x1 convolution, as in its VGGFace2 port. The single-task rows come twice: at equal steps
# (a single-task network then sees three times the frames of its task, since the three-task batches give each task a
# third) and at equal frames of the task (a third of the steps).

# %% tags=["hide-input"]
display(pd.DataFrame([{"contrast": f"{c.row} vs {c.versus}", "question": c.question}
                      for c in sweep.CONTRASTS]).set_index("contrast"))

# %% [markdown]
# ## The paper's Table I
#
# Validation scores on Aff-Wild2, ABAW 2020 scale (CCC per dimension; AU score 0.5 F1 + 0.5 accuracy; expression
# score 0.67 F1 + 0.33 accuracy), SENet-50 initialised from VGGFace2 {cite:p}`cao2018vggface2`, the two ResNeXt-50
# rows not. One run per row, no interval: the table cannot separate a design from the seed's luck. And its rows
# change several things at once: ResNeXt-50 and SENet-50 differ in cardinality, in attention and in initialisation,
# so "attention helps" can be read only from its ResNeXt-50 + CBAM row against ResNeXt-50, and "SENet is best" not at
# all as a statement about SE attention.

# %%
display(paper.table_i().round(3))

# %% [markdown]
# ## The reference sweep
#
# The committed sweep, one record per run: row, seed, configuration, scores on the twin's test split with their
# video-level 95% bootstrap intervals, the learned log-variances of eq. 5, wall time, commit, package versions and
# hardware. Its settings are printed below; every verdict of this chapter is computed from it.

# %% tags=["hide-input"]
reference_path = project_root() / reference
have_reference = reference_path.is_file()
if have_reference:
    ref_runs, ref_meta = sweep.read_summary(reference_path)
    ref_rows = list(dict.fromkeys(ref_runs["row"]))
    seeds_per_row = ref_runs.groupby("row")["seed"].nunique().reindex(ref_rows)
    minutes = ref_runs["train_seconds"] / 60
    display(Markdown(
        f"`{reference}`: **{len(ref_runs)} runs** of {len(ref_rows)} rows, on "
        + ", ".join(f"`{d}` ({n})" for d, n in ref_runs["device_name"].value_counts().items())
        + ", at commit " + ", ".join(f"`{str(c)[:10]}` ({n})" for c, n in ref_runs["commit"].value_counts().items())
        + f"; a run took {minutes.median():.1f} min (median; "
        f"{minutes.min():.1f} to {minutes.max():.1f}), {minutes.sum() / 60:.1f} h in all. Scored on: "
        + ", ".join(f"{k} ({v} runs)" for k, v in ref_runs["scored_on"].value_counts().items()) + "."))
    display(pd.Series({k: v for k, v in (ref_meta.get("shared") or {}).items() if k != "data_root"},
                      name="setting").astype(str).to_frame())
    not_run = [r for r in sweep.ROWS if r not in ref_rows]
    display(Markdown(
        "Seeds per row: " + ", ".join(f"{r} {n}" for r, n in seeds_per_row.items()) + ". "
        + (f"Rows not in the reference (left for a later session or the `gpu` profile): {', '.join(not_run)}."
           if not_run else "Every row of the chapter is in the reference.")))
else:
    display(Markdown(f"No committed reference sweep (`{reference}` does not exist): `make reference-sweep` runs one "
                     "and writes it."))

# %% [markdown]
# ### Scores per row
#
# Mean and standard deviation over seeds of each row's scores on test, and the median width of the runs' own
# video-level intervals ({numref}`fig-05-reference` shows every run with its interval). The seeds share the test
# videos, so their spread does not contain how much a score owes to which videos were drawn; the sentence below the
# table sets the two side by side (`mtanet.stats.spread_sources`).

# %% tags=["hide-input"]
if have_reference:
    ref_summary = sweep.summarize(ref_runs)
    table = sweep.formatted(ref_summary, ["valence", "arousal", *HEADLINE])
    widths = ref_runs.assign(**{f"{t} interval": ref_runs[f"{t}_high"] - ref_runs[f"{t}_low"] for t in HEADLINE})
    table = table.join(widths.groupby("row")[[f"{t} interval" for t in HEADLINE]].median().round(3))
    table.insert(0, "seeds", seeds_per_row)
    # the floor and reference of the twin the reference sweep was scored on (its test split), stored with it
    split_bounds = ref_meta.get("bounds") if (ref_runs["scored_on"] == "test").all() else None
    table.index = [label.get(r, r) for r in table.index]
    display(table)
    if split_bounds is not None and "senet" in ref_summary.index:
        closed = {t: paper.gap_closed(ref_summary.loc["senet", (t, "mean")], split_bounds["floor_score"][t],
                                      split_bounds["reference_score"][t]) for t in HEADLINE}
        display(Markdown(
            "The paper's configuration (`senet`) closes " + ", ".join(f"**{t}** {v:.0%}" for t, v in closed.items())
            + " of the gap from the floor (the best constant) to the reference (the noise-free labels) on test "
            "(floor " + ", ".join(f"{t} {split_bounds['floor_score'][t]:.3f}" for t in HEADLINE) + "; reference "
            + ", ".join(f"{t} {split_bounds['reference_score'][t]:.3f}" for t in HEADLINE) + ")."))
    sources = spread_sources(ref_runs, HEADLINE).dropna()
    if len(sources):
        def as_much(ratio: float) -> str:
            return "more than" if ratio > 1.5 else "less than" if ratio < 1 / 1.5 else "about as much as"
        readings: dict[str, list[str]] = {}
        for t in sources.index:
            readings.setdefault(as_much(sources.loc[t, "video_se"] / sources.loc[t, "seed_sd"]), []).append(t)
        display(Markdown(
            "In one unit, a standard deviation: a run's own interval over test videos amounts to a standard error of "
            + ", ".join(f"**{t}** {sources.loc[t, 'video_se']:.3f}" for t in sources.index)
            + " (median half-width / 1.96); the seeds of a row spread by "
            + ", ".join(f"**{t}** {sources.loc[t, 'seed_sd']:.3f}" for t in sources.index)
            + " (median over rows). So which test videos are drawn moves a score "
            + "; ".join(f"{reading} the seed does on " + (", ".join(tasks[:-1]) + " and " if len(tasks) > 1 else "")
                        + tasks[-1] for reading, tasks in readings.items())
            + ". Two rows compared on the same videos share that draw; a score against a fixed level (the floor, "
            "the paper's number) carries it whole."))

# %% [markdown]
# A comparison only means something on a task both rows learned. Whether each row's seeds score above the floor
# (`mtanet.stats.above_floor`: one-sided t test of the mean over seeds, Holm over every row and task):

# %% tags=["hide-input"]
learned_tasks = None
if have_reference and split_bounds is not None:
    learned_tasks = above_floor(ref_runs, split_bounds["floor_score"], HEADLINE)
    shown = learned_tasks.assign(row=[label.get(r, r) for r in learned_tasks["row"]])
    display(shown.pivot(index="row", columns="metric", values="learned")
            .reindex(index=list(dict.fromkeys(shown["row"])), columns=HEADLINE))
    floor_level = learned_tasks[learned_tasks["learned"] == False]  # noqa: E712 (None: too few seeds to test)
    by_task = floor_level.groupby("metric")["row"].apply(list)
    untested = learned_tasks["learned"].isna()
    fewest, most = int(learned_tasks["n"].min()), int(learned_tasks["n"].max())
    seed_counts = str(fewest) if fewest == most else f"{fewest} to {most}"
    display(Markdown(
        "No row has two seeds yet: whether its networks learned each task is not tested." if untested.all() else
        "Every row with two seeds or more is above the floor on every task." if floor_level.empty else
        "Not shown to score above the floor: " + "; ".join(
            f"**{t}** in {len(by_task[t])} of {int((learned_tasks['metric'] == t).sum())} rows "
            f"({', '.join(by_task[t])})" for t in HEADLINE if t in by_task)
        + f" (with {seed_counts} seeds per row). Verdicts on such "
        "a task may compare networks that did not learn it, so the claims below set them aside."))

# %% [markdown]
# The test split is one sample of new people, the validation split another. Runs that recorded both (the trainer's
# last evaluation on validation: the same model as `last.pt`, no selection, AU at threshold 0.5 as on test here) show
# how much a score owes to which people a split holds. The seeds share both samples, so their spread cannot show it.

# %% tags=["hide-input"]
on_test = ref_runs[ref_runs["scored_on"] == "test"] if have_reference else None
if on_test is not None and {f"val_{t}" for t in HEADLINE} <= set(on_test.columns):
    lines = []
    for t in HEADLINE:
        both = on_test[on_test[f"val_{t}"].notna() & on_test[t].notna()]
        if len(both) >= 2:
            lines.append({"task": t, "runs": len(both), "rows": both["row"].nunique(),
                          "validation": both[f"val_{t}"].mean(), "test": both[t].mean(),
                          "largest |difference|": (both[f"val_{t}"] - both[t]).abs().max()})
    people = pd.DataFrame(lines, columns=["task", "runs", "rows", "validation", "test", "largest |difference|"])
    if len(people):
        people = people.set_index("task")
        display(people.round(3))
        sentence = "Mean over the runs that recorded both, validation people then test people: " + "; ".join(
            f"**{t}** {people.loc[t, 'validation']:.3f} and {people.loc[t, 'test']:.3f} ({people.loc[t, 'runs']} runs "
            f"of {people.loc[t, 'rows']} rows)" for t in people.index)
        va_rows = on_test[on_test["val_va"].notna() & on_test["va"].notna()]
        if "va" in people.index:
            # VA's floor is CCC 0 on every split (no constant correlates), so both splits share it: the same test over
            # the same rows, once per split, Holm over those rows only (a smaller family than the table above)
            on_val_people = above_floor(va_rows.assign(va=va_rows["val_va"]), {"va": 0.0}, ["va"])
            on_test_people = above_floor(va_rows, {"va": 0.0}, ["va"])
            tested = int(on_val_people["learned"].notna().sum())
            if tested:
                shown_val, shown_test = (int(t["learned"].eq(True).sum()) for t in (on_val_people, on_test_people))
                sentence += (f". Of these {tested} rows, **VA** is shown above its floor in {shown_val} on the "
                             f"validation people and in {shown_test} on the test people (one-sided t test over "
                             "seeds, Holm over these rows, per split)"
                             + (": whether the networks count as having learned VA depends on which people a split "
                                "holds, so neither split alone settles it" if shown_val != shown_test else ""))
            va_sources = spread_sources(on_test, ["va"]).loc["va"]
            if va_sources.notna().all():
                # the test above reads the seeds only; which people were drawn moves VA more than the seed does
                sentence += (f". That test reads the seeds' spread (VA {va_sources['seed_sd']:.3f}), not the "
                             f"standard error of a run's VA over which test videos were drawn "
                             f"({va_sources['video_se']:.3f}; both medians, as in the sentence under the scores)")
        display(Markdown(sentence + "."))
    else:
        display(Markdown("No two runs recorded both their validation and their test scores: no comparison of the two "
                         "samples of people."))
elif have_reference:
    display(Markdown("The reference's runs do not record validation scores beside test scores: no comparison of the "
                     "two samples of people."))

# %% tags=["hide-input"]
if have_reference:
    order = list(dict.fromkeys(sweep.in_row_order(ref_runs)["row"]))
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.45 * len(order) + 1.2), sharey=True)
    for ax, task in zip(axes, HEADLINE):
        for y, row in enumerate(order):
            part = ref_runs[(ref_runs["row"] == row) & ref_runs[task].notna()].sort_values("seed")
            offsets = np.linspace(-0.25, 0.25, max(len(part), 1))
            ax.errorbar(part[task], y + offsets[: len(part)],
                        xerr=[part[task] - part[f"{task}_low"], part[f"{task}_high"] - part[task]],
                        fmt="o", ms=3, lw=0.8, color="tab:blue")
        if split_bounds is not None:
            ax.axvline(split_bounds["reference_score"][task], c="tab:green", ls="--", lw=1)
            ax.axvline(split_bounds["floor_score"][task], c="tab:red", ls=":", lw=1)
        ax.set(title=task, xlabel="score on test")
    axes[0].set_yticks(range(len(order)), [label.get(r, r) for r in order])
    axes[0].invert_yaxis()
    plt.tight_layout()
    plt.show()

# %% [markdown] tags=["figure-caption"]
# (fig-05-reference)=
# The reference sweep's scores on test: one dot per seed with its video-level 95% interval, per row; the dashed line
# is the noise-free labels' score, the dotted one the best constant's.

# %% [markdown]
# ### Which differences the seeds support
#
# Each contrast, score by score, paired by seed (`mtanet.stats.compare`): the mean paired difference (first row
# minus second), its 95% t interval, the paired t test's p value adjusted with Holm's method over every comparison
# in this table, and a verdict: **better** or **worse** when the adjusted p is below 0.05, **equivalent** when the
# 90% interval lies inside plus or minus the margin (two one-sided tests), otherwise **inconclusive**.

# %% tags=["hide-input"]
ref_verdicts = None
if have_reference:
    # a contrast is read once both its rows have at least two seeds (a sweep stopped half way has fewer)
    enough = set(seeds_per_row[seeds_per_row >= 2].index)
    chosen = [c for c in sweep.contrasts(ref_rows) if {c.row, c.versus} <= enough]
    waiting = [f"{c.row} vs {c.versus}" for c in sweep.contrasts(ref_rows) if c not in chosen]
    if chosen:
        sweep.check_scored_at_end(ref_runs, {r for c in chosen for r in (c.row, c.versus)})
        ref_verdicts = compare(ref_runs, [(c.row, c.versus) for c in chosen], HEADLINE, margin=margin, alpha=0.05)
        display(verdict_table(ref_verdicts, learned_tasks))
        counts = ref_verdicts["verdict"].value_counts()
        pairs = ref_verdicts["n"].value_counts().sort_index(ascending=False)
        unpaired = ref_verdicts[ref_verdicts["unpaired"] > 0]
        display(Markdown(f"Of {len(ref_verdicts)} comparisons (margin {margin}): "
                         + ", ".join(f"{n} {k}" for k, n in counts.items()) + "."
                         + (" They pair " + " and ".join(f"{n} seeds in {k}" for n, k in pairs.items()) + (
                             f"; {len(unpaired)} of them set aside the seeds only one of their rows holds, so their "
                             "difference is not the difference of the two rows' means in the table above"
                             if len(unpaired) else "") + "." if len(pairs) > 1 else "")
                         + (f" Not yet compared (a row with fewer than two seeds): {', '.join(waiting)}."
                            if waiting else "")))
    else:
        display(Markdown("No contrast of the reference has two rows with two seeds or more: no comparison yet."))

# %% [markdown]
# ### What this many seeds can resolve
#
# An inconclusive verdict says the seeds could not tell, not that the rows are alike. How finely they can tell is
# read from the spread of the paired differences (`sd` in `compare`'s table), over the comparisons on a task both rows
# learned (the others compare noise): per task and number of seeds paired, the median half-width of the 95% intervals
# above; and the seeds per row with which two truly alike rows would be called equivalent with a chance of 80%
# (`mtanet.stats.seeds_for_margin`, planned from the spread seen here).

# %% tags=["hide-input"]
if ref_verdicts is not None:
    readable = ref_verdicts["sd"].notna().to_numpy(copy=True)
    if learned_tasks is not None:
        readable &= np.array([b is True for b in both_learned(ref_verdicts, learned_tasks)], dtype=bool)
    spread = ref_verdicts[readable]
    if len(spread):
        # grouped by how many seeds a comparison pairs: rows given more seeds resolve finer than the rest
        spread = spread.assign(half_width=(spread["ci_high"] - spread["ci_low"]) / 2,
                               planned=seeds_for_margin(spread["sd"], margin, power=0.8))
        by_pairs = spread.groupby(["n", "metric"])
        resolution = pd.DataFrame({
            "comparisons": by_pairs.size(),
            "sd of paired differences (median)": by_pairs["sd"].median(),
            "95% half-width (median)": by_pairs["half_width"].median(),
        }).reindex([(n, t) for n in sorted(set(spread["n"]), reverse=True) for t in HEADLINE
                    if (n, t) in by_pairs.groups])
        resolution.index = resolution.index.set_names(["seeds paired", "task"])
        display(resolution.round(3))
        planned = spread.groupby("metric")["planned"].median().reindex([t for t in HEADLINE
                                                                        if t in set(spread["metric"])])
        display(Markdown(
            f"Over the {len(spread)} comparisons on a task both rows learned, the median 95% interval of a "
            "difference is, " + "; ".join(
                f"with {n} seeds paired ({int(part['comparisons'].sum())} comparisons), "
                + ", ".join(f"plus or minus {h:.3f} on {t.upper()}"
                            for t, h in part.droplevel(0)["95% half-width (median)"].items())
                for n, part in resolution.groupby(level=0, sort=False))
            + f"; against an equivalence margin of {margin}. Were two rows truly alike, calling them equivalent "
            "with a chance of 80% at the median spread of all these comparisons would take about "
            + ", ".join(f"{math.ceil(n)} seeds per row on {t.upper()}" for t, n in planned.items())
            + ": a difference smaller than the interval is neither found nor ruled out here."))
    else:
        display(Markdown("No comparison is on a task both its rows learned: nothing to plan from."))

# %% [markdown]
# ### The paper's claims, read from these verdicts
#
# A claim is **supported** when one of its comparisons goes its way after the correction and none goes against it,
# **refuted** when one goes against it or every one is equivalent, **mixed** when they go both ways, **undecided**
# when all are inconclusive, and **not run** when the reference lacks its rows. A comparison on a task that one of
# its rows did not learn (the table above) is set aside, and a claim left with none reads **not learned**.

# %% tags=["hide-input"]
if ref_verdicts is not None:
    claims = paper.read_claims(ref_verdicts, learned=learned_tasks)
    display(claims)
    # one line per reading, each claim quoted whole: a claim's own commas must not read as a list's
    display(Markdown("On this twin, at the reference's size:\n\n" + "\n".join(
        f"- **{reading}**: " + "; ".join(f"\u201c{claim}\u201d" for claim in claims.index[claims["reading"] == reading])
        for reading in ("supported", "refuted", "mixed", "undecided", "not learned", "not run")
        if (claims["reading"] == reading).any())))
    shared_settings = ref_meta.get("shared") or {}
    per_epoch = shared_settings.get("steps_per_epoch")
    if per_epoch and {"sum_only", "fixed_weights"} & set(ref_verdicts["row"]):
        stage2_steps = shared_settings.get("stage2_epochs", 0) * per_epoch
        # the long rows' stage 2 as they ran it (their recorded configuration), not as the row is defined now
        long_config = ref_runs.loc[ref_runs["row"] == "sum_long", "config"]
        long_steps = (long_config.iloc[0]["stage2"]["epochs"] * long_config.iloc[0]["steps_per_epoch"]
                      if "sum_long" in set(ref_verdicts["row"]) else None)
        display(Markdown(
            f"The loss-weighting rows differ only in stage 2, which here is {stage2_steps} steps after "
            f"{shared_settings.get('stage1_epochs', 0) * per_epoch} of stage 1: their verdicts say what the weighting "
            "changes at that length of stage 2, not at the paper's"
            + (f"; the rows `eq5_long` and `sum_long` ask the same question with {long_steps} steps of stage 2."
               if long_steps else ".")))
else:
    display(Markdown("No verdicts yet, so no claim is read."))

# %% [markdown]
# ### Eq. 5, learned
#
# At the start of stage 2 each task's log-variance starts at the stationary point $s^\ast = \log(2cL)$ of its
# stage-1 loss (see the training chapter's list of departures), and eq. 5 then moves it with the loss. The distance
# $s - s^\ast$ at the end (for the last stage-2 epoch's mean loss) says whether the weights stage 2 used were eq. 5's
# optimum; the `fixed_weights` row keeps $s = 0$, the weights $(0.5, 1, 1)$, and so sits far from it.

# %% tags=["hide-input"]
if have_reference and "s_va" in ref_runs:
    learned = ref_runs[ref_runs["s_va"].notna()]
    distance = pd.DataFrame({t: learned[f"s_{t}"] - learned[f"s_star_{t}"] for t in HEADLINE})
    distance.insert(0, "row", learned["row"])
    eq5 = distance[distance["row"] != "fixed_weights"]
    worst = eq5[HEADLINE].abs().max().max() if len(eq5) else float("nan")
    display(distance.groupby("row")[HEADLINE].agg(["mean", "max"]).round(3))
    weights = learned[learned["row"] == "senet"]
    display(Markdown(
        f"Largest $|s - s^\\ast|$ over the runs that learn eq. 5: **{worst:.3f}**; the task weights "
        "$c\\,e^{-s}$ those runs ended with (mean over seeds): " + ", ".join(
            f"{t} {np.mean(f * np.exp(-weights[f's_{t}'])):.2f}" for t, f in (("va", 0.5), ("au", 1.0), ("expr", 1.0)))
        + "."))
    assert not len(eq5) or worst < 0.25, (
        f"eq. 5 ended {worst:.3f} from its stationary point in the reference: stage 2 did not learn the weights")

# %% [markdown]
# ## This build's sweep
#
# The rows and seeds of this build's profile. The `cpu` profile reruns part of the reference with exactly its
# settings: on the same kind of machine its numbers should repeat the reference's to the last digits, elsewhere
# (another CPU's kernels, another torch) they should at least fall inside the reference's intervals.

# %% tags=["hide-input"]
display(pd.DataFrame([{"row": name, "what it changes": designs[name].label, "group": designs[name].group,
                       "backbone": sweep.FAMILIES[family][designs[name].changes["backbone"]]}
                      for name in names]).set_index("row"))
display(Markdown(f"{len(runs)} runs ({len(names)} rows x {len(seeds)} seeds), {image_size} px, "
                 f"{stage1_epochs} x {steps_per_epoch or 'all'} steps of stage 1 and {stage2_epochs} x "
                 f"{steps_per_epoch or 'all'} of stage 2, batch {batch_size}; results in `{out}`."))

# %% [markdown]
# The runs leave out the training chapter's figures (its cells tagged `report`): only the scores are needed here,
# and every executed run notebook stays in its folder for a closer look. Checkpoints are deleted once a run has
# written its `metrics.json`.

# %%
status = sweep.run_sweep(runs, out, jobs=jobs, drop_tags=("report",), log=print)
results = sweep.collect(out, names)
results = results[results["seed"].isin(seeds)].reset_index(drop=True)
display(Markdown(f"{(status['status'] == 'ran').sum()} runs executed now, {(status['status'] == 'reused').sum()} "
                 f"reused from an earlier sweep; {results['train_seconds'].sum():.0f} s of training in all, on "
                 f"`{results['device_name'].iloc[0]}`."))

# %% tags=["hide-input"]
editions = results["edition"].dropna().unique()
assert len(editions) <= 1, f"runs scored under two ABAW editions cannot share a column: {list(editions)}"
summary = sweep.summarize(results)
every = sweep.formatted(summary, ["valence", "arousal", "va", "au", "au_f1", "expr", "expr_f1"])
every.insert(0, "seeds", results.groupby("row")["seed"].nunique().reindex(summary.index))
every.index = [label.get(r, r) for r in every.index]
display(Markdown("Scored on: " + ", ".join(f"**{k}** ({v} runs)" for k, v in results["scored_on"].value_counts()
                                              .items()) + f"; ABAW {editions[0] if len(editions) else '?'} scores."))
display(every)
_ = sweep.write_summary(results, out / "summary.json", shared=shared, family=family, rows=names, seeds=seeds)

# %% [markdown]
# ### Does it repeat the reference?
#
# Each run beside the reference's run of the same row and seed, when both ran the same experiment (same settings
# but where and how they ran, same annotations).

# %% tags=["hide-input"]
repeats = sweep.reproducibility(results, ref_runs, HEADLINE) if have_reference else pd.DataFrame()
if len(repeats):
    display(repeats.set_index(["row", "seed", "metric"]).round(4))
    exact = (repeats["diff"].abs() < 1e-6).all()
    inside = repeats["in_video_interval"].all()
    display(Markdown(
        f"{repeats[['row', 'seed']].drop_duplicates().shape[0]} run(s) repeat a reference experiment; the largest "
        f"difference is {repeats['diff'].abs().max():.2g}. "
        + ("Every score repeats the reference's to 1e-6." if exact else
           "Every score lies inside the reference run's video-level interval." if inside else
           "**Not every score lies inside the reference run's video-level interval**: "
           + ", ".join(f"{r}/seed{s} {m}" for r, s, m in repeats.loc[~repeats["in_video_interval"],
                                                                     ["row", "seed", "metric"]].itertuples(index=False))
           + ".")))
else:
    display(Markdown("No run of this build's sweep repeats a reference experiment (other settings or other data): "
                     "no reproducibility check at this profile."))

# %% [markdown]
# ### Its own comparisons
#
# The same statistics over this build's runs, when every row has at least two seeds: at a budget where the networks
# barely learn they show the machinery and the seed noise, not a finding.

# %% tags=["hide-input"]
own_contrasts = sweep.contrasts(names, extra=list(extra_rows))
if own_contrasts and results.groupby("row")["seed"].nunique().min() >= 2:
    sweep.check_scored_at_end(results, {r for c in own_contrasts for r in (c.row, c.versus)})
    own = compare(results, [(c.row, c.versus) for c in own_contrasts], HEADLINE, margin=margin, alpha=0.05)
    own_bounds_file = root / synth.CEILING_FILE
    own_learned = None
    if (results["scored_on"] == "test").all() and own_bounds_file.is_file():
        own_floor = json.loads(own_bounds_file.read_text())["splits"]["test"]["floor_score"]
        own_learned = above_floor(results, own_floor, HEADLINE)
    own_table = verdict_table(own, own_learned)
    display(own_table)
    unlearned = 0 if own_learned is None else int((own_table["both learned"] == False).sum())  # noqa: E712
    display(Markdown(f"Of {len(own)} comparisons: "
                     + ", ".join(f"{n} {k}" for k, n in own["verdict"].value_counts().items()) + "."
                     + (f" {unlearned} of them compare rows of which at least one did not learn the task (at the "
                        "floor): they say nothing about the designs." if unlearned else "")))
else:
    display(Markdown("Fewer than two seeds per row, or no contrast among these rows: no comparison."))

# %% [markdown]
# ## Reading the result
#
# What the twin can and cannot say about the paper:
#
# - **Data.** The twin's labels come from simulated annotators, its test people are new to every network, and its
#   tasks are related through faces the way the data chapter describes; a design that wins here need not win on
#   Aff-Wild2, whose best validation scores are far lower (Table I).
# - **Size.** The reference sweep runs the `small` family (half-width ResNet-26 designs) at the size stated above,
#   not the paper's 50-layer networks at 112 px; the `gpu` profile is that full factorial with 5 seeds.
# - **Initialisation.** The paper starts SENet-50 from VGGFace2 face-recognition weights and the other two rows not;
#   here every network starts from random weights (no download at run time), which keeps initialisation out of every
#   contrast.
# - **Verdicts.** An inconclusive verdict is not "no difference": only an `equivalent` verdict says the difference
#   is smaller than the margin.
