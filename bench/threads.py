#!/usr/bin/env python
"""Intra-op threads on a shared machine: one pretraining epoch with 1 thread, 2 threads and the automatic choice.

Writes a small synthetic corpus (the demo's sizes), then times one epoch of the
demo's pretraining config (``configs/demo/tiny_pretrain.yaml``, evaluation off)
in a fresh process per measurement, with ``num_threads`` set to each variant, on
an idle machine and beside ``--busy`` busy-looping processes (two by default: "a
machine others also use"). Variants and conditions are interleaved within each
round; the figures are the median and the range over ``--rounds`` rounds, with
the wall seconds of the epoch and the thread count the run chose (the automatic
choice reads how many other processes are running when it starts).

    python bench/threads.py [--rounds 3] [--busy 2] [--variants 1 2 auto] [--keep DIR]

On a 2-core machine the question is whether two OpenMP threads beside other work
wait for each other (spinning) so long that one thread is faster; the automatic
choice should match the faster fixed count in each condition.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EPOCH = r"""
import json, sys, time, torch
sys.path.insert(0, {repo!r})
from processor.engine import Trainer
from processor.pretrain import PretrainTask
from utils.config import load_config
cfg = load_config({config!r}, ["data.root=" + {data!r}, "eval.root=", "train.resume=", "output_dir=" + {out!r},
                               "eval.period=0", "solver.epochs=2", "num_threads=" + {threads!r}, "log_period=1000"])
trainer = Trainer(cfg, PretrainTask())
start = time.time()
trainer.train(until_epoch=1)
print(json.dumps({{"threads": torch.get_num_threads(), "epoch_s": time.time() - start}}))
"""

BUSY = "while True: pass"


def make_data(root: Path) -> None:
    from datasets.synthetic import SyntheticConfig, generate
    from tools.demo import SIZES

    generate(root, SyntheticConfig(**SIZES["full"].data, seed=0), workers=1)


def one_epoch(data: Path, out: Path, variant: str) -> dict:
    """Wall seconds of one epoch and the threads used, in a fresh process (OMP_NUM_THREADS unset)."""
    shutil.rmtree(out, ignore_errors=True)
    threads = "0" if variant == "auto" else variant
    code = EPOCH.format(repo=str(REPO), config=str(REPO / "configs" / "demo" / "tiny_pretrain.yaml"),
                        data=str(data), out=str(out), threads=threads)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} s ({min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="busy-looping processes in the loaded condition")
    parser.add_argument("--variants", nargs="+", default=["1", "2", "auto"], help="thread counts, or auto")
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_threads_"))
    try:
        data = work / "data"
        if not (data / "meta.json").exists():
            make_data(data)
        times: dict[tuple[str, str], list[float]] = {}
        chosen: dict[tuple[str, str], set[int]] = {}
        for round_ in range(args.rounds):
            for condition in ("idle", f"{args.busy} busy"):
                busy = [] if condition == "idle" else [subprocess.Popen([sys.executable, "-c", BUSY])
                                                       for _ in range(args.busy)]
                try:
                    time.sleep(1.0 if busy else 0.0)
                    for variant in args.variants:
                        got = one_epoch(data, work / "run", variant)
                        times.setdefault((condition, variant), []).append(got["epoch_s"])
                        chosen.setdefault((condition, variant), set()).add(got["threads"])
                        print(f"round {round_ + 1} {condition:7s} threads={variant:4s} -> {got['threads']} thread(s), "
                              f"{got['epoch_s']:.1f} s", flush=True)
                finally:
                    for process in busy:
                        process.kill()
                        process.wait()
        print(f"\none pretraining epoch of configs/demo/tiny_pretrain.yaml (full demo data), median (range) of "
              f"{args.rounds} rounds, {os.cpu_count()} cores")
        for (condition, variant), values in times.items():
            used = ",".join(map(str, sorted(chosen[(condition, variant)])))
            print(f"  {condition:7s} num_threads={variant:4s} (ran {used} thread(s)): {summary(values)}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
