"""Drawing primitives of the synthetic renderer: 8-bit colour arithmetic and capsules."""

from __future__ import annotations

import colorsys

from PIL import ImageDraw

RGB = tuple[int, int, int]


def _clamp8(v: float) -> int:
    return max(0, min(255, int(round(v))))


def _scale(rgb: RGB, f: float) -> RGB:
    return (_clamp8(rgb[0] * f), _clamp8(rgb[1] * f), _clamp8(rgb[2] * f))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (_clamp8(a[0] + (b[0] - a[0]) * t), _clamp8(a[1] + (b[1] - a[1]) * t), _clamp8(a[2] + (b[2] - a[2]) * t))


def _outline(rgb: RGB) -> RGB:
    # Dark garments get a lighter edge, light ones a darker edge, so a garment
    # stays separable from a background of the same colour.
    return _scale(rgb, 0.55) if sum(rgb) > 200 else _mix(rgb, (110, 110, 110), 0.45)


def _hsv(h: float, s: float, v: float) -> RGB:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return (_clamp8(r * 255), _clamp8(g * 255), _clamp8(b * 255))


def _capsule(
    draw: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], width: float, fill: RGB
) -> None:
    draw.line([p0, p1], fill=fill, width=max(1, int(round(width))))
    r = width / 2.0
    for x, y in (p0, p1):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _along(p0: tuple[float, float], p1: tuple[float, float], t: float) -> tuple[float, float]:
    return (p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t)
