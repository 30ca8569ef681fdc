"""CUHK-PEDES from ``caption_all.json`` (splits by id range) and repeated image paths kept as the reference does."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from datasets import AnnotationError, build_dataset
from datasets.cuhkpedes import CUHKPEDES, PUBLISHED_IMAGE_COUNTS, compare_published_counts, split_of_id
from tests.test_datasets import LAYOUT, run_check, write_pedes

# Ids at both edges of every range of the standard split, and a few in between.
EDGE_RECORDS = [
    ("train", 1, "CUHK01/0001.png", ["one a", "one b"]),
    ("val", 11004, "val/11004.png", ["v first a", "v first b"]),
    ("train", 11003, "CUHK03/11003.png", ["last train"]),
    ("test", 13003, "test/13003.png", ["t last a", "t last b"]),
    ("train", 500, "cam/0500.png", ["mid a", "mid b", "mid c"]),
    ("val", 12003, "val/12003.png", ["v last"]),
    ("test", 12004, "test/12004.png", ["t first"]),
    ("train", 1, "CUHK01/0001_b.png", ["one again"]),
    ("val", 11500, "val/11500.png", ["v mid"]),
    ("test", 12500, "test/12500.png", ["t mid a", "t mid b"]),
]


def write_caption_all(root, records) -> str:
    """Write ``records`` as ``caption_all.json`` (no ``split`` key) plus their images; return its path."""
    write_pedes(root, records=records)
    os.remove(os.path.join(str(root), "CUHK-PEDES", "reid_raw.json"))
    path = os.path.join(str(root), "CUHK-PEDES", "caption_all.json")
    with open(path, "w") as f:
        json.dump([{"id": pid, "file_path": p, "captions": c, "processed_tokens": [s.split() for s in c]}
                   for _, pid, p, c in records], f)
    return path


def eval_fields(split) -> tuple:
    return split.img_paths, split.image_pids.tolist(), split.captions, split.caption_pids.tolist()


def test_caption_all_gives_the_samples_of_explicit_splits(tmp_path, caplog):
    write_pedes(tmp_path, records=EDGE_RECORDS)
    explicit = CUHKPEDES(str(tmp_path))
    assert explicit.annotation_path.endswith("reid_raw.json")
    path = write_caption_all(tmp_path, EDGE_RECORDS)
    with caplog.at_level(logging.INFO, logger="datasets"):
        derived = CUHKPEDES(str(tmp_path))
    assert derived.annotation_path == path
    assert list(derived.train) == list(explicit.train)
    assert derived.num_classes == 3 and derived.train.num_images == 4
    assert eval_fields(derived.val) == eval_fields(explicit.val)
    assert eval_fields(derived.test) == eval_fields(explicit.test)

    log = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(level == logging.INFO and "caption_all.json" in msg and "train 4, val 3, test 3" in msg
               for level, msg in log), log
    warnings = [msg for level, msg in log if level == logging.WARNING]
    assert any("differ from the published" in msg and "train 4 (published 34054)" in msg for msg in warnings), log
    assert any("differ from the published" in w for w in derived.warnings)


def test_reid_raw_wins_when_both_files_exist(tmp_path):
    write_caption_all(tmp_path, EDGE_RECORDS)
    # reid_raw.json puts every record in train: it, not the id ranges, must decide.
    write_pedes(tmp_path, records=[("train", *r[1:]) for r in EDGE_RECORDS])
    ds = build_dataset("CUHK-PEDES", str(tmp_path))
    assert ds.annotation_path.endswith("reid_raw.json")
    assert ds.train.num_images == len(EDGE_RECORDS) and not ds.val.img_paths


def test_neither_annotation_file_names_both(tmp_path):
    (tmp_path / "CUHK-PEDES" / "imgs").mkdir(parents=True)
    with pytest.raises(AnnotationError, match=r"looked for .*reid_raw\.json, .*caption_all\.json\)"):
        CUHKPEDES(str(tmp_path))


@pytest.mark.parametrize("bad_id", [0, 13004, -5])
def test_caption_all_id_out_of_range(tmp_path, bad_id):
    records = [*EDGE_RECORDS[:2], ("train", bad_id, "odd/x.png", ["x"]), *EDGE_RECORDS[2:]]
    path = write_caption_all(tmp_path, records)
    with pytest.raises(AnnotationError, match=rf"'id' {bad_id} is outside 1\.\.13003") as info:
        CUHKPEDES(str(tmp_path))
    assert str(info.value).startswith(f"{path}: record 2: ")
    skipped = CUHKPEDES(str(tmp_path), skip_bad_records=True)
    assert skipped.num_skipped == 1 and skipped.skipped[0].index == 2
    assert skipped.train.num_images == 4


def test_split_of_id_edges():
    assert [split_of_id(i) for i in (1, 11003, 11004, 12003, 12004, 13003)] == \
        ["train", "train", "val", "val", "test", "test"]
    assert split_of_id(0) is None and split_of_id(13004) is None


def test_compare_published_counts():
    assert PUBLISHED_IMAGE_COUNTS == {"train": 34054, "val": 3078, "test": 3074}
    assert compare_published_counts({"train": 34054, "val": 3078, "test": 3074}) == []
    assert compare_published_counts({"train": 34054, "val": 3077, "test": 3074}) == ["val 3077 (published 3078)"]
    assert compare_published_counts({"train": 10}) == ["train 10 (published 34054)", "val 0 (published 3078)",
                                                       "test 0 (published 3074)"]


def test_published_counts_log_info_when_they_match(monkeypatch, tmp_path, caplog):
    # Pretend the tiny fixture is the full corpus: the message is then info, not a warning.
    monkeypatch.setattr("datasets.cuhkpedes.PUBLISHED_IMAGE_COUNTS", {"train": 4, "val": 3, "test": 3})
    write_caption_all(tmp_path, EDGE_RECORDS)
    with caplog.at_level(logging.INFO, logger="datasets"):
        ds = CUHKPEDES(str(tmp_path))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("match the published" in r.getMessage() for r in caplog.records)
    assert ds.warnings == []


# --------------------------------------------------------------------------- repeated image paths


def duplicate_records(name: str) -> list[tuple[str, int, str, list[str]]]:
    """Records where image paths repeat (within train, within test, across splits); train ids contiguous.

    The reference loaders use ``id - 1`` (CUHK-PEDES) or ``id`` (ICFG-PEDES, RSTPReid) as the training pid,
    so train ids start at 1 or 0 to keep that comparable with our contiguous relabelling.
    """
    base = 1 if name == "CUHK-PEDES" else 0
    return [
        ("train", base, "a.png", ["a one", "a two"]),
        ("train", base + 1, "b.png", ["b one"]),
        ("train", base, "a.png", ["a again"]),
        ("test", 50, "t.png", ["t one", "t two"]),
        ("train", base + 2, "c.png", ["c one", "c two"]),
        ("test", 50, "t.png", ["t again"]),
        ("test", 51, "b.png", ["b in test"]),
        ("train", base + 1, "b.png", ["b twice"]),
    ]


def reference_lists(records, image_root, pid_offset):
    """A naive re-implementation of the IRRA-style loop: one image per record, duplicates and all."""
    train, image_id = [], 0
    for split, pid, path, captions in records:
        if split == "train":
            for caption in captions:
                train.append((pid - pid_offset, image_id, os.path.join(image_root, path), caption))
            image_id += 1
    test = ([], [], [], [])
    for split, pid, path, captions in records:
        if split == "test":
            test[0].append(os.path.join(image_root, path))
            test[1].append(pid)
            for caption in captions:
                test[2].append(caption)
                test[3].append(pid)
    return train, test


@pytest.mark.parametrize("name", ["CUHK-PEDES", "RSTPReid", "ICFG-PEDES"])
def test_repeated_image_paths_are_kept_like_the_reference(tmp_path, caplog, name):
    records = duplicate_records(name)
    write_pedes(tmp_path, name, records)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        ds = build_dataset(name, str(tmp_path))
    image_root = os.path.join(str(tmp_path), LAYOUT[name][0], "imgs")
    train, test = reference_lists(records, image_root, 1 if name == "CUHK-PEDES" else 0)
    assert list(ds.train) == train
    assert ds.train.num_images == 5 and ds.num_classes == 3
    assert eval_fields(ds.test) == test
    np.testing.assert_array_equal(ds.train.image_ids, [s[1] for s in train])
    # a.png, b.png (twice more) and t.png: each record after the first listing of its path.
    assert ds.num_duplicate_images == 4 and ds.num_skipped == 0
    assert any("4 record(s) repeat" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert any("4 record(s) repeat" in w and "'a.png' (records 0 and 2)" in w for w in ds.warnings)


def test_check_data_reports_file_used_and_duplicates_as_warnings(tmp_path):
    path = write_caption_all(tmp_path, [*EDGE_RECORDS, ("train", 500, "cam/0500.png", ["mid again"])])
    write_pedes(tmp_path, "RSTPReid", duplicate_records("RSTPReid"))
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"CUHK-PEDES: annotation {path}" in out
    assert "CUHK-PEDES (caption_all.json): 10 images checked" in out
    assert "RSTPReid (data_captions.json): 4 images checked" in out
    assert "warning: 1 record(s) repeat an earlier record's image path" in out
    assert "warning: 4 record(s) repeat an earlier record's image path" in out
    assert "differ from the published" in out
    assert "OK: CUHK-PEDES, RSTPReid passed all checks (3 warning(s) above)" in out
