#!/usr/bin/env python
"""Evaluate a checkpoint (ours, the GA-DMS authors' or IRRA's) on configured benchmarks.

    python tools/test.py --config RUN/config.yaml --checkpoint RUN/best_CUHK-PEDES.pth [key=value ...]
    python tools/test.py --config configs/finetune/cuhkpedes.yaml --checkpoint best0.pth eval.datasets=[CUHK-PEDES]

Any checkpoint evaluates with any config: ours, the GA-DMS authors' or IRRA's
(pretraining or fine-tuning), or OpenAI's CLIP file (zero-shot). Only the
backbone is built and it must match the checkpoint exactly; the MLM branch and
the ID classifier are not used by evaluation.

It prints one table; with --record it also appends the results (`type: test`
records) to `<output_dir>/metrics.jsonl` of the config, where tools/make_tables.py
finds them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from processor.evaluate import build_evaluator, eval_splits  # noqa: E402
from processor.inference import load_for_evaluation  # noqa: E402
from utils.cli import run_tool  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.metrics import format_table  # noqa: E402
from utils.metrics_log import append_metrics  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.threads import apply_threads  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.yaml or any experiment YAML")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file to evaluate")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split to evaluate")
    parser.add_argument("--trust", action="store_true", help="allow checkpoints that need full unpickling")
    parser.add_argument("--record", action="store_true",
                        help="append the results to <output_dir>/metrics.jsonl of the config (for make_tables.py)")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. eval.datasets=[RSTPReid]")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides) + ["model.clip.pretrained="])
    record = Path(cfg.output_dir) / "metrics.jsonl"
    if args.record:
        check_output_path(record, f"--record (output_dir={cfg.output_dir})")
    setup_logging(None, console_level=logging.INFO)
    apply_threads(cfg.num_threads, data_workers=cfg.data.num_workers)
    model = load_for_evaluation(cfg, args.checkpoint, trust=args.trust)
    device = resolve_device(cfg.device)
    model.to(device).eval()

    splits = eval_splits(cfg, args.split)
    evaluator = build_evaluator(cfg, splits, device)
    start = time.time()
    # The evaluator logs a table per set (for a training run's log); this tool prints one table of them all.
    evaluator_log = logging.getLogger("processor.evaluate")
    level = evaluator_log.level
    evaluator_log.setLevel(logging.WARNING)
    try:
        with torch.inference_mode():
            results = evaluator.evaluate(model)
    finally:
        evaluator_log.setLevel(level)
    rows = {f"{name} {task}": m for name, tasks in results.items() for task, m in tasks.items()}
    print(format_table(rows))
    print(f"evaluated {args.checkpoint} in {time.time() - start:.1f}s")
    if args.record:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        for name, tasks in results.items():
            for task, m in tasks.items():
                append_metrics(cfg.output_dir, {"type": "test", "checkpoint": str(args.checkpoint), "dataset": name,
                                                "split": args.split, "task": task,
                                                **{k: m[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}})
        print(f"recorded in {record}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
