"""Small PIL drawing helpers shared by the image-grid tools (search and the figure tools).

Fonts, text wrapping, thumbnails (and the allowed thumbnail heights), frames, and a
white -> dark-red score colour map with its colour bar. Charts with axes are drawn with matplotlib (utils/plots.py).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from utils.errors import UserInputError
from utils.output_paths import OutputPathError, unwritable_reason

logger = logging.getLogger(__name__)

__all__ = [
    "RGB", "WHITE", "BLACK", "GREY", "LIGHT_GREY", "GREEN", "RED", "BLUE", "load_font", "text_size", "wrap_text",
    "THUMB_HEIGHT_RANGE", "ThumbHeightError", "check_thumb_height", "fit_thumbnail", "score_colour",
    "text_colour_on", "draw_frame", "draw_colour_bar", "save_png", "checked_indices", "evenly_spaced",
]

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
GREY: RGB = (128, 128, 128)
LIGHT_GREY: RGB = (225, 225, 225)
GREEN: RGB = (0, 170, 0)
RED: RGB = (220, 0, 0)
BLUE: RGB = (30, 90, 230)
# ColorBrewer "Reds" anchors: white -> salmon -> dark red.
_SCORE_STOPS: tuple[tuple[float, RGB], ...] = ((0.0, (255, 255, 255)), (0.35, (252, 187, 161)),
                                               (0.65, (239, 59, 44)), (1.0, (103, 0, 13)))
#: Allowed --thumb-height (px): a readable thumbnail, and a grid that fits in memory.
THUMB_HEIGHT_RANGE = (16, 1024)


class ThumbHeightError(UserInputError, ValueError):
    """A thumbnail height outside :data:`THUMB_HEIGHT_RANGE`."""


def load_font(size: int = 14) -> ImageFont.ImageFont:
    """PIL's bundled scalable font at `size` px (the fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        # Pillow < 10.1 has no sized default font; the bitmap one still draws legibly.
        logger.debug("Pillow without sized default font; using the bitmap font")
        return ImageFont.load_default()


def text_size(font: ImageFont.ImageFont, text: str) -> tuple[int, int]:
    """Width and height in pixels of `text` drawn with `font` (height from the font's ascent+descent)."""
    left, _, right, _ = font.getbbox(text or " ")
    _, top, _, bottom = font.getbbox("Hg")
    return int(math.ceil(right - min(left, 0))), int(math.ceil(bottom + max(top, 0)))


def wrap_text(text: str, font: ImageFont.ImageFont, max_width: int, max_lines: int | None = None) -> list[str]:
    """Greedy word wrap to `max_width` px; overlong words are cut; an ellipsis marks dropped text."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if text_size(font, candidate)[0] <= max_width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while text_size(font, word)[0] > max_width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and text_size(font, word[:cut])[0] > max_width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and text_size(font, last + " ...")[0] > max_width:
            last = last[:-1]
        lines[-1] = last.rstrip() + " ..."
    return lines or [""]


def check_thumb_height(value: int) -> None:
    """Refuse a --thumb-height outside `THUMB_HEIGHT_RANGE` (a ThumbHeightError naming the flag)."""
    low, high = THUMB_HEIGHT_RANGE
    if not low <= value <= high:
        raise ThumbHeightError(f"--thumb-height must be between {low} and {high} pixels, got {value}")


def fit_thumbnail(image: Image.Image, size: tuple[int, int], background: RGB = WHITE) -> Image.Image:
    """`image` scaled to fit inside `size` = (width, height), keeping its aspect ratio, centred."""
    width, height = size
    scale = min(width / image.width, height / image.height)
    scaled = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                         Image.BICUBIC)
    canvas = Image.new("RGB", (width, height), background)
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def score_colour(score: float) -> RGB:
    """Colour of a score in [0, 1]: white (0) through salmon to dark red (1); clipped outside."""
    s = min(max(float(score), 0.0), 1.0) if math.isfinite(score) else 0.0
    for (x0, c0), (x1, c1) in zip(_SCORE_STOPS, _SCORE_STOPS[1:]):
        if s <= x1:
            t = (s - x0) / (x1 - x0)
            return tuple(round(a + (b - a) * t) for a, b in zip(c0, c1))  # type: ignore[return-value]
    return _SCORE_STOPS[-1][1]


def text_colour_on(background: RGB) -> RGB:
    """Black or white, whichever reads better on `background` (relative luminance)."""
    r, g, b = background
    return BLACK if 0.299 * r + 0.587 * g + 0.114 * b > 140 else WHITE


def draw_frame(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], colour: RGB, width: int) -> None:
    """A solid rectangular frame of `width` px drawn inside `box` = (x0, y0, x1, y1), x1/y1 exclusive."""
    x0, y0, x1, y1 = box
    for k in range(width):
        draw.rectangle((x0 + k, y0 + k, x1 - 1 - k, y1 - 1 - k), outline=colour)


def draw_colour_bar(image: Image.Image, box: tuple[int, int, int, int], font: ImageFont.ImageFont, label: str,
                    colour_map: Callable[[float], RGB] = score_colour,
                    ticks: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> None:
    """A horizontal colour bar in `box` with tick values under it and `label` on its left."""
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    label_w, label_h = text_size(font, label)
    draw.text((x0, y0 + (y1 - y0 - label_h) // 2), label, fill=BLACK, font=font)
    bar_x0 = x0 + label_w + 8
    span = max(1, x1 - bar_x0)
    for i in range(span):
        draw.line((bar_x0 + i, y0, bar_x0 + i, y1), fill=colour_map(i / max(1, span - 1)))
    draw.rectangle((bar_x0, y0, x1, y1), outline=GREY)
    for t in ticks:
        x = bar_x0 + round(t * (span - 1))
        draw.line((x, y1, x, y1 + 4), fill=BLACK)
        tick = f"{t:g}"
        draw.text((x - text_size(font, tick)[0] // 2, y1 + 5), tick, fill=BLACK, font=font)


def save_png(image: Image.Image, path: str | os.PathLike) -> str:
    """Write `image` as PNG (creating parent folders); returns the path.

    Raises:
        OutputPathError: naming the path and why it cannot be written.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        image.save(path, format="PNG")
    except OSError as err:
        reason = unwritable_reason(path) or err.strerror or str(err)
        raise OutputPathError(f"cannot write {path}: {reason}; choose another path") from err
    logger.info("wrote %s (%dx%d)", path, image.width, image.height)
    return path


def checked_indices(count: int, indices: Sequence[int] | None, num: int, *, where: str, index_flag: str,
                    num_flag: str, error: type[Exception]) -> list[int] | None:
    """Which captions a figure shows: the explicit `indices` (each checked against `count`), or None for
    the caller to choose `num` of them (`num` checked). `where` names the split in messages."""
    if count == 0:
        raise error(f"{where} has no captions")
    if indices:
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise error(f"{index_flag} {bad[0]} out of range: {where} has {count} captions")
        return list(indices)
    if num < 1:
        raise error(f"{num_flag} must be >= 1, got {num}")
    return None


def evenly_spaced(count: int, num: int) -> list[int]:
    """`num` indices (at most `count`) spread evenly over ``0 .. count - 1``."""
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, min(num, count))})
