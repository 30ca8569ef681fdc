#!/usr/bin/env python
"""Training samples per second per DataLoader worker (one core each), from three WebPerson sources.

    python bench/data_throughput.py [--images 256] [--rounds 3] [--batch 32] [--workers 1 2]
                                    [--baseline DIR] [--jpeg-draft] [--profile SOURCE]

Writes ~600x1000 "web" JPEGs with two captions each (smooth colour fields plus
sensor-like noise, ~60 KiB at quality 85) into a temporary folder as
(a) the hub's Parquet layout (``data/train-00000-of-00001.parquet``, 100-row
groups), (b) a JSON list with the images under ``images/``, and (c) webdataset
tar shards of person-size (384x128) JPEGs, the prepared form. Then, for each
source and worker count, in a fresh subprocess, one epoch of the pretraining
loader exactly as training builds it (``build_train_loader`` with the
pretraining defaults: IRRA augmentation, noise + informative masking from a
score cache, 77-token captions), and reports:

* per core: samples / CPU seconds of the worker processes (user + system, read
  from ``RUSAGE_CHILDREN`` once the epoch's workers have exited); each worker
  runs one torch thread, so this is the rate one core sustains;
* wall: samples / seconds of the epoch as seen by the training process
  (includes worker start; on a busy machine it only bounds the rate from below);
* the cores per GPU that 2,500 samples/s (one H100, ViT-B/16 at 384x128) needs.

Variants run interleaved round by round; figures are the median over rounds
with the min-max spread. ``--baseline DIR`` runs every variant also with the
code of another checkout (e.g. ``git archive HEAD~3 | tar -x -C DIR``), in the
same rounds, and prints its per-core rate relative to the current code;
``--jpeg-draft`` adds the opt-in reduced-scale JPEG decoding (``data.jpeg_draft``)
as a variant the same way. ``--profile SOURCE`` instead
runs cProfile over the per-sample path in one process (``dataset[i]`` and the
collate function of each batch, as a worker does) and prints the top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("parquet", "json", "tar")
LABELS = {"parquet": "(a) web JPEG, Parquet", "json": "(b) web JPEG, JSON + files",
          "tar": "(c) 384x128 JPEG, tar shards"}
TARGET_PER_GPU = 2500
WEB_SIZE = (600, 1000)  # width, height
PERSON_SIZE = (128, 384)
WORDS = ("the a woman man young person wearing black white red blue green dark light long short sleeve shirt "
         "jacket coat trousers jeans pants skirt dress shoes sneakers boots carrying holding bag backpack "
         "handbag hair ponytail glasses hat cap walking standing with and in on her his left right hand "
         "shoulder striped plaid grey brown yellow pink orange knee length loose tight logo front back").split()


# --------------------------------------------------------------------------- data


def web_image(rng: random.Random, size: tuple[int, int]):
    """A photo-like RGB image: a smooth colour field (upsampled 12x20 grid) plus mild noise."""
    import numpy as np
    from PIL import Image

    seed = rng.randrange(2**32)
    g = np.random.default_rng(seed)
    coarse = Image.fromarray(g.integers(0, 256, (20, 12, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(coarse).astype(np.int16) + g.integers(-6, 7, (size[1], size[0], 3), dtype=np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def jpeg_bytes(image, quality: int = 85) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def caption(rng: random.Random, i: int) -> str:
    return f"Person {i} is a " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45))) + "."


def write_sources(folder: str, num_images: int) -> dict[str, int]:
    """Write the three sources under ``folder/<source>/WebPerson``; returns mean bytes per JPEG."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    roots = {s: os.path.join(folder, s, "WebPerson") for s in SOURCES}
    os.makedirs(os.path.join(roots["json"], "images"))
    os.makedirs(os.path.join(roots["parquet"], "data"))
    os.makedirs(os.path.join(roots["tar"], "shards"))
    records, web, person = [], [], []
    with tarfile.open(os.path.join(roots["tar"], "shards", "shard-00000.tar"), "w") as tar:
        for i in range(num_images):
            image = web_image(rng, WEB_SIZE)
            rel, c1, c2 = f"part0/{i:06d}.jpg", caption(rng, i), caption(rng, i)
            data = jpeg_bytes(image)
            web.append(len(data))
            os.makedirs(os.path.join(roots["json"], "images", "part0"), exist_ok=True)
            with open(os.path.join(roots["json"], "images", rel), "wb") as f:
                f.write(data)
            records.append((rel, c1, c2, data))
            crop = jpeg_bytes(image.resize(PERSON_SIZE))
            person.append(len(crop))
            for name, payload in ((f"{i:06d}.jpg", crop), (f"{i:06d}.json", json.dumps(
                    {"caption1": c1, "caption2": c2}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with open(os.path.join(roots["json"], "WebPerson-1M.json"), "w") as f:
        json.dump([{rel: {"caption1": c1, "caption2": c2}} for rel, c1, c2, _ in records], f)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": d, "path": os.path.basename(r)} for r, _, _, d in records],
                                        image_type),
                      "image_path": [r for r, _, _, _ in records], "caption1": [c for _, c, _, _ in records],
                      "caption2": [c for _, _, c, _ in records]})
    pq.write_table(table, os.path.join(roots["parquet"], "data", "train-00000-of-00001.parquet"), row_group_size=100)
    return {"web": sum(web) // len(web), "person": sum(person) // len(person)}


# --------------------------------------------------------------------------- children


def build_loader(code: str, source_root: str, workers: int, batch: int, run_dir: str, draft: bool = False):
    """The pretraining loader of one source, built as training builds it."""
    from datasets.build import build_train_loader
    from datasets.score_cache import ScoreCache
    from datasets.webperson import WebPerson
    from model.tokenizer import Tokenizer
    from utils.config import load_config

    cfg = load_config(os.path.join(code, "configs", "pretrain", "webperson_1m.yaml"),
                      [f"data.batch_size={batch}", f"data.num_workers={workers}", "model.clip.pretrained="])
    if draft:
        # Reduced-scale JPEG decoding is opt-in and not (yet) a key of configs/base.yaml.
        cfg.data["jpeg_draft"] = True
    index = WebPerson(os.path.dirname(source_root), cache=False).train
    scores = ScoreCache(run_dir, len(index), cfg.data.text_length, init_value=cfg.gass.init_score)
    # Informative-mask probabilities depend on the scores: give them some spread, as after a few steps.
    import torch

    g = torch.Generator().manual_seed(0)
    scores.update(torch.arange(len(index)), torch.rand(len(index), cfg.data.text_length, generator=g))
    loader = build_train_loader(cfg, index, Tokenizer(), score_cache=scores)
    loader.sampler.set_epoch(0)
    loader.dataset.set_epoch(0)
    return loader


def child_measure(code: str, source_root: str, workers: int, batch: int, draft: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="throughput-run-") as run_dir:
        loader = build_loader(code, source_root, workers, batch, run_dir, draft)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        samples = sum(int(b["pids"].shape[0]) for b in loader)  # the iterator joins its workers at the end
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"samples": samples, "wall_s": wall, "worker_cpu_s": cpu}


