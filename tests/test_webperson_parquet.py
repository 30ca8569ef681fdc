"""WebPerson from the hub's Parquet release: parity with JSON + images, bad data, read-only folders, training."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import stat
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datasets import AnnotationError, ImageReadError, open_image
from datasets.build import TrainDataset, collate_train
from datasets.transforms import build_transforms
from datasets.webperson import WebPerson, cache_path, fallback_cache_path
from model.tokenizer import Tokenizer
from tests.conftest import REPO, load_tool
from tests.test_webperson import (
    RECORDS,
    _image,
    _Pixels,
    _png,
    naive_samples,
    write_json,
    write_jsonl,
    write_shards,
)

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# 7 images in 2 files of 2 row groups each (4 + 3 rows, 2 rows per group): [2, 2] and [2, 1].
ROW_GROUP = 2


def write_parquet(root, records=RECORDS, *, files: int = 2, payloads: dict[int, bytes | None] | None = None,
                  drop: tuple[str, ...] = (), folder: str = "data") -> list[str]:
    """The hub's layout: ``WebPerson/data/train-0000k-of-0000N.parquet``, several row groups per file.

    ``payloads`` replaces the image bytes of some images (None: a null payload); ``drop`` leaves columns out.
    An extra column stands for whatever else a release carries.
    """
    out = os.path.join(str(root), "WebPerson", folder)
    os.makedirs(out, exist_ok=True)
    payloads = payloads or {}
    per_file = -(-len(records) // files)
    paths = []
    for k in range(files):
        first = k * per_file
        chunk = records[first:first + per_file]
        images = [{"bytes": payloads.get(first + i, _png(first + i)), "path": os.path.basename(path)}
                  for i, (path, _, _) in enumerate(chunk)]
        columns = {"image": pa.array(images, IMAGE_TYPE), "image_path": [r[0] for r in chunk],
                   "caption1": pa.array([r[1] for r in chunk], pa.string()),
                   "caption2": pa.array([r[2] for r in chunk], pa.string()),
                   "source": ["web"] * len(chunk)}
        for name in drop:
            del columns[name]
        path = os.path.join(out, f"train-{k:05d}-of-{files:05d}.parquet")
        pq.write_table(pa.table(columns), path, row_group_size=ROW_GROUP)
        paths.append(path)
    return paths


def _samples(ds) -> list[tuple[int, int, str]]:
    return [(pid, image_id, caption) for pid, image_id, _, caption in ds.train]


def _member(paths: list[str], image: int) -> str:
    """``file::<row group>/<row>`` of an image written by ``write_parquet`` (2 files, 4 rows in the first)."""
    source, row = divmod(image, 4)
    return f"{paths[source]}::{row // ROW_GROUP}/{row % ROW_GROUP}"


def _train_dataset(index, skip_bad_images: bool = False) -> TrainDataset:
    return TrainDataset(index, build_transforms((8, 4), is_train=False), Tokenizer(), text_length=16,
                        skip_bad_images=skip_bad_images)


# --------------------------------------------------------------------------- the same samples as JSON


def test_parquet_gives_the_samples_and_pixels_of_json_plus_images(tmp_path):
    paths = write_parquet(tmp_path / "pq")
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in paths] == [2, 2]
    write_json(tmp_path / "json")
    parquet, reference = WebPerson(str(tmp_path / "pq")), WebPerson(str(tmp_path / "json"))
    assert parquet.train.fmt == "parquet" and parquet.sources == paths
    assert _samples(parquet) == _samples(reference) == naive_samples()
    assert parquet.num_classes == 7 and parquet.train.num_images == 7 and parquet.val is None
    np.testing.assert_array_equal(parquet.train.pids, reference.train.pids)
    assert [parquet.train.image_path(i) for i in range(7)] == [_member(paths, i) for i in range(7)]
    # What training sees: pixels, pid, image id and caption ids of every sample.
    a, b = _train_dataset(parquet.train), _train_dataset(reference.train)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), (i, key)
    # Twice, and from the cache: the same order every time.
    again = WebPerson(str(tmp_path / "pq"))
    assert again.train.loaded_from_cache and list(again.train) == list(parquet.train)


def test_index_is_lean_and_picklable(tmp_path):
    write_parquet(tmp_path)
    index = WebPerson(str(tmp_path), cache=False).train
    # Per image a file id, a row group and a row (int32 each): no caption text, no per-sample objects.
    assert sorted(index.arrays) == ["image_source", "row", "row_group"]
    assert all(a.dtype == np.int32 for a in index.arrays.values())
    assert index.nbytes == 12 * index.num_images
    clone = pickle.loads(pickle.dumps(index))
    assert list(clone) == list(index)
    np.testing.assert_array_equal(np.asarray(open_image(clone[13][2])), np.asarray(_image(6)))


def test_annotation_file_folder_glob_and_top_level_files(tmp_path):
    paths = write_parquet(tmp_path)
    assert _samples(WebPerson(str(tmp_path), annotation="data", cache=False)) == naive_samples()
    assert _samples(WebPerson(str(tmp_path), annotation="data/train-*-of-00002.parquet", cache=False)) == \
        naive_samples()
    assert _samples(WebPerson(str(tmp_path), annotation=paths[1], cache=False)) == \
        [(i - 4, i - 4, c) for i, (_, c1, c2) in enumerate(RECORDS) if i >= 4 for c in (c1, c2)]
    # Files directly in WebPerson/, and the hub folder given as the root itself.
    write_parquet(tmp_path / "flat", folder="")
    assert _samples(WebPerson(str(tmp_path / "flat"), cache=False)) == naive_samples()
    assert _samples(WebPerson(str(tmp_path / "WebPerson"), cache=False)) == naive_samples()
    write_jsonl(tmp_path)
    with pytest.raises(AnnotationError, match=r"both JSON annotations \(WebPerson-1M\.jsonl\) and Parquet files "
                                              r"\(train-00000-of-00002\.parquet\) found; choose one"):
        WebPerson(str(tmp_path), cache=False)


# --------------------------------------------------------------------------- bad data


def test_corrupt_image_payload_names_file_row_group_and_row(tmp_path):
    paths = write_parquet(tmp_path, payloads={2: b"\x89PNG but not really"})
    index = WebPerson(str(tmp_path)).train
    with pytest.raises(ImageReadError, match=r"train-00000-of-00002\.parquet::1/0: ") as info:
        open_image(index[4][2])
    assert info.value.path == _member(paths, 2) and not info.value.missing
    with pytest.raises(ImageReadError, match=r"parquet::1/0"):
        _train_dataset(index)[4]
    # data.skip_bad_images: the sample is dropped from its batch and counted.
    dataset = _train_dataset(index, skip_bad_images=True)
    assert dataset[4] is None and dataset[5] is None
    batch = collate_train([dataset[i] for i in range(2, 7)])
    assert int(batch["num_skipped"]) == 2 and batch["images"].shape[0] == 3


def test_null_image_bytes_read_the_image_path_under_images(tmp_path):
    paths = write_parquet(tmp_path, payloads={1: None, 5: None, 6: None})
    wp = tmp_path / "WebPerson"
    (wp / "images" / "part0").mkdir(parents=True)
    (wp / "images" / RECORDS[1][0]).write_bytes(_png(1))
    index = WebPerson(str(tmp_path)).train
    np.testing.assert_array_equal(np.asarray(open_image(index[2][2])), np.asarray(_image(1)))
    with pytest.raises(ImageReadError, match=r"parquet::0/1: file not found") as info:
        open_image(index[10][2])
    assert info.value.missing and info.value.path == _member(paths, 5)
    # An image_path that leaves images/ is never opened.
    table = pq.read_table(paths[1])
    table = table.set_column(1, "image_path", pa.array(["a.png", "../x.png", "c.png"]))
    pq.write_table(table, paths[1], row_group_size=ROW_GROUP)
    index = WebPerson(str(tmp_path)).train
    with pytest.raises(ImageReadError, match=r"row group 0, row 1: image_path '\.\./x\.png' leaves the image folder"):
        open_image(index[10][2])


@pytest.mark.parametrize("drop", [("caption2",), ("image", "image_path")])
def test_missing_column_names_file_and_column(tmp_path, drop):
    paths = write_parquet(tmp_path, drop=drop)
    with pytest.raises(AnnotationError, match=r"missing columns? " + ", ".join(repr(c) for c in drop)) as info:
        WebPerson(str(tmp_path), cache=False)
    assert info.value.file == paths[0] and info.value.index is None and paths[0] in str(info.value)


def test_image_column_of_another_type(tmp_path):
    path = write_parquet(tmp_path)[0]
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "image", pa.array([b"x"] * 4)), path)
    with pytest.raises(AnnotationError, match=r"column 'image' has type binary, expected a struct"):
        WebPerson(str(tmp_path), cache=False)


@pytest.mark.parametrize("caption, match", [(None, "must be a string, got null"), ("", "is empty"),
                                            ("&nbsp;", "'&nbsp;' is empty once cleaned for the tokenizer")])
def test_null_or_empty_caption_names_file_row_group_and_row(tmp_path, caption, match):
    # Image 5 is row 1 of the second file: row group 0, row 1.
    records = [r if i != 5 else (r[0], r[1], caption) for i, r in enumerate(RECORDS)]
    paths = write_parquet(tmp_path, records)
    with pytest.raises(AnnotationError, match=rf"record 1: row group 0, row 1: 'caption2' {match}") as info:
        WebPerson(str(tmp_path), cache=False)
    assert info.value.file == paths[1] and info.value.index == 1
    ds = WebPerson(str(tmp_path), skip_bad_records=True)
    assert ds.num_skipped == 1 and "row group 0, row 1" in str(ds.skipped[0])
    assert _samples(ds) == naive_samples(RECORDS[:5] + RECORDS[6:])
    # The counted skip is part of the cached index; a strict run does not reuse it.
    with pytest.raises(AnnotationError, match="row group 0, row 1"):
        WebPerson(str(tmp_path))


def test_repeated_image_path_is_a_duplicate_as_in_json(tmp_path):
    records = [*RECORDS[:4], (RECORDS[1][0], "another caption", "and one more"), *RECORDS[5:]]
    paths = write_parquet(tmp_path, records)
    with pytest.raises(AnnotationError, match=r"record 0: duplicate image entry 'part0/0001\.png' \(first listed "
                                              r"in train-00000-of-00002\.parquet record 1\)") as info:
        WebPerson(str(tmp_path), cache=False)
    assert info.value.file == paths[1]


def _damage_page_header(path: str, group: int, column: int) -> None:
    """Overwrite the first page header of one column chunk: pyarrow cannot read that chunk any more."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    with open(path, "r+b") as f:
        f.seek(chunk.dictionary_page_offset or chunk.data_page_offset)
        f.write(b"\xff" * 8)


