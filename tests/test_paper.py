"""The published table and the gap-closed reading."""

import pandas as pd
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


def _verdict(row: str, versus: str, metric: str, verdict: str, diff: float) -> dict:
    return {"row": row, "versus": versus, "metric": metric, "verdict": verdict, "diff": diff}


def test_read_claims_supports_refutes_or_leaves_undecided_from_the_verdicts() -> None:
    from mtanet.book.paper import CLAIMS, read_claims

    verdicts = pd.DataFrame([
        _verdict("resnext_cbam", "resnext", "va", "better", 0.05),  # attention helps: with the claim
        _verdict("resnext_cbam", "resnext", "au", "inconclusive", 0.01),
        _verdict("sum_only", "senet", "va", "better", 0.04),  # the summed loss better: against eq. 5's claim
        _verdict("avg_pool", "senet", "va", "equivalent", 0.001),  # equivalent on every score tested
        _verdict("avg_pool", "senet", "au", "equivalent", -0.002),
        _verdict("senet", "resnet", "expr", "inconclusive", 0.02),
        _verdict("va_only", "senet", "va", "worse", -0.06),  # single task worse: with the multi-task claim
        _verdict("au_only", "senet", "au", "better", 0.03),  # and one against it
    ])
    reading = read_claims(verdicts)["reading"]
    assert list(reading.index) == [c["claim"] for c in CLAIMS]
    assert reading["attention helps (CBAM on ResNeXt, Table I)"] == "supported"
    assert reading["fine-tuning with eq. 5 beats the summed loss"] == "refuted"
    assert reading["the avg + max neck beats average pooling"] == "refuted"
    assert reading["SE attention helps"] == "undecided"
    assert reading["one network for three tasks beats one per task"] == "mixed"
    assert reading["SENet beats ResNeXt + CBAM (Table I's ranking)"] == "not run"
    # a verdict on a pair the claim does not name is not read (the versus column matters)
    other = pd.DataFrame([_verdict("resnext_cbam", "senet", "va", "better", 0.05)])
    assert read_claims(other)["reading"]["attention helps (CBAM on ResNeXt, Table I)"] == "not run"
    assert read_claims(other)["reading"]["SENet beats ResNeXt + CBAM (Table I's ranking)"] == "refuted"


def test_a_comparison_on_a_task_a_row_did_not_learn_is_set_aside() -> None:
    """Two networks at the floor are 'equivalent' without saying anything: with the learned table, such a verdict is
    not read, so the avg+max claim is not refuted by it; a claim left with nothing reads 'not learned'."""
    from mtanet.book.paper import read_claims

    verdicts = pd.DataFrame([
        _verdict("avg_pool", "senet", "va", "equivalent", 0.001),  # both at the floor on VA
        _verdict("avg_pool", "senet", "au", "better", 0.03),  # learned: read, against the claim
        _verdict("sum_only", "senet", "va", "equivalent", 0.0),  # only VA compared, and VA not learned
    ])
    learned = pd.DataFrame([{"row": r, "metric": m, "learned": ok} for r, m, ok in (
        ("senet", "va", False), ("senet", "au", True), ("avg_pool", "va", False), ("avg_pool", "au", True),
        ("sum_only", "va", None))])
    plain = read_claims(verdicts)
    assert plain.loc["fine-tuning with eq. 5 beats the summed loss", "reading"] == "refuted"
    read = read_claims(verdicts, learned=learned)
    assert read.loc["fine-tuning with eq. 5 beats the summed loss", "reading"] == "not learned"
    assert read.loc["the avg + max neck beats average pooling", "reading"] == "refuted"
    assert "avg_pool vs senet, va: not learned" in read.loc["the avg + max neck beats average pooling", "evidence"]
    assert read.loc["SE attention helps", "reading"] == "not run"
