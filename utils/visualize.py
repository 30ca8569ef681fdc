"""Small PIL drawing helpers shared by the visualisation tools (no matplotlib).

Fonts, text wrapping, thumbnails, frames, a white -> dark-red score colour
map with its colour bar, and a line chart with axes, ticks and a legend.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from utils.output_paths import OutputPathError, unwritable_reason

logger = logging.getLogger(__name__)

__all__ = [
    "RGB", "WHITE", "BLACK", "GREY", "LIGHT_GREY", "GREEN", "RED", "BLUE", "SERIES_COLOURS",
    "Series", "load_font", "text_size", "wrap_text", "fit_thumbnail", "score_colour", "text_colour_on",
    "draw_frame", "draw_colour_bar", "draw_vertical_text", "nice_ticks", "format_tick", "draw_line_chart",
    "save_png",
]

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
GREY: RGB = (128, 128, 128)
LIGHT_GREY: RGB = (225, 225, 225)
GREEN: RGB = (0, 170, 0)
RED: RGB = (220, 0, 0)
BLUE: RGB = (30, 90, 230)
#: Distinct line colours (the "tab10" hues).
SERIES_COLOURS: tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)
# ColorBrewer "Reds" anchors: white -> salmon -> dark red.
_SCORE_STOPS: tuple[tuple[float, RGB], ...] = ((0.0, (255, 255, 255)), (0.35, (252, 187, 161)),
                                               (0.65, (239, 59, 44)), (1.0, (103, 0, 13)))


@dataclasses.dataclass
class Series:
    """One line of a chart: points (x, y) in data units, drawn in `colour`."""

    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    colour: RGB = SERIES_COLOURS[0]
    dashed: bool = False


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
        tick = format_tick(t)
        draw.text((x - text_size(font, tick)[0] // 2, y1 + 5), tick, fill=BLACK, font=font)


def draw_vertical_text(image: Image.Image, centre: tuple[int, int], text: str, font: ImageFont.ImageFont,
                       fill: RGB = BLACK) -> None:
    """`text` rotated 90 degrees counter-clockwise, centred on `centre`."""
    width, height = text_size(font, text)
    tile = Image.new("RGBA", (width + 4, height + 4), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((2, 2), text, fill=fill, font=font)
    tile = tile.rotate(90, expand=True)
    image.paste(tile, (centre[0] - tile.width // 2, centre[1] - tile.height // 2), tile)


def nice_ticks(lo: float, hi: float, max_ticks: int = 6, integer: bool = False) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"tick range must be finite, got [{lo}, {hi}]")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, max_ticks - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:
        step = max(1.0, float(math.ceil(step)))
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9 or len(ticks) < 2:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 10))
    return ticks


def format_tick(value: float) -> str:
    """Short label of a tick value (no trailing zeros; scientific for tiny/huge magnitudes)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4f}".rstrip("0").rstrip(".")


