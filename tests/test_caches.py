"""Caches validate themselves and rebuild: search's gallery features and the WebPerson index.

A stale, damaged or unreadable cache must never be served (wrong ranking, wrong caption)
and never crash the run: it is rebuilt, with one log line saying why, and the rebuilt
file is valid afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import AnnotationError, build_dataset
from datasets.webperson import WebPerson, cache_path
from model.clip import build_clip_from_config
from tests.conftest import REPO, load_tool
from tests.test_webperson import RECORDS, _record, naive_samples, write_json, write_jsonl, write_shards
from utils.config import load_config, save_config

FINETUNE = str(REPO / "configs" / "demo" / "tiny_finetune.yaml")

search = load_tool("search")


# --------------------------------------------------------------------------- search: gallery feature cache


def _write_checkpoint(path, seed: int) -> None:
    """A randomly initialised tiny CLIP file (search needs features, not a trained model)."""
    cfg = load_config(FINETUNE, ["model.clip.pretrained="])
    torch.manual_seed(seed)
    torch.save(build_clip_from_config(cfg.model.clip).state_dict(), path)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("cache_run")
    save_config(load_config(FINETUNE, ["device=cpu"]), run / "config.yaml")
    _write_checkpoint(run / "model.pth", seed=0)
    return run


@pytest.fixture
def setup(checkpoint_dir, synthetic_root, tmp_path):
    """A private copy of the run (tests change its checkpoint) and a gallery folder of 6 images."""
    run = tmp_path / "run"
    shutil.copytree(checkpoint_dir, run)
    photos = tmp_path / "photos"
    photos.mkdir()
    test_images = build_dataset("CUHK-PEDES", str(synthetic_root)).test.img_paths
    for k in range(6):
        shutil.copy(test_images[3 * k], photos / f"img{k}.jpg")
    return {"ckpt": run / "model.pth", "photos": photos, "cache": tmp_path / "cache",
            "spare": test_images[1]}


def _search(setup, capsys) -> tuple[int, str, str]:
    code = search.main(["--checkpoint", str(setup["ckpt"]), "--images", str(setup["photos"]),
                        "--query", "a woman in a red coat", "--topk", "3", "--cache-dir", str(setup["cache"]),
                        "device=cpu"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _cache_file(setup):
    files = sorted(setup["cache"].glob("gallery-*.npz"))
    assert len(files) == 1, f"expected one gallery cache file, found {files}"
    return files[0]


def _cached_features(setup) -> np.ndarray:
    with np.load(_cache_file(setup), allow_pickle=False) as data:
        return data["feats"]


def _fresh_features(setup) -> np.ndarray:
    cfg, model, device = search.load_run_model(str(setup["ckpt"]), None, ["device=cpu"])
    paths = search.list_images(str(setup["photos"]))
    return search.embed_images(model, paths, image_size=search.image_size_of(cfg), batch_size=8,
                               device=device).numpy()


def test_gallery_image_replaced_in_place_is_embedded_again(setup, capsys):
    code, out, _ = _search(setup, capsys)
    assert code == 0 and "embedded 6 gallery images" in out
    before = _cached_features(setup)
    # Same name, other picture: the file list is unchanged, only its size/mtime tell.
    shutil.copy(setup["spare"], setup["photos"] / "img0.jpg")
    code, out, err = _search(setup, capsys)
    assert code == 0
    assert "using cached" not in out and "embedded 6 gallery images" in out
    assert "img0.jpg" in err and "changed" in err
    after = _cached_features(setup)
    assert not np.allclose(after[0], before[0], atol=1e-4)
    np.testing.assert_allclose(after, _fresh_features(setup), atol=1e-5)
    np.testing.assert_allclose(after[1:], before[1:], atol=1e-5)
    # Rebuilt once, then reused.
    code, out, err = _search(setup, capsys)
    assert code == 0 and "using cached gallery features (6 images)" in out and not err


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_gallery_cache_is_rebuilt(setup, capsys, damage):
    assert _search(setup, capsys)[0] == 0
    cache = _cache_file(setup)
    data = cache.read_bytes()
    cache.write_bytes(data[:len(data) // 2] if damage == "truncated" else b"")
    code, out, err = _search(setup, capsys)
    assert code == 0 and "Traceback" not in err
    assert "embedded 6 gallery images" in out
    assert "unreadable" in err and len(err.strip().splitlines()) == 1
    np.testing.assert_allclose(_cached_features(setup), _fresh_features(setup), atol=1e-5)
    assert "using cached gallery features" in _search(setup, capsys)[1]


def test_changed_checkpoint_rebuilds_the_gallery_cache(setup, capsys):
    assert _search(setup, capsys)[0] == 0
    before = _cached_features(setup)
    _write_checkpoint(setup["ckpt"], seed=1)
    code, out, err = _search(setup, capsys)
    assert code == 0 and "embedded 6 gallery images" in out
    assert "checkpoint" in err and "changed" in err
    after = _cached_features(setup)  # the stale file was replaced, not left beside the new one
    assert not np.allclose(after, before, atol=1e-4)
    np.testing.assert_allclose(after, _fresh_features(setup), atol=1e-5)


# --------------------------------------------------------------------------- WebPerson index cache


def _write(tmp_path, fmt: str) -> None:
    {"json": write_json, "jsonl": write_jsonl, "tar": write_shards}[fmt](tmp_path)


def _samples(ds) -> list[tuple[int, int, str]]:
    return [(pid, image_id, caption) for pid, image_id, _, caption in ds.train]


def _index_cache(ds) -> str:
    path = cache_path(ds.train.sources)
    assert os.path.isfile(path)
    return path


def _reloads_from_cache(tmp_path, caplog) -> None:
    caplog.clear()
    again = WebPerson(str(tmp_path))
    assert again.train.loaded_from_cache
    assert _samples(again) == naive_samples()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("fmt", ["json", "tar"])
def test_index_cache_with_damaged_offsets_is_detected_and_rebuilt(tmp_path, caplog, fmt):
    _write(tmp_path, fmt)
    first = WebPerson(str(tmp_path))
    path = _index_cache(first)
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    # Swap the spans of images 0 and 1, keep the metadata: every record still parses.
    for key in ("record_offset", "record_length"):
        arrays[key][[0, 1]] = arrays[key][[1, 0]]
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    caplog.set_level(logging.INFO, logger="datasets.webperson")
    ds = WebPerson(str(tmp_path))
    assert not ds.train.loaded_from_cache
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "checksum" in warnings[0] and "rebuild" in warnings[0]
    # Image 0 carries its own captions, as in the source annotation.
    assert ds.train[0][3] == RECORDS[0][1] and ds.train[1][3] == RECORDS[0][2]
    assert _samples(ds) == naive_samples()
    _reloads_from_cache(tmp_path, caplog)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "npy_header", "bad_meta"])
def test_unreadable_index_cache_is_rebuilt(tmp_path, caplog, damage):
    _write(tmp_path, "jsonl")
    path = _index_cache(WebPerson(str(tmp_path)))
    data = Path(path).read_bytes()
    if damage == "bad_meta":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["meta"] = np.array("[1, 2")
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:
        Path(path).write_bytes({"garbage": bytes(range(256)), "truncated": data[:len(data) // 2], "empty": b"",
                                "npy_header": b"\x93NUMPY\x01\x00garbage"}[damage])
    caplog.set_level(logging.INFO, logger="datasets.webperson")
    ds = WebPerson(str(tmp_path))
    assert not ds.train.loaded_from_cache
    assert _samples(ds) == naive_samples()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "rebuild" in warnings[0]
    _reloads_from_cache(tmp_path, caplog)


def test_concurrent_index_rebuilds_by_writers_with_the_same_pid(tmp_path, caplog, monkeypatch):
    """Ranks on several hosts (containers) can share a pid: their rebuilds must not share a temp file."""
    _write(tmp_path, "json")
    path = _index_cache(WebPerson(str(tmp_path)))
    with open(path, "wb") as f:
        f.write(b"junk")
    real_savez = np.savez
    started = []

    def savez_while_another_rank_rebuilds(file, *args, **kwargs):
        if not started:
            started.append(True)
            file.write(b"half a cache")
            WebPerson(str(tmp_path))  # the other rank finds the bad cache too and rebuilds it meanwhile
            file.seek(0)
            file.truncate()
        real_savez(file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez_while_another_rank_rebuilds)
    caplog.set_level(logging.INFO, logger="datasets.webperson")
    assert _samples(WebPerson(str(tmp_path))) == naive_samples()
    assert started
    assert not [r for r in caplog.records if "could not write" in r.getMessage()]
    monkeypatch.setattr(np, "savez", real_savez)
    _reloads_from_cache(tmp_path, caplog)
    assert sorted(os.listdir(os.path.dirname(path))) == sorted(["WebPerson-1M.json", "images",
                                                                os.path.basename(path)])


def test_record_that_no_longer_parses_discards_the_cache_so_a_restart_rebuilds(tmp_path):
    path = write_jsonl(tmp_path)
    ds = WebPerson(str(tmp_path))
    stat = os.stat(path)
    # The file changes but keeps its size and mtime (a copy that preserved them): record 0
    # grows by two bytes, record 1 shrinks by two, so the indexed span of record 0 is cut.
    changed = [(RECORDS[0][0], RECORDS[0][1] + "!!", RECORDS[0][2]), *RECORDS[1:]]
    lines = [json.dumps(_record(*r), ensure_ascii=False) for r in changed]
    lines[1] = lines[1].replace(": ", ":", 2)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    assert os.path.getsize(path) == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(AnnotationError, match="restart to rebuild"):
        ds.train[0]
    restarted = WebPerson(str(tmp_path))
    assert not restarted.train.loaded_from_cache
    assert _samples(restarted) == naive_samples(changed)
