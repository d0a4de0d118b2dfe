"""The Aff-Wild2 reader on hand-made roots: layout, sentinels, editions, every kind of bad input, dataset, sampler."""

from __future__ import annotations

import errno
import os
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import RootBuilder, jpeg_bytes
from mtanet import data, errors
from mtanet.data import DataFormatError, load_frames, parse_annotation_text, read_split
from mtanet.data import dataset as dataset_module
from mtanet.data.loading import BatchedFrames, KeyedBatches, KeyedFrames, collate_batched
from mtanet.tasks import AU_NAMES_2020, AU_NAMES_2021, EXPR_NAMES_2020, EXPR_NAMES_2022

VA_HEADER = "valence,arousal\n"
AU_HEADER = ",".join(AU_NAMES_2020) + "\n"
EXPR_HEADER = ",".join(EXPR_NAMES_2020) + "\n"


def au_line(*values: int) -> str:
    return ",".join(str(v) for v in values) + "\n"


@pytest.fixture
def basic(builder: RootBuilder) -> RootBuilder:
    """Two names: 'a' annotated for VA and EXPR (train), 'b_left' for AU (train), 'c' VA validation."""
    builder.annotation("va", "train", "a", VA_HEADER + "0.5,-0.25\n-5,-5\n0.1,0.2\n1.0,-1.0\n")
    builder.annotation("expr", "train", "a", EXPR_HEADER + "4\n5\n0\n6\n")
    builder.images("a", [1, 3, 4])  # frame 2 has no face
    builder.annotation("au", "train", "b_left", AU_HEADER + au_line(1, 0, 0, 1, 1, 0, 0, 1) + au_line(0, 0, -1, 0, 0, 0, 0, 0))
    builder.images("b_left", [1, 2])
    builder.annotation("va", "val", "c", VA_HEADER + "0,0\n0.3,0.3\n")
    builder.images("c", [1, 2])
    return builder


def test_reads_one_table_with_frames_images_and_sentinels(basic: RootBuilder) -> None:
    frames = load_frames(basic.root, "train")
    assert list(frames.columns[:10]) == ["name", "video", "frame", "image", "split_va", "split_au", "split_expr",
                                         "valence", "arousal", "expression"]
    assert list(frames.columns[10:]) == list(AU_NAMES_2020)
    a = frames[frames["name"] == "a"].set_index("frame")
    assert list(a.index) == [1, 2, 3, 4]
    assert a.loc[1, "image"] == "cropped_aligned/a/00001.jpg"
    assert a.loc[2, "image"] == ""  # no jpg: stays for scoring, never fed
    assert a.loc[1, "valence"] == pytest.approx(0.5) and a.loc[1, "arousal"] == pytest.approx(-0.25)
    assert np.isnan(a.loc[2, "valence"]) and np.isnan(a.loc[2, "arousal"])  # -5 sentinel
    assert a.loc[4, "valence"] == pytest.approx(1.0)  # the range is closed
    assert list(a["expression"]) == [4, 5, 0, 6]
    assert (a[list(AU_NAMES_2020)] == -1).all().all()  # 'a' has no AU file
    assert set(a["split_va"]) == {"train"} and set(a["split_au"]) == {""}
    b = frames[frames["name"] == "b_left"].set_index("frame")
    assert b.loc[1, "AU1"] == 1 and b.loc[1, "AU25"] == 1 and b.loc[1, "AU2"] == 0
    assert (b.loc[2, list(AU_NAMES_2020)] == -1).all()  # one -1 makes the whole row unlabeled
    assert set(b["video"]) == {"b"}
    assert "c" not in set(frames["name"])  # validation only
    assert frames.attrs["edition"] == "2020"


def test_validation_split_reads_each_tasks_own_folder(basic: RootBuilder) -> None:
    frames = load_frames(basic.root, "val")
    assert set(frames["name"]) == {"c"}
    assert frames["valence"].tolist() == pytest.approx([0.0, 0.3])


def test_images_matched_by_number_not_listing_order(builder: RootBuilder) -> None:
    builder.annotation("expr", "train", "v", EXPR_HEADER + "".join(f"{i % 7}\n" for i in range(12)))
    builder.images("v", [10, 2, 7])
    f = load_frames(builder.root, "train").set_index("frame")
    assert [f.loc[i, "image"] != "" for i in range(1, 13)] == [i in (2, 7, 10) for i in range(1, 13)]
    assert f.loc[10, "image"].endswith("/00010.jpg") and f.loc[10, "expression"] == 9 % 7  # line 10 after the header