def draw_line_chart(image: Image.Image, box: tuple[int, int, int, int], series: Sequence[Series], *, title: str,
                    xlabel: str, ylabel: str, font: ImageFont.ImageFont, title_font: ImageFont.ImageFont | None = None,
                    integer_x: bool = True, empty_message: str = "no data") -> None:
    """A line chart in `box` = (x0, y0, x1, y1): title, axes, ticks, grid, labels, lines and a legend.

    Non-finite points are skipped; a series with one point is drawn as a marker.
    With no points at all, the axes frame shows `empty_message`.
    """
    draw = ImageDraw.Draw(image)
    title_font = title_font or font
    x0, y0, x1, y1 = box
    _, line_h = text_size(font, "Hg")
    title_w, title_h = text_size(title_font, title)
    draw.text(((x0 + x1 - title_w) // 2, y0), title, fill=BLACK, font=title_font)

    points = [[(float(x), float(y)) for x, y in zip(s.xs, s.ys) if math.isfinite(float(y))] for s in series]
    drawn = [(s, p) for s, p in zip(series, points) if p]
    legend_w = max((text_size(font, s.label)[0] for s, _ in drawn), default=0) + 40 if drawn else 0
    ys_all = [y for _, p in drawn for _, y in p]
    xs_all = [x for _, p in drawn for x, _ in p]
    y_ticks = nice_ticks(min(ys_all), max(ys_all), 6) if ys_all else [0.0, 1.0]
    x_ticks = nice_ticks(min(xs_all), max(xs_all), 8, integer=integer_x) if xs_all else [0.0, 1.0]
    y_label_w = max(text_size(font, format_tick(t))[0] for t in y_ticks)

    plot = (x0 + line_h + 10 + y_label_w + 6, y0 + title_h + 12, x1 - legend_w - 10, y1 - 2 * line_h - 14)
    px0, py0, px1, py1 = plot
    if px1 - px0 < 20 or py1 - py0 < 20:
        raise ValueError(f"chart box {box} is too small for its labels")
    draw.rectangle(plot, outline=BLACK, fill=WHITE)
    xlo, xhi = x_ticks[0], x_ticks[-1]
    ylo, yhi = y_ticks[0], y_ticks[-1]

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (px0 + (x - xlo) / (xhi - xlo) * (px1 - px0), py1 - (y - ylo) / (yhi - ylo) * (py1 - py0))

    for t in y_ticks:
        _, py = to_px(xlo, t)
        draw.line((px0 + 1, py, px1 - 1, py), fill=LIGHT_GREY)
        draw.line((px0 - 4, py, px0, py), fill=BLACK)
        label = format_tick(t)
        lw, lh = text_size(font, label)
        draw.text((px0 - 6 - lw, py - lh // 2), label, fill=BLACK, font=font)
    for t in x_ticks:
        px, _ = to_px(t, ylo)
        draw.line((px, py0 + 1, px, py1 - 1), fill=LIGHT_GREY)
        draw.line((px, py1, px, py1 + 4), fill=BLACK)
        label = format_tick(t)
        draw.text((px - text_size(font, label)[0] // 2, py1 + 6), label, fill=BLACK, font=font)
    draw.rectangle(plot, outline=BLACK)
    xw, _ = text_size(font, xlabel)
    draw.text(((px0 + px1 - xw) // 2, py1 + line_h + 10), xlabel, fill=BLACK, font=font)
    draw_vertical_text(image, (x0 + line_h // 2 + 2, (py0 + py1) // 2), ylabel, font)

    if not drawn:
        mw, mh = text_size(font, empty_message)
        draw.text(((px0 + px1 - mw) // 2, (py0 + py1 - mh) // 2), empty_message, fill=GREY, font=font)
        return
    for s, pts in drawn:
        coords = [to_px(x, y) for x, y in pts]
        if len(coords) > 1:
            if s.dashed:
                for (ax, ay), (bx, by) in zip(coords, coords[1:]):
                    _dashed_line(draw, (ax, ay), (bx, by), s.colour)
            else:
                draw.line(coords, fill=s.colour, width=2, joint="curve")
        for cx, cy in coords:
            draw.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=s.colour)
    ly = py0 + 4
    for s, _ in drawn:
        lx = px1 + 10
        if s.dashed:
            _dashed_line(draw, (lx, ly + line_h / 2), (lx + 22, ly + line_h / 2), s.colour)
        else:
            draw.line((lx, ly + line_h / 2, lx + 22, ly + line_h / 2), fill=s.colour, width=2)
        draw.ellipse((lx + 8, ly + line_h / 2 - 3, lx + 14, ly + line_h / 2 + 3), fill=s.colour)
        draw.text((lx + 28, ly), s.label, fill=BLACK, font=font)
        ly += line_h + 6


def _dashed_line(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], colour: RGB,
                 dash: float = 6.0) -> None:
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    steps = max(1, int(length // dash))
    for k in range(0, steps, 2):
        t0, t1 = k / steps, min(1.0, (k + 1) / steps)
        draw.line((a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0,
                   a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1), fill=colour, width=2)


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
