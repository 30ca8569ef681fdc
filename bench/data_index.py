"""Memory and load time of the WebPerson index vs a naive list of Python records.

    python bench/data_index.py [--images 500000] [--workdir DIR] [--samples 5000] [--parquet-images 1000000]

Writes a synthetic WebPerson annotation (authors' JSON list and JSONL; two
captions of ~40 words per image) into a temporary folder, then measures in
separate subprocesses (clean RSS numbers):

* load time and peak RSS increase of ``WebPerson`` (cold build, and from the
  ``.npz`` cache) vs ``json.load`` + a list of ``(pid, image_id, path, caption)``
  tuples, the way IRRA-style loaders hold their training set;
* per-worker RSS / PSS / USS of 2 forked DataLoader workers before and after
  they read ``--samples`` random samples (copy-on-write growth);
* the hub's Parquet layout at ``--parquet-images`` rows (default 1M; 0 skips it):
  10 files of 100-row groups, captions as above, null image bytes (the index
  never reads them): build time, ``.npz`` reload time and peak RSS of the
  ``WebPerson`` index vs reading the three text columns into Python lists.
  The files (~0.4 GB at 1M rows) are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

WORDS = ("the a woman man young person wearing black white red blue green dark light long short sleeve shirt "
         "jacket coat trousers jeans pants skirt dress shoes sneakers boots carrying holding bag backpack "
         "handbag hair ponytail glasses hat cap walking standing with and in on her his left right hand "
         "shoulder striped plaid grey brown yellow pink orange knee length loose tight logo front back").split()


def proc_status(pid: str = "self") -> dict[str, int]:
    """VmRSS / VmHWM of a process in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def smaps_rollup(pid: int) -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of a process in MiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


# --------------------------------------------------------------------------- data generation


def write_annotations(folder: str, num_images: int, words: int) -> tuple[str, str]:
    rng = random.Random(0)
    # A pool of realistic-length sentences; a per-image prefix makes every caption distinct.
    pool = [" ".join(rng.choice(WORDS) for _ in range(words - 3)) + "." for _ in range(20000)]
    wp = os.path.join(folder, "WebPerson")
    os.makedirs(os.path.join(wp, "images"), exist_ok=True)
    json_path, jsonl_path = os.path.join(wp, "WebPerson-1M.json"), os.path.join(wp, "WebPerson-1M.jsonl")
    with open(json_path, "w") as fj, open(jsonl_path, "w") as fl:
        fj.write("[\n")
        for i in range(num_images):
            record = json.dumps({f"part_{i // 10000:04d}/{i:09d}.jpg": {
                "caption1": f"Pedestrian {i} is a {pool[(7 * i) % len(pool)]}",
                "caption2": f"Image {i} shows a {pool[(13 * i + 1) % len(pool)]}"}})
            fj.write(record + (",\n" if i < num_images - 1 else "\n"))
            fl.write(record + "\n")
        fj.write("]\n")
    return json_path, jsonl_path


