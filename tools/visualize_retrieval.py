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
the split; without --query-index they are spread evenly over the split.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from datasets import build_dataset  # noqa: E402
from datasets.bases import EvalSplit, ImageReadError, open_image  # noqa: E402
from processor.evaluate import build_evaluator  # noqa: E402
from processor.inference import image_size_of, load_run_model  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.visualize import (  # noqa: E402
    BLACK,
    GREEN,
    GREY,
    RED,
    WHITE,
    check_thumb_height,
    draw_frame,
    fit_thumbnail,
    load_font,
    save_png,
    text_size,
    wrap_text,
)

FONT_SIZE = 15
SMALL_FONT_SIZE = 13
TEXT_LINES = 3


@dataclass(frozen=True)
class RetrievalLayout:
    """Pixel geometry of the figure; every query block has the same height.

    Column -1 is the reference image of the query's identity, columns 0..k-1
    the ranked results.
    """

    thumb_w: int
    thumb_h: int
    k: int
    line_h: int
    frame: int = 4
    gap: int = 10
    margin: int = 14
    ref_gap: int = 26
    text_lines: int = TEXT_LINES

    @property
    def header_h(self) -> int:
        return self.margin + 2 * (self.line_h + 4) + 8

    @property
    def cell_w(self) -> int:
        return max(self.thumb_w + 2 * self.frame, 86) + self.gap

    @property
    def block_h(self) -> int:
        return self.text_lines * (self.line_h + 2) + 6 + self.thumb_h + 2 * self.frame + 2 * self.line_h + 18

    @property
    def width(self) -> int:
        return 2 * self.margin + (self.k + 1) * self.cell_w + self.ref_gap

    def height(self, rows: int) -> int:
        return self.header_h + rows * self.block_h + self.margin

    def text_origin(self, row: int) -> tuple[int, int]:
        return self.margin, self.header_h + row * self.block_h

    def frame_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive, of the framed thumbnail of a cell."""
        x = self.margin + (col + 1) * self.cell_w + (self.ref_gap if col >= 0 else 0)
        y = self.header_h + row * self.block_h + self.text_lines * (self.line_h + 2) + 6
        return x, y, x + self.thumb_w + 2 * self.frame, y + self.thumb_h + 2 * self.frame


def make_layout(image_size: tuple[int, int], thumb_height: int, k: int) -> RetrievalLayout:
    """The layout for model input `image_size` (H, W), thumbnails `thumb_height` px tall, top-`k`."""
    thumb_w = max(24, round(thumb_height * image_size[1] / image_size[0]))
    return RetrievalLayout(thumb_w=thumb_w, thumb_h=thumb_height, k=k, line_h=text_size(load_font(FONT_SIZE), "Hg")[1])


@dataclass
class QueryResult:
    """A query caption and its ranked gallery indices, scores and correctness."""

    index: int
    caption: str
    pid: int
    ranked: list[int]
    scores: list[float]
    correct: list[bool]
    first_correct: int | None


def rank_queries(feats: dict[str, torch.Tensor], split: EvalSplit, query_indices: list[int],
                 k: int) -> list[QueryResult]:
    """Top-k gallery images of the chosen queries from extracted features (cosine, stable order)."""
    text = feats["text_feats"][query_indices].float().cpu()
    sim = text @ feats["image_feats"].float().cpu().T
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices
    image_pids = np.asarray(split.image_pids)
    out = []
    for row, q in enumerate(query_indices):
        pid = int(split.caption_pids[q])
        full = order[row].tolist()
        hits = image_pids[full] == pid
        first = int(np.argmax(hits)) + 1 if hits.any() else None
        top = full[:k]
        out.append(QueryResult(index=q, caption=split.captions[q], pid=pid, ranked=top,
                               scores=[float(sim[row, j]) for j in top], correct=[bool(h) for h in hits[:k]],
                               first_correct=first))
    return out


def _thumb(path: str, size: tuple[int, int]) -> Image.Image:
    try:
        return fit_thumbnail(open_image(path), size)
    except ImageReadError:
        return Image.new("RGB", size, GREY)


def render(results: list[QueryResult], split: EvalSplit, layout: RetrievalLayout, title: str) -> Image.Image:
    """The figure: a header with the legend, then one block per query."""
    font, small, bold = load_font(FONT_SIZE), load_font(SMALL_FONT_SIZE), load_font(FONT_SIZE + 1)
    canvas = Image.new("RGB", (layout.width, layout.height(len(results))), WHITE)
    draw = ImageDraw.Draw(canvas)
    m = layout.margin
    draw.text((m, m), title, fill=BLACK, font=bold)
    y = m + layout.line_h + 6
    x = m
    for colour, label in ((GREEN, "same identity as the query (correct)"), (RED, "other identity (wrong)"),
                          (GREY, "an image of the query's identity (reference)")):
        draw_frame(draw, (x, y, x + 16, y + layout.line_h), colour, 3)
        draw.text((x + 22, y), label, fill=BLACK, font=small)
        x += 22 + text_size(small, label)[0] + 24
    draw.text((x, y), "under each: rank, cosine score, pid", fill=GREY, font=small)

    first_image = {}
    for j, pid in enumerate(np.asarray(split.image_pids).tolist()):
        first_image.setdefault(int(pid), j)
    inner = (layout.thumb_w, layout.thumb_h)
    for row, res in enumerate(results):
        tx, ty = layout.text_origin(row)
        found = f"first correct at rank {res.first_correct}" if res.first_correct else "no correct image"
        head = f"query {res.index} (pid {res.pid}, {found}): \"{res.caption}\""
        for line in wrap_text(head, font, layout.width - 2 * m, max_lines=layout.text_lines):
            draw.text((tx, ty), line, fill=BLACK, font=font)
            ty += layout.line_h + 2
        cells = [(-1, first_image.get(res.pid), None, GREY)]
        cells += [(c, j, s, GREEN if ok else RED)
                  for c, (j, s, ok) in enumerate(zip(res.ranked, res.scores, res.correct))]
        for col, gallery_index, score, colour in cells:
            box = layout.frame_box(row, col)
            x0, y0, x1, y1 = box
            if gallery_index is None:
                draw.text((x0, y0), "(no image)", fill=GREY, font=small)
                continue
            canvas.paste(_thumb(split.img_paths[gallery_index], inner), (x0 + layout.frame, y0 + layout.frame))
            draw_frame(draw, box, colour, layout.frame)
            label = "reference" if score is None else f"#{col + 1}  {score:.3f}"
            draw.text((x0, y1 + 3), label, fill=BLACK, font=small)
            draw.text((x0, y1 + 3 + layout.line_h), f"pid {int(split.image_pids[gallery_index])}", fill=GREY,
                      font=small)
        ref_x = layout.frame_box(row, 0)[0] - layout.ref_gap // 2 - layout.gap // 2
        _, y0, _, y1 = layout.frame_box(row, 0)
        draw.line((ref_x, y0, ref_x, y1), fill=GREY, width=1)
    return canvas


def choose_queries(num_captions: int, indices: list[int] | None, num: int) -> list[int]:
    """Explicit caption indices (checked), or `num` indices spread evenly over the split."""
    if num_captions == 0:
        raise ToolError("the split has no captions")
    if indices:
        bad = [i for i in indices if not 0 <= i < num_captions]
        if bad:
            raise ToolError(f"--query-index {bad[0]} out of range: the split has {num_captions} captions")
        return list(indices)
    if num < 1:
        raise ToolError(f"--num-queries must be >= 1, got {num}")
    return sorted({int(round(x)) for x in np.linspace(0, num_captions - 1, min(num, num_captions))})


def selected_checkpoint(run_dir: str, dataset: str) -> tuple[str, str]:
    """The checkpoint of `run_dir` to draw `dataset` with, and why: `best_<dataset>.pth`, else `last.pth`.

    Raises:
        ToolError: `run_dir` is not a folder, or holds neither file.
    """
    if not os.path.isdir(run_dir):
        raise ToolError(f"run directory {run_dir} not found")
    best = os.path.join(run_dir, f"best_{dataset}.pth")
    if os.path.isfile(best):
        return best, f"the run's selected checkpoint for {dataset}"
    last = os.path.join(run_dir, "last.pth")
    if os.path.isfile(last):
        return last, f"the run wrote no best_{dataset}.pth"
    raise ToolError(f"run directory {run_dir} holds neither best_{dataset}.pth nor last.pth")


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
    if args.topk < 1:
        raise ToolError(f"--topk must be >= 1, got {args.topk}")
    check_thumb_height(args.thumb_height)
    check_output_path(args.out, "--out")
    checkpoint = args.checkpoint
    if args.run is not None:
        checkpoint, why = selected_checkpoint(args.run, args.dataset)
        print(f"checkpoint: {checkpoint} ({why})")
    cfg, model, device = load_run_model(checkpoint, args.config, args.overrides, trust=args.trust)
    root = args.root or cfg.eval.root or cfg.data.root
    try:
        split = getattr(build_dataset(args.dataset, root), args.split)
    except (ValueError, OSError) as err:
        raise ToolError(str(err)) from err
    if split is None:
        raise ToolError(f"{args.dataset} has no {args.split} split")
    queries = choose_queries(len(split.captions), args.query_index, args.num_queries)
    feats = build_evaluator(cfg, {args.dataset: split}, device).extract(model, split)
    k = min(args.topk, len(split.img_paths))
    results = rank_queries(feats, split, queries, k)
    for res in results:
        marks = " ".join("+" if ok else "-" for ok in res.correct)
        print(f"query {res.index} (pid {res.pid}): top-{k} [{marks}]; first correct at rank {res.first_correct}")
    layout = make_layout(image_size_of(cfg), args.thumb_height, k)
    title = f"{args.dataset} {args.split}: text-to-image top-{k} ({os.path.basename(checkpoint)})"
    print(f"saved {save_png(render(results, split, layout, title), args.out)}")
    return results


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
