"""The published numbers this book compares against, and how a result is read against the synthetic twin's floor and
reference.

Values from the paper's Table I and the ABAW 2020 notes (``ABAW2020.md`` §3): validation set of Aff-Wild2, ABAW 2020
scale (VA as CCC per dimension, AU = 0.5 F1 + 0.5 accuracy, EXPR = 0.67 F1 + 0.33 accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from mtanet.stats import both_learned

#: Table I of the paper (validation): valence CCC, arousal CCC, AU score, EXPR score.
TABLE_I: dict[str, dict[str, float]] = {
    "Baseline (ABAW 2020)": {"valence": 0.14, "arousal": 0.24, "au": 0.31, "expr": 0.36},
    "ResNeXt-50": {"valence": 0.22, "arousal": 0.31, "au": 0.403, "expr": 0.30},
    "ResNeXt-50 + CBAM": {"valence": 0.27, "arousal": 0.34, "au": 0.397, "expr": 0.31},
    "SENet-50": {"valence": 0.28, "arousal": 0.34, "au": 0.427, "expr": 0.32},
}

#: Which backbone of :data:`mtanet.models.BACKBONES` each Table I row used.
TABLE_I_BACKBONES: dict[str, str] = {"ResNeXt-50": "resnext50", "ResNeXt-50 + CBAM": "resnext50_cbam",
                                     "SENet-50": "senet50"}


def table_i() -> pd.DataFrame:
    """The paper's Table I as a DataFrame, with the VA score (mean of the two CCCs) beside the CCCs."""
    df = pd.DataFrame(TABLE_I).T
    df.insert(2, "va", (df["valence"] + df["arousal"]) / 2)
    return df


def gap_closed(score: float, floor: float, reference: float) -> float:
    """Share of the distance from the floor (the best constant) to the reference (the noise-free labels) that
    ``score`` covers: 0 at the floor, 1 at the reference, above 1 past it (the reference is not a bound).

    Raises if the reference is not above the floor.
    """
    if not reference > floor:
        raise ValueError(f"the reference {reference} must lie above the floor {floor}")
    return (score - floor) / (reference - floor)


def against_reference(scores: Mapping[str, float], bounds: Mapping[str, object]) -> pd.DataFrame:
    """Scores per task beside one split's floor and reference, with the share of the gap closed.

    Args:
        scores: ABAW 2020 scores per task (``va``, ``au``, ``expr``) on one split.
        bounds: that split's entry of ``synth_ceiling.json`` (``splits[split]``: keys ``floor_score`` and
            ``reference_score``; see :func:`mtanet.synth.bounds`).
    """
    rows = []
    for task, score in scores.items():
        low, high = bounds["floor_score"][task], bounds["reference_score"][task]
        rows.append({"task": task, "model": score, "floor": low, "reference": high,
                     "gap_closed": gap_closed(score, low, high)})
    return pd.DataFrame(rows).set_index("task")


#: Every choice the paper leaves open or where this implementation departs from it, with the reason. The training
#: chapter renders this table; keep it in step with :class:`mtanet.train.TrainConfig` and :mod:`mtanet.models`.
DEPARTURES: list[dict[str, str]] = [
    {"choice": "VA head output", "paper": "a linear layer (III-A)", "here": "linear layer, then tanh",
     "why": "labels lie in [-1, 1]; tanh keeps every prediction a valid label and does not change the CCC optimum"},
    {"choice": "AU loss reduction", "paper": "eq. 2 sums over the 8 AUs", "here": "mean over the 8 AUs (and rows)",
     "why": "keeps the AU loss on the scale of the other two in the summed stage 1; a constant factor of 8 that eq. 5 "
            "would absorb anyway"},
    {"choice": "SGD momentum", "paper": "SGD, momentum not given", "here": "0.9",
     "why": "the common default; without momentum stage 2 at lr 1e-4 barely moves"},
    {"choice": "Dropout rate", "paper": "dropout in the neck, rate not given", "here": "0.5", "why": "the usual rate"},
    {"choice": "Neck order", "paper": "avg and max pooling 'with dropout and ReLU', concatenated to 1024-d",
     "here": "GAP and GMP, each Dropout -> Linear(2048, 512) -> ReLU, concatenated",
     "why": "the only order that gives a 1024-d concatenation from 2048-d features"},
    {"choice": "Eq. 5 parameterisation", "paper": "log sigma per task", "here": "s = log sigma^2 per task, weights "
     "exp(-s)/2 (VA) and exp(-s) (AU, EXPR), penalty s/2",
     "why": "the same objective, numerically stable (Kendall et al.)"},
    {"choice": "Start of eq. 5's log-variances", "paper": "not given",
     "here": "at the start of stage 2, s* = log(2 c L) for each task's mean training loss L over the last stage-1 "
             "epoch (`init_log_var=\"stationary\"`; 0 on request)",
     "why": "at the paper's stage-2 rate (SGD 1e-4, momentum 0.9) s relaxes with a time constant of about 2,000 "
            "steps, so from 0 it hardly moves in any budget here and stage 2 would be the fixed weights (0.5, 1, 1); "
            "started at s* it is at eq. 5's optimum for the losses it inherits and follows them"},
    {"choice": "Augmentation", "paper": "not described", "here": "horizontal flip, small crop, brightness/contrast",
     "why": "standard for aligned faces; flips keep every label valid"},
    {"choice": "Batches", "paper": "not described", "here": "task-balanced: equal shares of frames labelled for each "
     "task", "why": "most frames carry one or two tasks' labels; a random batch can hold no VA row, and CCC needs "
                    "rows"},
    {"choice": "Schedules and lengths", "paper": "epochs, batch size and schedule not given",
     "here": "set per profile (cpu: cosine, 4 + 1 epochs of 620 steps, batch 32)",
     "why": "the profiles are sized to their machine; the page of each chapter states them"},
    {"choice": "Cross-task leak", "paper": "not discussed", "here": "training labels of a video that is held out for "
     "another task are masked", "why": "otherwise a validation (or test) video is trained on through its other task"},
    {"choice": "Backbone initialisation", "paper": "SENet-50 pretrained on VGGFace2",
     "here": "random by default; the VGGFace2 weights load with the `pretrained` option",
     "why": "the weights need a separate download and licence; nothing downloads at run time"},
    {"choice": "Backbone and input in the cpu profile", "paper": "SENet-50 at 112x112",
     "here": "SE-ResNet-18 at half width, 64x64 (the gpu profile: SENet-50 at 112)",
     "why": "the book must run on 2 CPU cores in minutes"},
    {"choice": "Checkpoint selection and AU thresholds", "paper": "not described (validation scores are reported)",
     "here": "best mean validation score; per-AU thresholds tuned on validation; scores reported on test",
     "why": "never report a score on the data it was chosen on"},
]


