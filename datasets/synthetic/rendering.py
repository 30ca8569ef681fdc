"""Rendering of synthetic person images: identity shades, background, figure, camera effects."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.drawing import RGB, _clamp8, _hsv, _scale
from datasets.synthetic.figure import _FigurePainter
from datasets.synthetic.vocabulary import HAIR_PALETTE, PALETTE, SKIN_TONES, _derive_seed


def _identity_colours(attrs: PersonAttributes) -> dict[str, RGB]:
    """Per-identity shades: each colour jittered a little, the same in every image."""
    rng = random.Random(_derive_seed("shade", attrs.shade_seed))

    def jitter(rgb: RGB, amount: int = 10) -> RGB:
        return tuple(_clamp8(c + rng.randint(-amount, amount)) for c in rgb)  # type: ignore[return-value]

    skin = jitter(SKIN_TONES[attrs.skin], 6)
    out = {"skin": skin}
    out["hair"] = jitter(HAIR_PALETTE[attrs.hair_colour][0]) if attrs.hair_colour else skin
    out["hat"] = jitter(PALETTE[attrs.hat_colour][0]) if attrs.hat_colour else skin
    out["top"] = jitter(PALETTE[attrs.top_colour][0])
    out["bottom"] = jitter(PALETTE[attrs.bottom_colour][0]) if attrs.bottom_colour else skin
    out["shoes"] = jitter(PALETTE[attrs.shoe_colour][0])
    out["bag"] = jitter(PALETTE[attrs.bag_colour][0]) if attrs.bag_colour else skin
    # Inner shirt under an open jacket/coat: contrast with the garment.
    out["inner"] = (236, 236, 230) if sum(out["top"]) < 420 else (40, 40, 44)
    return out


def _background(rng: random.Random, width: int, height: int, horizon: float) -> Image.Image:
    """Gradient wall/sky, ground plane below ``horizon`` and random clutter."""
    hue = rng.random()
    top = _hsv(hue, rng.uniform(0.04, 0.3), rng.uniform(0.45, 0.95))
    bottom = _hsv(hue + rng.uniform(-0.15, 0.15), rng.uniform(0.04, 0.3), rng.uniform(0.35, 0.9))
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    grad = np.asarray(top, np.float32) * (1.0 - t) + np.asarray(bottom, np.float32) * t
    grad = np.repeat(grad, width, axis=1)
    img = Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(("building", "tree", "pole", "blob", "rail"))
        colour = _clutter_colour(rng)
        if kind == "building":
            _draw_building(draw, rng, colour, width, horizon)
        else:
            _draw_clutter(draw, rng, kind, colour, width, height, horizon)
    _draw_ground(draw, rng, width, height, horizon)
    return img


def _clutter_colour(rng: random.Random) -> RGB:
    """Mostly a muted colour; now and then a saturated one."""
    saturated = rng.random() < 0.15
    return _hsv(
        rng.random(), rng.uniform(0.55, 0.9) if saturated else rng.uniform(0.03, 0.35), rng.uniform(0.25, 0.92)
    )


def _draw_building(draw: ImageDraw.ImageDraw, rng: random.Random, colour: RGB, width: int, horizon: float) -> None:
    """A facade standing on the horizon, with a grid of windows."""
    x0 = rng.uniform(-0.3, 0.9) * width
    x1 = x0 + rng.uniform(0.25, 0.7) * width
    y0 = rng.uniform(0.0, 0.8) * horizon
    draw.rectangle((x0, y0, x1, horizon), fill=colour)
    window = _scale(colour, rng.choice((0.6, 1.3)))
    step = rng.uniform(0.08, 0.16) * width
    y = y0 + step * 0.4
    while y + step * 0.5 < horizon:
        x = x0 + step * 0.3
        while x + step * 0.5 < x1:
            draw.rectangle((x, y, x + step * 0.45, y + step * 0.55), fill=window)
            x += step
        y += step


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: random.Random, kind: str, colour: RGB, width: int, height: int,
                  horizon: float) -> None:
    """One background object of ``kind``: tree, pole, blob or rail (a railing)."""
    if kind == "tree":
        x = rng.uniform(0.0, 1.0) * width
        crown = rng.uniform(0.12, 0.3) * width
        cy = horizon - rng.uniform(0.3, 0.6) * height * 0.5
        draw.rectangle(
            (x - crown * 0.12, cy, x + crown * 0.12, horizon), fill=_hsv(0.08, 0.5, rng.uniform(0.25, 0.5))
        )
        draw.ellipse((x - crown, cy - crown * 1.3, x + crown, cy + crown * 0.5), fill=colour)
    elif kind == "pole":
        x = rng.uniform(0.0, 1.0) * width
        w = rng.uniform(0.015, 0.04) * width
        draw.rectangle(
            (x, rng.uniform(0.0, 0.5) * horizon, x + w, horizon + rng.uniform(0, 0.05) * height), fill=colour
        )
    elif kind == "blob":
        x = rng.uniform(0.0, 1.0) * width
        y = rng.uniform(0.1, 1.0) * horizon
        r = rng.uniform(0.06, 0.25) * width
        draw.ellipse((x - r, y - r * 0.7, x + r, y + r * 0.7), fill=colour)
    else:
        y = horizon - rng.uniform(0.05, 0.2) * height
        draw.line([(0, y), (width, y)], fill=colour, width=max(1, int(0.012 * height)))
        for x in np.arange(rng.uniform(0, 0.2) * width, width, rng.uniform(0.12, 0.3) * width):
            draw.line([(float(x), y), (float(x), horizon)], fill=colour, width=max(1, int(0.01 * height)))


def _draw_ground(draw: ImageDraw.ImageDraw, rng: random.Random, width: int, height: int, horizon: float) -> None:
    """The ground plane below ``horizon``, sometimes with paving or road markings."""
    ground = _hsv(rng.choice((0.08, 0.1, 0.3, 0.6)), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.7))
    draw.rectangle((0, horizon, width, height), fill=ground)
    draw.line([(0, horizon), (width, horizon)], fill=_scale(ground, 0.75), width=max(1, int(0.008 * height)))
    if rng.random() < 0.5:
        # paving / road markings
        mark = _scale(ground, rng.choice((0.8, 1.25)))
        for k in range(1, rng.randint(2, 5)):
            y = horizon + (height - horizon) * k / 5.0
            draw.line([(0, y), (width, y)], fill=mark, width=1)


def render_person(
    attrs: PersonAttributes, rng: random.Random, size: tuple[int, int] = (128, 64), supersample: int = 2
) -> Image.Image:
    """Render one image of a person.

    Args:
        attrs: the identity.
        rng: source of all per-image variation (pose, facing, placement,
            background, lighting, blur, noise).
        size: (height, width) of the output.
        supersample: drawing scale before the anti-aliasing downsize.

    Returns:
        An RGB image of the requested size.
    """
    height, width = size
    if height < 32 or width < 16:
        raise ValueError(f"render_person: size must be at least (32, 16) (H, W), got {size}")
    H, W = height * supersample, width * supersample
    person_h = H * rng.uniform(0.80, 0.93)
    top = rng.uniform(0.02 * H, H - person_h - 0.012 * H)
    cx = W * (0.5 + rng.uniform(-0.06, 0.06))
    facing = rng.choices(("front", "back", "left", "right"), (0.36, 0.24, 0.2, 0.2))[0]
    feet = top + person_h
    horizon = feet - H * rng.uniform(0.06, 0.35)

    img = _background(rng, W, H, horizon)
    draw = ImageDraw.Draw(img)
    shadow_w = person_h * rng.uniform(0.14, 0.22)
    draw.ellipse((cx - shadow_w, feet - person_h * 0.02, cx + shadow_w, feet + person_h * 0.015), fill=(60, 60, 60))
    colours = _identity_colours(attrs)
    _FigurePainter(draw, attrs, colours, rng, person_h, top, cx, facing).paint()

    img = img.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(img, dtype=np.float32)
    contrast = rng.uniform(0.78, 1.18)
    brightness = rng.uniform(0.75, 1.2)
    gains = np.asarray([rng.uniform(0.93, 1.07) for _ in range(3)], dtype=np.float32)
    mean = float(arr.mean())
    arr = ((arr - mean) * contrast + mean) * brightness * gains
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.75)))
    sigma = rng.uniform(0.0, 6.0)
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    arr = np.asarray(img, dtype=np.float32) + noise_rng.normal(0.0, sigma, size=(height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def contact_sheet(images: Sequence[Image.Image], columns: int = 6, scale: int = 2, pad: int = 4) -> Image.Image:
    """Tile images (upscaled by ``scale``, nearest) into one sheet for eyeballing."""
    if not images:
        raise ValueError("contact_sheet: no images given")
    w, h = images[0].size
    w, h = w * scale, h * scale
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        sheet.paste(im.resize((w, h), Image.Resampling.NEAREST), (pad + c * (w + pad), pad + r * (h + pad)))
    return sheet
