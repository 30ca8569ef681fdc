#!/usr/bin/env python
"""Pretrain the tiny CLIP preset as OpenAI pretrained CLIP: plain contrastive learning on a generic corpus.

    python tools/pretrain_backbone.py --data data/synthetic --out tiny_clip.pt
    python tools/pretrain_backbone.py --data data/synthetic --epochs 4 --threads 2   # faster, weaker
    python tools/test.py --config configs/demo/tiny_pretrain.yaml --checkpoint tiny_clip.pt   # zero-shot again

GA-DMS starts from OpenAI's pretrained ViT-B/16, whose image-text alignment is what
GASS reads; the demo's tiny model has no such starting point unless one is made.
This tool makes it with `processor.backbone.make_backbone`: CLIP's own recipe
(symmetric InfoNCE with a learned temperature, logit_scale initialised to ln(1/0.07)
and clamped at ln(100)) on a generic synthetic corpus
(`datasets.synthetic.generic_corpus`: its own identities, none of them within one
attribute of a benchmark or WebPerson identity of `--data`, and clean captions worded
more broadly than the benchmark's, web alt-text included). The file is an OpenAI-keyed
state dict with `logit_scale`, so `model.clip.pretrained=<file>` loads it exactly as it
loads ViT-B-16.pt (the temperature is dropped with a log line).

The backbone is cached under `--cache-dir` (default ~/.cache/gadms/backbones) by the
hash of its settings (and of the identities left out): a second call with the same
settings reuses it, any other setting makes another file. Writes are atomic, and
concurrent makers wait on a lock instead of training twice. With `--data`, its
zero-shot retrieval on the synthetic benchmark's test split is printed (the
analogue of the paper's "plain CLIP" row), and, when the corpus has a noise report,
how well its token scores find the corrupted words (GASS, CSS, random; per kind).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.clip import clip_preset  # noqa: E402
from processor.backbone import (  # noqa: E402
    DEFAULT_CACHE,
    BackboneSettings,
    backbone_noise_auc,
    eval_config,
    make_backbone,
    settings_for,
    zero_shot,
)
from processor.noise_detection import NOISE_KINDS, load_noise_report  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.metrics import format_table  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.threads import apply_threads  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BackboneSettings()
    parser.add_argument("--out", default=None, help="also write the backbone to this file (new, or the same bytes)")
    parser.add_argument("--data", default=None,
                        help="synthetic data root: its identities are left out of the corpus, and the backbone "
                             "is evaluated zero-shot on its benchmark (and its noise report, if any)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the generic corpus")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="corpus and training seed")
    parser.add_argument("--images", type=int, default=defaults.images, help="generic images (one identity each)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per contrastive step")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch threads while training (part of the settings: the weights depend on it)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where backbones are kept by settings hash")
    parser.add_argument("--workers", type=int, default=2, help="processes drawing the corpus (no effect on results)")
    parser.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation on --data")
    parser.add_argument("overrides", nargs="*",
                        help="overrides of the evaluation config (configs/demo/tiny_pretrain.yaml), key=value, "
                             "e.g. gass.num_layers=4 gass.attn_norm=attention")
    return parser.parse_args(argv)


def format_auc_table(results: dict[str, dict[str, float]]) -> str:
    """`scorer | all | wrong_attr | irrelevant | captions` rows."""
    lines = [f"{'scorer':<8} {'all':>6} " + " ".join(f"{k:>11}" for k in NOISE_KINDS) + "  captions"]
    for name, row in results.items():
        lines.append(f"{name:<8} {row['all']:6.3f} " + " ".join(f"{row[k]:11.3f}" for k in NOISE_KINDS)
                     + f"  {int(row['captions']):8d}")
    return "\n".join(lines)


def _copy_out(path: Path, out: str) -> None:
    target = Path(out)
    data = path.read_bytes()
    if target.exists():
        if target.is_file() and target.read_bytes() == data:
            return
        raise ToolError(f"--out {out} exists and is not this backbone; choose a new file name (nothing was "
                        "overwritten)")
    atomic_write(target, lambda f: f.write(data))


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_path(args.out, "--out")
    if args.data is not None and not Path(args.data).is_dir():
        raise ToolError(f"--data {args.data} is not a folder (make one with tools/make_synthetic.py)")
    if args.epochs < 1:
        raise ToolError(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        raise ToolError(f"--threads must be >= 1, got {args.threads}")
    if not 2 <= args.batch_size <= args.images:
        raise ToolError(f"--batch-size must be in 2..--images ({args.images}), got {args.batch_size}")
    setup_logging(None, console_level=logging.WARNING)
    apply_threads(0)
    settings, exclude = settings_for(args.data, epochs=args.epochs, seed=args.seed, images=args.images,
                                     batch_size=args.batch_size, threads=args.threads)
    start = time.time()
    path, record = make_backbone(settings, args.cache_dir, exclude=exclude, workers=args.workers)
    what = (f"trained in {time.time() - start:.0f}s" if record["trained"]
            else f"reused (trained earlier in {record['seconds']:.0f}s)")
    last = record["history"][-1]
    print(f"backbone {path}: {what}; {settings.images} generic images, {settings.epochs} epochs, "
          f"{record['excluded_identities']} identities of --data left out; final loss {last['loss']:.3f}, "
          f"logit scale {last['logit_scale']:.1f}")
    if args.out:
        _copy_out(path, args.out)
        print(f"written to {args.out}")
    if args.data is not None and not args.no_eval:
        metrics = zero_shot(path, args.data, overrides=args.overrides)
        print(format_table({"pretrained backbone (zero-shot), test t2i": metrics}))
        if load_noise_report(args.data) is not None:
            aucs, preference = backbone_noise_auc(path, args.data, overrides=args.overrides)
            gass = eval_config(args.data, args.overrides).gass
            print(f"noise detection (per-caption AUC of clean over corrupted words; 0.5 = chance; GASS on the last "
                  f"{gass.num_layers} of {clip_preset(settings.arch)['transformer_layers']} text layers, "
                  f"attn_norm {gass.attn_norm}, normalize {gass.normalize}):")
            print(format_auc_table(aucs))
            print("clean caption closer to the image than its corrupted version: "
                  + ", ".join(f"{k} {preference[k]:.3f}" for k in ("all", *NOISE_KINDS)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
