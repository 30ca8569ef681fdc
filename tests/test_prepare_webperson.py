"""tools/prepare_webperson.py: round trips through the loader, determinism, resuming after kill -9, bad data."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from datasets import build_dataset, open_image
from tests.conftest import REPO, load_tool
from tests.test_webperson import naive_samples, write_json
from tests.test_webperson_parquet import write_parquet

prepare = load_tool("prepare_webperson")

NUM = 30
SIZE = (32, 16)  # H, W given to --size
# Non-ASCII captions: the JSON members are UTF-8.
RECORDS = [(f"part{i // 10}/{i:04d}.{'png' if i % 3 == 0 else 'jpg'}",
            f"a person {i} in a red coat" + (" café ✓" if i % 2 else ""), f"someone {i} wearing black shoes")
           for i in range(NUM)]


def _size(i: int) -> tuple[int, int]:
    """(W, H) of source image i: mostly larger than SIZE, in both aspect directions; every 7th is smaller."""
    if i % 7 == 6:
        return 12, 24
    return 20 + (i * 5) % 23, 40 + (i * 11) % 37


def _picture(i: int) -> Image.Image:
    """A colour of its own per image (neighbours differ by 37 levels of red) over a vertical gradient."""
    w, h = _size(i)
    ramp = np.linspace(0, 60, h, dtype=np.float32)[:, None, None]
    base = np.array([37 * i % 256, 91 * i % 196, 120], np.float32)
    pixels = np.clip(np.broadcast_to(base, (h, w, 3)) + ramp * np.array([0, 1, 1], np.float32), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def _encoded(i: int) -> bytes:
    buf = io.BytesIO()
    _picture(i).save(buf, "PNG" if RECORDS[i][0].endswith(".png") else "JPEG", quality=90)
    return buf.getvalue()


def _write_source(root, fmt: str, records=RECORDS, payloads: dict[int, bytes] | None = None) -> None:
    """The corpus in the hub's Parquet form or as JSON + images, with the images above (or ``payloads``)."""
    data = {i: _encoded(i) for i in range(len(records))} | (payloads or {})
    if fmt == "parquet":
        write_parquet(root, records, payloads=data)
        return
    write_json(root, records)
    for i, (path, _, _) in enumerate(records):
        with open(os.path.join(str(root), "WebPerson", "images", path), "wb") as f:
            f.write(data[i])


def _run(src, out, *flags: str) -> int:
    return prepare.main(["--root", str(src), "--out", str(out), "--size", *map(str, SIZE), "--shard-size", "8",
                         *flags])


def _files(out) -> dict[str, bytes]:
    """Every file the tool wrote (not the loader's index cache), by relative path."""
    found = {}
    for folder, _, names in os.walk(out):
        for name in names:
            if not name.endswith(".npz"):
                path = os.path.join(folder, name)
                found[os.path.relpath(path, out)] = open(path, "rb").read()
    return found


def _manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _samples(ds) -> list[tuple[int, int, str]]:
    return [(pid, image_id, caption) for pid, image_id, _, caption in ds.train]