def write_parquet(folder: str, num_images: int, words: int, files: int = 10) -> str:
    """The hub's layout, ``WebPerson/data/train-0000k-of-0000N.parquet``, 100-row groups, null image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    pool = [" ".join(rng.choice(WORDS) for _ in range(words - 3)) + "." for _ in range(20000)]
    data = os.path.join(folder, "WebPerson", "data")
    os.makedirs(data, exist_ok=True)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    per_file = -(-num_images // files)
    for k in range(files):
        ids = range(k * per_file, min((k + 1) * per_file, num_images))
        paths = [f"part_{i // 10000:04d}/{i:09d}.jpg" for i in ids]
        table = pa.table({
            "image": pa.array([{"bytes": None, "path": os.path.basename(p)} for p in paths], image_type),
            "image_path": paths,
            "caption1": [f"Pedestrian {i} is a {pool[(7 * i) % len(pool)]}" for i in ids],
            "caption2": [f"Image {i} shows a {pool[(13 * i + 1) % len(pool)]}" for i in ids]})
        pq.write_table(table, os.path.join(data, f"train-{k:05d}-of-{files:05d}.parquet"), row_group_size=100)
    return data


# --------------------------------------------------------------------------- children


def naive_load(path: str, image_root: str) -> list[tuple[int, int, str, str]]:
    """An IRRA/GA-DMS-style loader: parse everything, keep a list of tuples."""
    samples = []
    with open(path) as f:
        if path.endswith(".jsonl"):
            annos = [json.loads(line) for line in f if line.strip()]
        else:
            annos = json.load(f)
    for pid, item in enumerate(annos):
        for rel, caps in item.items():
            img_path = os.path.join(image_root, rel)
            samples.append((pid, pid, img_path, caps["caption1"]))
            samples.append((pid, pid, img_path, caps["caption2"]))
    del annos
    return samples


def naive_parquet_load(folder: str) -> list[tuple[int, int, str, str]]:
    """The Parquet text columns read whole into Python lists, then a list of tuples as above."""
    import glob

    import pyarrow.parquet as pq

    table = pq.read_table(sorted(glob.glob(os.path.join(folder, "*.parquet"))),
                          columns=["image_path", "caption1", "caption2"])
    root = os.path.join(os.path.dirname(folder), "images")
    samples = []
    for pid, (rel, c1, c2) in enumerate(zip(*(table.column(c).to_pylist() for c in table.column_names),
                                            strict=True)):
        img_path = os.path.join(root, rel)
        samples.append((pid, pid, img_path, c1))
        samples.append((pid, pid, img_path, c2))
    del table
    return samples


def load(kind: str, path: str):
    root = os.path.dirname(os.path.dirname(path))
    if kind == "naive":
        if os.path.isdir(path):
            return naive_parquet_load(path)
        return naive_load(path, os.path.join(root, "WebPerson", "images"))
    from datasets.webperson import WebPerson

    return WebPerson(root, annotation=path, cache=kind == "cached").train


def child_load(kind: str, path: str) -> dict:
    import numpy  # noqa: F401  (imported before the baseline so only the load is measured)

    import datasets  # noqa: F401
    import model.tokenizer  # noqa: F401  (caption checks import it, and torch, lazily; training has both loaded)

    base = proc_status()["VmRSS"]
    start = time.perf_counter()
    data = load(kind, path)
    seconds = time.perf_counter() - start
    status = proc_status()
    out = {"seconds": seconds, "peak_mib": status["VmHWM"] - base, "rss_mib": status["VmRSS"] - base,
           "samples": len(data)}
    if kind != "naive":
        out["index_mib"] = data.nbytes / 2**20
        out["from_cache"] = data.loaded_from_cache
    return out


class _Samples:
    """Map-style dataset over either representation, returning (worker pid, pid, caption)."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, int, str]:
        pid, _, _, caption = self.data[i]
        return os.getpid(), pid, caption


def _as_list(batch: list) -> list:
    return batch


