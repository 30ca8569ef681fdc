#!/usr/bin/env python
"""Train GA-DMS: pretraining or fine-tuning, as the config's `task` says.

    python tools/train.py --config configs/pretrain/webperson_5m.yaml [key=value ...]
    python tools/train.py --config configs/finetune/cuhkpedes.yaml --finetune ckpt.pth [key=value ...]

Under torchrun every process runs this script (see pretrain.sh / finetune.sh).
Bad input (config, data, checkpoint, a busy run folder) is one `error:` line and
exit status 2; add --debug (or set GADMS_DEBUG=1) for the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.engine import Trainer  # noqa: E402
from processor.finetune import FinetuneTask  # noqa: E402
from processor.pretrain import PretrainTask  # noqa: E402
from utils import comm  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.metrics import format_table  # noqa: E402

TASKS = {"pretrain": PretrainTask, "finetune": FinetuneTask}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (inherits configs/base.yaml)")
    parser.add_argument("--finetune", default=None, help="initialise from this checkpoint (= model.finetune=...)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. solver.lr=1e-5")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.finetune:
        overrides.append(f"model.finetune={args.finetune}")
    cfg = load_config(args.config, overrides)
    if cfg.task not in TASKS:
        raise ToolError(f"unknown task {cfg.task!r}; valid: {', '.join(TASKS)}")
    main_process = comm.is_main_process()  # before cleanup, which makes every process "rank 0"
    try:
        trainer = Trainer(cfg, TASKS[cfg.task]())
        best = trainer.train()
    except BaseException:
        comm.cleanup(barrier=False)  # the other ranks may never reach a barrier
        raise
    comm.cleanup()
    if main_process:
        if best:
            rows = {f"{name} ({b['split']}, epoch {b['epoch']})": b for name, b in best.items()}
            rows.update({f"{name} test @ best": b["test"] for name, b in best.items() if "test" in b})
            print(format_table(rows))
        print(f"run directory: {trainer.run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
