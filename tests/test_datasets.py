"""CUHK-PEDES / ICFG-PEDES / RSTPReid loaders, the registry, bad input, tools/check_data.py."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from datasets import DATASETS, AnnotationError, build_dataset
from datasets.cuhkpedes import CUHKPEDES
from datasets.icfgpedes import ICFGPEDES
from datasets.rstpreid import RSTPReid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (split, original id, relative path, captions) in file order; splits interleaved on purpose.
CUHK_RECORDS = [
    ("train", 7, "CUHK01/a.png", ["a man in a blue shirt", "blue shirt, black trousers"]),
    ("test", 30, "test/g.png", ["g one", "g two"]),
    ("train", 3, "CUHK01/b.png", ["b one", "b two", "b three"]),
    ("val", 20, "val/e.png", ["e one", "e two"]),
    ("train", 7, "cam/c.png", ["c one", "c two"]),
    ("test", 30, "test/h.png", ["h one"]),
    ("val", 21, "val/f.png", ["f one", "f two"]),
    ("train", 12, "cam/d.png", ["d one"]),
    ("test", 31, "test/i.png", ["i one", "i two"]),
]
LAYOUT = {  # name -> (folder, annotation file, path key)
    "CUHK-PEDES": ("CUHK-PEDES", "reid_raw.json", "file_path"),
    "ICFG-PEDES": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path"),
    "RSTPReid": ("RSTPReid", "data_captions.json", "img_path"),
}


def _records_json(records, path_key):
    out = []
    for split, pid, path, captions in records:
        record = {"split": split, "captions": captions, path_key: path, "id": pid}
        if path_key == "file_path":
            record["processed_tokens"] = [c.split() for c in captions]
        out.append(record)
    return out


def write_pedes(root, name="CUHK-PEDES", records=CUHK_RECORDS, annotation=None, raw=None) -> str:
    """Write a corpus in its real layout under ``root``; return the annotation path."""
    folder, default_annotation, path_key = LAYOUT[name]
    base = os.path.join(str(root), folder)
    for _, _, path, _ in records:
        full = os.path.join(base, "imgs", path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        Image.new("RGB", (4, 8), (len(path) * 20 % 256, 10, 10)).save(full)
    os.makedirs(os.path.join(base, "imgs"), exist_ok=True)
    path = os.path.join(base, annotation or default_annotation)
    with open(path, "w") as f:
        if raw is not None:
            f.write(raw)
        else:
            json.dump(_records_json(records, path_key), f, indent=1)
    return path


def reference_train(records, image_root):
    """IRRA-style train list with ids remapped by sorted original id."""
    pid_map = {p: k for k, p in enumerate(sorted({r[1] for r in records if r[0] == "train"}))}
    samples, image_id = [], 0
    for split, pid, path, captions in records:
        if split != "train":
            continue
        for caption in captions:
            samples.append((pid_map[pid], image_id, os.path.join(image_root, path), caption))
        image_id += 1
    return samples


def test_cuhk_train_samples_and_pid_remapping(tmp_path):
    write_pedes(tmp_path)
    ds = build_dataset("CUHK-PEDES", str(tmp_path))
    image_root = str(tmp_path / "CUHK-PEDES" / "imgs")
    assert list(ds.train) == reference_train(CUHK_RECORDS, image_root)
    assert len(ds.train) == 8 and ds.num_classes == 3 and ds.train.num_images == 4
    # Original ids 3, 7, 12 -> 0, 1, 2; images in file order.
    np.testing.assert_array_equal(ds.train.pids, [1, 1, 0, 0, 0, 1, 1, 2])
    np.testing.assert_array_equal(ds.train.image_ids, [0, 0, 1, 1, 1, 2, 2, 3])
    assert ds.train.image_path(2) == os.path.join(image_root, "cam/c.png")
    assert pickle.loads(pickle.dumps(ds.train))[4] == ds.train[4]
    with pytest.raises(IndexError, match="out of range"):
        ds.train[8]


def test_cuhk_eval_splits_keep_original_ids(tmp_path):
    write_pedes(tmp_path)
    ds = CUHKPEDES(str(tmp_path))
    image_root = str(tmp_path / "CUHK-PEDES" / "imgs")
    assert ds.test.img_paths == [os.path.join(image_root, p) for p in ("test/g.png", "test/h.png", "test/i.png")]
    np.testing.assert_array_equal(ds.test.image_pids, [30, 30, 31])
    assert ds.test.captions == ["g one", "g two", "h one", "i one", "i two"]
    np.testing.assert_array_equal(ds.test.caption_pids, [30, 30, 30, 31, 31])
    assert ds.val.captions == ["e one", "e two", "f one", "f two"]
    np.testing.assert_array_equal(ds.val.image_pids, [20, 21])
    table = ds.show_statistics()
    assert "| train  |  3  |   4    |    8     |" in table
    assert "|  test  |  2  |   3    |    5     |" in table


def test_root_may_be_the_dataset_folder_itself(tmp_path):
    write_pedes(tmp_path)
    direct = CUHKPEDES(str(tmp_path / "CUHK-PEDES"))
    assert list(direct.train) == list(CUHKPEDES(str(tmp_path)).train)


def test_icfg_has_no_val_and_accepts_the_underscore_name(tmp_path):
    records = [r for r in CUHK_RECORDS if r[0] != "val"]
    write_pedes(tmp_path, "ICFG-PEDES", records, annotation="ICFG_PEDES.json")
    ds = ICFGPEDES(str(tmp_path))
    assert ds.val is None
    assert len(ds.test.img_paths) == 3 and ds.num_classes == 3
    assert "no val split" in ds.show_statistics()
    bad = tmp_path / "bad"
    write_pedes(bad, "ICFG-PEDES", CUHK_RECORDS)
    with pytest.raises(AnnotationError, match=r"ICFG-PEDES\.json: record 3: unknown split 'val' \(expected one of train, test\)"):
        ICFGPEDES(str(bad))


def test_rstpreid_reads_img_path(tmp_path):
    write_pedes(tmp_path, "RSTPReid")
    ds = RSTPReid(str(tmp_path))
    assert list(ds.train) == reference_train(CUHK_RECORDS, str(tmp_path / "RSTPReid" / "imgs"))
    assert ds.val is not None and len(ds.val.img_paths) == 2


def test_registry_and_unknown_names():
    assert set(DATASETS) >= {"CUHK-PEDES", "ICFG-PEDES", "RSTPReid", "WebPerson"}
    with pytest.raises(ValueError, match=r"unknown dataset 'CUHK_PEDES' \(did you mean 'CUHK-PEDES'\?\); valid names: "
                                         r"CUHK-PEDES, ICFG-PEDES, RSTPReid, WebPerson"):
        build_dataset("CUHK_PEDES", "/nonexistent")


GOOD = {"split": "train", "captions": ["a caption"], "file_path": "CUHK01/a.png", "id": 1}


def _with(**changes):
    record = dict(GOOD, file_path="CUHK01/b.png")
    for key, value in changes.items():
        if value is KeyError:
            record.pop(key)
        else:
            record[key] = value
    return record


@pytest.mark.parametrize("second, match", [
    ("not a dict", "expected an object, got string"),
    (_with(captions=KeyError), r"missing key 'captions' \(keys present: \['file_path', 'id', 'split'\]\)"),
    (_with(id="12"), "'id' must be an integer, got string '12'"),
    (_with(id=True), "'id' must be an integer, got boolean"),
    (_with(split="dev"), r"unknown split 'dev' \(expected one of train, val, test\)"),
    (_with(captions=["ok", "  "]), "caption 1 is empty"),
    (_with(captions=["ok", 3]), "caption 1 must be a string, got integer"),
    (_with(captions=[]), "'captions' must be a non-empty list of strings"),
    (_with(file_path=""), "'file_path' must be a non-empty string"),
])
def test_bad_records_name_file_and_record_index(tmp_path, second, match):
    path = write_pedes(tmp_path, raw=json.dumps([GOOD, second]))
    with pytest.raises(AnnotationError, match=match) as info:
        CUHKPEDES(str(tmp_path))
    assert str(info.value).startswith(f"{path}: record 1: ")
    assert info.value.file == path and info.value.index == 1


@pytest.mark.parametrize("raw, match", [
    ('[{"split": "train",\n "id": 1,, }]', r"malformed JSON at line 2, column 10: Expecting property name"),
    ('{"split": "train"}', "expected a JSON list of image records at the top level, got object"),
])
def test_bad_annotation_files(tmp_path, raw, match):
    path = write_pedes(tmp_path, raw=raw)
    with pytest.raises(AnnotationError, match=match) as info:
        CUHKPEDES(str(tmp_path))
    assert str(info.value).startswith(f"{path}: ") and info.value.index is None


def test_missing_folders_say_what_was_expected(tmp_path):
    with pytest.raises(AnnotationError, match=r"CUHK-PEDES not found .*expected layout: <root>/CUHK-PEDES/"):
        CUHKPEDES(str(tmp_path))
    (tmp_path / "CUHK-PEDES").mkdir()
    with pytest.raises(AnnotationError, match=r"annotation file not found \(looked for .*reid_raw\.json, "
                                              r".*caption_all\.json\)"):
        CUHKPEDES(str(tmp_path))
    (tmp_path / "ICFG-PEDES").mkdir()
    with pytest.raises(AnnotationError, match=r"looked for .*ICFG-PEDES\.json, .*ICFG_PEDES\.json"):
        ICFGPEDES(str(tmp_path))
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text(json.dumps([GOOD]))
    with pytest.raises(AnnotationError, match=r"CUHK-PEDES/imgs: image folder not found"):
        CUHKPEDES(str(tmp_path))


def test_skip_bad_records_counts(tmp_path):
    records = [GOOD, "junk", _with(split="dev"), _with(file_path="CUHK01/a.png"),
               _with(file_path="CUHK01/c.png", id=4, captions=["c1", "c2"]), _with(split="test")]
    write_pedes(tmp_path, raw=json.dumps(records))
    ds = CUHKPEDES(str(tmp_path), skip_bad_records=True)
    # The repeated image path (record 3) is not a bad record: it is kept as its own image.
    assert ds.num_skipped == 2 and [e.index for e in ds.skipped] == [1, 2]
    assert ds.num_duplicate_images == 1
    assert [c for *_, c in ds.train] == ["a caption", "a caption", "c1", "c2"]
    np.testing.assert_array_equal(ds.train.pids, [0, 0, 1, 1])
    np.testing.assert_array_equal(ds.train.image_ids, [0, 1, 2, 2])
    assert ds.test.img_paths[0].endswith("CUHK01/b.png")
    assert "2 bad record(s) skipped" in ds.show_statistics()


@pytest.mark.parametrize("name", list(LAYOUT))
@pytest.mark.parametrize("pid, shown", [
    (10**30, "1000000000000000000000000000000"),
    (-(10**30), "-1000000000000000000000000000000"),
    (2**63, "9223372036854775808"),
    (-(2**63) - 1, "-9223372036854775809"),
    (10**100, "10000000000000000000...(101 digits)"),
])
def test_id_too_large_for_int64_names_file_and_record(tmp_path, name, pid, shown):
    folder, annotation, path_key = LAYOUT[name]
    records = [dict(GOOD, file_path=KeyError), dict(GOOD, id=pid, split="test")]
    for k, record in enumerate(records):
        record.pop("file_path")
        record[path_key] = f"CUHK01/{'ab'[k]}.png"
    path = write_pedes(tmp_path, name, raw=json.dumps(records))
    with pytest.raises(AnnotationError) as info:
        DATASETS[name](str(tmp_path))
    assert str(info.value) == (f"{path}: record 1: 'id' {shown} does not fit in a 64-bit integer "
                               f"(allowed: -9223372036854775808..9223372036854775807)")
    # Skipping bad records drops it and loads the rest.
    ds = DATASETS[name](str(tmp_path), skip_bad_records=True)
    assert ds.num_skipped == 1 and ds.skipped[0].index == 1


def test_ids_at_the_int64_limits_and_negative_ids_are_accepted(tmp_path):
    # Ids are labels: training remaps them to 0..K-1 and evaluation only compares them.
    low, high = -(2**63), 2**63 - 1
    records = [("train", high, "a.png", ["a"]), ("train", -5, "b.png", ["b"]), ("train", high, "c.png", ["c"]),
               ("test", low, "d.png", ["d"]), ("test", -1, "e.png", ["e"]), ("val", 0, "f.png", ["f"])]
    write_pedes(tmp_path, records=records)
    ds = CUHKPEDES(str(tmp_path))
    np.testing.assert_array_equal(ds.train.pids, [1, 0, 1])
    np.testing.assert_array_equal(ds.test.image_pids, [low, -1])
    np.testing.assert_array_equal(ds.test.caption_pids, [low, -1])
    # One past the limit is refused.
    records[3] = ("test", low - 1, "d.png", ["d"])
    write_pedes(tmp_path / "over", records=records)
    with pytest.raises(AnnotationError, match="record 3: 'id' -9223372036854775809 does not fit"):
        CUHKPEDES(str(tmp_path / "over"))


def test_integer_with_too_many_digits_for_python_is_an_annotation_error(tmp_path):
    path = write_pedes(tmp_path, raw='[{"split": "train", "captions": ["a"], "file_path": "a.png", "id": '
                                    + "9" * 5000 + "}]")
    with pytest.raises(AnnotationError, match="malformed JSON: Exceeds the limit") as info:
        CUHKPEDES(str(tmp_path))
    assert str(info.value).startswith(f"{path}: ") and info.value.index is None


@pytest.mark.parametrize("captions, bad", [
    (["a man", "\x00\x01\x02"], "caption 1 '\\\\x00\\\\x01\\\\x02' is empty once cleaned"),
    (["&nbsp;", "a man"], "caption 0 '&nbsp;' is empty once cleaned"),
    (["a man", "&amp;nbsp; \x7f"], "caption 1 .* is empty once cleaned"),
    (["a man", "\x1b[31m"], "caption 1 .* is empty once cleaned"),
])
def test_captions_the_tokenizer_cleans_to_nothing_are_bad_records(tmp_path, captions, bad):
    path = write_pedes(tmp_path, raw=json.dumps([GOOD, _with(captions=captions)]))
    with pytest.raises(AnnotationError, match=bad) as info:
        CUHKPEDES(str(tmp_path))
    assert str(info.value).startswith(f"{path}: record 1: ")
    ds = CUHKPEDES(str(tmp_path), skip_bad_records=True)
    assert ds.num_skipped == 1 and [c for *_, c in ds.train] == ["a caption"]


def test_captions_with_entities_or_controls_around_text_are_kept(tmp_path):
    captions = ["a man &amp; his dog", "\x00a woman\x01", "caf\u00e9 &nbsp; coat"]
    write_pedes(tmp_path, raw=json.dumps([GOOD, _with(captions=captions)]))
    assert [c for *_, c in CUHKPEDES(str(tmp_path)).train][1:] == captions


@pytest.mark.parametrize("name", list(LAYOUT))
@pytest.mark.parametrize("path", ["/etc/passwd.png", "../outside.png", "CUHK01/../../outside.png", ".."])
def test_image_paths_leaving_the_image_folder_are_bad_records(tmp_path, name, path):
    folder, _, path_key = LAYOUT[name]

    def record(image: str, split: str) -> dict:
        return {"split": split, "captions": ["a caption"], path_key: image, "id": 1}

    records = [record("CUHK01/a.png", "train"), record(path, "train"), record("CUHK01/a.png", "test")]
    write_pedes(tmp_path, name=name, raw=json.dumps(records))
    image_root = os.path.join(str(tmp_path), folder, "imgs")
    with pytest.raises(AnnotationError, match=rf"record 1: '{path_key}' '{path}' leaves the image folder: image "
                                              rf"paths are relative to {image_root} and must stay inside it"):
        DATASETS[name](str(tmp_path))
    ds = DATASETS[name](str(tmp_path), skip_bad_records=True)
    assert ds.num_skipped == 1 and ds.train.num_images == 1


def test_image_paths_that_stay_inside_and_a_symlinked_image_folder_are_fine(tmp_path):
    records = [("train", 1, "CUHK01/../CUHK01/a.png", ["one"]), ("train", 2, "./b.png", ["two"]),
               ("test", 3, "c..d.png", ["three"])]
    write_pedes(tmp_path / "real", records=records)
    # The image folder may be a link to elsewhere (a shared disk): only the annotation's paths are checked.
    os.makedirs(tmp_path / "linked" / "CUHK-PEDES")
    os.symlink(tmp_path / "real" / "CUHK-PEDES" / "imgs", tmp_path / "linked" / "CUHK-PEDES" / "imgs")
    os.symlink(tmp_path / "real" / "CUHK-PEDES" / "reid_raw.json", tmp_path / "linked" / "CUHK-PEDES" / "reid_raw.json")
    ds = CUHKPEDES(str(tmp_path / "linked"))
    assert ds.train.num_images == 2 and len(ds.test.img_paths) == 1


@pytest.mark.parametrize("name", list(LAYOUT))
def test_a_utf8_byte_order_mark_is_read_past(tmp_path, name):
    path = write_pedes(tmp_path, name=name, records=[r for r in CUHK_RECORDS if name != "ICFG-PEDES" or
                                                     r[0] != "val"])
    plain = _samples_of(DATASETS[name](str(tmp_path)))
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + data)
    assert _samples_of(DATASETS[name](str(tmp_path))) == plain


def test_caption_all_with_a_byte_order_mark(tmp_path):
    records = [dict(GOOD, id=1), dict(GOOD, id=12_004, file_path="CUHK01/b.png")]
    for record in records:
        record.pop("split")
    write_pedes(tmp_path, annotation="caption_all.json", raw="\ufeff" + json.dumps(records))
    ds = CUHKPEDES(str(tmp_path))
    assert ds.splits_from_ids and ds.train.num_images == 1 and len(ds.test.img_paths) == 1


def _samples_of(ds) -> list:
    return [(pid, image_id, os.path.basename(path), caption) for pid, image_id, path, caption in ds.train]


# --------------------------------------------------------------------------- tools/check_data.py


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "check_data.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=str(REPO))


def test_check_data_clean(tmp_path):
    write_pedes(tmp_path)
    write_pedes(tmp_path, "RSTPReid")
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "OK: CUHK-PEDES, RSTPReid passed all checks" in result.stdout
    assert "checking 9 of 9 images" in result.stdout
    sampled = run_check("--root", str(tmp_path), "--name", "RSTPReid", "--sample", "4", "--workers", "2")
    assert sampled.returncode == 0, sampled.stderr
    assert "checking 4 of 9 images with 2 worker(s)" in sampled.stdout


def test_check_data_reports_missing_and_corrupt_images(tmp_path):
    write_pedes(tmp_path)
    imgs = tmp_path / "CUHK-PEDES" / "imgs"
    os.remove(imgs / "cam" / "c.png")
    os.remove(imgs / "test" / "h.png")
    (imgs / "val" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_check("--root", str(tmp_path), "--name", "CUHK-PEDES")
    assert result.returncode == 1
    assert "2 missing image(s) (first 2):" in result.stderr
    assert str(imgs / "cam" / "c.png") in result.stderr and str(imgs / "test" / "h.png") in result.stderr
    assert f"1 corrupt image(s) (first 1):\n    {imgs / 'val' / 'e.png'}: " in result.stderr
    assert "FAILED: CUHK-PEDES" in result.stderr


def test_check_data_reports_bad_records_and_missing_datasets(tmp_path):
    path = write_pedes(tmp_path, raw=json.dumps([GOOD, _with(captions=[""]), _with(id="x")]))
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 1
    assert "2 bad annotation record(s):" in result.stderr
    assert f"{path}: record 1: caption 0 is empty" in result.stderr
    assert f"{path}: record 2: 'id' must be an integer" in result.stderr



def test_check_data_without_datasets(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("check_data", os.path.join(REPO, "tools", "check_data.py"))
    check_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_data)
    assert check_data.main(["--root", str(tmp_path)]) == 2  # a user error: one line, exit status 2
    assert "no dataset folder found" in capsys.readouterr().err
    assert check_data.main(["--root", str(tmp_path), "--name", "RSTPReid"]) == 1
    assert "RSTPReid not found" in capsys.readouterr().err