def _check_prepared_image(got: Image.Image, i: int, fit: str = "cover") -> None:
    """Prepared image i: the size ``fit`` asks (checked by its properties) and the source's pixels."""
    (w, h), (gw, gh) = _size(i), got.size
    H, W = SIZE
    fits = (h <= H or w <= W) if fit == "cover" else (h <= H and w <= W)
    if fits:
        assert (gw, gh) == (w, h), i  # never enlarged
    elif fit == "cover":
        assert gh >= H and gw >= W and (gh == H or gw == W), (i, got.size)
    else:
        assert gh <= H and gw <= W and (gh == H or gw == W), (i, got.size)
    assert abs(gw / gh - w / h) <= 1 / min(gw, gh), (i, got.size)  # aspect kept, up to rounding
    reference = np.asarray(_picture(i).resize(got.size, Image.Resampling.BICUBIC), np.float32)
    assert np.abs(np.asarray(got, np.float32) - reference).mean() < 3, i


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_round_trip_through_the_loader(tmp_path, fmt, capsys):
    _write_source(tmp_path / "src", fmt)
    out = tmp_path / "out"
    assert _run(tmp_path / "src", out, "--workers", "2") == 0
    assert f"wrote {NUM} images ({2 * NUM} captions) in 4 shard(s)" in capsys.readouterr().out
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [f"webperson-00000{k}.tar" for k in range(4)]
    # The folder and the glob of its shards both train directly; captions in order, one identity per image.
    for annotation in (str(out), str(out / "*.tar")):
        ds = build_dataset("WebPerson", str(out), annotation=annotation)
        assert ds.train.fmt == "tar" and _samples(ds) == naive_samples(RECORDS)
    for i in range(NUM):
        _check_prepared_image(open_image(ds.train.image_path(i)), i)
    with tarfile.open(out / "webperson-000001.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:2]] == ["000000008.jpg", "000000008.json"]
        assert json.loads(tar.extractfile(members[1]).read()) == {"caption1": RECORDS[8][1], "caption2": RECORDS[8][2]}
    # An image that needs no shrinking is copied when it is a JPEG, re-encoded when not.
    small = [i for i in range(NUM) if _size(i) == (12, 24)]
    with tarfile.open(out / "webperson-000001.tar") as tar:
        assert tar.extractfile("000000013.jpg").read() == _encoded(13)
    manifest = _manifest(out)
    assert manifest["counts"] == {
        "source_images": NUM, "selected_images": NUM, "images": NUM, "captions": 2 * NUM, "shards": 4,
        "skipped_records": 0, "skipped_images": 0, "images_resized": NUM - len(small),
        "images_copied": sum(RECORDS[i][0].endswith(".jpg") for i in small),
        "images_encoded": sum(RECORDS[i][0].endswith(".png") for i in small)}
    assert manifest["source"]["format"] == fmt and manifest["options"]["size"] == list(SIZE)
    # The checksums are those of the files.
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 4
    for line, shard in zip(sums, manifest["shards"], strict=True):
        digest = hashlib.sha256((out / shard["name"]).read_bytes()).hexdigest()
        assert line == f"{digest}  {shard['name']}" and shard["sha256"] == digest


def test_fit_inside_and_keep_original(tmp_path):
    _write_source(tmp_path / "src", "json")
    assert _run(tmp_path / "src", tmp_path / "inside", "--fit", "inside", "--workers", "1") == 0
    ds = build_dataset("WebPerson", str(tmp_path / "inside"), annotation=str(tmp_path / "inside"))
    for i in range(NUM):
        _check_prepared_image(open_image(ds.train.image_path(i)), i, fit="inside")

    out = tmp_path / "original"
    assert prepare.main(["--root", str(tmp_path / "src"), "--out", str(out), "--keep-original", "--workers", "1"]) == 0
    with tarfile.open(out / "webperson-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    # One shard of 1000 (the default) holds every image, byte for byte, under its format's extension.
    assert len(members) == 2 * NUM
    for i, (path, _, _) in enumerate(RECORDS):
        assert members[f"{i:09d}.{os.path.splitext(path)[1][1:]}"] == _encoded(i)
    assert _manifest(out)["counts"]["images_copied"] == NUM


# --------------------------------------------------------------------------- determinism and resuming


def test_same_input_and_flags_give_the_same_bytes_whatever_the_workers(tmp_path):
    _write_source(tmp_path / "src", "parquet")
    assert _run(tmp_path / "src", tmp_path / "a", "--workers", "1") == 0
    assert _run(tmp_path / "src", tmp_path / "b", "--workers", "3") == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert sorted(a) == sorted(b) and any(name.endswith(".tar") for name in a)
    assert {name for name in a if a[name] != b[name]} == set()
    assert b"time" not in a["manifest.json"] and str(tmp_path / "a").encode() not in a["manifest.json"]
    # Other flags give other shards (the comparison above can fail).
    assert _run(tmp_path / "src", tmp_path / "c", "--quality", "80", "--workers", "1") == 0
    assert _files(tmp_path / "c")["webperson-000000.tar"] != a["webperson-000000.tar"]


def test_kill_9_mid_run_then_rerun_equals_an_uninterrupted_run(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _write_source(src, "json")
    # Image 20 (shard 2) is a named pipe: the run blocks reading it, after other shards are complete.
    blocked = os.path.join(str(src), "WebPerson", "images", RECORDS[20][0])
    os.remove(blocked)
    os.mkfifo(blocked)
    command = [sys.executable, str(REPO / "tools" / "prepare_webperson.py"), "--root", str(src), "--out", str(out),
               "--size", *map(str, SIZE), "--shard-size", "8", "--workers", "2"]
    proc = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        first = out / ".parts" / "000000.json"
        deadline = time.monotonic() + 120
        while not first.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first shard"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, as a preempted job
        proc.wait()
    assert not (out / "manifest.json").exists()
    done_before = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out) if name.endswith(".tar")}
    assert "webperson-000000.tar" in done_before and "webperson-000002.tar" not in done_before

    os.remove(blocked)
    with open(blocked, "wb") as f:
        f.write(_encoded(20))
    assert _run(src, out, "--workers", "2") == 0
    kept = int(re.search(r"resumed: (\d+) of 4 shard", capsys.readouterr().out).group(1))
    assert kept >= 1 and os.stat(out / "webperson-000000.tar").st_mtime_ns == done_before["webperson-000000.tar"]
    assert _run(src, tmp_path / "straight", "--workers", "1") == 0
    assert _files(out) == _files(tmp_path / "straight")  # no temp files left, the same bytes everywhere


def test_a_damaged_finished_shard_is_redone(tmp_path, capsys):
    _write_source(tmp_path / "src", "parquet")
    out = tmp_path / "out"
    assert _run(tmp_path / "src", out, "--workers", "1") == 0
    before = _files(out)
    with open(out / "webperson-000001.tar", "r+b") as f:
        f.seek(600)
        f.write(b"\x00\x01")
    assert _run(tmp_path / "src", out, "--workers", "1") == 0
    assert "resumed: 3 of 4 shard(s) were complete and verified" in capsys.readouterr().out
    assert _files(out) == before


# --------------------------------------------------------------------------- bad data, subsets, folders


def test_corrupt_images_and_bad_records_are_listed_or_fatal_with_strict(tmp_path, capsys):
    records = [r if i != 9 else (r[0], r[1], "  ") for i, r in enumerate(RECORDS)]  # an empty caption2
    _write_source(tmp_path / "src", "parquet", records, payloads={4: b"not an image", 17: _encoded(17)[:400]})
    out = tmp_path / "out"
    assert _run(tmp_path / "src", out, "--workers", "2") == 0
    manifest = _manifest(out)
    counts = manifest["counts"]
    assert (counts["source_images"], counts["skipped_records"], counts["skipped_images"]) == (NUM - 1, 1, 2)
    assert counts["images"] == NUM - 3 and counts["captions"] == 2 * (NUM - 3)
    [record] = manifest["skipped_records"]
    assert record["file"].endswith("train-00000-of-00002.parquet") and record["record"] == 9
    assert "'caption2' is empty" in record["reason"]
    # Image keys are positions in the loader's order: image 17 of the source is position 16 once record 9 is gone.
    assert [(s["key"], s["image"].rsplit("::", 1)[1]) for s in manifest["skipped_images"]] == \
        [("000000004", "2/0"), ("000000016", "1/0")]
    assert "not an image PIL can identify" in manifest["skipped_images"][0]["reason"]
    assert "truncated" in manifest["skipped_images"][1]["reason"].lower()
    assert " at 0x" not in json.dumps(manifest)
    ds = build_dataset("WebPerson", str(out), annotation=str(out))
    kept = [r for i, r in enumerate(records) if i not in (4, 9, 17)]
    assert [c for _, _, c in _samples(ds)] == [c for _, c1, c2 in kept for c in (c1, c2)]
    assert manifest["shards"][0]["images"] == 7  # shard 0 lost image 4: shards keep their source ranges

    assert _run(tmp_path / "src", tmp_path / "strict", "--strict") == 2
    assert "'caption2' is empty" in capsys.readouterr().err
    _write_source(tmp_path / "src2", "parquet", payloads={4: b"not an image"})
    assert _run(tmp_path / "src2", tmp_path / "strict2", "--strict", "--workers", "2") == 2
    err = capsys.readouterr().err
    assert re.search(r"^error: cannot read image .*parquet::2/0: not an image PIL can identify \(--strict", err, re.M)
    assert not (tmp_path / "strict2" / "manifest.json").exists()


def test_limit_takes_the_first_images(tmp_path):
    _write_source(tmp_path / "src", "json")
    out = tmp_path / "out"
    assert _run(tmp_path / "src", out, "--limit", "10", "--workers", "1") == 0
    ds = build_dataset("WebPerson", str(out), annotation=str(out))
    assert _samples(ds) == naive_samples(RECORDS[:10])
    counts = _manifest(out)["counts"]
    assert (counts["source_images"], counts["selected_images"], counts["images"], counts["shards"]) == (NUM, 10, 10, 2)


def test_refuses_foreign_folders_and_other_flags_without_overwrite(tmp_path, capsys):
    _write_source(tmp_path / "src", "json")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for flags in ((), ("--overwrite",)):  # --overwrite replaces only the tool's own output
        assert _run(tmp_path / "src", foreign, *flags) == 2
        assert "is not empty and was not made by tools/prepare_webperson.py" in capsys.readouterr().err
        assert os.listdir(foreign) == ["notes.txt"]

    out = tmp_path / "out"
    assert _run(tmp_path / "src", out, "--workers", "1") == 0
    (out / "notes.txt").write_text("a user's file in the tool's folder")
    first = _files(out)
    assert _run(tmp_path / "src", out, "--quality", "80") == 2
    assert "made from other flags (quality); pass --overwrite" in capsys.readouterr().err
    assert _files(out) == first
    assert _run(tmp_path / "src", out, "--quality", "80", "--workers", "1", "--overwrite") == 0
    assert _manifest(out)["options"]["quality"] == 80
    assert (out / "notes.txt").read_text() == "a user's file in the tool's folder"


def test_train_pretrains_two_steps_on_prepared_shards(tmp_path):
    # The documented layout: the shards in WebPerson/prepared, data.root unchanged, data.annotation=prepared.
    _write_source(tmp_path / "data", "parquet")
    out = tmp_path / "data" / "WebPerson" / "prepared"
    assert prepare.main(["--root", str(tmp_path / "data"), "--out", str(out), "--size", "64", "32", "--workers",
                         "1"]) == 0
    train = load_tool("train")
    run_dir = tmp_path / "run"
    code = train.main(["--config", str(REPO / "configs" / "demo" / "tiny_pretrain.yaml"),
                       f"data.root={tmp_path / 'data'}", "data.annotation=prepared", f"output_dir={run_dir}",
                       "eval.period=0", "train.max_steps=2", "solver.epochs=1", "solver.warmup_epochs=0",
                       "data.batch_size=8", "data.num_workers=0"])
    assert code == 0
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    assert [(r["epoch"], r["step"], r["skipped_images"]) for r in records if r["type"] == "train"] == [(0, 2, 0)]
    # It read the shards: the loader cached their index beside them.
    assert [n for n in os.listdir(out) if n.endswith(".npz")] != []


def test_check_data_verifies_a_prepared_folder_against_its_manifest(tmp_path, capsys):
    """The prepared folder is a data root by itself (manifest.json is no annotation); check_data checks its shards."""
    check_data = load_tool("check_data")
    _write_source(tmp_path / "src", "json")
    out = tmp_path / "out"
    assert _run(tmp_path / "src", out) == 0
    capsys.readouterr()
    assert build_dataset("WebPerson", str(out)).train.fmt == "tar"
    assert check_data.main(["--root", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"prepared shards: {NUM} images, 4 shards" in printed and "OK: WebPerson" in printed, printed

    shard = out / "webperson-000002.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # inside the first member's bytes: the tar still reads, the checksum differs
    shard.write_bytes(bytes(data))
    (out / "webperson-000009.tar").write_bytes((out / "webperson-000000.tar").read_bytes())
    assert check_data.main(["--root", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{shard}: sha256 differs from manifest.json" in err, err
    assert f"{out / 'webperson-000009.tar'}: not listed in manifest.json" in err, err

    (out / "webperson-000009.tar").unlink()
    os.remove(out / "manifest.json")
    assert check_data.main(["--root", str(out)]) == 1
    assert "unfinished preparation" in capsys.readouterr().err