def test_cross_task_leak_is_masked_and_reported(builder: RootBuilder) -> None:
    builder.annotation("va", "val", "x", VA_HEADER + "0.1,0.1\n0.2,0.2\n")
    builder.annotation("expr", "train", "x", EXPR_HEADER + "1\n2\n")
    builder.annotation("expr", "train", "y", EXPR_HEADER + "3\n")
    for name in ("x", "y"):
        builder.images(name, [1])
    table = read_split(builder.root, "train")
    x = table.frames[table.frames["name"] == "x"]
    assert (x["expression"] == -1).all()  # masked: x is a VA validation video
    assert table.report.counts["labels_masked_cross_task_leak"] == 2
    assert table.report.counts["images_beyond_annotations"] == 0  # masked labels still give the length
    overlap = table.report.cross_task_overlap
    assert overlap.to_dict("records") == [{"name": "x", "train_task": "expr", "val_tasks": "va"}]
    assert table.frames.loc[table.frames["name"] == "y", "expression"].tolist() == [3]
    kept = load_frames(builder.root, "train", allow_cross_task_leak=True)
    assert kept.loc[kept["name"] == "x", "expression"].tolist() == [1, 2]


def test_leak_check_pairs_left_and_right_of_one_video(builder: RootBuilder) -> None:
    builder.annotation("au", "val", "vid_left", AU_HEADER + au_line(0, 0, 0, 0, 0, 0, 0, 0))
    builder.annotation("va", "train", "vid_right", VA_HEADER + "0.5,0.5\n")
    table = read_split(builder.root, "train")
    assert table.report.counts["labels_masked_cross_task_leak"] == 1


@pytest.mark.parametrize(("task", "text", "line", "needle"), [
    ("va", "arousal,valence\n0,0\n", 1, "expected header 'valence,arousal'"),
    ("va", "0.1,0.2\n0.3,0.4\n", 1, "missing header"),
    ("expr", "Neutral,Anger\n0\n", 1, "expected header"),
    ("au", "AU1,AU2,AU1\n0,0,0\n", 1, "AU names"),
    ("va", VA_HEADER + "0.1,0.2\n0.1\n", 3, "1 fields"),
    ("va", VA_HEADER + "0.1,0.2\n0.1,0.2,0.3\n", 3, "3 fields"),
    ("va", VA_HEADER + "0.1,0.2\n\n0.1,0.2\n", 3, "blank line"),
    ("va", VA_HEADER + "0.1,abc\n", 2, "not a number"),
    ("va", VA_HEADER + "0.1,nan\n", 2, "non-finite"),
    ("au", AU_HEADER + au_line(0, 0, 0, 0, 0, 0, 0, 0) + au_line(0, 2, 0, 0, 0, 0, 0, 0), 3, "0, 1 or -1"),
    ("au", AU_HEADER + "0,0,0,0,0,0,0,0.5\n", 2, "AU labels are the integers 0, 1 or -1 (unlabeled); found '0.5'"),
    ("au", AU_HEADER + "0,0,0,0,0,0,0,1.0\n", 2, "AU labels are the integers 0, 1 or -1 (unlabeled); found '1.0'"),
    ("au", AU_HEADER + "0,0,0,0,0,0,0,yes\n", 2, "AU labels are the integers 0, 1 or -1 (unlabeled); found 'yes'"),
    ("expr", EXPR_HEADER + "0\n7\n", 3, "-1 or 0..6"),
    ("expr", EXPR_HEADER + "0\n-5\n", 3, "-1 or 0..6"),
    ("expr", EXPR_HEADER + "1.0\n", 2, "expression labels are the integers 0..6 or -1 (unlabeled); found '1.0'"),
    ("expr", "", 1, "empty file"),
    ("expr", "\n\n", 1, "empty file"),
])
def test_malformed_annotation_names_file_and_line(builder: RootBuilder, task: str, text: str, line: int,
                                                  needle: str) -> None:
    path = builder.annotation(task, "train", "bad", text)
    with pytest.raises(DataFormatError) as info:
        load_frames(builder.root, "train")
    assert info.value.path == str(path) and info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert needle in str(info.value)


def test_va_out_of_range_is_missing_and_counted(builder: RootBuilder) -> None:
    path = builder.annotation("va", "train", "v", VA_HEADER + "0.5,0.5\n1.5,0.2\n-5,-5\n")
    builder.images("v", [1, 2, 3])  # rows with neither image nor label would not be in the table
    table = read_split(builder.root, "train")
    assert table.report.counts["va_out_of_range"] == 1  # -5 is the sentinel, not counted
    assert table.report.examples["va_out_of_range"] == [f"{path}:3"]
    assert table.frames["valence"].isna().tolist() == [False, True, True]


def test_crlf_is_read_and_counted(builder: RootBuilder) -> None:
    builder.annotation("expr", "train", "w", EXPR_HEADER.replace("\n", "\r\n") + "1\r\n2\r\n")
    table = read_split(builder.root, "train")
    assert table.frames["expression"].tolist() == [1, 2]
    assert table.report.counts["crlf_line_endings"] == 1


def test_utf8_bom_is_tolerated_and_non_utf8_is_an_error(builder: RootBuilder) -> None:
    builder.annotation("expr", "train", "bom", b"\xef\xbb\xbf" + EXPR_HEADER.encode() + b"3\n")
    assert load_frames(builder.root, "train")["expression"].tolist() == [3]
    builder.annotation("expr", "train", "latin", EXPR_HEADER.encode() + b"3\n\xff\n")
    with pytest.raises(DataFormatError, match=r"latin\.txt:3: not UTF-8"):
        load_frames(builder.root, "train")


