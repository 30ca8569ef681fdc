#!/usr/bin/env python
"""Draw text-to-image retrieval results: per query, its top-k gallery images.

    python tools/visualize_retrieval.py --run RUN --dataset CUHK-PEDES \\
        --root data/synthetic [--split test] [--num-queries 4 | --query-index 0 17 ...] --out retrieval.png
    python tools/visualize_retrieval.py --checkpoint RUN/last.pth --dataset CUHK-PEDES ... --out retrieval.png

--run draws from the checkpoint the run selected for the dataset shown
(`best_<dataset>.pth`, kept by R1 on its selection split), or from `last.pth`
when the run wrote none for that dataset; it prints which. --checkpoint names
the file itself.

Each query is a block: the caption (wrapped) above a row holding one image of
the query's identity (grey frame, for reference) and the top-k ranked gallery
images, framed green when the image shows the query's identity and red when
not, with rank, cosine score and pid under each. Queries are caption indices of
the split; without --query-index they are spread evenly over the split. The
figure is `processor.retrieval_figure.draw_retrieval_figure`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from processor.retrieval_figure import (  # noqa: E402
    QueryResult,
    describe_result,
    draw_retrieval_figure,
    selected_checkpoint,
)
from utils.cli import run_tool  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="retrieval checkpoint")
    source.add_argument("--run", help="run directory: draw with its best_<dataset>.pth, else its last.pth")
    parser.add_argument("--config", default=None, help="config YAML (default: config.yaml next to the checkpoint)")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. CUHK-PEDES")
    parser.add_argument("--root", default=None, help="data root (default: eval.root or data.root of the config)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split to query")
    parser.add_argument("--num-queries", type=int, default=4, help="queries spread evenly over the split")
    parser.add_argument("--query-index", type=int, nargs="+", default=None, help="caption indices to show")
    parser.add_argument("--topk", type=int, default=10, help="ranked images per query")
    parser.add_argument("--thumb-height", type=int, default=128, help="thumbnail height (px)")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--trust", action="store_true", help="allow checkpoints that need full unpickling")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[QueryResult]:
    """Rank, print and draw as the parsed arguments say."""
    checkpoint = args.checkpoint
    if args.run is not None:
        checkpoint, why = selected_checkpoint(args.run, args.dataset)
        print(f"checkpoint: {checkpoint} ({why})")
    results = draw_retrieval_figure(checkpoint, args.dataset, args.out, config=args.config, root=args.root,
                                    split=args.split, num_queries=args.num_queries, query_indices=args.query_index,
                                    topk=args.topk, thumb_height=args.thumb_height, trust=args.trust,
                                    overrides=args.overrides)
    for result in results:
        print(describe_result(result))
    print(f"saved {args.out}")
    return results


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