def test_damaged_image_column_fails_only_its_images(tmp_path):
    paths = write_parquet(tmp_path)
    _damage_page_header(paths[0], 1, 0)  # image.bytes of row group 1 (images 2 and 3)
    index = WebPerson(str(tmp_path)).train
    assert index[4][3] == RECORDS[2][1]  # the captions still read
    with pytest.raises(ImageReadError, match=r"parquet::1/0: .*row group 1: the image column cannot be read"):
        open_image(index[4][2])
    np.testing.assert_array_equal(np.asarray(open_image(index[2][2])), np.asarray(_image(1)))
    dataset = _train_dataset(index, skip_bad_images=True)
    assert dataset[4] is None and dataset[7] is None and dataset[8] is not None


def test_damaged_caption_column_names_file_and_row_group(tmp_path):
    paths = write_parquet(tmp_path)
    _damage_page_header(paths[1], 1, 3)  # caption1 of the second file's row group 1
    with pytest.raises(AnnotationError, match=r"row group 1 cannot be read \(.*\); the file is damaged") as info:
        WebPerson(str(tmp_path), skip_bad_records=True, cache=False)
    assert info.value.file == paths[1]


def test_truncated_parquet_file_names_the_file(tmp_path):
    paths = write_parquet(tmp_path)
    data = open(paths[1], "rb").read()
    with open(paths[1], "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(AnnotationError, match=r"not a readable Parquet file .*truncated") as info:
        WebPerson(str(tmp_path), skip_bad_records=True, cache=False)
    assert info.value.file == paths[1]


# --------------------------------------------------------------------------- read-only dataset folders


@contextlib.contextmanager
def read_only(folder) -> Iterator[str]:
    """Make ``folder`` read-only; yields how: "chmod", or "simulated" where chmod does not bind.

    Tests may run as root, whom permission bits do not stop: there the loader's
    ``os.access`` check is answered as a read-only mount would answer it.
    """
    folders = [d for d, _, _ in os.walk(folder)]
    for d in folders:
        os.chmod(d, 0o555)
    try:
        with pytest.MonkeyPatch.context() as patch:
            how = "chmod"
            if os.access(folder, os.W_OK):
                how = "simulated"
                real_access = os.access
                prefix = os.path.abspath(folder) + os.sep

                def access(path, mode, *args, **kwargs):
                    if mode & os.W_OK and (os.path.abspath(path) + os.sep).startswith(prefix):
                        return False
                    return real_access(path, mode, *args, **kwargs)

                patch.setattr(os, "access", access)
            yield how
    finally:
        for d in folders:
            os.chmod(d, stat.S_IRWXU)


def _write(root, fmt: str) -> None:
    {"json": write_json, "jsonl": write_jsonl, "tar": write_shards, "parquet": write_parquet}[fmt](root)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "tar", "parquet"])
