"""The retrieval figure: per text query, its top-k gallery images, framed green (its identity) or red.

Each query is a block: the caption (wrapped) above a row holding one image of
the query's identity (grey frame, for reference) and the top-k ranked gallery
images, with rank, cosine score and pid under each. :func:`draw_retrieval_figure`
makes the whole figure from a checkpoint; :func:`selected_checkpoint` is the
checkpoint a run selected for a dataset (tools/visualize_retrieval.py, tools/demo.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from datasets import build_dataset
from datasets.bases import EvalSplit
from processor.evaluate import build_evaluator
from processor.inference import image_size_of, image_thumbnail, load_run_model
from utils.errors import UserInputError
from utils.output_paths import check_output_path
from utils.visualize import (
    BLACK,
    GREEN,
    GREY,
    RED,
    WHITE,
    check_thumb_height,
    checked_indices,
    draw_frame,
    evenly_spaced,
    load_font,
    save_png,
    text_size,
    wrap_text,
)

__all__ = ["QueryResult", "RetrievalFigureError", "RetrievalLayout", "choose_queries", "describe_result",
           "draw_retrieval_figure", "make_layout", "rank_queries", "render", "selected_checkpoint"]

FONT_SIZE = 15
SMALL_FONT_SIZE = 13
TEXT_LINES = 3


class RetrievalFigureError(UserInputError, ValueError):
    """Queries that cannot be shown: no run checkpoint, no such split, an index out of range, a bad top-k."""


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
            canvas.paste(image_thumbnail(split.img_paths[gallery_index], inner), (x0 + layout.frame, y0 + layout.frame))
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
    chosen = checked_indices(num_captions, indices, num, where="the split", index_flag="--query-index",
                             num_flag="--num-queries", error=RetrievalFigureError)
    return chosen if chosen is not None else evenly_spaced(num_captions, num)


def selected_checkpoint(run_dir: str, dataset: str) -> tuple[str, str]:
    """The checkpoint of `run_dir` to draw `dataset` with, and why: `best_<dataset>.pth`, else `last.pth`.

    Raises:
        RetrievalFigureError: `run_dir` is not a folder, or holds neither file.
    """
    if not os.path.isdir(run_dir):
        raise RetrievalFigureError(f"run directory {run_dir} not found")
    best = os.path.join(run_dir, f"best_{dataset}.pth")
    if os.path.isfile(best):
        return best, f"the run's selected checkpoint for {dataset}"
    last = os.path.join(run_dir, "last.pth")
    if os.path.isfile(last):
        return last, f"the run wrote no best_{dataset}.pth"
    raise RetrievalFigureError(f"run directory {run_dir} holds neither best_{dataset}.pth nor last.pth")


# --------------------------------------------------------------------------- the whole figure


def describe_result(result: QueryResult) -> str:
    """One line: the query, its top-k as + (its identity) and - (another), and the first correct rank."""
    marks = " ".join("+" if ok else "-" for ok in result.correct)
    return (f"query {result.index} (pid {result.pid}): top-{len(result.ranked)} [{marks}]; "
            f"first correct at rank {result.first_correct}")


def draw_retrieval_figure(checkpoint: str, dataset: str, out: str, *, config: str | None = None,
                          root: str | None = None, split: str = "test", num_queries: int = 4,
                          query_indices: list[int] | None = None, topk: int = 10, thumb_height: int = 128,
                          trust: bool = False, overrides: Sequence[str] = ()) -> list[QueryResult]:
    """Rank the gallery of `dataset`'s `split` for some of its captions and draw the figure to the PNG `out`.

    Args:
        checkpoint: the retrieval checkpoint; its config is `config`, else the `config.yaml` beside it.
        root: data root (default: `eval.root`, else `data.root` of the config).
        num_queries, query_indices: the queries: `query_indices` (caption indices), else
            `num_queries` spread evenly over the split.
        topk: ranked images per query.
        thumb_height: thumbnail height (px).
        overrides: config overrides, key=value.

    Returns:
        The drawn queries with their ranked images.

    Raises:
        UserInputError: a bad size, output path, checkpoint, config, dataset, split or query index.
    """
    if topk < 1:
        raise RetrievalFigureError(f"--topk must be >= 1, got {topk}")
    check_thumb_height(thumb_height)
    check_output_path(out, "--out")
    cfg, model, device = load_run_model(checkpoint, config, list(overrides), trust=trust)
    root = root or cfg.eval.root or cfg.data.root
    try:
        shown = getattr(build_dataset(dataset, root), split)
    except (ValueError, OSError) as err:
        raise RetrievalFigureError(str(err)) from err
    if shown is None:
        raise RetrievalFigureError(f"{dataset} has no {split} split")
    queries = choose_queries(len(shown.captions), query_indices, num_queries)
    feats = build_evaluator(cfg, {dataset: shown}, device).extract(model, shown)
    k = min(topk, len(shown.img_paths))
    results = rank_queries(feats, shown, queries, k)
    layout = make_layout(image_size_of(cfg), thumb_height, k)
    title = f"{dataset} {split}: text-to-image top-{k} ({os.path.basename(checkpoint)})"
    save_png(render(results, shown, layout, title), out)
    return results
