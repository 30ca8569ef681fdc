"""The GASS token-score figure: captions shaded by their token scores, with the dual masks they induce.

Each row: the image at the left; the caption's tokens (CLIP word pieces of one
word drawn touching, words spaced) shaded by their score (white = 0 -> dark
red = 1); tokens the noise mask replaces in the contrastive caption are boxed
grey and struck through; tokens the informative mask selects for masked-token
prediction are underlined blue. Masks are drawn with `datasets.masking` from
these scores and a fixed seed, with the config's masking constants; truly
corrupted words (the synthetic noise report) get a red dot.
:func:`draw_gass_figure` makes the whole figure from a checkpoint (tools/visualize_gass.py,
tools/demo.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from datasets.bases import ImageReadError, open_image
from datasets.masking import informative_mask, noise_mask
from datasets.transforms import build_transforms
from model.tokenizer import Tokenizer
from processor.inference import image_size_of, image_thumbnail, load_run_model, open_dataset
from processor.noise_detection import (
    NOISE_REPORT,
    CaptionSource,
    WordPiece,
    corrupted_positions,
    group_words,
    load_noise_report,
    match_noise_entries,
    token_pieces,
)
from utils.errors import UserInputError
from utils.output_paths import check_output_path
from utils.visualize import (
    BLACK,
    BLUE,
    GREY,
    LIGHT_GREY,
    RED,
    WHITE,
    check_thumb_height,
    checked_indices,
    draw_colour_bar,
    evenly_spaced,
    load_font,
    save_png,
    score_colour,
    text_colour_on,
    text_size,
    wrap_text,
)

__all__ = ["SELECTIONS", "CaptionView", "GassFigureError", "TokenView", "choose_indices", "compute_views",
           "describe_view", "draw_gass_figure", "render"]


#: How the captions are chosen: evenly over the split, at random, or the noisy ones of the noise report.
SELECTIONS = ("spread", "random", "noise_report")
DARK_GREY = (70, 70, 70)
#: Words after which the next word is drawn without a space ("t-shirt", "o'clock").
JOINERS = ("-", "'", "/")


class GassFigureError(UserInputError, ValueError):
    """Captions that cannot be shown: an empty split, an index out of range, no noise report, too narrow a figure."""


@dataclass
class TokenView(WordPiece):
    """One caption token as drawn."""

    score: float = 0.0
    noise_masked: bool = False
    mlm_selected: bool = False
    corrupted: bool = False


@dataclass
class CaptionView:
    """One row of the figure."""

    index: int
    pid: int
    image_path: str
    caption: str
    tokens: list[TokenView] = field(default_factory=list)
    noise: dict[str, Any] | None = None


# --------------------------------------------------------------------------- captions


def choose_indices(source: CaptionSource, *, indices: list[int] | None, how: str, num: int, seed: int,
                   noisy: dict[int, dict[str, Any]] | None) -> list[int]:
    """The caption indices to show."""
    n = len(source)
    chosen = checked_indices(n, indices, num, where=f"the {source.split} split", index_flag="--index",
                             num_flag="--num", error=GassFigureError)
    if chosen is not None:
        return chosen
    if how == "noise_report":
        if not noisy:
            raise GassFigureError(f"no caption of the {source.split} split is listed in {NOISE_REPORT}")
        keys = list(noisy)
        picks = np.linspace(0, len(keys) - 1, min(num, len(keys)))
        return [keys[int(round(p))] for p in picks]
    if how == "random":
        rng = np.random.default_rng(seed)
        return sorted(rng.choice(n, size=min(num, n), replace=False).tolist())
    return evenly_spaced(n, num)


# --------------------------------------------------------------------------- scores and masks


def compute_views(model: torch.nn.Module, cfg: Any, source: CaptionSource, indices: list[int], *,
                  tokenizer: Tokenizer, device: torch.device, seed: int,
                  noisy: dict[int, dict[str, Any]] | None = None) -> list[CaptionView]:
    """Scores, noise / informative masks and corrupted-word flags of the chosen captions (one batch)."""
    transform = build_transforms(image_size_of(cfg), is_train=False)
    rows = [source.get(i) for i in indices]
    try:
        images = torch.stack([transform(open_image(path)) for _, path, _ in rows]).to(device)
    except ImageReadError as err:
        raise GassFigureError(str(err)) from err
    ids = tokenizer.tokenize([caption for caption, _, _ in rows], cfg.data.text_length).to(device)
    with torch.no_grad():
        image_feats = model.encode_image(images)
    # GASS differentiates through the text tower, so no inference_mode here.
    scores = model.token_scores(image_feats, ids).float().cpu()
    ids = ids.cpu()
    m = cfg.masking
    generator = torch.Generator().manual_seed(seed)
    noisy_ids = noise_mask(ids, scores, generator, max_prob=m.noise_max_prob, slope=m.noise_slope,
                           center=m.noise_center, mask_ratio=m.mask_ratio, random_ratio=m.random_ratio,
                           force_one=m.noise_force_one)
    _, labels = informative_mask(ids, scores, generator, max_prob=m.mlm_max_prob, slope=m.mlm_slope,
                                 center=m.mlm_center, mask_ratio=m.mask_ratio, random_ratio=m.random_ratio)
    views = []
    for row, (i, (caption, path, pid)) in enumerate(zip(indices, rows)):
        entry = (noisy or {}).get(i)
        bad = corrupted_positions(tokenizer, ids[row].tolist(), entry.get("clean"), entry.get("words", ())) \
            if entry else set()
        tokens = [TokenView(p.position, p.text, p.word_end) for p in token_pieces(tokenizer, ids[row].tolist())]
        for t in tokens:
            t.score = float(scores[row, t.position])
            # The contrastive branch sees a different id exactly where noise masking replaced the token.
            t.noise_masked = bool(noisy_ids[row, t.position] != ids[row, t.position])
            t.mlm_selected = bool(labels[row, t.position] != 0)
            t.corrupted = t.position in bad
        views.append(CaptionView(index=i, pid=pid, image_path=path, caption=caption, tokens=tokens, noise=entry))
    return views


# --------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Style:
    font: Any
    small: Any
    bold: Any
    line_h: int
    pad: int = 3

    @property
    def box_h(self) -> int:
        return self.line_h + 6

    @property
    def pitch(self) -> int:
        # Room above each box for the corrupted-word dot and below for the MLM underline.
        return self.box_h + 14


def _flow(tokens: Sequence[TokenView], style: _Style, width: int) -> list[tuple[TokenView, int, int, int]]:
    """(token, x, line, box width) for every token, wrapping at `width`.

    Pieces of one word touch (padding only at the word's outer edges);
    punctuation hugs the previous word and a hyphen joins its neighbours;
    such a group wraps as a whole, so no line starts with a comma.
    """
    space = text_size(style.font, " ")[0] + 6
    units: list[list[tuple[int, int]]] = []  # per unit: (token index, box width)
    previous = ""
    for word in group_words(tokens):
        last = len(word) - 1
        boxes = [(i, text_size(style.font, tokens[i].text)[0] + (style.pad if k == 0 else 1)
                  + (style.pad if k == last else 1)) for k, i in enumerate(word)]
        word_text = "".join(tokens[i].text for i in word)
        if units and (not any(c.isalnum() for c in word_text) or previous in JOINERS):
            units[-1].extend(boxes)
        else:
            units.append(boxes)
        previous = word_text
    placed = []
    x, line = 0, 0
    for unit in units:
        start = x + space if x > 0 else 0
        if start + sum(w for _, w in unit) > width and x > 0:
            line, start = line + 1, 0
        for i, w in unit:
            placed.append((tokens[i], start, line, w))
            start += w
        x = start
    return placed


def _caption_height(view: CaptionView, style: _Style, text_w: int) -> int:
    placed = _flow(view.tokens, style, text_w)
    lines = (placed[-1][2] + 1) if placed else 1
    height = style.line_h + 8 + lines * style.pitch
    if view.noise and view.noise.get("clean"):
        height += len(wrap_text("clean: " + view.noise["clean"], style.small, text_w)) * (style.line_h + 1) + 4
    return height


def render(views: list[CaptionView], *, width: int, thumb_height: int, image_size: tuple[int, int], title: str,
           subtitle: str, show_noise_legend: bool) -> Image.Image:
    """The figure: title, legend with the colour bar, then one row per caption."""
    style = _Style(font=load_font(16), small=load_font(13), bold=load_font(17), line_h=text_size(load_font(16), "Hg")[1])
    margin = 14
    thumb_w = max(24, round(thumb_height * image_size[1] / image_size[0]))
    text_x = margin + thumb_w + 18
    text_w = width - text_x - margin
    if text_w < 200:
        raise GassFigureError(f"--width {width} is too small for thumbnails {thumb_w} px wide")
    row_heights = [max(thumb_height, _caption_height(v, style, text_w)) + 18 for v in views]
    subtitle_lines = wrap_text(subtitle, style.small, width - 2 * margin)
    header_h = margin + style.line_h + 6 + len(subtitle_lines) * (style.line_h + 1) + 10 + 2 * style.pitch + 24
    canvas = Image.new("RGB", (width, header_h + sum(row_heights) + margin), WHITE)
    draw = ImageDraw.Draw(canvas)

    y = margin
    draw.text((margin, y), title, fill=BLACK, font=style.bold)
    y += style.line_h + 6
    for line in subtitle_lines:
        draw.text((margin, y), line, fill=DARK_GREY, font=style.small)
        y += style.line_h + 1
    y += 10
    draw_colour_bar(canvas, (margin, y, margin + 380, y + style.box_h - 4), style.small, "token score")
    x = margin + 430
    samples = [(TokenView(0, "word", True, 0.2, noise_masked=True), "replaced in the contrastive caption (noise mask)"),
               (TokenView(0, "word", True, 0.8, mlm_selected=True), "selected for masked-token prediction (informative mask)")]
    if show_noise_legend:
        samples.append((TokenView(0, "word", True, 0.5, corrupted=True), "truly corrupted word (noise_report.json)"))
    ly = y
    for sample, label in samples:
        w = text_size(style.font, sample.text)[0] + 2 * style.pad
        _draw_token(draw, sample, x, ly + 6, w, style)
        draw.text((x + w + 10, ly + 8), label, fill=BLACK, font=style.small)
        ly += style.box_h + 6
    y = header_h - 8
    draw.line((margin, y, width - margin, y), fill=GREY)

    for view, row_h in zip(views, row_heights):
        top = y + 10
        thumb = image_thumbnail(view.image_path, (thumb_w, thumb_height), LIGHT_GREY)
        canvas.paste(thumb, (margin, top))
        draw.rectangle((margin - 1, top - 1, margin + thumb_w, top + thumb_height), outline=GREY)
        head = f"caption {view.index}   pid {view.pid}"
        if view.noise:
            head += f"   noisy caption: {view.noise.get('kind', '?')}"
        draw.text((text_x, top), head, fill=DARK_GREY, font=style.small)
        ty = top + style.line_h + 8
        lines = 0
        starts = {view.tokens[word[0]].position for word in group_words(view.tokens)}
        for token, tx, line, w in _flow(view.tokens, style, text_w):
            _draw_token(draw, token, text_x + tx, ty + line * style.pitch + 6, w, style, token.position in starts)
            lines = max(lines, line + 1)
        ty += lines * style.pitch
        if view.noise and view.noise.get("clean"):
            for line_text in wrap_text("clean: " + view.noise["clean"], style.small, text_w):
                draw.text((text_x, ty + 2), line_text, fill=GREY, font=style.small)
                ty += style.line_h + 1
        y += row_h
        draw.line((margin, y, width - margin, y), fill=LIGHT_GREY)
    return canvas


def _draw_token(draw: ImageDraw.ImageDraw, token: TokenView, x: int, y: int, w: int, style: _Style,
                first_piece: bool = True) -> None:
    background = score_colour(token.score)
    box = (x, y, x + w - 1, y + style.box_h - 1)
    draw.rectangle(box, fill=background)
    if not first_piece:
        # A faint tick separates the pieces of one word without breaking it apart.
        draw.line((x, y + 3, x, y + style.box_h - 4), fill=GREY)
    fg = text_colour_on(background)
    draw.text((x + (style.pad if first_piece else 1), y + 2), token.text, fill=fg, font=style.font)
    if token.noise_masked:
        draw.rectangle(box, outline=DARK_GREY, width=2)
        mid = y + style.box_h // 2 + 1
        draw.line((x + 1, mid, x + w - 2, mid), fill=DARK_GREY if fg == BLACK else LIGHT_GREY, width=2)
    if token.mlm_selected:
        draw.line((x + 1, y + style.box_h + 2, x + w - 2, y + style.box_h + 2), fill=BLUE, width=3)
    if token.corrupted:
        cx = x + w // 2
        draw.ellipse((cx - 3, y - 9, cx + 3, y - 3), fill=RED)


# --------------------------------------------------------------------------- the whole figure


def describe_view(view: CaptionView) -> str:
    """One line: the caption's index, pid, noise kind and every token with its score ('~': the word goes on)."""
    words = " ".join(f"{t.text}{'' if t.word_end else '~'}:{t.score:.2f}" for t in view.tokens)
    note = f" [noisy: {view.noise.get('kind')}]" if view.noise else ""
    return f"caption {view.index} (pid {view.pid}){note}: {words}"


def draw_gass_figure(checkpoint: str, dataset: str, out: str, *, config: str | None = None, root: str | None = None,
                     annotation: str | None = None, split: str = "train", num: int = 8,
                     indices: list[int] | None = None, captions_from: str = "spread", seed: int = 0,
                     width: int = 1200, thumb_height: int = 160, trust: bool = False,
                     overrides: Sequence[str] = ()) -> list[CaptionView]:
    """Score captions of `dataset` with the checkpoint's model and draw the figure to the PNG `out`.

    Args:
        checkpoint: the retrieval checkpoint; its config is `config`, else the `config.yaml` beside it.
        root: data root (default: `data.root` of the config).
        annotation: WebPerson annotation file or shard folder (default: `data.annotation` of
            the config when it names the same dataset).
        split: the split whose captions are shown.
        num, indices, captions_from: which captions: `indices`, else `num` chosen as
            :data:`SELECTIONS` says.
        seed: seed of the mask generator (and of a random choice).
        width, thumb_height: figure width and image thumbnail height (px).
        overrides: config overrides, key=value.

    Returns:
        The drawn rows.

    Raises:
        UserInputError: a bad size, output path, checkpoint, config, dataset or caption choice.
    """
    check_thumb_height(thumb_height)
    check_output_path(out, "--out")
    cfg, model, device = load_run_model(checkpoint, config, list(overrides), trust=trust)
    root = root or cfg.data.root
    annotation = annotation or (cfg.data.annotation if cfg.data.name == dataset else None)
    source = CaptionSource(open_dataset(dataset, root, annotation), split)
    report = load_noise_report(root)
    if captions_from == "noise_report" and report is None:
        raise GassFigureError(f"--captions-from noise_report: no {NOISE_REPORT} in {root} or its parent folder")
    noisy = match_noise_entries(report, dataset, source) if report else {}
    chosen = choose_indices(source, indices=indices, how=captions_from, num=num, seed=seed, noisy=noisy)
    views = compute_views(model, cfg, source, chosen, tokenizer=Tokenizer(), device=device, seed=seed, noisy=noisy)
    scoring = "CSS" if cfg.gass.scoring == "css" else "GASS"
    title = f"{scoring} token scores: {dataset} {split} ({os.path.basename(checkpoint)})"
    m = cfg.masking
    over = "over all shown captions (batch, as in training)" if cfg.gass.normalize == "batch" else "per caption"
    subtitle = (f"Scores of {len(views)} captions against their images, min-max normalised {over};"
                f" masks drawn once with seed {seed}: noise mask p = {m.noise_max_prob} / "
                f"(1 + exp(-{m.noise_slope} ((1 - s) - {m.noise_center}))), informative mask "
                f"p = {m.mlm_max_prob} / (1 + exp(-{m.mlm_slope} (s - {m.mlm_center})))."
                " Pieces of one word touch; '~' in the printout marks a piece that continues the word.")
    figure = render(views, width=width, thumb_height=thumb_height, image_size=image_size_of(cfg), title=title,
                    subtitle=subtitle, show_noise_legend=bool(noisy))
    save_png(figure, out)
    return views