def test_read_only_dataset_folder_caches_under_cache_dir(tmp_path, caplog, fmt):
    _write(tmp_path / "a", fmt)
    _write(tmp_path / "b", fmt)
    cache_dir = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="datasets.webperson")
    with read_only(tmp_path / "a" / "WebPerson"):
        before = sorted(os.walk(tmp_path / "a"))
        ds = WebPerson(str(tmp_path / "a"), cache_dir=str(cache_dir))
        assert _samples(ds) == naive_samples()
        assert sorted(os.walk(tmp_path / "a")) == before  # nothing written into the dataset
        cache = ds.train.cache_file
        assert cache == fallback_cache_path(ds.train.sources, str(cache_dir)) and os.path.isfile(cache)
        assert os.path.dirname(cache) == str(cache_dir)
        assert any("not writable" in r.getMessage() and str(cache_dir) in r.getMessage() for r in caplog.records)
        assert any(f"cached the WebPerson index in {cache}" == r.getMessage() for r in caplog.records)
        again = WebPerson(str(tmp_path / "a"), cache_dir=str(cache_dir))
        assert again.train.loaded_from_cache and again.train.cache_file == cache
        assert _samples(again) == naive_samples()
        # Another dataset with the same cache folder gets its own file.
        with read_only(tmp_path / "b" / "WebPerson"):
            other = WebPerson(str(tmp_path / "b"), cache_dir=str(cache_dir))
        assert other.train.cache_file != cache and os.path.dirname(other.train.cache_file) == str(cache_dir)
        assert sorted(os.listdir(cache_dir)) == sorted(os.path.basename(p) for p in (cache, other.train.cache_file))
    # Writable again: the cache found under cache_dir is still used, nothing is written beside the data.
    assert WebPerson(str(tmp_path / "a"), cache_dir=str(cache_dir)).train.cache_file == cache
    assert not os.path.exists(cache_path(ds.train.sources))


