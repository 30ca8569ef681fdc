#!/usr/bin/env python
"""Throughput and memory of one GA-DMS pretraining step, per switch (GPU; CPU smoke test).

On CUDA: ViT-B/16 (random weights) at 384x128, sdm+mlm, bf16 autocast, AdamW,
a batch of 128 captions of 20-60 tokens. Variants, each a fresh model:

* GASS off / on (and on with `gass.precision=bf16`, and `tf32`);
* K=1 x 128 vs K=4 x 32 (`train.accum_steps`: gradient caching, same effective batch);
* compile off / on (`train.compile`, GASS on; the compile time is reported apart);
* the fused optimiser kernel (`solver.fused`; with it the step makes no host-device sync, see
  bench/host_syncs.py; the other variants read the finite-loss flag once per step).

Printed per variant: images/s (median over rounds, and the spread), the step's peak
GPU memory above what the model, its gradients and optimiser state hold before the
step, and GASS's share of the step (1 - time without / time with). Rounds are
interleaved (every variant once per round) so clock and thermal drift hit all alike.
On a machine without CUDA the same matrix runs on the tiny preset (64x32, batch 16,
K=4 x 4, fp32) as a smoke test; its times mean nothing for a GPU.

    python bench/gpu_step.py [--rounds 3] [--steps 8] [--warmup 3] [--no-compile] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from datasets.build import add_host_facts  # noqa: E402
from model.build import build_model  # noqa: E402
from processor.loop import TrainLoop  # noqa: E402
from solver.optim import build_optimizer  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.device import autocast_context  # noqa: E402

SOT, EOT, MASK = 49406, 49407, 49405
GPU = {"arch": "ViT-B/16", "image_size": (384, 128), "batch": 128, "micro": 32, "precision": "bf16"}
CPU = {"arch": "tiny", "image_size": (64, 32), "batch": 16, "micro": 4, "precision": "fp32"}
#: name -> config overrides (and the accumulation) of each variant.
VARIANTS = {
    "GASS off": ["gass.enabled=false"],
    "GASS on": [],
    "GASS on, gass.precision=bf16": ["gass.precision=bf16"],
    "GASS on, gass.precision=tf32": ["gass.precision=tf32"],
    "GASS on, K=4 (accum_steps)": ["train.accum_steps=4"],
    "GASS on, solver.fused": ["solver.fused=true"],
    "GASS on, train.compile": ["train.compile=true"],
}


def make_batch(size: int, image_size: tuple[int, int], device: torch.device, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(size, 77, dtype=torch.long)
    for b in range(size):
        n = int(torch.randint(20, 60, (1,), generator=g))
        ids[b, 0], ids[b, n + 1] = SOT, EOT
        ids[b, 1:n + 1] = torch.randint(1, MASK, (n,), generator=g)
    selected = (torch.rand(ids.shape, generator=g) < 0.3) & (ids > 0) & (ids < MASK)
    batch = {"images": torch.randint(0, 256, (size, 3, *image_size), generator=g, dtype=torch.uint8),
             "pids": torch.arange(size) // 2, "caption_ids": ids, "noise_ids": ids.clone(),
             "mlm_ids": ids.masked_fill(selected, MASK), "mlm_labels": torch.where(selected, ids, 0)}
    add_host_facts(batch)  # as the training loader does: the step reads nothing back from the device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Variant:
    """A model, optimiser and loop of one variant, and its measurements."""

    def __init__(self, name: str, overrides: list[str], setup: dict, device: torch.device) -> None:
        self.name = name
        cfg = load_config(None, [f"model.clip.arch={setup['arch']}", "model.clip.pretrained=",
                                 f"model.clip.image_size=[{setup['image_size'][0]}, {setup['image_size'][1]}]",
                                 "model.loss_names=sdm+mlm", "solver.optimizer=AdamW", "solver.eps=1e-8",
                                 f"precision={setup['precision']}", *overrides,
                                 *(["gass.num_layers=2"] if setup["arch"] == "tiny" else [])])
        torch.manual_seed(0)
        self.model = build_model(cfg).to(device).train()
        self.accum = int(cfg.train.accum_steps)
        size = setup["batch"] // self.accum
        self.batches = [make_batch(size, setup["image_size"], device, seed) for seed in range(self.accum)]
        self.loop = TrainLoop(self.model, [], build_optimizer(cfg, self.model), device=device,
                              autocast=lambda: autocast_context(device, cfg.precision), accum_steps=self.accum)
        self.device, self.images = device, setup["batch"]
        self.rates: list[float] = []
        self.peaks: list[float] = []
        self.first_step = 0.0

    def step(self) -> None:
        if self.accum == 1:
            self.loop.step(self.batches[0])
        else:
            self.loop.accumulated_step(self.batches)

    def measure(self, warmup: int, steps: int) -> None:
        for _ in range(warmup):
            start = time.perf_counter()
            self.step()
            _sync(self.device)
            self.first_step = self.first_step or time.perf_counter() - start
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            resident = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        self.rates.append(self.images * steps / (time.perf_counter() - start))
        if self.device.type == "cuda":
            self.peaks.append((torch.cuda.max_memory_allocated(self.device) - resident) / 2**30)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the first round")
    parser.add_argument("--no-compile", action="store_true", help="skip the train.compile variant")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), metavar="NAME",
                        help="run these variants only ('GASS off' and 'GASS on' are always run)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setup = GPU if device.type == "cuda" else CPU
    if device.type == "cpu":
        torch.set_num_threads(1)
    names = [n for n in VARIANTS if not (args.no_compile and "compile" in n)
             and (not args.only or n in args.only or n in ("GASS off", "GASS on"))]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test; 1 thread)"
    print(f"{where}; torch {torch.__version__}; {setup['arch']} at {setup['image_size'][0]}x{setup['image_size'][1]}, "
          f"batch {setup['batch']} (K=4: 4 x {setup['batch'] // 4}), sdm+mlm, {setup['precision']}, AdamW; "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up steps", flush=True)
    variants = []
    for name in names:
        start = time.perf_counter()
        variant = Variant(name, VARIANTS[name], setup, device)
        variant.measure(args.warmup, 1)  # warm-up (and compilation), then one timed step that is dropped
        variant.rates.clear()
        variant.peaks.clear()
        print(f"  ready: {name} (build + warm-up {time.perf_counter() - start:.1f}s, first step "
              f"{variant.first_step:.1f}s)", flush=True)
        variants.append(variant)
    for _ in range(args.rounds):
        for variant in variants:
            variant.measure(0, args.steps)
    off = statistics.median(next(v for v in variants if v.name == "GASS off").rates)
    print(f"\n{'variant':34s} {'images/s':>9s} {'spread':>13s} {'step peak GiB':>14s} {'vs GASS off':>12s}")
    for v in variants:
        rate = statistics.median(v.rates)
        peak = f"{statistics.median(v.peaks):.2f}" if v.peaks else "-"
        print(f"{v.name:34s} {rate:9.1f} {min(v.rates):6.1f}-{max(v.rates):<6.1f} {peak:>14s} {off / rate:11.2f}x")
    on = statistics.median(next(v for v in variants if v.name == "GASS on").rates)
    print(f"\nGASS share of the step (fp32 scoring): {1 - on / off:.1%} of the GASS-on step time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
