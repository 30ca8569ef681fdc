#!/usr/bin/env python
"""Show GASS token scores and the dual masks they induce, caption by caption.

    python tools/visualize_gass.py --checkpoint RUN/last.pth --dataset WebPerson --root data/synthetic \\
        --annotation annotations.json --split train --captions-from noise_report --num 8 --out gass.png
    python tools/visualize_gass.py --checkpoint RUN/last.pth --dataset CUHK-PEDES --index 0 5 9 --out gass.png

Each row: the image at the left; the caption's tokens (CLIP word pieces of one
word drawn touching, words spaced) shaded by their score (white = 0 -> dark
red = 1); tokens the noise mask replaces in the contrastive caption are boxed
grey and struck through; tokens the informative mask selects for masked-token
prediction are underlined blue. Masks are drawn with `datasets.masking` from
these scores and a fixed seed (`--seed`), with the config's masking constants.

Scores are `model.token_scores(model.encode_image(image), ids)` for the shown
captions as one batch, so with `gass.normalize=batch` (the released code) the
min-max normalisation spans the shown captions, as it spans the batch in
training. On the synthetic data, when `<root>/noise_report.json` exists, the
truly corrupted words of noisy captions get a red dot, and
`--captions-from noise_report` picks noisy captions. For val/test captions the
image is the first gallery image of the caption's identity. The figure is
`processor.gass_figure.draw_gass_figure`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.gass_figure import SELECTIONS, CaptionView, describe_view, draw_gass_figure  # noqa: E402
from utils.cli import run_tool  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="retrieval checkpoint")
    parser.add_argument("--config", default=None, help="config YAML (default: config.yaml next to the checkpoint)")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. CUHK-PEDES or WebPerson")
    parser.add_argument("--root", default=None, help="data root (default: data.root of the config)")
    parser.add_argument("--annotation", default=None, help="WebPerson annotation file or shard folder")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"], help="captions from this split")
    parser.add_argument("--num", type=int, default=8, help="number of captions")
    parser.add_argument("--index", type=int, nargs="+", default=None, help="caption indices within the split")
    parser.add_argument("--captions-from", default="spread", choices=SELECTIONS,
                        help="spread: evenly over the split; random (--seed); noise_report: corrupted captions")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mask generator (and of --captions-from random)")
    parser.add_argument("--width", type=int, default=1200, help="figure width (px)")
    parser.add_argument("--thumb-height", type=int, default=160, help="image thumbnail height (px)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--trust", action="store_true", help="allow checkpoints that need full unpickling")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. gass.normalize=sample")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[CaptionView]:
    """Compute, print and draw as the parsed arguments say."""
    views = draw_gass_figure(args.checkpoint, args.dataset, args.out, config=args.config, root=args.root,
                             annotation=args.annotation, split=args.split, num=args.num, indices=args.index,
                             captions_from=args.captions_from, seed=args.seed, width=args.width,
                             thumb_height=args.thumb_height, trust=args.trust, overrides=args.overrides)
    for view in views:
        print(describe_view(view))
    print(f"saved {args.out}")
    return views


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