def test_default_cache_dir_is_under_the_home_folder(tmp_path, monkeypatch):
    write_parquet(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with read_only(tmp_path / "data" / "WebPerson"):
        ds = WebPerson(str(tmp_path / "data"), cache_dir="")
    assert ds.train.cache_file.startswith(str(tmp_path / "home" / ".cache" / "gadms") + os.sep)


# --------------------------------------------------------------------------- workers, check_data, training


def test_forked_dataloader_workers_read_parquet_rows(tmp_path):
    from torch.utils.data import DataLoader

    write_parquet(tmp_path)
    index = WebPerson(str(tmp_path)).train
    open_image(index[0][2])  # the parent holds a row group and open files before forking
    loader = DataLoader(_Pixels(index), batch_size=3, num_workers=2, collate_fn=list, multiprocessing_context="fork")
    got = [item for batch in loader for item in batch]
    assert [(pid, caption) for pid, caption, _ in got] == [(p, c) for p, _, c in naive_samples()]
    for pid, _, pixel in got:
        np.testing.assert_allclose(pixel, np.asarray(_image(pid)).mean(axis=(0, 1)))


def test_check_data_reports_the_parquet_layout(tmp_path, capsys):
    paths = write_parquet(tmp_path, payloads={3: None})
    (tmp_path / "WebPerson" / "images" / "part1").mkdir(parents=True)
    (tmp_path / "WebPerson" / "images" / RECORDS[3][0]).write_bytes(_png(3))
    check_data = load_tool("check_data")
    assert check_data.main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"WebPerson: parquet format, 2 source file(s): {paths[0]} ... {os.path.basename(paths[1])}" in out
    assert "2 Parquet file(s), 4 row group(s), 7 rows; 1 without embedded image bytes" in out
    assert "checking 7 of 7 images" in out and "OK: WebPerson passed all checks" in out
    assert check_data.main(["--root", str(tmp_path), "--sample", "3"]) == 0
    assert "checking 3 of 7 images" in capsys.readouterr().out

    write_parquet(tmp_path, payloads={3: None, 5: b"not an image"})
    assert check_data.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"1 corrupt image(s) (first 1):\n    {_member(paths, 5)}: " in err
    write_parquet(tmp_path, drop=("caption1",))
    assert check_data.main(["--root", str(tmp_path)]) == 1
    assert f"{paths[0]}: missing column 'caption1'" in capsys.readouterr().err


def test_train_pretrains_two_steps_on_a_read_only_parquet_folder(tmp_path):
    records = [(f"img/{i:03d}.png", f"a person number {i} in a red coat", f"someone {i} with black shoes")
               for i in range(12)]
    write_parquet(tmp_path / "data", records)
    train = load_tool("train")
    out, cache_dir = tmp_path / "run", tmp_path / "cache"
    with read_only(tmp_path / "data" / "WebPerson"):
        code = train.main(["--config", str(REPO / "configs" / "demo" / "tiny_pretrain.yaml"),
                           f"data.root={tmp_path / 'data'}", "data.annotation=data", f"data.cache_dir={cache_dir}",
                           f"output_dir={out}", "eval.period=0", "train.max_steps=2", "solver.epochs=1",
                           "solver.warmup_epochs=0", "data.batch_size=8", "data.num_workers=0"])
    assert code == 0
    records = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    assert [(r["epoch"], r["step"], r["skipped_images"]) for r in records if r["type"] == "train"] == [(0, 2, 0)]
    assert len(os.listdir(cache_dir)) == 1