def child_workers(kind: str, path: str, samples: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    data = load(kind, path)
    loader = DataLoader(_Samples(data), batch_size=100, shuffle=True, num_workers=2, collate_fn=_as_list,
                        multiprocessing_context="fork", prefetch_factor=1, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    pids = set()
    while len(pids) < 2:
        pids.update(worker for worker, _, _ in next(it))
    before = {pid: smaps_rollup(pid) for pid in pids}
    seen = 0
    while seen < samples:
        seen += len(next(it))
    after = {pid: smaps_rollup(pid) for pid in pids}
    del it
    return {"workers": [{"before": before[p], "after": after[p]} for p in sorted(pids)], "samples": seen}


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args],
                            capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"child {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500_000, help="images (two captions each)")
    parser.add_argument("--words", type=int, default=40, help="words per caption")
    parser.add_argument("--samples", type=int, default=5000, help="samples the DataLoader workers read")
    parser.add_argument("--parquet-images", type=int, default=1_000_000, help="Parquet rows (0: skip)")
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir, removed)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        result = child_load(*rest) if mode == "load" else child_workers(rest[0], rest[1], int(rest[2]))
        print(json.dumps(result))
        return

    folder = args.workdir or tempfile.mkdtemp(prefix="webperson-bench-")
    try:
        start = time.perf_counter()
        json_path, jsonl_path = write_annotations(folder, args.images, args.words)
        print(f"wrote {args.images:,} images / {2 * args.images:,} captions in {time.perf_counter() - start:.1f}s: "
              f"JSON {os.path.getsize(json_path) / 2**20:.0f} MiB, JSONL {os.path.getsize(jsonl_path) / 2**20:.0f} MiB")
        print(f"\n{'load':<34}{'time s':>8}{'peak RSS +MiB':>15}{'RSS after +MiB':>16}{'index MiB':>11}")
        rows = {}
        for label, kind, path in [("naive list, JSON", "naive", json_path), ("naive list, JSONL", "naive", jsonl_path),
                                  ("WebPerson index, JSON (build)", "build", json_path),
                                  ("WebPerson index, JSONL (build)", "build", jsonl_path),
                                  ("WebPerson index, JSON (build+save)", "cached", json_path),
                                  ("WebPerson index, JSON (.npz cache)", "cached", json_path)]:
            r = rows[label] = run_child("load", kind, path)
            index = f"{r['index_mib']:.1f}" if "index_mib" in r else "-"
            print(f"{label:<34}{r['seconds']:>8.2f}{r['peak_mib']:>15.0f}{r['rss_mib']:>16.0f}{index:>11}")
        for fmt in ("JSON", "JSONL"):
            naive, ours = rows[f"naive list, {fmt}"], rows[f"WebPerson index, {fmt} (build)"]
            print(f"{fmt}: peak memory {naive['peak_mib'] / max(ours['peak_mib'], 0.1):.0f}x lower than naive, "
                  f"build {ours['seconds']:.1f}s (goal: >= 5x, <= 20 s)")

        print(f"\nDataLoader, 2 forked workers, {args.samples:,} random samples (per worker, MiB):")
        print(f"{'data':<18}{'worker':>7}{'RSS before':>12}{'RSS after':>11}{'PSS before':>12}{'PSS after':>11}"
              f"{'USS before':>12}{'USS after':>11}")
        for label, kind in [("naive list", "naive"), ("WebPerson index", "cached")]:
            r = run_child("workers", kind, json_path, str(args.samples))
            for w, worker in enumerate(r["workers"]):
                b, a = worker["before"], worker["after"]
                print(f"{label:<18}{w:>7}{b['rss']:>12.0f}{a['rss']:>11.0f}{b['pss']:>12.0f}{a['pss']:>11.0f}"
                      f"{b['uss']:>12.0f}{a['uss']:>11.0f}")
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    if args.parquet_images:
        parquet_section(args)


def parquet_section(args: argparse.Namespace) -> None:
    """Index vs Python lists on the hub's Parquet layout (its own folder, removed at the end)."""
    folder = tempfile.mkdtemp(prefix="webperson-parquet-bench-", dir=args.workdir)
    try:
        start = time.perf_counter()
        data = write_parquet(folder, args.parquet_images, args.words)
        size = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
        print(f"\nwrote {args.parquet_images:,} Parquet rows (10 files, 100-row groups, null image bytes) in "
              f"{time.perf_counter() - start:.1f}s: {size / 2**20:.0f} MiB")
        print(f"{'load':<38}{'time s':>8}{'peak RSS +MiB':>15}{'RSS after +MiB':>16}{'index MiB':>11}")
        rows = {}
        for label, kind in [("Python lists of the text columns", "naive"),
                            ("WebPerson index (build)", "build"),
                            ("WebPerson index (build+save)", "cached"),
                            ("WebPerson index (.npz reload)", "cached")]:
            r = rows[label] = run_child("load", kind, data)
            index = f"{r['index_mib']:.1f}" if "index_mib" in r else "-"
            print(f"{label:<38}{r['seconds']:>8.2f}{r['peak_mib']:>15.0f}{r['rss_mib']:>16.0f}{index:>11}")
        naive, ours = rows["Python lists of the text columns"], rows["WebPerson index (build)"]
        print(f"Parquet: peak memory {naive['peak_mib'] / max(ours['peak_mib'], 0.1):.1f}x lower than the lists, "
              f"RSS after {naive['rss_mib'] / max(ours['rss_mib'], 0.1):.0f}x lower")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