def test_more_images_than_annotation_rows_keeps_them_unlabeled(builder: RootBuilder) -> None:
    builder.annotation("expr", "train", "m", EXPR_HEADER + "1\n2\n")
    builder.images("m", [1, 2, 3, 4])
    table = read_split(builder.root, "train")
    m = table.frames.set_index("frame")
    assert list(m.index) == [1, 2, 3, 4]
    assert m.loc[3, "expression"] == -1 and m.loc[4, "image"].endswith("00004.jpg")
    assert table.report.counts["images_beyond_annotations"] == 2


def test_folders_and_files_without_a_place_are_counted(builder: RootBuilder) -> None:
    builder.annotation("expr", "train", "known", EXPR_HEADER + "0\n")
    builder.images("known", [1])
    builder.images("orphan", [1, 2])
    (builder.root / "cropped_aligned" / "known" / "thumbs.db").write_bytes(b"x")
    (builder.root / "cropped_aligned" / "known" / "1.jpg").write_bytes(jpeg_bytes())
    builder.annotation("va", "train", "no_images", VA_HEADER + "0.1,0.1\n")
    table = read_split(builder.root, "train")
    counts = table.report.counts
    assert counts["image_folder_without_annotations"] == 1
    assert counts["unexpected_file"] == 2
    assert counts["annotated_name_without_images"] == 1
    assert "orphan" not in set(table.frames["name"])
    assert table.frames.loc[table.frames["name"] == "no_images", "image"].tolist() == [""]
    assert "image_folder_without_annotations: 1" in str(table.report)


def test_every_unread_entry_under_annotations_is_counted_with_why(builder: RootBuilder, capsys) -> None:
    from mtanet.cli import main

    a = builder.annotation("va", "train", "a", VA_HEADER + "0.1,0.2\n")
    builder.images("a", [1])
    builder.annotation("va", "val", "c", VA_HEADER + "0.3,0.3\n")
    builder.images("c", [1])
    train_dir, val_dir, ann = a.parent, a.parent.parent / "Validation_Set", builder.root / "annotations"
    (train_dir / "b.csv").write_text(VA_HEADER + "0.5,0.5\n")  # labels under another suffix
    (train_dir / "B.TXT").write_text(VA_HEADER + "0.5,0.5\n")
    (train_dir / "a.txt.bak").write_text(VA_HEADER)
    (train_dir / ".DS_Store").write_bytes(b"\x00\x01")
    (train_dir / "._a.txt").write_bytes(b"\x00\x05\x16\x07 mac resource fork")  # hidden: never parsed
    (train_dir / "nested").mkdir()
    (val_dir / "d.csv").write_text(VA_HEADER)  # the validation load's to count
    (ann / "README.md").write_text("labels")
    (ann / "VA_Set" / "notes.txt").write_text("labels")
    (ann / "VA_Set" / "Archive").mkdir()  # not named like a split folder: an extra folder, not a misspelling
    (ann / "Old_Annotations").mkdir()
    (ann / ".git").mkdir()
    train, val = read_split(builder.root, "train"), read_split(builder.root, "val")
    assert set(train.frames["name"]) == {"a"} and set(val.frames["name"]) == {"c"}
    tree = {"annotation_stray_file": ["annotations/README.md", "annotations/VA_Set/notes.txt"],
            "annotation_unknown_folder": ["annotations/Old_Annotations", "annotations/VA_Set/Archive"],
            "annotation_hidden": ["annotations/.git"]}
    split = "annotations/VA_Set/Training_Set/"
    want_train = {**tree, "annotation_other_suffix": [split + "B.TXT", split + "a.txt.bak", split + "b.csv"],
                  "annotation_hidden": ["annotations/.git", split + ".DS_Store", split + "._a.txt"],
                  "annotation_unknown_folder": tree["annotation_unknown_folder"] + [split + "nested"]}
    want_val = {**tree, "annotation_other_suffix": ["annotations/VA_Set/Validation_Set/d.csv"]}
    for table, want in ((train, want_train), (val, want_val)):
        got = {k: sorted(v) for k, v in table.report.examples.items()}
        assert got == {k: sorted(v) for k, v in want.items()}
        assert dict(table.report.counts) == {k: len(v) for k, v in want.items()}
    assert main(["inspect", str(builder.root)]) == 0
    printed = capsys.readouterr().out
    assert "annotation_other_suffix: 3 (e.g." in printed and "b.csv" in printed and "d.csv" in printed
    assert "nothing skipped" not in printed


