"""The numbers the data chapter shows (mtanet.data.stats, mtanet.book.explore), on a hand-made table and on the smoke
synthetic set."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mtanet import synth
from mtanet.book import explore
from mtanet.data import load_frames, stats
from mtanet.tasks import AU_NAMES_2020, EXPR_NAMES_2020

AUS = ["AU1", "AU2"]


@pytest.fixture
def table() -> pd.DataFrame:
    return pd.DataFrame({
        "name": ["a", "a", "a", "b", "b"],
        "frame": [1, 2, 4, 1, 2],
        "image": ["x1", "", "x4", "y1", "y2"],
        "valence": [0.1, np.nan, 0.3, np.nan, -0.2],
        "arousal": [0.0, np.nan, 0.1, np.nan, 0.5],
        "expression": [0, 0, -1, 2, 2],
        "AU1": [1, -1, 1, 0, 1],
        "AU2": [0, -1, 1, 0, 0],
    })


def test_split_summary_counts_names_and_frames(table: pd.DataFrame) -> None:
    s = stats.split_summary({"train": table}, AUS)
    assert s.loc[("va", "train")].tolist() == [2, 3, 3]
    assert s.loc[("expr", "train")].tolist() == [2, 4, 3]
    assert s.loc[("au", "train")].tolist() == [2, 4, 4]


def test_task_combinations_and_distributions(table: pd.DataFrame) -> None:
    combos = stats.task_combinations(table, AUS)
    assert combos.to_dict() == {"va+au+expr": 2, "au+expr": 1, "va+au": 1, "expr": 1}
    dist = stats.expression_distribution(table, ["N", "A", "D"])
    assert dist.tolist() == [2, 0, 2]
    assert stats.au_prevalence(table, AUS).tolist() == pytest.approx([0.75, 0.25])


def test_au_cooccurrence_is_conditional(table: pd.DataFrame) -> None:
    co = stats.au_cooccurrence(table, AUS)
    assert co.loc["AU1", "AU2"] == pytest.approx(1 / 3)  # AU2 present in 1 of the 3 AU1 frames
    assert co.loc["AU2", "AU1"] == pytest.approx(1.0)
    assert co.loc["AU1", "AU1"] == 1.0


def test_sequence_lengths_and_samples(table: pd.DataFrame) -> None:
    lengths = stats.sequence_lengths(table)
    assert lengths.loc["a"].tolist() == [4, 2, 0.5]
    sample = stats.sample_rows(table, 3, seed=0, au_names=AUS)
    assert len(sample) == 3 and (sample["image"] != "").all()
    assert stats.sample_rows(table, 3, seed=0, au_names=AUS).equals(sample)


def test_pixel_baseline_stays_well_below_the_reference(smoke_root) -> None:
    train, val = load_frames(smoke_root, "train"), load_frames(smoke_root, "val")
    result = explore.pixel_baseline(smoke_root, train, val, AU_NAMES_2020, num_expressions=len(EXPR_NAMES_2020),
                                    max_frames=300)
    reference = json.loads((smoke_root / synth.CEILING_FILE).read_text())["splits"]["val"]["reference_score"]
    assert set(result) == {"va", "au", "expr"}
    for task, scores in result.items():
        assert scores["score"] < reference[task] - 0.1, (task, scores["score"], reference[task])