def child_profile(code: str, source_root: str, batch: int, top: int) -> None:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="throughput-run-") as run_dir:
        loader = build_loader(code, source_root, 0, batch, run_dir)
        dataset, collate = loader.dataset, loader.collate_fn
        batches = list(loader.batch_sampler)
        collate([dataset[i] for i in batches[0]])  # warm the tokenizer and file caches
        profile = cProfile.Profile()
        start = time.process_time()
        profile.enable()
        for indices in batches:
            collate([dataset[i] for i in indices])
        profile.disable()
        seconds = time.process_time() - start
    n = sum(len(b) for b in batches)
    print(f"{n} samples in {seconds:.2f} CPU s under cProfile ({1e3 * seconds / n:.2f} ms/sample, inflated)")
    pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def run_child(code: str, *args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=code)
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", code, *args],
                            capture_output=True, text=True, check=False, env=env, cwd=code)
    if result.returncode:
        raise RuntimeError(f"child {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})"


def report(results: dict, codes: dict[str, tuple[str, bool]], workers: list[int]) -> None:
    print(f"\n{'source':<30}{'code':<9}{'workers':>8}{'per core /s (min-max)':>24}{'wall /s (min-max)':>22}"
          f"{'cores for 2500/s':>18}")
    for source in SOURCES:
        for name in codes:
            for w in workers:
                runs = results[(source, name, w)]
                per_core = [r["samples"] / r["worker_cpu_s"] for r in runs]
                wall = [r["samples"] / r["wall_s"] for r in runs]
                cores = TARGET_PER_GPU / statistics.median(per_core)
                print(f"{LABELS[source]:<30}{name:<9}{w:>8}{spread(per_core):>24}{spread(wall):>22}{cores:>18.1f}")
    for name in codes:
        if name == "current":
            continue
        print(f"\nper-core rate of {name} / current (median of per-round ratios, all worker counts):")
        for source in SOURCES:
            ratios = [c["samples"] / c["worker_cpu_s"] / (b["samples"] / b["worker_cpu_s"])
                      for w in workers for b, c in zip(results[(source, "current", w)], results[(source, name, w)],
                                                       strict=True)]
            print(f"  {LABELS[source]:<30}{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="images (two captions each) per source")
    parser.add_argument("--batch", type=int, default=32, help="samples per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline", default=None, help="another checkout to measure in the same rounds")
    parser.add_argument("--jpeg-draft", action="store_true", help="also measure data.jpeg_draft (opt-in)")
    parser.add_argument("--profile", choices=SOURCES, default=None, help="cProfile the per-sample path instead")
    parser.add_argument("--top", type=int, default=25, help="profile entries shown")
    parser.add_argument("--workdir", default=None, help="where to write the data (default: a temp dir, removed)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        code, mode, root, *rest = args.child
        sys.path.insert(0, code)
        if mode == "measure":
            print(json.dumps(child_measure(code, root, int(rest[0]), int(rest[1]), rest[2] == "1")))
        else:
            child_profile(code, root, int(rest[0]), int(rest[1]))
        return 0

    folder = args.workdir or tempfile.mkdtemp(prefix="throughput-bench-")
    try:
        start = time.perf_counter()
        sizes = write_sources(folder, args.images)
        print(f"wrote {args.images} images ({WEB_SIZE[0]}x{WEB_SIZE[1]} JPEG, mean {sizes['web'] / 1024:.0f} KiB; "
              f"384x128 crops {sizes['person'] / 1024:.0f} KiB) x 3 sources in {time.perf_counter() - start:.0f} s")
        roots = {s: os.path.join(folder, s, "WebPerson") for s in SOURCES}
        if args.profile:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", REPO, "profile",
                            roots[args.profile], str(args.batch), str(args.top)], check=True, env=env, cwd=REPO)
            return 0
        codes = {"current": (REPO, False)}
        if args.jpeg_draft:
            codes["draft"] = (REPO, True)
        if args.baseline:
            codes["baseline"] = (os.path.abspath(args.baseline), False)
        print(f"{2 * args.images} samples per epoch, batch {args.batch}, {args.rounds} rounds; pretraining loader "
              f"(configs/pretrain/webperson_1m.yaml), one torch thread per worker")
        results: dict = {}
        for _ in range(args.rounds):
            for source in SOURCES:
                for w in args.workers:
                    for name, (code, draft) in codes.items():
                        r = run_child(code, "measure", roots[source], str(w), str(args.batch), str(int(draft)))
                        results.setdefault((source, name, w), []).append(r)
        report(results, codes, args.workers)
    finally:
        if args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