@pytest.mark.parametrize(("make", "folder", "meant"), [
    (lambda ann: ann / "VA_Set" / "Validaton_Set", "Validaton_Set", "Validation_Set"),
    (lambda ann: ann / "VA_Set" / "validation_set", "validation_set", "Validation_Set"),
    (lambda ann: ann / "VA_Set" / "Train_Set", "Train_Set", "Training_Set"),  # a 2021 folder in a 2020 root
    (lambda ann: ann / "AU_set" / "Validation_Set", "AU_set", "AU_Set"),
], ids=["misspelt", "lower_case", "other_edition", "task_folder"])
def test_a_misspelt_task_or_split_folder_is_an_error_not_lost_labels(builder: RootBuilder, capsys, make, folder: str,
                                                                     meant: str) -> None:
    from mtanet.cli import main

    # c is in VA's validation split: were that folder not read, c's EXPR training labels would leak unmasked
    builder.annotation("va", "train" if meant != "Training_Set" else "val", "a", VA_HEADER + "0.1,0.2\n")
    builder.annotation("expr", "train", "c", EXPR_HEADER + "1\n")
    wrong = make(builder.root / "annotations")
    wrong.mkdir(parents=True)
    header = AU_HEADER if folder == "AU_set" else VA_HEADER
    (wrong / "c.txt").write_text(header + ("0,0,0,0,0,0,0,0\n" if folder == "AU_set" else "0.3,0.3\n"))
    for split in ("train", "val"):
        with pytest.raises(DataFormatError, match=rf"{folder}: not a (task|split) folder of the ABAW 2020 layout, "
                                                  rf"which expects .*; \w+ has no {meant}.*rename {folder} to {meant}"):
            read_split(builder.root, split)
    assert main(["inspect", str(builder.root)]) == 2
    err = capsys.readouterr().err
    misspelt = wrong if wrong.name == folder else wrong.parent
    assert err.startswith(f"mtanet: error: {misspelt}: not a ") and err.count("\n") == 1


def test_unreadable_jpgs_lose_their_image_not_their_labels(builder: RootBuilder) -> None:
    builder.annotation("expr", "train", "j", EXPR_HEADER + "1\n2\n3\n4\n")
    builder.images("j", [1])
    builder.images("j", [2], data=jpeg_bytes(2)[:300])  # truncated
    builder.images("j", [3], data=b"")  # empty
    builder.images("j", [4], data=b"not a jpeg at all")
    plain = load_frames(builder.root, "train")
    dataset = data.FrameDataset(plain, builder.root, AU_NAMES_2020)
    assert dataset[0][0].shape == (3, 112, 112)
    with pytest.raises(DataFormatError, match=r"00002\.jpg: unreadable or truncated JPEG"):
        dataset[1]
    with pytest.raises(DataFormatError, match=r"00003\.jpg: empty image file"):
        dataset[2]
    table = read_split(builder.root, "train", verify_images=True)
    assert table.report.counts["unreadable_image"] == 3
    assert table.frames["expression"].tolist() == [1, 2, 3, 4]
    assert (table.frames["image"] != "").tolist() == [True, False, False, False]


def test_edition_2021_is_detected_from_folders_and_headers(tmp_path) -> None:
    b = RootBuilder(tmp_path / "r2021", edition="2021")
    b.annotation("au", "train", "p", ",".join(AU_NAMES_2021) + "\n" + ",".join(["1"] + ["0"] * 11) + "\n")
    b.annotation("expr", "val", "q", EXPR_HEADER + "5\n")
    b.images("p", [1])
    table = read_split(b.root, "train")
    assert table.edition.name == "2021"
    assert list(table.frames.columns[10:]) == list(AU_NAMES_2021)
    assert table.frames["AU1"].tolist() == [1] and table.frames["AU26"].tolist() == [0]
    assert table.edition.num_outputs == {"va": 2, "au": 12, "expr": 7}


def test_edition_2022_is_detected_with_other_class(tmp_path) -> None:
    b = RootBuilder(tmp_path / "r2022", edition="2022")
    b.annotation("expr", "train", "p", ",".join(EXPR_NAMES_2022) + "\n7\n0\n")
    b.annotation("au", "train", "p", ",".join(AU_NAMES_2021) + "\n" + ",".join(["0"] * 12) + "\n-1" + ",0" * 11 + "\n")
    b.images("p", [1, 2])
    table = read_split(b.root, "train")
    assert table.edition.name == "2022"
    assert table.edition.num_outputs["expr"] == 8
    assert table.frames["expression"].tolist() == [7, 0]
    assert (table.frames.loc[1, list(AU_NAMES_2021)] == -1).all()


def test_unknown_layout_is_an_error(tmp_path) -> None:
    (tmp_path / "annotations" / "Something").mkdir(parents=True)
    with pytest.raises(DataFormatError, match="cannot tell the ABAW edition"):
        load_frames(tmp_path, "train")
    with pytest.raises(DataFormatError, match="no annotations folder"):
        load_frames(tmp_path / "nowhere", "train")