def departures() -> pd.DataFrame:
    """:data:`DEPARTURES` as a table indexed by the choice."""
    return pd.DataFrame(DEPARTURES).set_index("choice")


#: The paper's claims that an ablation can test, each as contrasts of :data:`mtanet.book.sweep.CONTRASTS` (row,
#: versus) with the sign the claim predicts for ``row - versus`` (+1: row better) and the scores it is about.
CLAIMS: list[dict[str, object]] = [
    {"claim": "attention helps (CBAM on ResNeXt, Table I)", "contrasts": [("resnext_cbam", "resnext", +1)],
     "metrics": ("va", "au", "expr")},
    {"claim": "SE attention helps", "contrasts": [("senet", "resnet", +1), ("seresnext", "resnext", +1)],
     "metrics": ("va", "au", "expr")},
    {"claim": "SENet beats ResNeXt + CBAM (Table I's ranking)", "contrasts": [("resnext_cbam", "senet", -1)],
     "metrics": ("va", "au", "expr")},
    {"claim": "fine-tuning with eq. 5 beats the summed loss", "contrasts": [("sum_only", "senet", -1)],
     "metrics": ("va", "au", "expr")},
    {"claim": "fine-tuning with eq. 5 beats the summed loss, stage 2 three times longer",
     "contrasts": [("sum_long", "eq5_long", -1)], "metrics": ("va", "au", "expr")},
    {"claim": "one network for three tasks beats one per task",
     "contrasts": [(f"{t}_only{k}", "senet", -1) for t in ("va", "au", "expr") for k in ("", "_frames")],
     "metrics": ("va", "au", "expr")},
    {"claim": "the avg + max neck beats average pooling", "contrasts": [("avg_pool", "senet", -1)],
     "metrics": ("va", "au", "expr")},
]


def read_claims(verdicts: pd.DataFrame, learned: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each of :data:`CLAIMS` read from :func:`mtanet.stats.compare`'s table (with ``versus``): **supported** when
    at least one of its comparisons goes the claimed way significantly and none goes against it; **refuted** when
    one goes against it significantly, or every comparison is ``equivalent`` (no difference within the margin);
    **mixed** when significant verdicts go both ways; **undecided** when everything tested is inconclusive;
    **not run** when none of its rows were compared. ``evidence`` lists the verdicts it read.

    With ``learned`` (:func:`mtanet.stats.above_floor`'s table), a comparison on a task that either row did not learn
    (``learned`` False) is set aside: two networks at the floor are "equivalent" without saying anything about the
    designs. A claim whose every comparison was set aside reads **not learned**."""
    verdicts = verdicts.reset_index(drop=True)
    unlearned = [False] * len(verdicts) if learned is None else [b is False for b in both_learned(verdicts, learned)]
    verdicts = verdicts.assign(unlearned=unlearned)
    lines = []
    for claim in CLAIMS:
        found, set_aside = [], []
        for row, versus, sign in claim["contrasts"]:  # type: ignore[union-attr]
            part = verdicts[(verdicts["row"] == row) & (verdicts["versus"] == versus)
                            & verdicts["metric"].isin(claim["metrics"])]  # type: ignore[arg-type]
            for line in part.itertuples(index=False):
                if line.unlearned:
                    set_aside.append(f"{row} vs {versus}, {line.metric}: not learned")
                    continue
                agrees = {"better": sign > 0, "worse": sign < 0}.get(line.verdict)
                found.append((f"{row} vs {versus}, {line.metric}: {line.verdict} ({line.diff:+.3f})", line.verdict,
                              agrees))
        kinds = [v for _, v, _ in found]
        with_claim = any(a is True for _, _, a in found)
        against = any(a is False for _, _, a in found)
        if not found:
            reading = "not learned" if set_aside else "not run"
        elif with_claim and against:
            reading = "mixed"
        elif against or all(k == "equivalent" for k in kinds):
            reading = "refuted"
        elif with_claim:
            reading = "supported"
        else:
            reading = "undecided"
        lines.append({"claim": claim["claim"], "reading": reading,
                      "evidence": "; ".join([e for e, _, _ in found] + set_aside)})
    return pd.DataFrame(lines).set_index("claim")
