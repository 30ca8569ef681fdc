#!/usr/bin/env python
"""Memory and time of gradient caching (train.accum_steps) against one large batch, on the CPU.

One optimisation step of GA-DMS pretraining (sdm+mlm, GASS on, fp32, one thread) of
the tiny preset at 128x64, measured in a fresh process per variant, rounds
interleaved:

* batch 32, K=1 (the whole batch in one graph);
* K=4 micro-batches of 8 (gradient caching: the same effective batch, SDM exact);
* batch 8, K=1 (what one micro-batch alone costs).

Printed per variant: the steps' peak memory above the resident size of the built model
and batches (peak RSS from getrusage; plain SGD, so no optimiser state), and the CPU
time of a step (median of the timed steps after one warm-up); the median and spread
over rounds, and the time relative to the batch of 32.

    python bench/accum_memory.py [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"batch 32, K=1": (32, 1), "K=4 x 8 (accum_steps=4)": (8, 4), "batch 8, K=1": (8, 1)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(micro: int, accum: int, steps: int) -> dict[str, float]:
    """One variant in this process: returns peak MiB above the pre-step resident size and CPU s per step."""
    sys.path.insert(0, str(REPO))
    import torch

    from bench.gpu_step import make_batch
    from model.build import build_model
    from processor.loop import TrainLoop
    from utils.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(None, ["model.clip.arch=tiny", "model.clip.pretrained=", "model.clip.image_size=[128, 64]",
                             "model.loss_names=sdm+mlm", "gass.num_layers=2", "model.cmt_depth=1",
                             f"train.accum_steps={accum}"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # Plain SGD keeps no optimiser state: what the steps add to the resident size is activations and gradients.
    loop = TrainLoop(model, [], torch.optim.SGD(model.parameters(), lr=1e-4), accum_steps=accum)
    batches = [make_batch(micro, (128, 64), torch.device("cpu"), seed) for seed in range(accum)]

    def step() -> None:
        loop.step(batches[0]) if accum == 1 else loop.accumulated_step(batches)

    before = _rss_mib()
    step()  # warm-up (its peak counts: the same work as the timed steps)
    times = []
    for _ in range(steps):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_mib": peak - before, "cpu_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variant", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: MICRO ACCUM
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(*args.variant, args.steps)))
        return 0
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, (micro, accum) in VARIANTS.items():
            out = subprocess.run([sys.executable, __file__, "--variant", str(micro), str(accum), "--steps",
                                  str(args.steps)], capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"tiny preset at 128x64, sdm+mlm with GASS, fp32, 1 thread; {args.rounds} rounds (fresh process each) "
          f"x {args.steps} timed steps")
    print(f"{'variant':26s} {'step peak MiB':>20s} {'CPU s/step':>20s}")
    base = statistics.median(r["cpu_s"] for r in results["batch 32, K=1"])
    for name, rows in results.items():
        peaks, times = [r["peak_mib"] for r in rows], [r["cpu_s"] for r in rows]
        print(f"{name:26s} {statistics.median(peaks):8.0f} ({min(peaks):4.0f}-{max(peaks):4.0f})"
              f" {statistics.median(times):8.2f} ({min(times):.2f}-{max(times):.2f})"
              f"  {statistics.median(times) / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