def test_inconsistent_au_headers_are_an_error(builder: RootBuilder) -> None:
    first = builder.annotation("au", "train", "a", AU_HEADER + au_line(*[0] * 8))
    path = builder.annotation("au", "train", "b", ",".join(AU_NAMES_2021) + "\n" + ",".join(["0"] * 12) + "\n")
    with pytest.raises(DataFormatError, match=f"{path}:1: AU header .* differs from .* of {first}") as info:
        load_frames(builder.root, "train")
    assert info.value.path == str(path)


@pytest.mark.parametrize("task", ["au", "expr"])
def test_a_header_mismatch_names_the_file_whose_header_is_wrong(builder: RootBuilder, task: str) -> None:
    """The first file read (``a``, names are read in order) has the odd header: it is the one named, not the
    later files that agree with the edition the folders tell."""
    if task == "au":
        wrong = builder.annotation("au", "train", "a", "AU1,AU2,AU4\n0,1,0\n")
        for name in ("b", "c"):
            right = builder.annotation("au", "train", name, AU_HEADER + au_line(*[0] * 8))
    else:
        wrong = builder.annotation("expr", "train", "a", ",".join(EXPR_NAMES_2022) + "\n1\n")
        for name in ("b", "c"):
            right = builder.annotation("expr", "train", name, EXPR_HEADER + "1\n")
    with pytest.raises(DataFormatError) as info:
        load_frames(builder.root, "train")
    assert info.value.path == str(wrong) and info.value.line == 1
    assert "ABAW 2020" in str(info.value) and str(right.parent) in str(info.value)


# ------------------------------------------------------------------------------------------------ property tests

va_values = st.floats(-1, 1, allow_nan=False, width=32) | st.just(-5.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(va_values, va_values), min_size=1, max_size=40), st.booleans())
def test_va_files_round_trip(rows: list[tuple[float, float]], crlf: bool) -> None:
    newline = "\r\n" if crlf else "\n"
    text = "valence,arousal" + newline + "".join(f"{v!r},{a!r}{newline}" for v, a in rows)
    _, values = parse_annotation_text(text, "va")
    expected = np.array(rows, dtype=np.float64)
    labeled = (expected >= -1).all(axis=1) & (expected <= 1).all(axis=1)
    assert values.shape == (len(rows), 2)
    assert np.isnan(values[~labeled]).all()
    np.testing.assert_allclose(values[labeled], expected[labeled].astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0, 1, -1]), min_size=8, max_size=8), min_size=1, max_size=30))
def test_au_files_round_trip(rows: list[list[int]]) -> None:
    text = AU_HEADER + "".join(au_line(*r) for r in rows)
    header, values = parse_annotation_text(text, "au")
    assert header == AU_NAMES_2020
    for r, v in zip(rows, values):
        assert list(v) == ([-1] * 8 if -1 in r else r)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-1, 6), min_size=2, max_size=30), st.data())
def test_a_corrupted_line_is_named(labels: list[int], draw) -> None:
    bad_row = draw.draw(st.integers(0, len(labels) - 1))
    junk = draw.draw(st.sampled_from(["x", "7", "-2", "1,2", "", "3.5"]))
    lines = [str(v) for v in labels]
    lines[bad_row] = junk
    text = EXPR_HEADER + "\n".join(lines) + "\n"
    if junk == "" and bad_row == len(labels) - 1:
        # a trailing empty line is harmless, not corruption
        assert parse_annotation_text(text, "expr")[1].tolist() == labels[:-1]
        return
    with pytest.raises(DataFormatError) as info:
        parse_annotation_text(text, "expr", path="f.txt")
    assert info.value.line == bad_row + 2


# ------------------------------------------------------------------------------------------------ dataset, sampler


