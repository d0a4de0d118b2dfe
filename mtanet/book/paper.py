"""The published numbers this book compares against, and how a result is read against the synthetic ceiling.

Values from the paper's Table I and the ABAW 2020 notes (``ABAW2020.md`` §3): validation set of Aff-Wild2, ABAW 2020
scale (VA as CCC per dimension, AU = 0.5 F1 + 0.5 accuracy, EXPR = 0.67 F1 + 0.33 accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

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


def gap_closed(score: float, trivial: float, ceiling: float) -> float:
    """Share of the distance from the trivial predictor to the ceiling that ``score`` covers (1 = at the ceiling).

    Negative when the score is below the trivial predictor; raises if the ceiling is not above the floor.
    """
    if not ceiling > trivial:
        raise ValueError(f"the ceiling {ceiling} must lie above the trivial score {trivial}")
    return (score - trivial) / (ceiling - trivial)


def against_ceiling(scores: Mapping[str, float], ceiling: Mapping[str, object]) -> pd.DataFrame:
    """Scores per task beside the synthetic set's ceiling and best trivial predictor, with the gap closed.

    Args:
        scores: ABAW 2020 scores per task (``va``, ``au``, ``expr``).
        ceiling: the content of ``synth_ceiling.json`` (keys ``ceiling_score`` and ``trivial_best``).
    """
    rows = []
    for task, score in scores.items():
        low, high = ceiling["trivial_best"][task], ceiling["ceiling_score"][task]
        rows.append({"task": task, "model": score, "trivial": low, "ceiling": high,
                     "gap_closed": gap_closed(score, low, high)})
    return pd.DataFrame(rows).set_index("task")
