"""The published table and the gap-closed reading."""

import pytest

from mtanet.book import paper
from mtanet.models import BACKBONES


def test_table_i_matches_the_paper_and_names_real_backbones() -> None:
    t = paper.table_i()
    assert t.loc["SENet-50", "au"] == 0.427 and t.loc["Baseline (ABAW 2020)", "expr"] == 0.36
    assert t.loc["SENet-50", "va"] == pytest.approx(0.31)
    assert set(paper.TABLE_I_BACKBONES.values()) <= set(BACKBONES)


def test_gap_closed() -> None:
    assert paper.gap_closed(0.5, 0.0, 1.0) == 0.5
    assert paper.gap_closed(0.2, 0.4, 0.9) == pytest.approx(-0.4)
    with pytest.raises(ValueError, match="above"):
        paper.gap_closed(0.5, 0.9, 0.9)
    assert paper.gap_closed(1.1, 0.4, 0.9) == pytest.approx(1.4)  # past the reference: it is not a bound
    bounds = {"floor_score": {"va": 0.0, "au": 0.4}, "reference_score": {"va": 0.9, "au": 0.8}}
    table = paper.against_reference({"va": 0.45, "au": 0.8}, bounds)
    assert table["gap_closed"].tolist() == pytest.approx([0.5, 1.0])
    assert table.loc["au", "floor"] == 0.4 and table.loc["au", "reference"] == 0.8
