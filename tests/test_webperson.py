"""WebPerson: the JSON, JSONL and tar formats, the index cache, tar image reading, bad input."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

import datasets.webperson as webperson
from datasets import AnnotationError, ImageReadError, build_dataset, open_image
from datasets.webperson import WebPerson

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Non-ASCII captions exercise the byte-offset bookkeeping of the streaming parser.
RECORDS = [
    (f"part{i // 3}/{i:04d}.png",
     f"a woman in a red coat number {i} with a bag" + (" café ✓" if i % 2 else ""),
     f"person {i} wearing black shoes and jeans")
    for i in range(7)
]


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (4, 8), (30 * i % 256, 7 * i % 256, 200))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def _record(path: str, c1: str, c2: str) -> dict:
    return {path: {"caption1": c1, "caption2": c2}}


def write_images(wp: str, records=RECORDS) -> None:
    for i, (path, _, _) in enumerate(records):
        full = os.path.join(wp, "images", path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(_png(i))


def write_json(root, records=RECORDS, name="WebPerson-1M.json") -> str:
    wp = os.path.join(str(root), "WebPerson")
    write_images(wp, records)
    path = os.path.join(wp, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump([_record(*r) for r in records], f, indent=2, ensure_ascii=False)
    return path


def write_jsonl(root, records=RECORDS, name="WebPerson-1M.jsonl") -> str:
    wp = os.path.join(str(root), "WebPerson")
    write_images(wp, records)
    path = os.path.join(wp, name)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(_record(*r), ensure_ascii=False) + "\n")
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, records=RECORDS, per_shard=4) -> list[str]:
    folder = os.path.join(str(root), "WebPerson", "shards")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(0, len(records), per_shard):
        path = os.path.join(folder, f"webperson-{s // per_shard:06d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(s, min(s + per_shard, len(records))):
                key = f"{i:08d}"
                _add(tar, f"{key}.png", _png(i))
                _add(tar, f"{key}.json", json.dumps({"caption1": records[i][1], "caption2": records[i][2]}).encode())
        paths.append(path)
    return paths


def naive_samples(records=RECORDS) -> list[tuple[int, int, str]]:
    """The authors' loader: each image its own identity, caption1 then caption2."""
    out = []
    for pid, (_, c1, c2) in enumerate(records):
        out += [(pid, pid, c1), (pid, pid, c2)]
    return out


def _samples(ds) -> list[tuple[int, int, str]]:
    return [(pid, image_id, caption) for pid, image_id, _, caption in ds.train]


