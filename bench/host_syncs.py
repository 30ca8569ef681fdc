#!/usr/bin/env python
"""Host-device syncs per training step, counted (utils.host_sync.HostSyncCounter).

Builds a real run (the Trainer, its loader, hooks and the task) on a small
synthetic corpus with the tiny preset, and counts, for each optimisation step, the
torch calls that would make the host wait for the device on a GPU (`.item()`,
`float(t)`, `.tolist()`, `.cpu()`, boolean-mask indexing, ...), made by the step
and the hooks after it (loader iteration excluded). Steps where a log line is due
(`log_period`) are reported apart: they read the logged values once.

Configurations: pretraining (sdm+mlm, GASS on) and fine-tuning (sdm+id+mlm), each
with the default optimiser (AdamW, foreach) and with `solver.fused=true` (the fused
kernel, which can skip a non-finite step on the device).

    python bench/host_syncs.py [--steps 12] [--log-period 5] [--sites]

Runs on the CPU in about a minute; the counts are the same on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "pretrain (sdm+mlm, GASS)": ("configs/demo/tiny_pretrain.yaml", "pretrain"),
    "finetune (sdm+id+mlm)": ("configs/demo/tiny_finetune.yaml", "finetune"),
}


def measure(config: str, task_name: str, data: Path, out: Path, steps: int, log_period: int,
            fused: bool) -> tuple[list[int], list[int], dict[str, int]]:
    """Syncs per step (steps without and with a log line) and per call site, for one configuration."""
    import torch

    from processor.engine import Trainer
    from processor.finetune import FinetuneTask
    from processor.pretrain import PretrainTask
    from utils.config import load_config
    from utils.host_sync import PerStep

    torch.set_num_threads(1)
    cfg = load_config(str(REPO / config), [f"data.root={data}", f"output_dir={out}", "data.batch_size=8",
                                           f"log_period={log_period}", f"train.max_steps={steps}",
                                           "solver.epochs=2", "solver.warmup_epochs=0", "eval.period=0", "data.num_workers=0",
                                           f"solver.fused={str(fused).lower()}", "model.finetune="])
    trainer = Trainer(cfg, PretrainTask() if task_name == "pretrain" else FinetuneTask())
    per_step = PerStep(root=REPO)
    trainer.loop.step_context = per_step
    trainer.train()
    plain, logged, sites = [], [], {}
    for i, counter in enumerate(per_step.steps):
        position = i % steps + 1  # the epoch's batches: steps per epoch (train.max_steps)
        (logged if position % log_period == 0 or position == steps else plain).append(counter.total)
        for site, n in counter.sites.items():
            sites[site] = sites.get(site, 0) + n
    return plain, logged, sites


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-period", type=int, default=5)
    parser.add_argument("--sites", action="store_true", help="also print the call sites")
    args = parser.parse_args(argv)

    from datasets.synthetic import SyntheticConfig, generate

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        generate(data, SyntheticConfig(identities=24, images_per_id=3, val_ids=8, test_ids=8, webperson_images=128,
                                       shard_size=64, seed=3), workers=1)
        print(f"host-device syncs per optimisation step (step + after-step hooks), 2 epochs x {args.steps} steps, "
              f"log line every {args.log_period}")
        print(f"{'configuration':32s} {'optimiser':8s} {'plain step':>12s} {'log step':>10s}")
        for label, (config, task) in CONFIGS.items():
            for fused in (False, True):
                out = Path(tmp) / f"{task}-{fused}"
                plain, logged, sites = measure(config, task, data, out, args.steps, args.log_period, fused)
                med = statistics.median(plain) if plain else float("nan")
                print(f"{label:32s} {'fused' if fused else 'foreach':8s} {med:>6.0f} "
                      f"[{min(plain)}-{max(plain)}] {statistics.median(logged):>10.0f}")
                if args.sites:
                    for site, n in sorted(sites.items(), key=lambda kv: -kv[1]):
                        print(f"    {n / (len(plain) + len(logged)):6.1f}/step  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