def test_dataset_feeds_only_frames_with_images_with_targets_and_masks(basic: RootBuilder) -> None:
    frames = load_frames(basic.root, "train")
    dataset = data.FrameDataset(frames, basic.root, AU_NAMES_2020, image_size=64)
    assert len(dataset) == (frames["image"] != "").sum() == 5 < len(frames)
    image, targets, masks = dataset[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert set(targets) == set(masks) == {"va", "au", "expr"}
    assert masks["va"] and masks["expr"] and not masks["au"]
    assert targets["va"].tolist() == pytest.approx([0.5, -0.25]) and int(targets["expr"]) == 4
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    assert batch[0].shape == (5, 3, 64, 64) and batch[2]["au"].tolist() == [False, False, False, True, False]


def _masks(n: int = 200, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"va": rng.random(n) < 0.7, "au": rng.random(n) < 0.2, "expr": rng.random(n) < 0.05}


def test_sampler_gives_every_task_labels_in_every_batch() -> None:
    masks = _masks()
    sampler = data.TaskBalancedBatchSampler(masks, batch_size=12, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 1
    for batch in batches:
        assert len(batch) == 12
        for mask in masks.values():
            assert mask[batch].sum() >= 4
    assert list(data.TaskBalancedBatchSampler(masks, 12, seed=3)) == batches  # deterministic
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_sampler_resumes_mid_epoch_and_splits_ranks() -> None:
    masks = _masks()
    full = list(data.TaskBalancedBatchSampler(masks, 12, seed=1))
    resumed = data.TaskBalancedBatchSampler(masks, 12, seed=1)
    resumed.load_state_dict({"epoch": 0, "seed": 1}, batches_done=3)
    assert list(resumed) == full[3:]
    ranks = [list(data.TaskBalancedBatchSampler(masks, 12, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    for b, batch in enumerate(full):
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(batch)
    with pytest.raises(errors.ConfigError, match="no labeled frame .*for task.s. va"):
        data.TaskBalancedBatchSampler({"va": np.zeros(5, bool)}, 4)


def test_packed_cache_matches_jpeg_decoding(basic: RootBuilder, tmp_path) -> None:
    frames = load_frames(basic.root, "train")
    dataset = data.FrameDataset(frames, basic.root, AU_NAMES_2020)
    packed = data.build_packed_cache(dataset, tmp_path / "cache" / "train.npy")
    assert packed.shape == (len(dataset), 112, 112, 3)
    cached = data.FrameDataset(frames, basic.root, AU_NAMES_2020, packed=packed)
    for i in range(len(dataset)):
        assert torch.equal(cached[i][0], dataset[i][0])
    assert data.build_packed_cache(dataset, tmp_path / "cache" / "train.npy").filename == packed.filename
    with pytest.raises(ValueError, match="rebuild"):
        data.FrameDataset(frames, basic.root, AU_NAMES_2020, packed=packed[:2])


def test_packed_cache_key_follows_the_image_files_not_their_names(basic: RootBuilder, tmp_path) -> None:
    import os
    import shutil

    frames = load_frames(basic.root, "train")
    dataset = data.FrameDataset(frames, basic.root, AU_NAMES_2020)
    key = data.packed_cache_key(dataset)
    assert data.packed_cache_key(data.FrameDataset(frames, basic.root, AU_NAMES_2020)) == key
    copy = tmp_path / "copy"
    shutil.copytree(basic.root, copy)  # the same layout, sizes and modification times, at another place
    assert data.packed_cache_key(data.FrameDataset(frames, copy, AU_NAMES_2020)) != key
    path = basic.root / dataset.paths[0]
    st = path.stat()
    later = st.st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(st.st_atime_ns, later))  # rewritten in place: a new modification time
    touched = data.packed_cache_key(dataset)
    assert touched != key
    other = path.with_name("swap.jpg")  # another file of the same size and time renamed onto it
    other.write_bytes(path.read_bytes())
    os.utime(other, ns=(st.st_atime_ns, later))
    os.replace(other, path)
    assert data.packed_cache_key(dataset) != touched
    path.unlink()
    with pytest.raises(DataFormatError, match=r"00001\.jpg: cannot read image"):
        data.packed_cache_key(dataset)


def test_failed_packed_cache_build_leaves_nothing(basic: RootBuilder, tmp_path) -> None:
    basic.images("a", [3], data=jpeg_bytes(3, size=96))  # a crop of another size than the first one
    dataset = data.FrameDataset(load_frames(basic.root, "train"), basic.root, AU_NAMES_2020)
    with pytest.raises(DataFormatError, match=r"00003\.jpg: image is \(96, 96\)"):
        data.build_packed_cache(dataset, tmp_path / "cache" / "train.npy")
    assert list((tmp_path / "cache").iterdir()) == []  # no cache, no temporary file


def assert_same_batch(got_batch, want_batch) -> None:
    assert got_batch[0].dtype == want_batch[0].dtype and torch.equal(got_batch[0], want_batch[0])
    for got, want in zip(got_batch[1:], want_batch[1:]):
        assert got.keys() == want.keys()
        for task in want:
            assert got[task].dtype == want[task].dtype and torch.equal(got[task], want[task])


@pytest.mark.parametrize("packed", [False, True], ids=["jpeg", "packed-cache"])
def test_every_batch_path_equals_collated_items_bit_for_bit(basic: RootBuilder, tmp_path, packed: bool) -> None:
    frames = load_frames(basic.root, "train")
    augment = data.FaceAugment(48)
    dataset = data.FrameDataset(frames, basic.root, AU_NAMES_2020, image_size=48, transform=augment)
    if packed:
        dataset.packed = data.build_packed_cache(dataset, tmp_path / "cache.npy")
    rows = [3, 0, 4, 4, 1, 2, 0]  # frames twice in one batch, as the task-balanced sampler can draw them
    items = [(r, (0, 1, 2, j)) for j, r in enumerate(rows)]
    keyed = KeyedFrames(dataset, augment)
    one_by_one = torch.utils.data.default_collate([keyed[item] for item in items])
    batched = keyed.__getitems__(items)
    assert batched[0].shape == (7, 3, 48, 48)
    assert_same_batch(batched, one_by_one)
    assert_same_batch(dataset.batch(rows, [key for _, key in items]), one_by_one)
    assert not torch.equal(batched[0][2], batched[0][3])  # same frame, other slot: other augmentation
    # no transform: scaling and resizing once per batch
    plain = data.FrameDataset(frames, basic.root, AU_NAMES_2020, image_size=48, packed=dataset.packed)
    want = torch.utils.data.default_collate([plain[r] for r in rows])
    assert_same_batch(plain.batch(rows), want)
    assert_same_batch(BatchedFrames(plain).__getitems__(rows), want)
    assert_same_batch(KeyedFrames(plain, None).__getitems__(items), want)
    # an augmentation the dataset does not call itself is still reseeded item by item
    wrapped = data.FrameDataset(frames, basic.root, AU_NAMES_2020, image_size=48, transform=lambda x: augment(x),
                                packed=dataset.packed)
    assert_same_batch(KeyedFrames(wrapped, augment).__getitems__(items), one_by_one)


def test_augmentation_of_another_size_is_resized_in_batches_as_in_items(basic: RootBuilder) -> None:
    frames = load_frames(basic.root, "train")
    augment = data.FaceAugment(40)
    dataset = data.FrameDataset(frames, basic.root, AU_NAMES_2020, image_size=48, transform=augment)
    items = [(r, (5, 0, 0, j)) for j, r in enumerate([0, 1, 2, 3, 4])]
    keyed = KeyedFrames(dataset, augment)
    batched = keyed.__getitems__(items)
    assert batched[0].shape == (5, 3, 48, 48)
    assert_same_batch(batched, torch.utils.data.default_collate([keyed[item] for item in items]))


def test_data_loader_with_the_adapters_gives_the_sampler_batches(basic: RootBuilder) -> None:
    frames = load_frames(basic.root, "train")
    dataset = data.FrameDataset(frames, basic.root, AU_NAMES_2020, image_size=32)
    sampler = data.TaskBalancedBatchSampler(dataset.masks, batch_size=6, seed=2, num_batches=3)
    loader = torch.utils.data.DataLoader(KeyedFrames(dataset, None), batch_sampler=KeyedBatches(sampler, seed=2),
                                         collate_fn=collate_batched)
    got = list(loader)
    assert len(got) == len(loader) == 3
    for batch, rows in zip(got, sampler):
        assert_same_batch(batch, dataset.batch(rows))
    plain = torch.utils.data.DataLoader(BatchedFrames(dataset), batch_sampler=[[0, 1], [2, 3, 4]],
                                        collate_fn=collate_batched)
    assert [b[0].shape[0] for b in plain] == [2, 3]


def test_keys_name_each_rows_global_slot_so_ranks_augment_as_one(basic: RootBuilder) -> None:
    masks = _masks()
    single = list(KeyedBatches(data.TaskBalancedBatchSampler(masks, 12, seed=4), seed=7))
    ranks = [list(KeyedBatches(data.TaskBalancedBatchSampler(masks, 12, seed=4, num_replicas=2, rank=r), seed=7))
             for r in range(2)]
    for b, batch in enumerate(single):
        assert [key for _, key in batch] == [(7, 0, b, j) for j in range(12)]
        assert sorted(ranks[0][b] + ranks[1][b]) == sorted(batch)  # each rank holds its slots, keys and all
    resumed = data.TaskBalancedBatchSampler(masks, 12, seed=4)
    resumed.load_state_dict({"epoch": 0, "seed": 4}, batches_done=2)
    assert list(KeyedBatches(resumed, seed=7)) == single[2:]  # a resumed run keys its batches as the full run


def test_data_format_error_is_the_one_of_mtanet_errors() -> None:
    assert data.DataFormatError is errors.DataFormatError
    err = DataFormatError("a/b.txt", 3, "bad")
    assert str(err) == "a/b.txt:3: bad" and isinstance(err, errors.MtanetError) and isinstance(err, ValueError)


def test_label_arrays_are_tasks_as_data(basic: RootBuilder) -> None:
    frames = load_frames(basic.root, "train")
    targets, masks = data.label_arrays(frames, AU_NAMES_2020)
    assert masks["va"].sum() == 3 and masks["expr"].sum() == 4 and masks["au"].sum() == 1
    assert not np.isnan(targets["va"]).any()
    assert isinstance(frames, pd.DataFrame)


# ------------------------------------------------------------------------------------------------ failures


def test_data_format_error_crosses_a_process_whole() -> None:
    err = DataFormatError("a/b.jpg", None, "unreadable or truncated JPEG")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is DataFormatError and str(back) == str(err)
    assert (back.path, back.line, back.message) == (err.path, err.line, err.message)


@pytest.mark.parametrize("adapter", ["keyed", "batched"])
def test_a_corrupt_jpg_in_a_loader_worker_is_raised_as_itself(basic: RootBuilder, adapter: str) -> None:
    bad = basic.images("a", [3], data=jpeg_bytes(3)[:200]) / "00003.jpg"  # truncated
    dataset = data.FrameDataset(load_frames(basic.root, "train"), basic.root, AU_NAMES_2020, image_size=32)
    rows = list(range(len(dataset)))
    if adapter == "keyed":
        fetch, batches = KeyedFrames(dataset, None), [[(r, (0, 0, 0, j)) for j, r in enumerate(rows)]]
    else:
        fetch, batches = BatchedFrames(dataset), [rows]
    loader = data.FrameLoader(fetch, batch_sampler=batches, collate_fn=collate_batched, num_workers=1)
    with pytest.raises(DataFormatError) as info:
        list(loader)
    assert info.value.path == str(bad) and "truncated JPEG" in str(info.value)
    # torch's own DataLoader over the adapters yields the error's place, which raises it when unpacked as a batch
    plain = torch.utils.data.DataLoader(fetch, batch_sampler=batches, collate_fn=collate_batched, num_workers=1)
    with pytest.raises(DataFormatError, match="truncated JPEG"):
        for images, targets, masks in plain:
            pass
    # why: torch re-raises an error of a worker by calling its class with one string, and DataFormatError needs
    # three arguments, so the dataset alone gives a RuntimeError holding the worker's traceback
    raw = torch.utils.data.DataLoader(dataset, batch_size=len(rows), num_workers=1)
    with pytest.raises(RuntimeError, match="Caught DataFormatError in DataLoader worker process 0"):
        list(raw)


def test_a_worker_batch_without_errors_is_unchanged(basic: RootBuilder) -> None:
    dataset = data.FrameDataset(load_frames(basic.root, "train"), basic.root, AU_NAMES_2020, image_size=32)
    loader = data.FrameLoader(BatchedFrames(dataset), batch_sampler=[[0, 1], [2, 3, 4]], collate_fn=collate_batched,
                              num_workers=1)
    for got, rows in zip(loader, [[0, 1], [2, 3, 4]]):
        assert_same_batch(got, dataset.batch(rows))


@pytest.mark.parametrize(("batch_size", "replicas", "match"), [
    (2, 1, "batch_size 2 is smaller than the number of tasks 3"),
    (7, 2, "not divisible by the 2 processes"),
])
def test_sampler_refuses_batches_that_cannot_hold_every_task(batch_size: int, replicas: int, match: str) -> None:
    with pytest.raises(errors.ConfigError, match=match):
        data.TaskBalancedBatchSampler(_masks(), batch_size, num_replicas=replicas)
    with pytest.raises(errors.ConfigError, match="no labeled frame .*au: train without them .tasks=va,expr"):
        data.TaskBalancedBatchSampler({**_masks(), "au": np.zeros(200, bool)}, 12)


def test_a_full_disk_while_building_the_packed_cache_names_it_and_leaves_nothing(basic: RootBuilder, tmp_path,
                                                                                monkeypatch) -> None:
    dataset = data.FrameDataset(load_frames(basic.root, "train"), basic.root, AU_NAMES_2020)
    target = tmp_path / "cache" / "train.npy"

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError) as info:
        data.build_packed_cache(dataset, target)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(target.parent.iterdir()) == []


def test_an_interrupted_packed_cache_build_leaves_nothing(basic: RootBuilder, tmp_path, monkeypatch) -> None:
    dataset = data.FrameDataset(load_frames(basic.root, "train"), basic.root, AU_NAMES_2020)
    decode = dataset_module.decode_image_file
    calls = []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return decode(path)

    monkeypatch.setattr(dataset_module, "decode_image_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.build_packed_cache(dataset, tmp_path / "cache" / "train.npy")
    assert list((tmp_path / "cache").iterdir()) == []


def test_test_split_is_read_from_test_set_and_masks_its_videos_in_training(builder: RootBuilder) -> None:
    """A Test_Set folder is a third split: read on its own, never part of train or val, and a video in one task's
    test split loses its training labels of the other tasks (as validation videos do)."""
    builder.annotation("va", "train", "1-30-640x480", VA_HEADER + "0.1,0.2\n0.2,0.3\n")
    builder.annotation("expr", "train", "2-30-640x480", EXPR_HEADER + "1\n2\n")
    builder.annotation("va", "test", "2-30-640x480", VA_HEADER + "0.5,0.5\n-0.5,0.4\n")
    builder.annotation("expr", "val", "3-30-640x480", EXPR_HEADER + "4\n")
    for name in ("1-30-640x480", "2-30-640x480", "3-30-640x480"):
        builder.images(name, [1, 2])
    test = read_split(builder.root, "test").frames
    assert set(test["name"]) == {"2-30-640x480"}
    assert test["valence"].tolist() == pytest.approx([0.5, -0.5])
    assert set(test["split_va"]) == {"test"} and set(test["split_expr"]) == {"train"}
    train = read_split(builder.root, "train")
    masked = train.frames[train.frames["name"] == "2-30-640x480"]
    assert (masked["expression"] == -1).all(), "a test video's labels of another task reached training"
    assert train.report.counts["labels_masked_cross_task_leak"] == 2
    assert set(read_split(builder.root, "val").frames["name"]) == {"3-30-640x480"}
    assert read_split(builder.root, "train", allow_cross_task_leak=True).frames.query(
        "name == '2-30-640x480'")["expression"].tolist() == [1, 2]