def test_three_formats_give_the_authors_samples_in_order(tmp_path):
    write_json(tmp_path / "a")
    write_jsonl(tmp_path / "b")
    write_shards(tmp_path / "c")
    loaded = [build_dataset("WebPerson", str(tmp_path / d)) for d in "abc"]
    for ds in loaded:
        assert _samples(ds) == naive_samples()
        assert len(ds.train) == 14 and ds.num_classes == 7 and ds.train.num_images == 7
        assert ds.val is None and ds.test is None
        np.testing.assert_array_equal(ds.train.pids, np.repeat(np.arange(7), 2))
        np.testing.assert_array_equal(ds.train.image_ids, ds.train.pids)
    assert [ds.train.fmt for ds in loaded] == ["json", "jsonl", "tar"]
    json_paths = [path for _, _, path, _ in loaded[0].train]
    assert json_paths[::2] == [os.path.join(str(tmp_path / "a"), "WebPerson", "images", r[0]) for r in RECORDS]
    tar_paths = [path for _, _, path, _ in loaded[2].train]
    assert tar_paths[8] == os.path.join(str(tmp_path / "c"), "WebPerson", "shards", "webperson-000001.tar") + \
        "::00000004.png"
    # Every format reads back the same pixels for the same sample.
    for i in (0, 9, 13):
        pixels = [np.asarray(open_image(ds.train[i][2])) for ds in loaded]
        np.testing.assert_array_equal(pixels[0], np.asarray(_image(i // 2)))
        np.testing.assert_array_equal(pixels[1], pixels[0])
        np.testing.assert_array_equal(pixels[2], pixels[0])
    assert "pretraining corpus" in loaded[0].show_statistics()


def test_streaming_parser_across_chunk_boundaries(tmp_path, monkeypatch):
    write_json(tmp_path)
    # Tiny chunks cut records, multi-byte characters and the brackets everywhere.
    monkeypatch.setattr(webperson, "_CHUNK_BYTES", 5)
    ds = WebPerson(str(tmp_path), cache=False)
    assert _samples(ds) == naive_samples()


def test_annotation_argument_file_dir_and_glob(tmp_path):
    shards = write_shards(tmp_path, per_shard=2)
    wp = tmp_path / "WebPerson"
    by_dir = WebPerson(str(tmp_path), annotation="shards", cache=False)
    by_glob = WebPerson(str(wp), annotation=str(wp / "shards" / "webperson-00000[0-1].tar"), cache=False)
    by_file = WebPerson(str(wp), annotation=shards[3], cache=False)
    assert _samples(by_dir) == naive_samples()
    assert _samples(by_glob) == naive_samples()[:8]
    assert [c for _, _, c in _samples(by_file)] == [RECORDS[6][1], RECORDS[6][2]]
    with pytest.raises(AnnotationError, match="annotation not found"):
        WebPerson(str(tmp_path), annotation="nope.jsonl")


def test_index_is_compact_and_picklable(tmp_path):
    write_json(tmp_path)
    index = WebPerson(str(tmp_path), cache=False).train
    assert all(isinstance(a, np.ndarray) for a in index.arrays.values())
    # Per image only a source id and a byte span: no caption text is held in memory.
    assert index.nbytes == 16 * index.num_images
    clone = pickle.loads(pickle.dumps(index))
    assert list(clone) == list(index)
    with pytest.raises(IndexError, match="out of range"):
        index[14]
    assert index[-1] == index[13]


def test_tar_images_read_through_registered_and_scanned_tables(tmp_path):
    write_shards(tmp_path)
    ds = WebPerson(str(tmp_path))
    path = ds.train[5][2]
    np.testing.assert_array_equal(np.asarray(open_image(path)), np.asarray(_image(2)))
    # A shard nobody indexed is scanned once.
    other = str(tmp_path / "other.tar")
    with tarfile.open(other, "w") as tar:
        _add(tar, "x/y.png", _png(3))
        _add(tar, "x/bad.jpg", b"definitely not a jpeg")
    np.testing.assert_array_equal(np.asarray(open_image(other + "::x/y.png")), np.asarray(_image(3)))
    with pytest.raises(ImageReadError, match=r"other\.tar::x/bad\.jpg"):
        open_image(other + "::x/bad.jpg")
    with pytest.raises(ImageReadError, match=r"other\.tar::x/missing\.png: file not found"):
        open_image(other + "::x/missing.png")
    with pytest.raises(ImageReadError, match=r"nothing\.png"):
        open_image(str(tmp_path / "nothing.png"))


def test_cache_is_used_then_invalidated_when_the_source_changes(tmp_path):
    path = write_jsonl(tmp_path)
    first = WebPerson(str(tmp_path))
    assert not first.train.loaded_from_cache
    assert os.path.isfile(path + ".index.npz")
    second = WebPerson(str(tmp_path))
    assert second.train.loaded_from_cache
    assert list(second.train) == list(first.train)

    changed = RECORDS[:3] + [("part9/new.png", "a brand new caption", "another new caption")]
    write_jsonl(tmp_path, changed)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = WebPerson(str(tmp_path))
    assert not third.train.loaded_from_cache
    assert _samples(third) == naive_samples(changed)
    # An index built from the old file refuses to read the new one (checked when a worker first reads).
    stale = pickle.loads(pickle.dumps(first.train))
    with pytest.raises(AnnotationError, match="changed on disk after it was indexed"):
        stale[0]
    assert WebPerson(str(tmp_path)).train.loaded_from_cache


def test_cache_disabled_writes_nothing(tmp_path):
    path = write_json(tmp_path)
    WebPerson(str(tmp_path), cache=False)
    assert not os.path.exists(path + ".index.npz")


def _expect(tmp_path, fmt: str, text: str, match: str, record: int | None, **kwargs) -> AnnotationError:
    wp = tmp_path / "WebPerson"
    (wp / "images").mkdir(parents=True, exist_ok=True)
    path = wp / f"anno.{fmt}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(AnnotationError, match=match) as info:
        WebPerson(str(tmp_path), cache=False, **kwargs)
    assert info.value.file == str(path) and info.value.index == record
    assert str(path) in str(info.value)
    if record is not None:
        assert f"record {record}" in str(info.value)
    return info.value


GOOD = json.dumps(_record("a.png", "first caption", "second caption"))


@pytest.mark.parametrize("text, match, record", [
    ('{"a.png": {}}', r"expected a JSON list \('\['\) at the top level", None),
    (f"[{GOOD}, 3]", "expected a one-key object.*got integer", 1),
    (f'[{GOOD}, {{"b.png": {{"caption1": "x"}}}}]', "misses key 'caption2'", 1),
    (f'[{GOOD}, {{"b.png": {{"caption1": "x", "caption2": "  "}}}}]', "'caption2' is empty", 1),
    (f'[{GOOD}, {{"b.png": {{"caption1": "x", "caption2": 5}}}}]', "'caption2' must be a string, got integer", 1),
    (f'[{GOOD}, {{"b.png": {{}}, "c.png": {{}}}}]', "exactly one image path key, got 2", 1),
    (f'[{GOOD}, {{"": {{"caption1": "x", "caption2": "y"}}}}]', "empty image path", 1),
    (f'[{GOOD},\n {GOOD}]', "duplicate image entry 'a.png' .*record 0", 1),
    (f'[{GOOD},\n  {{"b.png": {{"caption1": "x" "caption2": "y"}}}}]', r"line 2, column 30: malformed JSON: Expecting .,. delimiter", 1),
    (f"[{GOOD}] extra", "extra data after the closing", None),
    (f"[{GOOD}, ", "end of file inside the list", 1),
])
def test_bad_json_records_name_file_and_record(tmp_path, text, match, record):
    _expect(tmp_path, "json", text, match, record)


def test_bad_jsonl_line_names_the_line(tmp_path):
    text = f"{GOOD}\n\n{{not json}}\n"
    error = _expect(tmp_path, "jsonl", text, r"line 3, column 2: malformed JSON", 2)
    assert error.index == 2


def test_skip_bad_records_counts_and_keeps_the_rest(tmp_path):
    lines = [GOOD, "[1, 2]", json.dumps(_record("b.png", "x", "")), "{broken", GOOD,
             json.dumps(_record("c.png", "third", "fourth"))]
    wp = tmp_path / "WebPerson"
    (wp / "images").mkdir(parents=True)
    (wp / "anno.jsonl").write_text("\n".join(lines) + "\n")
    ds = WebPerson(str(tmp_path), skip_bad_records=True)
    assert ds.num_skipped == 4
    assert [e.index for e in ds.skipped] == [1, 2, 3, 4]
    assert "duplicate image entry 'a.png'" in str(ds.skipped[3])
    assert _samples(ds) == [(0, 0, "first caption"), (0, 0, "second caption"), (1, 1, "third"), (1, 1, "fourth")]
    assert "4 bad record(s) skipped" in ds.show_statistics()
    # A strict run must not silently reuse the index built while skipping.
    with pytest.raises(AnnotationError, match=r"record 1: expected a one-key object"):
        WebPerson(str(tmp_path))
    again = WebPerson(str(tmp_path), skip_bad_records=True)
    assert again.train.loaded_from_cache and again.num_skipped == 4


@pytest.mark.parametrize("fmt", ["json", "jsonl"])
@pytest.mark.parametrize("path", ["/data/elsewhere/b.png", "../b.png", "sub/../../b.png"])
def test_image_paths_leaving_images_are_bad_records(tmp_path, fmt, path):
    bad = json.dumps(_record(path, "third", "fourth"))
    text = f"[{GOOD},\n {bad}]" if fmt == "json" else f"{GOOD}\n{bad}\n"
    image_root = tmp_path / "WebPerson" / "images"
    _expect(tmp_path, fmt, text, rf"image path '{path}' leaves the image folder: image paths are relative to "
                                 rf"{image_root} and must stay inside it", 1)
    ds = WebPerson(str(tmp_path), skip_bad_records=True, cache=False)
    assert ds.num_skipped == 1 and _samples(ds) == [(0, 0, "first caption"), (0, 0, "second caption")]


@pytest.mark.parametrize("caption", ["&nbsp;", "\x00\x01", "&amp;nbsp;\t\x1b[0m"])
def test_captions_the_tokenizer_cleans_to_nothing_are_bad_records(tmp_path, caption):
    bad = json.dumps(_record("b.png", "a man", caption))
    _expect(tmp_path, "json", f"[{GOOD}, {bad}]", r"record 1: captions of 'b.png' 'caption2' .* is empty once "
                                                   "cleaned for the tokenizer", 1)


def test_tar_captions_the_tokenizer_cleans_to_nothing_are_bad_records(tmp_path):
    (tmp_path / "WebPerson").mkdir()
    with tarfile.open(tmp_path / "WebPerson" / "s-0.tar", "w") as tar:
        _add(tar, "k0.png", _png(0))
        _add(tar, "k0.json", b'{"caption1": "&nbsp;", "caption2": "b"}')
    with pytest.raises(AnnotationError, match=r"record 0: k0\.json 'caption1' '&nbsp;' is empty once cleaned"):
        WebPerson(str(tmp_path), cache=False)


def test_a_utf8_byte_order_mark_is_read_past(tmp_path):
    for fmt, write in (("json", write_json), ("jsonl", write_jsonl)):
        path = write(tmp_path / fmt)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + data)
        for cached in (False, True):  # built, then read back through the index cache
            ds = WebPerson(str(tmp_path / fmt))
            assert ds.train.loaded_from_cache == cached
            # Record 0's byte span starts after the mark, so its text reads back from the file.
            assert _samples(ds) == naive_samples()
            assert ds.train[0][2] == os.path.join(str(tmp_path / fmt), "WebPerson", "images", RECORDS[0][0])


def test_bad_tar_samples(tmp_path):
    folder = tmp_path / "WebPerson"
    folder.mkdir()
    shard = str(folder / "s-0.tar")
    with tarfile.open(shard, "w") as tar:
        _add(tar, "k0.png", _png(0))
        _add(tar, "k0.json", b'{"caption1": "a", "caption2": "b"}')
        _add(tar, "k1.png", _png(1))
        _add(tar, "k2.png", _png(2))
        _add(tar, "k2.json", b'{"caption1": "a"')
        _add(tar, "k3.json", b'{"caption1": "a", "caption2": "b"}')
        _add(tar, "k4.png", _png(4))
        _add(tar, "k4.json", b'{"caption1": "c", "caption2": "d"}')
    with pytest.raises(AnnotationError, match=r"s-0\.tar: record 1: sample 'k1' has no k1\.json member"):
        WebPerson(str(tmp_path), cache=False)
    ds = WebPerson(str(tmp_path), skip_bad_records=True, cache=False)
    assert ds.num_skipped == 3
    messages = [str(e) for e in ds.skipped]
    assert "record 2: k2.json is not valid JSON" in messages[1]
    assert "record 3: sample 'k3' has no image member" in messages[2]
    assert _samples(ds) == [(0, 0, "a"), (0, 0, "b"), (1, 1, "c"), (1, 1, "d")]
    assert ds.train[3][2] == shard + "::k4.png"


def test_layout_errors(tmp_path):
    with pytest.raises(AnnotationError, match="does not exist"):
        WebPerson(str(tmp_path / "missing"))
    with pytest.raises(AnnotationError, match=r"WebPerson not found; expected layout"):
        WebPerson(str(tmp_path))
    wp = tmp_path / "WebPerson"
    wp.mkdir()
    with pytest.raises(AnnotationError, match="no WebPerson annotation found"):
        WebPerson(str(tmp_path))
    (wp / "a.json").write_text("[]")
    with pytest.raises(AnnotationError, match=r"image folder not found.*images/"):
        WebPerson(str(tmp_path))
    (wp / "images").mkdir()
    with pytest.raises(AnnotationError, match="no usable WebPerson record"):
        WebPerson(str(tmp_path), cache=False)
    (wp / "b.jsonl").write_text("")
    with pytest.raises(AnnotationError, match=r"several annotation files found \(a\.json, b\.jsonl\)"):
        WebPerson(str(tmp_path))
    (wp / "c.txt").write_text("")
    with pytest.raises(AnnotationError, match=r"unsupported annotation extension"):
        WebPerson(str(tmp_path), annotation="c.txt")


def test_check_data_reads_tar_members(tmp_path, capsys):
    shards = write_shards(tmp_path)
    with tarfile.open(shards[1], "a") as tar:
        _add(tar, "00000099.png", b"\x89PNG broken")
        _add(tar, "00000099.json", b'{"caption1": "x", "caption2": "y"}')
    spec = importlib.util.spec_from_file_location("check_data", os.path.join(REPO, "tools", "check_data.py"))
    check_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_data)
    assert check_data.main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"1 corrupt image(s) (first 1):\n    {shards[1]}::00000099.png: " in err
    os.remove(shards[1])
    write_shards(tmp_path)
    assert check_data.main(["--root", str(tmp_path)]) == 0
    assert "OK: WebPerson passed all checks" in capsys.readouterr().out


class _Pixels:
    """Map-style dataset: (pid, caption, mean pixel) read inside the worker."""

    def __init__(self, index) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        pid, _, path, caption = self.index[i]
        return pid, caption, np.asarray(open_image(path)).mean(axis=(0, 1))


def test_forked_dataloader_workers_read_tar_samples(tmp_path):
    from torch.utils.data import DataLoader  # torch only here: the loaders themselves do not need it

    write_shards(tmp_path)
    index = WebPerson(str(tmp_path)).train
    index[0]  # the parent opened descriptors before forking; children must reopen their own
    loader = DataLoader(_Pixels(index), batch_size=3, num_workers=2, collate_fn=list, multiprocessing_context="fork")
    got = [item for batch in loader for item in batch]
    assert [(pid, caption) for pid, caption, _ in got] == [(p, c) for p, _, c in naive_samples()]
    for pid, _, pixel in got:
        np.testing.assert_allclose(pixel, np.asarray(_image(pid)).mean(axis=(0, 1)))
