"""Deterministic synthetic person-retrieval data written in the real on-disk formats.

The generator draws pedestrian-like figures with PIL. Every identity is a fixed
combination of attributes (gender and build, hair, hat, top, bottom, shoes,
bag); every image of it varies pose, facing, scale, position, background
clutter, lighting, blur and noise. Captions verbalise the attributes with many
templates and synonyms. An optional, configurable share of captions is
corrupted the way MLLM captions go wrong -- a wrong colour or item, or an
irrelevant phrase -- and every corruption is recorded, so one can check
whether GASS scores find the noise.

Outputs (see :func:`generate`)::

    <out>/CUHK-PEDES/imgs/<split>/<id>_<k>.jpg   + reid_raw.json
    <out>/WebPerson/images/<dddd>/<index>.jpg   + annotations.json, annotations.jsonl,
                                                  shards/webperson-000000.tar ...
    <out>/meta.json, README.txt                 parameters and counts
    <out>/.gadms-synthetic                      marks the folder as the generator's (settings)
    <out>/attributes.json                       true attributes per identity / image
    <out>/noise_report.json                     which captions were corrupted and how

WebPerson annotation keys are image paths relative to ``WebPerson/images/``;
the webdataset key of a sample is that path without its extension.

Determinism: every random draw comes from a ``random.Random`` (or a numpy
generator seeded from it) whose seed is derived with SHA-256 from the global
seed plus the names and indices of the thing being drawn, so the bytes written
do not depend on worker count, scheduling, time or hash randomisation.
"""

from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import re
import shutil
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from utils.errors import UserInputError
from utils.output_paths import check_output_path

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "ga-dms-synthetic-1"
BENCHMARK_DIR = "CUHK-PEDES"
WEBPERSON_DIR = "WebPerson"
#: File that marks a folder as made by :func:`generate` (JSON: generator version and
#: settings). Only a new or empty folder, or one carrying it, is written into or cleared.
MARKER = ".gadms-synthetic"


class OutputExistsError(UserInputError, FileExistsError):
    """An output folder holds something the tool did not make, or a result it may not replace."""

# --------------------------------------------------------------------------- vocabulary

#: Clothing / bag / hat palette: canonical name -> (RGB, words used in captions).
#: Word sets are disjoint so every colour word maps back to one colour.
PALETTE: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((28, 28, 32), ("black",)),
    "white": ((238, 238, 232), ("white", "ivory")),
    "grey": ((130, 130, 132), ("grey", "gray")),
    "red": ((205, 28, 34), ("red", "crimson", "scarlet")),
    "orange": ((246, 128, 18), ("orange",)),
    "yellow": ((244, 214, 36), ("yellow", "lemon")),
    "green": ((34, 146, 52), ("green", "emerald")),
    "blue": ((32, 68, 205), ("blue", "cobalt")),
    "teal": ((18, 164, 168), ("teal", "turquoise", "cyan")),
    "purple": ((122, 42, 162), ("purple", "violet")),
    "pink": ((246, 138, 192), ("pink",)),
    "brown": ((124, 74, 32), ("brown", "chocolate")),
}

#: Hair palette: canonical name -> (RGB, words used in captions).
HAIR_PALETTE: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {
    "black": ((24, 20, 18), ("black", "dark")),
    "brown": ((104, 62, 30), ("brown", "chestnut")),
    "blonde": ((222, 186, 100), ("blonde", "blond", "golden")),
    "grey": ((170, 170, 166), ("grey", "gray", "silver")),
    "red": ((178, 68, 28), ("red", "ginger", "auburn")),
}

SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (243, 208, 180),
    (226, 180, 145),
    (192, 138, 102),
    (152, 104, 74),
)

GENDERS = ("male", "female")
BUILDS = ("slim", "average", "broad")
HAIR_STYLES = ("short", "long", "ponytail", "bald")
HATS = ("cap", "beanie")
TOP_TYPES = ("t-shirt", "long-sleeve", "jacket", "coat", "vest", "dress")
BOTTOM_TYPES = ("trousers", "jeans", "shorts", "skirt")
BAGS = ("backpack", "handbag", "shoulder bag")

_TOPS_BY_GENDER = {
    "male": ("t-shirt", "long-sleeve", "jacket", "coat", "vest"),
    "female": ("t-shirt", "long-sleeve", "jacket", "coat", "vest", "dress"),
}
_BOTTOMS_BY_GENDER = {"male": ("trousers", "jeans", "shorts"), "female": BOTTOM_TYPES}
_HAIR_STYLE_WEIGHTS = {"male": (0.64, 0.12, 0.08, 0.16), "female": (0.22, 0.45, 0.30, 0.03)}
_HAIR_COLOUR_WEIGHTS = {"black": 4.0, "brown": 3.0, "blonde": 1.6, "grey": 1.0, "red": 0.7}
_BAG_WEIGHTS = {"male": (0.40, 0.30, 0.10, 0.20), "female": (0.30, 0.20, 0.30, 0.20)}
_COLOUR_NAMES = tuple(PALETTE)
# Real wardrobes favour dark trousers and black/white shoes; a mild skew keeps
# colour alone from separating identities.
_BOTTOM_COLOUR_WEIGHTS = {"black": 3.0, "blue": 3.0, "grey": 2.0, "white": 1.5, "brown": 1.3}
_SHOE_COLOUR_WEIGHTS = {"black": 3.0, "white": 3.0, "grey": 1.5, "brown": 1.5}

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")


def tokenize_caption(caption: str) -> list[str]:
    """Lower-cased word list of a caption (the ``processed_tokens`` of CUHK-PEDES)."""
    return _TOKEN_RE.findall(caption.lower())


def _derive_seed(*parts: object) -> int:
    """64-bit seed from a tuple of names/indices, stable across processes and runs."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# --------------------------------------------------------------------------- attributes


@dataclass(frozen=True)
class PersonAttributes:
    """One identity: the attributes every image and caption of it shares.

    ``bottom_*`` is None for a dress, ``hair_colour`` is None when bald,
    ``hat_colour``/``bag_colour`` are None without a hat/bag. ``skin``,
    ``build`` and ``shade_seed`` are visual-only (exact shades, skin tone).
    """

    gender: str
    build: str
    skin: int
    hair_style: str
    hair_colour: str | None
    hat: str | None
    hat_colour: str | None
    top_type: str
    top_colour: str
    bottom_type: str | None
    bottom_colour: str | None
    shoe_colour: str
    bag: str | None
    bag_colour: str | None
    shade_seed: int

    def __post_init__(self) -> None:
        def check(name: str, value: object, allowed: Iterable[object]) -> None:
            allowed = tuple(allowed)
            if value not in allowed:
                raise ValueError(f"PersonAttributes.{name}={value!r}; expected one of {allowed}")

        check("gender", self.gender, GENDERS)
        check("build", self.build, BUILDS)
        check("skin", self.skin, range(len(SKIN_TONES)))
        check("hair_style", self.hair_style, HAIR_STYLES)
        check("hat", self.hat, (None, *HATS))
        check("top_type", self.top_type, TOP_TYPES)
        check("top_colour", self.top_colour, _COLOUR_NAMES)
        check("shoe_colour", self.shoe_colour, _COLOUR_NAMES)
        check("bag", self.bag, (None, *BAGS))
        if self.hair_style == "bald":
            check("hair_colour (bald)", self.hair_colour, (None,))
        else:
            check("hair_colour", self.hair_colour, tuple(HAIR_PALETTE))
        check("hat_colour", self.hat_colour, (None,) if self.hat is None else _COLOUR_NAMES)
        check("bag_colour", self.bag_colour, (None,) if self.bag is None else _COLOUR_NAMES)
        if self.top_type == "dress":
            check("bottom_type (dress)", self.bottom_type, (None,))
            check("bottom_colour (dress)", self.bottom_colour, (None,))
        else:
            check("bottom_type", self.bottom_type, BOTTOM_TYPES)
            check("bottom_colour", self.bottom_colour, _COLOUR_NAMES)
        if not isinstance(self.shade_seed, int) or isinstance(self.shade_seed, bool):
            raise ValueError(f"PersonAttributes.shade_seed must be an int, got {self.shade_seed!r}")

    def key(self) -> tuple[str | None, ...]:
        """The describable attributes (what identity uniqueness is defined on)."""
        return tuple(getattr(self, name) for name in DESCRIBED_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the form stored in attributes.json)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PersonAttributes:
        """Inverse of :meth:`to_dict`; rejects missing or unknown fields."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        extra = sorted(set(data) - set(names))
        if missing or extra:
            raise ValueError(f"attribute record: missing fields {missing}, unknown fields {extra}")
        return cls(**{n: data[n] for n in names})


#: Fields captions talk about; identities differ in at least two of them.
DESCRIBED_FIELDS = (
    "gender",
    "hair_style",
    "hair_colour",
    "hat",
    "hat_colour",
    "top_type",
    "top_colour",
    "bottom_type",
    "bottom_colour",
    "shoe_colour",
    "bag",
    "bag_colour",
)


def _weighted(rng: random.Random, names: Sequence[str], weights: dict[str, float]) -> str:
    return rng.choices(names, [weights.get(n, 1.0) for n in names])[0]


def _sample_one(rng: random.Random) -> PersonAttributes:
    gender = rng.choice(GENDERS)
    build = rng.choices(BUILDS, (1.0, 2.0, 1.0))[0]
    skin = rng.randrange(len(SKIN_TONES))
    hair_style = rng.choices(HAIR_STYLES, _HAIR_STYLE_WEIGHTS[gender])[0]
    hair_colour = None if hair_style == "bald" else _weighted(rng, tuple(HAIR_PALETTE), _HAIR_COLOUR_WEIGHTS)
    hat = rng.choices((None, *HATS), (0.72, 0.18, 0.10))[0]
    hat_colour = rng.choice(_COLOUR_NAMES) if hat else None
    top_type = rng.choice(_TOPS_BY_GENDER[gender])
    top_colour = rng.choice(_COLOUR_NAMES)
    if top_type == "dress":
        bottom_type = bottom_colour = None
    else:
        bottom_type = rng.choice(_BOTTOMS_BY_GENDER[gender])
        bottom_colour = _weighted(rng, _COLOUR_NAMES, _BOTTOM_COLOUR_WEIGHTS)
    shoe_colour = _weighted(rng, _COLOUR_NAMES, _SHOE_COLOUR_WEIGHTS)
    bag = rng.choices((None, *BAGS), _BAG_WEIGHTS[gender])[0]
    bag_colour = rng.choice(_COLOUR_NAMES) if bag else None
    return PersonAttributes(
        gender=gender,
        build=build,
        skin=skin,
        hair_style=hair_style,
        hair_colour=hair_colour,
        hat=hat,
        hat_colour=hat_colour,
        top_type=top_type,
        top_colour=top_colour,
        bottom_type=bottom_type,
        bottom_colour=bottom_colour,
        shoe_colour=shoe_colour,
        bag=bag,
        bag_colour=bag_colour,
        shade_seed=rng.getrandbits(32),
    )


def sample_identities(n: int, seed: int, min_distance: int = 2, *, stream: str = "identities",
                      exclude: Iterable[tuple[str | None, ...]] = ()) -> list[PersonAttributes]:
    """Draw ``n`` identities whose described attributes differ pairwise in >= ``min_distance`` fields.

    A distance of 2 keeps identities separable (one misread attribute never
    merges two people) while no single attribute identifies anyone.

    Args:
        n: how many identities.
        seed: global seed.
        min_distance: 1 (distinct keys) or 2.
        stream: name of the random stream (another name, another population).
        exclude: keys (:meth:`PersonAttributes.key`) of identities drawn elsewhere; every
            identity drawn here is at least ``min_distance`` fields away from each of them.

    Raises:
        ValueError: bad arguments, or the attribute space ran out.
    """
    if n < 0:
        raise ValueError(f"sample_identities: n must be >= 0, got {n}")
    if min_distance not in (1, 2):
        raise ValueError(f"sample_identities: min_distance must be 1 or 2, got {min_distance}")
    rng = random.Random(_derive_seed(seed, stream))
    chosen: list[PersonAttributes] = []
    # Two keys are within distance 1 iff they agree after blanking one field,
    # so a set of all one-field-blanked keys makes the check O(#fields).
    exact: set[tuple[object, ...]] = {tuple(key) for key in exclude}
    blanked: set[tuple[object, ...]] = {key[:i] + ("*",) + key[i + 1:] for key in exact for i in range(len(key))}
    attempts = 0
    max_attempts = 200 * n + 1000
    while len(chosen) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(f"sample_identities: could only find {len(chosen)} of {n} distinct identities")
        cand = _sample_one(rng)
        key = cand.key()
        if min_distance == 1:
            if key in exact:
                continue
        else:
            variants = [key[:i] + ("*",) + key[i + 1 :] for i in range(len(key))]
            if any(v in blanked for v in variants):
                continue
            blanked.update(variants)
        exact.add(key)
        chosen.append(cand)
    return chosen


# --------------------------------------------------------------------------- rendering

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


def _capsule(
    draw: ImageDraw.ImageDraw, p0: tuple[float, float], p1: tuple[float, float], width: float, fill: RGB
) -> None:
    draw.line([p0, p1], fill=fill, width=max(1, int(round(width))))
    r = width / 2.0
    for x, y in (p0, p1):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _along(p0: tuple[float, float], p1: tuple[float, float], t: float) -> tuple[float, float]:
    return (p0[0] + (p1[0] - p0[0]) * t, p0[1] + (p1[1] - p0[1]) * t)


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

    def clutter_colour() -> RGB:
        saturated = rng.random() < 0.15
        return _hsv(
            rng.random(), rng.uniform(0.55, 0.9) if saturated else rng.uniform(0.03, 0.35), rng.uniform(0.25, 0.92)
        )

    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(("building", "tree", "pole", "blob", "rail"))
        colour = clutter_colour()
        if kind == "building":
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
        elif kind == "tree":
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

    ground = _hsv(rng.choice((0.08, 0.1, 0.3, 0.6)), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.7))
    draw.rectangle((0, horizon, width, height), fill=ground)
    draw.line([(0, horizon), (width, horizon)], fill=_scale(ground, 0.75), width=max(1, int(0.008 * height)))
    if rng.random() < 0.5:
        # paving / road markings
        mark = _scale(ground, rng.choice((0.8, 1.25)))
        for k in range(1, rng.randint(2, 5)):
            y = horizon + (height - horizon) * k / 5.0
            draw.line([(0, y), (width, y)], fill=mark, width=1)
    return img


class _FigurePainter:
    """Draws one person on a canvas; all lengths are fractions of the figure height P."""

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        attrs: PersonAttributes,
        colours: dict[str, RGB],
        rng: random.Random,
        person_h: float,
        top: float,
        cx: float,
        facing: str,
    ) -> None:
        self.draw = draw
        self.a = attrs
        self.c = colours
        self.rng = rng
        self.P = person_h
        self.top = top
        self.cx = cx
        self.facing = facing
        self.side = facing in ("left", "right")
        self.d = 1.0 if facing == "right" else -1.0 if facing == "left" else 0.0
        female = attrs.gender == "female"
        build = {"slim": 0.88, "average": 1.0, "broad": 1.14}[attrs.build]
        self.sw = (0.108 if female else 0.126) * build * person_h  # shoulder half width
        self.ww = (0.080 if female else 0.100) * build * person_h  # waist
        self.hw = (0.108 if female else 0.098) * build * person_h  # hips
        self.arm_t = 0.052 * build * person_h
        self.leg_t = 0.072 * build * person_h
        self.head_r = 0.064 * person_h
        self.head_c = (cx + self.d * 0.012 * person_h, self.y(0.072))
        self.depth = 0.62 if self.side else 1.0

    def y(self, f: float) -> float:
        return self.top + f * self.P

    def L(self, f: float) -> float:
        return f * self.P

    # ---- limbs -----------------------------------------------------------
    def _legs(self) -> list[tuple[tuple[float, float], tuple[float, float], tuple[float, float], float]]:
        """(hip, knee, ankle, shade) per leg, back leg first."""
        rng = self.rng
        hip_y, thigh, shin = self.y(0.50), self.L(0.22), self.L(0.235)
        legs = []
        if not self.side:
            spread = self.L(rng.uniform(-0.004, 0.03))
            for s in (-1.0, 1.0):
                hip = (self.cx + s * self.hw * 0.5, hip_y)
                knee = (hip[0] + s * spread * 0.5, hip_y + thigh)
                ankle = (hip[0] + s * spread, hip_y + thigh + shin)
                legs.append((hip, knee, ankle, 1.0))
            return legs
        stride = math.radians(rng.uniform(3.0, 24.0))
        for lead, shade in ((-1.0, 0.82), (1.0, 1.0)):
            th = lead * stride
            sh = th * (0.5 if lead > 0 else 1.45)
            hip = (self.cx, hip_y)
            knee = (hip[0] + self.d * math.sin(th) * thigh, hip_y + math.cos(th) * thigh)
            ankle = (knee[0] + self.d * math.sin(sh) * shin, knee[1] + math.cos(sh) * shin)
            legs.append((hip, knee, ankle, shade))
        return legs

    def _arms(self) -> list[tuple[tuple[float, float], tuple[float, float], tuple[float, float], float, bool]]:
        """(shoulder, elbow, hand, shade, in_front) per arm."""
        rng = self.rng
        upper, fore = self.L(0.17), self.L(0.16)
        arms = []
        if not self.side:
            for s in (-1.0, 1.0):
                sh = (self.cx + s * (self.sw - self.arm_t * 0.45), self.y(0.175))
                out = math.radians(rng.uniform(3.0, 12.0))
                bend = out + math.radians(rng.uniform(-6.0, 8.0))
                el = (sh[0] + s * math.sin(out) * upper, sh[1] + math.cos(out) * upper)
                hand = (el[0] + s * math.sin(bend) * fore, el[1] + math.cos(bend) * fore)
                arms.append((sh, el, hand, 1.0, True))
            return arms
        swing = math.radians(rng.uniform(0.0, 24.0))
        for lead, shade, front in ((1.0, 0.82, False), (-1.0, 1.0, True)):
            a = lead * swing
            b = a + math.radians(rng.uniform(5.0, 25.0))
            sh = (self.cx, self.y(0.175))
            el = (sh[0] + self.d * math.sin(a) * upper, sh[1] + math.cos(a) * upper)
            hand = (el[0] + self.d * math.sin(b) * fore, el[1] + math.cos(b) * fore)
            arms.append((sh, el, hand, shade, front))
        return arms

    def draw_leg(
        self, hip: tuple[float, float], knee: tuple[float, float], ankle: tuple[float, float], shade: float
    ) -> None:
        a, c, dr = self.a, self.c, self.draw
        skin = _scale(c["skin"], shade)
        bottom = _scale(c["bottom"], shade)
        kind = a.bottom_type
        if kind in ("trousers", "jeans"):
            t = self.leg_t * (1.12 if kind == "trousers" else 1.0)
            edge = _outline(bottom)
            for p, q in ((hip, knee), (knee, ankle)):
                _capsule(dr, p, q, t + 2, edge)
            for p, q in ((hip, knee), (knee, ankle)):
                _capsule(dr, p, q, t, bottom)
            if kind == "jeans":
                # faded knees, rolled cuffs and a light seam: what tells jeans apart
                fade = _mix(bottom, (235, 235, 235), 0.28)
                _capsule(dr, _along(hip, knee, 0.7), _along(knee, ankle, 0.15), t * 0.55, fade)
                _capsule(dr, _along(knee, ankle, 0.9), ankle, t * 1.08, fade)
        else:
            t = self.leg_t * 0.86
            _capsule(dr, hip, knee, t, skin)
            _capsule(dr, knee, ankle, t, skin)
            if kind == "shorts":
                end = _along(hip, knee, 0.62)
                _capsule(dr, hip, end, self.leg_t * 1.32 + 2, _outline(bottom))
                _capsule(dr, hip, end, self.leg_t * 1.32, bottom)
        # shoe
        x, y = ankle
        # Shoes are drawn a little oversized so their colour survives a 64x32 resize.
        if self.side:
            fx = x + self.d * self.L(0.028)
            box = (fx - self.L(0.066), y - self.L(0.016), fx + self.L(0.066), y + self.L(0.045))
        else:
            box = (x - self.L(0.052), y - self.L(0.016), x + self.L(0.052), y + self.L(0.045))
        shoes = _scale(c["shoes"], shade)
        dr.ellipse(box, fill=shoes, outline=_outline(shoes), width=1)

    def draw_hips(self) -> None:
        """Garment across the hips (crotch of trousers/shorts, skirt)."""
        a, dr = self.a, self.draw
        colour = self.c["bottom"]
        hw = self.hw * self.depth
        if a.bottom_type in ("trousers", "jeans", "shorts"):
            dr.polygon(
                [
                    (self.cx - hw, self.y(0.48)),
                    (self.cx + hw, self.y(0.48)),
                    (self.cx + hw * 0.85, self.y(0.585)),
                    (self.cx - hw * 0.85, self.y(0.585)),
                ],
                fill=colour,
            )
        elif a.bottom_type == "skirt":
            flare = 1.6 if not self.side else 1.25
            pts = [
                (self.cx - hw * 1.02, self.y(0.47)),
                (self.cx + hw * 1.02, self.y(0.47)),
                (self.cx + hw * flare, self.y(0.69)),
                (self.cx - hw * flare, self.y(0.69)),
            ]
            dr.polygon(pts, fill=colour, outline=_outline(colour), width=2)

    def draw_arm(
        self, sh: tuple[float, float], el: tuple[float, float], hand: tuple[float, float], shade: float
    ) -> None:
        a, c, dr = self.a, self.c, self.draw
        skin = _scale(c["skin"], shade)
        top = _scale(c["top"], shade)
        t = self.arm_t
        if a.top_type in ("long-sleeve", "jacket", "coat"):
            edge = _outline(top)
            _capsule(dr, sh, el, t * 1.12 + 2, edge)
            _capsule(dr, el, hand, t * 1.05 + 2, edge)
            _capsule(dr, sh, el, t * 1.12, top)
            _capsule(dr, el, hand, t * 1.05, top)
        else:
            _capsule(dr, sh, el, t * 0.9, skin)
            _capsule(dr, el, hand, t * 0.85, skin)
            if a.top_type == "t-shirt":
                _capsule(dr, sh, _along(sh, el, 0.55), t * 1.3, top)
        r = t * 0.55
        dr.ellipse((hand[0] - r, hand[1] - r, hand[0] + r, hand[1] + r), fill=skin)

    # ---- torso -----------------------------------------------------------
    def draw_torso(self) -> None:
        a, c, dr = self.a, self.c, self.draw
        cx, k = self.cx, self.depth
        sw, ww, hw = self.sw * k, self.ww * k, self.hw * k
        y_sh = self.y(0.158)
        skin = c["skin"]
        # neck + bare shoulders under sleeveless garments
        dr.rectangle((cx - self.L(0.026), self.y(0.12), cx + self.L(0.026), y_sh + self.L(0.02)), fill=skin)
        bare = [
            (cx - sw, y_sh + self.L(0.012)),
            (cx + sw, y_sh + self.L(0.012)),
            (cx + ww, self.y(0.36)),
            (cx + hw, self.y(0.5)),
            (cx - hw, self.y(0.5)),
            (cx - ww, self.y(0.36)),
        ]
        dr.polygon(bare, fill=skin)
        # Seen from the side the arms hang from the body's centre line, so no
        # shoulder caps stick out of the silhouette.
        for s in () if self.side else (-1.0, 1.0):
            x = cx + s * (sw - self.arm_t * 0.45)
            r = self.arm_t * 0.62
            dr.ellipse((x - r, self.y(0.175) - r, x + r, self.y(0.175) + r), fill=skin)

        top = c["top"]
        kind = a.top_type
        hem_y, hem_w = {
            "t-shirt": (0.53, 1.02),
            "long-sleeve": (0.53, 1.02),
            "vest": (0.52, 1.0),
            "jacket": (0.565, 1.12),
            "coat": (0.775, 1.32),
            "dress": (0.76, 1.62),
        }[kind]
        if self.side:
            hem_w = 1.0 + (hem_w - 1.0) * 0.6
        if kind in ("vest", "dress") and not self.side:
            strap = sw * 0.52
            pts = [
                (cx - strap, y_sh),
                (cx + strap, y_sh),
                (cx + sw * 0.86, self.y(0.245)),
                (cx + ww, self.y(0.37)),
                (cx + hw * hem_w, self.y(hem_y)),
                (cx - hw * hem_w, self.y(hem_y)),
                (cx - ww, self.y(0.37)),
                (cx - sw * 0.86, self.y(0.245)),
            ]
        else:
            pts = [
                (cx - sw, y_sh),
                (cx + sw, y_sh),
                (cx + ww * 1.04, self.y(0.37)),
                (cx + hw * hem_w, self.y(hem_y)),
                (cx - hw * hem_w, self.y(hem_y)),
                (cx - ww * 1.04, self.y(0.37)),
            ]
        dr.polygon(pts, fill=top, outline=_outline(top), width=2)
        if kind not in ("vest", "dress") and not self.side:
            for s in (-1.0, 1.0):
                x = cx + s * (sw - self.arm_t * 0.45)
                r = self.arm_t * 0.58
                dr.ellipse((x - r, self.y(0.178) - r, x + r, self.y(0.178) + r), fill=top)
        if self.facing == "back":
            if kind == "coat":
                dr.line([(cx, self.y(0.5)), (cx, self.y(hem_y))], fill=_outline(top), width=2)
            return
        if self.side:
            if kind in ("jacket", "coat"):
                x = cx + self.d * sw * 0.85
                dr.line([(x, y_sh + self.L(0.03)), (x, self.y(hem_y))], fill=_outline(top), width=2)
            return
        if kind in ("t-shirt", "long-sleeve"):
            r = self.L(0.03)
            dr.pieslice((cx - r, y_sh - r, cx + r, y_sh + r), 0, 180, fill=skin)
        elif kind in ("jacket", "coat"):
            v = self.L(0.05)
            dr.polygon([(cx - v, y_sh), (cx + v, y_sh), (cx, self.y(0.29))], fill=c["inner"])
            dr.line([(cx, self.y(0.29)), (cx, self.y(hem_y))], fill=_outline(top), width=2)
            if kind == "coat":
                r = max(1.0, self.L(0.008))
                for f in (0.34, 0.42, 0.5):
                    bx = cx - self.L(0.018)
                    dr.ellipse((bx - r, self.y(f) - r, bx + r, self.y(f) + r), fill=_outline(top))
                dr.line([(cx - hw * 0.9, self.y(0.44)), (cx + hw * 0.9, self.y(0.44))], fill=_outline(top), width=2)

    # ---- head ------------------------------------------------------------
    def draw_hair_behind(self) -> None:
        a, dr = self.a, self.draw
        if a.hair_style == "bald":
            return
        hx, hy = self.head_c
        r = self.head_r
        hair = self.c["hair"]
        if a.hair_style == "long" and self.facing == "front":
            dr.rounded_rectangle((hx - 1.2 * r, hy - 0.9 * r, hx + 1.2 * r, self.y(0.25)), radius=r * 0.6, fill=hair)
        elif a.hair_style == "ponytail" and self.facing == "front":
            s = self.rng.choice((-1.0, 1.0))
            dr.ellipse(
                (hx + s * 0.75 * r - 0.4 * r, hy - 0.2 * r, hx + s * 0.75 * r + 0.55 * r, hy + 1.5 * r), fill=hair
            )

    def draw_head(self) -> None:
        a, c, dr = self.a, self.c, self.draw
        hx, hy = self.head_c
        r = self.head_r
        skin, hair = c["skin"], c["hair"]
        dr.ellipse((hx - r, hy - r * 1.08, hx + r, hy + r), fill=skin, outline=_scale(skin, 0.8), width=1)
        style = a.hair_style
        if self.facing == "back":
            if style != "bald":
                dr.ellipse((hx - r * 1.06, hy - r * 1.14, hx + r * 1.06, hy + r * 1.02), fill=hair)
                if style == "long":
                    dr.rounded_rectangle(
                        (hx - 1.22 * r, hy - 0.2 * r, hx + 1.22 * r, self.y(0.27)), radius=r * 0.6, fill=hair
                    )
                elif style == "ponytail":
                    dr.ellipse((hx - 0.42 * r, hy + 0.4 * r, hx + 0.42 * r, hy + 2.1 * r), fill=hair)
        elif self.side:
            d = self.d
            if style != "bald":
                box = (hx - r * 1.07, hy - r * 1.16, hx + r * 1.07, hy + r * 1.02)
                start, end = (150.0, 345.0) if style == "short" else (105.0, 350.0)
                if d < 0:
                    start, end = 180.0 - end, 180.0 - start
                dr.pieslice(box, start, end, fill=hair)
                if style == "long":
                    dr.rounded_rectangle(
                        (
                            min(hx - d * 1.12 * r, hx - d * 0.1 * r),
                            hy - 0.3 * r,
                            max(hx - d * 1.12 * r, hx - d * 0.1 * r),
                            self.y(0.26),
                        ),
                        radius=r * 0.5,
                        fill=hair,
                    )
                elif style == "ponytail":
                    tx = hx - d * 1.25 * r
                    dr.polygon(
                        [
                            (hx - d * 0.8 * r, hy - 0.4 * r),
                            (tx - d * 0.35 * r, hy + 0.2 * r),
                            (tx, hy + 1.6 * r),
                            (hx - d * 0.7 * r, hy + 0.3 * r),
                        ],
                        fill=hair,
                    )
            er = max(1.0, self.L(0.008))
            ex = hx + d * 0.55 * r
            dr.ellipse((ex - er, hy - er, ex + er, hy + er), fill=(40, 30, 30))
        else:
            er = max(1.0, self.L(0.008))
            for s in (-1.0, 1.0):
                ex = hx + s * 0.36 * r
                dr.ellipse((ex - er, hy - er, ex + er, hy + er), fill=(40, 30, 30))
            if style != "bald":
                dr.pieslice((hx - r * 1.08, hy - r * 1.16, hx + r * 1.08, hy + r * 0.7), 180, 360, fill=hair)
                if style == "long":
                    for s in (-1.0, 1.0):
                        x0, x1 = sorted((hx + s * 0.72 * r, hx + s * 1.22 * r))
                        dr.rounded_rectangle((x0, hy - 0.45 * r, x1, self.y(0.235)), radius=r * 0.25, fill=hair)
                else:
                    for s in (-1.0, 1.0):
                        x0, x1 = sorted((hx + s * 0.78 * r, hx + s * 1.06 * r))
                        dr.rectangle((x0, hy - 0.45 * r, x1, hy + 0.15 * r), fill=hair)
        self._draw_hat()

    def _draw_hat(self) -> None:
        a, dr = self.a, self.draw
        if a.hat is None:
            return
        hx, hy = self.head_c
        r = self.head_r
        col = self.c["hat"]
        edge = _outline(col)
        if a.hat == "cap":
            dr.pieslice(
                (hx - r * 1.1, hy - r * 1.24, hx + r * 1.1, hy + r * 0.72), 180, 360, fill=col, outline=edge, width=1
            )
            if self.side:
                x0, x1 = sorted((hx + self.d * 0.4 * r, hx + self.d * 1.75 * r))
                dr.rectangle((x0, hy - 0.3 * r, x1, hy - 0.08 * r), fill=col, outline=edge, width=1)
            elif self.facing == "front":
                dr.ellipse(
                    (hx - 1.18 * r, hy - 0.42 * r, hx + 1.18 * r, hy - 0.02 * r), fill=col, outline=edge, width=1
                )
        else:
            dr.pieslice(
                (hx - r * 1.13, hy - r * 1.42, hx + r * 1.13, hy + r * 0.9), 180, 360, fill=col, outline=edge, width=1
            )
            dr.rectangle(
                (hx - 1.13 * r, hy - 0.42 * r, hx + 1.13 * r, hy - 0.08 * r),
                fill=_scale(col, 0.85),
                outline=edge,
                width=1,
            )

    # ---- bags ------------------------------------------------------------
    def draw_backpack_behind(self) -> None:
        if self.a.bag != "backpack" or self.facing != "front":
            return
        col = self.c["bag"]
        sw = self.sw
        self.draw.rounded_rectangle(
            (self.cx - sw * 1.1, self.y(0.15), self.cx + sw * 1.1, self.y(0.44)),
            radius=self.L(0.03),
            fill=col,
            outline=_outline(col),
            width=2,
        )

    def draw_bags_front(self, hand_front: tuple[float, float], hand_side: float) -> None:
        a, dr = self.a, self.draw
        if a.bag is None:
            return
        col = self.c["bag"]
        edge = _outline(col)
        cx, y = self.cx, self.y
        strap_w = max(2, int(round(self.L(0.03))))
        if a.bag == "backpack":
            if self.facing == "back":
                dr.rounded_rectangle(
                    (cx - self.L(0.13), y(0.185), cx + self.L(0.13), y(0.47)),
                    radius=self.L(0.03),
                    fill=col,
                    outline=edge,
                    width=2,
                )
                dr.rounded_rectangle(
                    (cx - self.L(0.09), y(0.34), cx + self.L(0.09), y(0.45)),
                    radius=self.L(0.02),
                    fill=_scale(col, 0.85),
                    outline=edge,
                    width=1,
                )
            elif self.side:
                back = self.sw * self.depth
                x0, x1 = sorted((cx - self.d * (back + self.L(0.11)), cx - self.d * (back - self.L(0.02))))
                dr.rounded_rectangle((x0, y(0.18), x1, y(0.45)), radius=self.L(0.03), fill=col, outline=edge, width=2)
                dr.line([(cx, y(0.165)), (cx + self.d * back * 0.8, y(0.36))], fill=col, width=strap_w)
            else:
                for s in (-1.0, 1.0):
                    dr.line(
                        [(cx + s * self.sw * 0.55, y(0.158)), (cx + s * self.sw * 0.62, y(0.40))],
                        fill=col,
                        width=strap_w,
                    )
        elif a.bag == "handbag":
            hx, hy = hand_front
            w, h = self.L(0.06), self.L(0.10)
            dr.arc((hx - w * 0.55, hy - self.L(0.02), hx + w * 0.55, hy + self.L(0.05)), 180, 360, fill=edge, width=2)
            dr.polygon(
                [
                    (hx - w * 0.8, hy + self.L(0.02)),
                    (hx + w * 0.8, hy + self.L(0.02)),
                    (hx + w, hy + h),
                    (hx - w, hy + h),
                ],
                fill=col,
                outline=edge,
                width=2,
            )
        else:
            s = hand_side
            if self.side:
                start = (cx - self.d * self.sw * 0.3, y(0.165))
                bx = cx + self.d * self.sw * 0.55
            else:
                start = (cx + s * self.sw * 0.7, y(0.165))
                bx = cx - s * (self.hw + self.L(0.035))
            dr.line([start, (bx, y(0.46))], fill=col, width=strap_w)
            w = self.L(0.062)
            dr.rounded_rectangle(
                (bx - w, y(0.44), bx + w, y(0.55)), radius=self.L(0.012), fill=col, outline=edge, width=2
            )
            dr.line([(bx - w, y(0.475)), (bx + w, y(0.475))], fill=edge, width=1)

    # ---- whole figure ------------------------------------------------------
    def paint(self) -> None:
        legs = self._legs()
        arms = self._arms()
        self.draw_hair_behind()
        self.draw_backpack_behind()
        for arm in arms:
            if not arm[4]:
                self.draw_arm(arm[0], arm[1], arm[2], arm[3])
        for hip, knee, ankle, shade in legs:
            self.draw_leg(hip, knee, ankle, shade)
        self.draw_hips()
        self.draw_torso()
        front_arms = [arm for arm in arms if arm[4]]
        if self.side:
            # the far-side bag strap / backpack belong behind the near arm
            self.draw_head()
            hand_arm = front_arms[0]
            if self.a.bag != "handbag":
                self.draw_bags_front(hand_arm[2], 1.0)
            self.draw_arm(hand_arm[0], hand_arm[1], hand_arm[2], hand_arm[3])
            if self.a.bag == "handbag":
                self.draw_bags_front(hand_arm[2], 1.0)
            return
        for arm in front_arms:
            self.draw_arm(arm[0], arm[1], arm[2], arm[3])
        self.draw_head()
        side = self.rng.choice((0, 1))
        hand = front_arms[side][2]
        self.draw_bags_front(hand, -1.0 if side == 0 else 1.0)


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


# --------------------------------------------------------------------------- captions

_SUBJECT_NOUNS = {
    "male": ("man", "man", "young man", "gentleman", "guy", "male pedestrian"),
    "female": ("woman", "woman", "young woman", "lady", "girl", "female pedestrian"),
}
_NEUTRAL_NOUNS = ("person", "pedestrian", "individual")
_BUILD_WORDS = {"slim": ("slim", "thin", "slender"), "average": (), "broad": ("stocky", "heavyset", "broad-shouldered")}

# (pattern, words naming the garment type); "{c}" is the colour word.
_HAIR_FORMS = {
    "short": (
        ("short {c} hair", "short"),
        ("{c} short hair", "short"),
        ("short, {c} hair", "short"),
        ("a short {c} haircut", "short haircut"),
    ),
    "long": (
        ("long {c} hair", "long"),
        ("{c} long hair", "long"),
        ("long, flowing {c} hair", "long flowing"),
        ("{c} hair down to {poss} back", "down to back"),
    ),
    "ponytail": (
        ("{c} hair tied in a ponytail", "tied in a ponytail"),
        ("a {c} ponytail", "ponytail"),
        ("{c} hair pulled back into a ponytail", "pulled back into a ponytail"),
    ),
    "bald": (("a bald head", "bald"), ("a shaved head", "shaved")),
}
_HAT_FORMS = {
    "cap": (("{c} cap", "cap"), ("{c} baseball cap", "baseball cap")),
    "beanie": (("{c} beanie", "beanie"), ("{c} knit hat", "knit hat"), ("{c} woolly hat", "woolly hat")),
}
_TOP_FORMS = {
    "t-shirt": (
        ("{c} t-shirt", "t-shirt"),
        ("{c} tee", "tee"),
        ("short-sleeved {c} shirt", "short-sleeved shirt"),
        ("{c} short-sleeve t-shirt", "short-sleeve t-shirt"),
    ),
    "long-sleeve": (
        ("{c} long-sleeved shirt", "long-sleeved shirt"),
        ("long-sleeve {c} top", "long-sleeve top"),
        ("{c} shirt with long sleeves", "shirt with long sleeves"),
        ("{c} sweater", "sweater"),
    ),
    "jacket": (
        ("{c} jacket", "jacket"),
        ("{c} zip-up jacket", "zip-up jacket"),
        ("{c} windbreaker jacket", "windbreaker jacket"),
    ),
    "coat": (
        ("{c} coat", "coat"),
        ("long {c} coat", "long coat"),
        ("{c} overcoat", "overcoat"),
        ("knee-length {c} coat", "knee-length coat"),
    ),
    "vest": (("{c} vest", "vest"), ("{c} tank top", "tank top"), ("sleeveless {c} top", "sleeveless top")),
    "dress": (
        ("{c} dress", "dress"),
        ("sleeveless {c} dress", "sleeveless dress"),
        ("{c} knee-length dress", "knee-length dress"),
    ),
}
_BOTTOM_FORMS = {
    "trousers": (
        ("{c} trousers", "trousers"),
        ("{c} pants", "pants"),
        ("a pair of {c} trousers", "trousers"),
        ("{c} slacks", "slacks"),
    ),
    "jeans": (("{c} jeans", "jeans"), ("a pair of {c} jeans", "jeans"), ("{c} denim jeans", "denim jeans")),
    "shorts": (
        ("{c} shorts", "shorts"),
        ("a pair of {c} shorts", "shorts"),
        ("{c} knee-length shorts", "knee-length shorts"),
    ),
    "skirt": (("a {c} skirt", "skirt"), ("a short {c} skirt", "short skirt"), ("a {c} pleated skirt", "pleated skirt")),
}
_BOTTOM_NOUNS = {"trousers": ("trousers", "pants"), "jeans": ("jeans",), "shorts": ("shorts",), "skirt": ("skirt",)}
_SHOE_FORMS = ("{c} shoes", "a pair of {c} shoes", "{c} sneakers", "{c} trainers")
_BAG_FORMS = {
    "backpack": (
        ("a {c} backpack", "backpack"),
        ("a {c} rucksack", "rucksack"),
        ("a {c} backpack on {poss} back", "backpack"),
    ),
    "handbag": (("a {c} handbag", "handbag"), ("a {c} purse", "purse"), ("a small {c} handbag", "small handbag")),
    "shoulder bag": (
        ("a {c} shoulder bag", "shoulder bag"),
        ("a {c} crossbody bag", "crossbody bag"),
        ("a {c} bag over {poss} shoulder", "bag over shoulder"),
    ),
}

# Irrelevant material an MLLM or a web caption adds: photo meta-talk,
# boilerplate, background descriptions (some with colour words, the nastiest kind).
_IRRELEVANT_PREFIX = (
    "in a photo taken on a sunny day",
    "in this stock photo",
    "in a high-resolution image",
    "on a busy city street",
    "captured by a security camera",
    "in a picture posted online",
    "at a shopping mall",
    "in this candid street shot",
)
_IRRELEVANT_CLAUSE = (
    "in a photo taken on a sunny day",
    "against a blurry background",
    "next to a parked car",
    "in front of a grey building",
    "under a blue sky",
    "near a green hedge",
    "in the rain",
    "on a quiet afternoon",
)
_IRRELEVANT_SENTENCE = (
    "The image is high resolution.",
    "Stock photo.",
    "All rights reserved.",
    "Click here to download the full image.",
    "The background shows trees and a white building.",
    "There are cars parked behind {obj}.",
    "The photo was taken in the afternoon.",
    "Free shipping on all orders.",
    "Image courtesy of the photographer.",
    "The weather looks cloudy.",
    "A red car is visible in the background.",
    "Best quality wallpaper in 4k.",
    "The street behind {obj} is crowded.",
    "Photo by a professional photographer.",
)

NOISE_KINDS = ("wrong_attr", "irrelevant")


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _join(items: Sequence[str], oxford: bool) -> str:
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} and {items[1]}"
    return ", ".join(items[:-1]) + ("," if oxford else "") + f" and {items[-1]}"


_ARTICLE_RE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _fix_articles(text: str) -> str:
    """ "a orange skirt" -> "an orange skirt" (patterns fix the article before the colour is known)."""
    return _ARTICLE_RE.sub(r"\1n ", text)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


class _Verbaliser:
    """Noun phrases for one caption, each drawn from its own random stream.

    Separate streams mean a corrupted copy (one attribute changed) words
    every other part of the caption exactly like the clean one.
    """

    STREAMS = ("template", "subject", "hair", "hat", "top", "bottom", "shoes", "bag", "clauses")

    def __init__(self, attrs: PersonAttributes, rng: random.Random) -> None:
        self.a = attrs
        self.rngs = {name: random.Random(rng.getrandbits(64)) for name in self.STREAMS}
        self.surfaces: dict[str, list[str]] = {}
        male = attrs.gender == "male"
        self.pron, self.poss, self.obj = ("he", "his", "him") if male else ("she", "her", "her")
        self._cache: dict[str, str | None] = {}
        # Shoes go unmentioned in some captions, as in real ones.
        self.mention_shoes = self.rngs["shoes"].random() >= 0.2

    def _note(self, field: str, text: str) -> None:
        self.surfaces.setdefault(field, []).append(text)

    def pick(self, stream: str, options: Sequence[Any]) -> Any:
        return self.rngs[stream].choice(options)

    def _colour(self, stream: str, field: str, name: str, palette: dict[str, tuple[RGB, tuple[str, ...]]]) -> str:
        word = self.pick(stream, palette[name][1])
        self._note(field, word)
        return word

    def _form(self, stream: str, type_field: str, forms: Sequence[tuple[str, str]], colour: str) -> str:
        pattern, type_words = self.pick(stream, forms)
        self._note(type_field, type_words)
        return pattern.format(c=colour, poss=self.poss)

    def cached(self, name: str, build: Callable[[], str | None]) -> str | None:
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    # ---- phrases -------------------------------------------------------------
    def subject(self, det: str = "a") -> str:
        rng = self.rngs["subject"]
        neutral = rng.random() < 0.2
        noun = rng.choice(_NEUTRAL_NOUNS if neutral else _SUBJECT_NOUNS[self.a.gender])
        if not neutral:
            self._note("gender", noun)
        adjectives = _BUILD_WORDS[self.a.build]
        if adjectives and rng.random() < 0.3:
            noun = f"{rng.choice(adjectives)} {noun}"
        return _article(noun) if det == "a" else f"{det} {noun}"

    def hair(self) -> str:
        def build() -> str:
            a = self.a
            colour = "" if a.hair_colour is None else self._colour("hair", "hair_colour", a.hair_colour, HAIR_PALETTE)
            hair = self._form("hair", "hair_style", _HAIR_FORMS[a.hair_style], colour)
            if a.hat is None:
                return hair
            hat_colour = self._colour("hat", "hat_colour", a.hat_colour, PALETTE)  # type: ignore[arg-type]
            hat = _article(self._form("hat", "hat", _HAT_FORMS[a.hat], hat_colour))
            if a.hair_style == "bald":
                return hat
            if self.rngs["hat"].random() < 0.5:
                return f"{hat} and {hair}"
            return f"{hair} under {hat}"

        return self.cached("hair", build)  # type: ignore[return-value]

    def top(self) -> str:
        def build() -> str:
            colour = self._colour("top", "top_colour", self.a.top_colour, PALETTE)
            return _article(self._form("top", "top_type", _TOP_FORMS[self.a.top_type], colour))

        return self.cached("top", build)  # type: ignore[return-value]

    def bottom(self) -> str | None:
        def build() -> str | None:
            if self.a.bottom_type is None:
                return None
            colour = self._colour("bottom", "bottom_colour", self.a.bottom_colour, PALETTE)  # type: ignore[arg-type]
            return self._form("bottom", "bottom_type", _BOTTOM_FORMS[self.a.bottom_type], colour)

        return self.cached("bottom", build)

    def bottom_predicate(self) -> str | None:
        """ "her jeans are blue" form."""

        def build() -> str | None:
            kind = self.a.bottom_type
            if kind is None:
                return None
            noun = self.pick("bottom", _BOTTOM_NOUNS[kind])
            self._note("bottom_type", noun)
            colour = self._colour("bottom", "bottom_colour", self.a.bottom_colour, PALETTE)  # type: ignore[arg-type]
            verb = "is" if kind == "skirt" else "are"
            return f"{self.poss} {noun} {verb} {colour}"

        return self.cached("bottom_predicate", build)

    def shoes(self) -> str | None:
        def build() -> str | None:
            if not self.mention_shoes:
                return None
            colour = self._colour("shoes", "shoe_colour", self.a.shoe_colour, PALETTE)
            return self.pick("shoes", _SHOE_FORMS).format(c=colour)

        return self.cached("shoes", build)

    def shoes_predicate(self) -> str | None:
        def build() -> str | None:
            if not self.mention_shoes:
                return None
            colour = self._colour("shoes", "shoe_colour", self.a.shoe_colour, PALETTE)
            return f"{self.poss} shoes are {colour}"

        return self.cached("shoes_predicate", build)

    def bag(self) -> str | None:
        def build() -> str | None:
            if self.a.bag is None:
                return None
            colour = self._colour("bag", "bag_colour", self.a.bag_colour, PALETTE)  # type: ignore[arg-type]
            return self._form("bag", "bag", _BAG_FORMS[self.a.bag], colour)

        return self.cached("bag", build)

    def carrying(self, allow_with: bool = True) -> str:
        """Verb introducing the bag; "with" is avoided where the sentence already has one."""
        if self.a.bag == "handbag":
            second = "holding"
        else:
            second = "with" if allow_with else "carrying"
        return self.pick("clauses", ("carrying", second))

    def clothes(self) -> str:
        items = [x for x in (self.top(), self.bottom(), self.shoes()) if x]
        rng = self.rngs["clauses"]
        if len(items) > 1 and rng.random() < 0.25:
            rng.shuffle(items)
        return _join(items, oxford=rng.random() < 0.3)

    def wear_verb(self) -> str:
        return self.pick("clauses", ("wears", "is wearing", "has on", "is dressed in"))


def _t_with_wears(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} with {v.hair()} {v.wear_verb()} {v.clothes()}"
    if v.bag():
        s += f", {v.carrying()} {v.bag()}"
    return s + "."


def _t_pedestrian_wearing(v: _Verbaliser) -> str:
    opener = v.pick("template", ("The pedestrian", "This person", "The person", "This pedestrian"))
    s = f"{opener} is wearing {v.clothes()}. {_capitalise(v.pron)} has {v.hair()}"
    if v.bag():
        s += f" and is carrying {v.bag()}"
    return s + "."


def _t_in_walking(v: _Verbaliser) -> str:
    outfit = v.top() if v.bottom() is None else f"{v.top()} and {v.bottom()}"
    s = f"{_capitalise(v.subject())} in {outfit} is walking"
    if v.bag():
        s += f" {v.carrying()} {v.bag()}"
    s += f". {_capitalise(v.pron)} has {v.hair()}"
    if v.shoes():
        s += f" and wears {v.shoes()}"
    return s + "."


def _t_this_has(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject('this'))} has {v.hair()}. {_capitalise(v.pron)} is dressed in {v.clothes()}"
    if v.bag():
        s += f". {_capitalise(v.pron)} carries {v.bag()}"
    return s + "."


def _t_wearing_fragment(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} wearing {v.clothes()}, with {v.hair()}"
    if v.bag():
        s += f", {v.carrying(allow_with=False)} {v.bag()}"
    return s + "."


def _t_pronoun_first(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.pron)} wears {v.top()}"
    rest = [x for x in (v.bottom(), v.shoes()) if x]
    if rest:
        s += f" with {_join(rest, oxford=False)}"
    s += f". {_capitalise(v.pron)} has {v.hair()}"
    if v.bag():
        s += f" and carries {v.bag()}"
    return s + "."


def _t_has_and_wearing(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} has {v.hair()} and is wearing {v.clothes()}."
    if v.bag():
        s += f" {_capitalise(v.pron)} carries {v.bag()}."
    return s


def _t_fragment_dressed(v: _Verbaliser) -> str:
    head = v.hair() if not v.bag() else f"{v.hair()} and {v.bag()}"
    return f"{_capitalise(v.subject())} with {head}, dressed in {v.clothes()}."


def _t_predicates(v: _Verbaliser) -> str:
    s = f"{_capitalise(v.subject())} with {v.hair()} is wearing {v.top()}."
    preds = [x for x in (v.bottom_predicate(), v.shoes_predicate()) if x]
    if preds:
        s += f" {_capitalise(_join(preds, oxford=False))}."
    if v.bag():
        s += f" {_capitalise(v.pron)} is carrying {v.bag()}."
    return s


def _t_clothes_first(v: _Verbaliser) -> str:
    s = f"Wearing {v.clothes()}, {v.subject()} with {v.hair()} walks"
    if v.bag():
        s += f" while carrying {v.bag()}"
    return s + "."


def _t_dressed_in(v: _Verbaliser) -> str:
    outfit = v.top() if v.bottom() is None else f"{v.top()} and {v.bottom()}"
    owned = [x for x in (v.hair(), v.shoes(), v.bag()) if x]
    return f"{_capitalise(v.subject())} dressed in {outfit}. {_capitalise(v.pron)} has {_join(owned, oxford=False)}."


TEMPLATES: tuple[Callable[[_Verbaliser], str], ...] = (
    _t_with_wears,
    _t_pedestrian_wearing,
    _t_in_walking,
    _t_this_has,
    _t_wearing_fragment,
    _t_pronoun_first,
    _t_has_and_wearing,
    _t_fragment_dressed,
    _t_predicates,
    _t_clothes_first,
    _t_dressed_in,
)


def _other(rng: random.Random, options: Sequence[str], current: str | None) -> str:
    return rng.choice([o for o in options if o != current])


def _corruption_candidates(attrs: PersonAttributes, mentioned: set[str]) -> list[tuple[str, float]]:
    """(field, weight) pairs a wrong-attribute corruption may change."""
    out: list[tuple[str, float]] = []
    for field, weight in (
        ("top_colour", 3.0),
        ("bottom_colour", 3.0),
        ("shoe_colour", 1.5),
        ("bag_colour", 2.0),
        ("hat_colour", 1.5),
        ("hair_colour", 1.5),
    ):
        if field in mentioned:
            out.append((field, weight))
    if "top_type" in mentioned and attrs.top_type != "dress":
        out.append(("top_type", 1.0))
    if "bottom_type" in mentioned:
        out.append(("bottom_type", 1.0))
    if "bag" in mentioned:
        out.append(("bag", 1.0))
    if "hat" in mentioned:
        out.append(("hat", 0.5))
    if "hair_style" in mentioned and attrs.hair_style != "bald":
        out.append(("hair_style", 0.7))
    if attrs.bag is None:
        out.append(("add_bag", 1.0))
    if attrs.hat is None:
        out.append(("add_hat", 0.5))
    return out


def _corrupt(attrs: PersonAttributes, field: str, rng: random.Random) -> tuple[PersonAttributes, dict[str, Any]]:
    """A copy of ``attrs`` with one wrong attribute, and a record of the change."""
    if field == "add_bag":
        bag, colour = rng.choice(BAGS), rng.choice(_COLOUR_NAMES)
        new = dataclasses.replace(attrs, bag=bag, bag_colour=colour)
        return new, {"field": "bag", "true": None, "noisy": f"{colour} {bag}", "fields": ["bag", "bag_colour"]}
    if field == "add_hat":
        hat, colour = rng.choice(HATS), rng.choice(_COLOUR_NAMES)
        new = dataclasses.replace(attrs, hat=hat, hat_colour=colour)
        return new, {"field": "hat", "true": None, "noisy": f"{colour} {hat}", "fields": ["hat", "hat_colour"]}
    current = getattr(attrs, field)
    options: Sequence[str]
    if field == "hair_colour":
        options = tuple(HAIR_PALETTE)
    elif field.endswith("_colour"):
        options = _COLOUR_NAMES
    elif field == "top_type":
        options = tuple(t for t in _TOPS_BY_GENDER[attrs.gender] if t != "dress")
    elif field == "bottom_type":
        options = _BOTTOMS_BY_GENDER[attrs.gender]
    elif field == "bag":
        options = BAGS
    elif field == "hat":
        options = HATS
    elif field == "hair_style":
        options = ("short", "long", "ponytail")
    else:
        raise ValueError(f"cannot corrupt unknown attribute field {field!r}")
    noisy = _other(rng, options, current)
    new = dataclasses.replace(attrs, **{field: noisy})
    return new, {"field": field, "true": current, "noisy": noisy, "fields": [field]}


def _insert_irrelevant(caption: str, pron_obj: str, rng: random.Random) -> tuple[str, dict[str, Any]]:
    where = rng.choice(("prefix", "clause", "sentence_end", "sentence_start"))
    if where == "prefix":
        phrase = _capitalise(rng.choice(_IRRELEVANT_PREFIX))
        text = f"{phrase}, {caption[:1].lower()}{caption[1:]}"
    elif where == "clause":
        phrase = rng.choice(_IRRELEVANT_CLAUSE)
        text = f"{caption[:-1]}, {phrase}." if caption.endswith(".") else f"{caption}, {phrase}."
    else:
        phrase = rng.choice(_IRRELEVANT_SENTENCE).format(obj=pron_obj)
        text = f"{caption} {phrase}" if where == "sentence_end" else f"{phrase} {caption}"
    # "phrase" is the exact inserted text, so it is a substring of the caption.
    return text, {"kind": "irrelevant", "position": where, "phrase": phrase}


def describe(
    attrs: PersonAttributes, rng: random.Random, noise: str | None = None, template: int | None = None
) -> tuple[str, dict[str, Any] | None]:
    """Write one caption for ``attrs``; optionally corrupt it.

    Args:
        attrs: the identity.
        rng: random source (consumed).
        noise: None for a clean caption, ``"wrong_attr"`` (one wrong colour or
            item, or a hallucinated bag/hat) or ``"irrelevant"`` (an inserted
            phrase unrelated to the person).
        template: index into :data:`TEMPLATES`; random when None.

    Returns:
        (caption, info). ``info`` is None when clean; otherwise a dict with
        ``kind``, ``clean`` (the caption without the corruption), ``words``
        (lower-cased tokens that were inserted or changed) and details
        (``changes`` for wrong_attr, ``phrase``/``position`` for irrelevant).
    """
    if noise not in (None, *NOISE_KINDS):
        raise ValueError(f"describe: noise must be None or one of {NOISE_KINDS}, got {noise!r}")
    if template is None:
        template = rng.randrange(len(TEMPLATES))
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"describe: template must be in [0, {len(TEMPLATES)}), got {template}")
    verbaliser_seed = rng.getrandbits(64)
    clean_v = _Verbaliser(attrs, random.Random(verbaliser_seed))
    clean = _fix_articles(TEMPLATES[template](clean_v))
    if noise is None:
        return clean, None
    noise_rng = random.Random(rng.getrandbits(64))
    if noise == "irrelevant":
        text, info = _insert_irrelevant(clean, clean_v.obj, noise_rng)
        info.update(clean=clean, words=tokenize_caption(info["phrase"]))
        return text, info
    candidates = _corruption_candidates(attrs, set(clean_v.surfaces))
    field = noise_rng.choices([c[0] for c in candidates], [c[1] for c in candidates])[0]
    noisy_attrs, change = _corrupt(attrs, field, noise_rng)
    noisy_v = _Verbaliser(noisy_attrs, random.Random(verbaliser_seed))
    text = _fix_articles(TEMPLATES[template](noisy_v))
    words: list[str] = []
    for f in change.pop("fields"):
        for surface in noisy_v.surfaces.get(f, []):
            words.extend(tokenize_caption(surface))
    change["words"] = words
    info = {"kind": "wrong_attr", "changes": [change], "clean": clean, "words": words}
    return text, info


def caption_pair(
    attrs: PersonAttributes,
    rng: random.Random,
    noise_rate: float = 0.0,
    wrong_attr_rate: float = 0.5,
    irrelevant_rate: float = 0.5,
) -> list[tuple[str, dict[str, Any] | None]]:
    """Two captions from two different templates, each corrupted with probability ``noise_rate``.

    The noise draws happen whatever the rate, so changing ``noise_rate`` never
    changes the wording of the captions that stay clean.
    """
    templates = rng.sample(range(len(TEMPLATES)), 2)
    out = []
    total = wrong_attr_rate + irrelevant_rate
    for template in templates:
        u_noise, u_kind = rng.random(), rng.random()
        noise = None
        if u_noise < noise_rate:
            noise = "wrong_attr" if u_kind * total < wrong_attr_rate else "irrelevant"
        out.append(describe(attrs, random.Random(rng.getrandbits(64)), noise=noise, template=template))
    return out


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and rates of a synthetic corpus (all plain values, saved in meta.json).

    Attributes:
        identities: benchmark training identities.
        images_per_id: images per benchmark identity (all splits).
        val_ids: benchmark validation identities.
        test_ids: benchmark test identities.
        webperson_images: pretraining images (one identity each, disjoint from the benchmark).
        noise_rate: share of WebPerson captions that are corrupted.
        benchmark_noise_rate: share of benchmark *train* captions corrupted (val/test stay clean).
        wrong_attr_rate: relative weight of wrong-attribute corruptions.
        irrelevant_rate: relative weight of irrelevant-phrase corruptions.
        image_size: (height, width) of every image.
        shard_size: WebPerson samples per tar shard.
        seed: global seed.
        image_format: "jpg" or "png".
        jpeg_quality: JPEG quality when image_format is "jpg".
    """

    identities: int = 200
    images_per_id: int = 4
    val_ids: int = 50
    test_ids: int = 50
    webperson_images: int = 1000
    noise_rate: float = 0.3
    benchmark_noise_rate: float = 0.0
    wrong_attr_rate: float = 0.5
    irrelevant_rate: float = 0.5
    image_size: tuple[int, int] = (128, 64)
    shard_size: int = 250
    seed: int = 0
    image_format: str = "jpg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name in ("identities", "images_per_id", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("val_ids", "test_ids", "webperson_images", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("noise_rate", "benchmark_noise_rate", "wrong_attr_rate", "irrelevant_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be a number in [0, 1], got {value!r}")
        if self.wrong_attr_rate + self.irrelevant_rate <= 0.0:
            raise ValueError("SyntheticConfig: wrong_attr_rate + irrelevant_rate must be > 0")
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) for s in size) or size[0] < 32 or size[1] < 16:
            raise ValueError(
                f"SyntheticConfig.image_size must be (height>=32, width>=16) ints, got {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", size)
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"SyntheticConfig.image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"SyntheticConfig.jpeg_quality must be an int in [1, 100], got {self.jpeg_quality!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``config`` block of meta.json)."""
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size)
        return out


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 keeps thin coloured straps from bleeding into their surroundings.
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _render_job(job: tuple[dict[str, Any], int, tuple[int, int], str, str, int]) -> None:
    """Worker: render one image and write it (module level so it pickles)."""
    attrs_dict, seed, size, path, fmt, quality = job
    img = render_person(PersonAttributes.from_dict(attrs_dict), random.Random(seed), size)
    with open(path, "wb") as fh:
        fh.write(_encode(img, fmt, quality))


def _run_jobs(jobs: list[tuple[dict[str, Any], int, tuple[int, int], str, str, int]], workers: int) -> None:
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _render_job(job)
        return
    methods = multiprocessing.get_all_start_methods()
    # fork skips re-importing the package in every worker; each job carries
    # its own seed, so the start method cannot change the bytes.
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(processes=workers) as pool:
        for _ in pool.imap_unordered(_render_job, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 4)))):
            pass


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def _dump_json(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    return json.dumps(obj, ensure_ascii=True, indent=indent, sort_keys=sort_keys) + "\n"


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def write_shards(
    samples: Sequence[tuple[str, Path, dict[str, str]]], shard_dir: Path, shard_size: int, prefix: str = "webperson"
) -> list[Path]:
    """Write webdataset tar shards with reproducible bytes.

    Args:
        samples: (key, image file, captions dict) per sample; the member names
            are ``<key><image suffix>`` and ``<key>.json``.
        shard_dir: output folder (created).
        shard_size: samples per shard.
        prefix: shard file name prefix.

    Returns:
        The shard paths, in order.
    """
    if shard_size < 1:
        raise ValueError(f"write_shards: shard_size must be >= 1, got {shard_size}")
    shard_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(samples, key=lambda s: s[0])
    paths = []
    for shard_index, start in enumerate(range(0, len(ordered), shard_size)):
        members: list[tuple[str, bytes]] = []
        for key, image_path, captions in ordered[start : start + shard_size]:
            members.append((key + image_path.suffix, image_path.read_bytes()))
            members.append((key + ".json", _dump_json(captions, indent=None).encode("utf-8")))
        members.sort(key=lambda m: m[0])
        path = shard_dir / f"{prefix}-{shard_index:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                tar.addfile(*_tar_member(name, data))
        paths.append(path)
    return paths


def check_claimable(folder: Path, marker: str = MARKER, made_by: str = "the synthetic data generator", *,
                    what: str = "output folder") -> None:
    """Refuse `folder` unless it is absent, empty, or carries `marker` (a folder we made).

    A tool writes into and clears only folders it made, so pointing it at a folder
    of the user's own files (e.g. the real data root) can never lose them. `what`
    names the folder in the messages as the user gave it (e.g. ``--out``).

    Raises:
        OutputExistsError: `folder` is a file, or a non-empty folder without `marker`.
        OutputPathError: `folder` cannot be created (a file in its way, no permission).
    """
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{what} {folder} is a file, not a folder; choose a new or empty folder")
    check_output_path(folder, what, folder=True)
    if folder.is_dir() and not (folder / marker).is_file() and any(folder.iterdir()):
        raise OutputExistsError(
            f"{folder} is not empty and was not made by {made_by} (it has no {marker} file), so nothing "
            f"in it is written or removed: choose a new or empty folder, or delete {folder} yourself"
        )


def claim_folder(folder: Path, marker: str, record: dict[str, Any], made_by: str) -> None:
    """Create `folder` (or accept an empty or marked one) and write `marker` holding `record` as JSON.

    Raises:
        OutputExistsError: see :func:`check_claimable`.
    """
    check_claimable(folder, marker, made_by)
    folder.mkdir(parents=True, exist_ok=True)
    _write_text(folder / marker, _dump_json(record, indent=2, sort_keys=True))


def _prepare_out(out: Path, cfg: SyntheticConfig, overwrite: bool) -> None:
    check_claimable(out)
    existing = [p for p in (out / BENCHMARK_DIR, out / WEBPERSON_DIR) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"synthetic output already exists: {', '.join(map(str, existing))} (pass overwrite=True / --overwrite)"
        )
    # Marked before anything is written: an interrupted run leaves a folder a rerun may replace.
    claim_folder(out, MARKER, {"generator": GENERATOR_VERSION, "config": cfg.to_dict()},
                 "the synthetic data generator")
    for p in existing:
        shutil.rmtree(p)


def _noise_entry(info: dict[str, Any], image: str, caption_no: int, split: str, caption: str) -> dict[str, Any]:
    entry = {
        "image": image,
        "caption": caption_no,
        "split": split,
        "kind": info["kind"],
        "text": caption,
        "clean": info["clean"],
        "words": info["words"],
    }
    entry.update((k, v) for k, v in info.items() if k not in entry)
    return entry


def generate(
    out_dir: str | os.PathLike[str], config: SyntheticConfig | None = None, workers: int = 1, overwrite: bool = False
) -> dict[str, Any]:
    """Write the synthetic benchmark and pretraining corpus under ``out_dir``.

    Args:
        out_dir: output root; gets ``CUHK-PEDES/``, ``WebPerson/`` and side files.
        config: sizes, rates and seed (defaults when None).
        workers: rendering processes (does not affect any output byte).
        overwrite: replace the ``CUHK-PEDES/`` and ``WebPerson/`` folders of an earlier run.

    ``out_dir`` must be new, empty, or made by an earlier call (it holds :data:`MARKER`,
    written first): a folder of other files is never written into or cleared.

    Returns:
        The counts also written to ``meta.json``.

    Raises:
        OutputExistsError: ``out_dir`` holds files this generator did not make, or
            an earlier corpus and ``overwrite`` is False.
    """
    cfg = config or SyntheticConfig()
    out = Path(out_dir)
    _prepare_out(out, cfg, overwrite)
    ext = cfg.image_format
    quality = cfg.jpeg_quality
    n_bench = cfg.identities + cfg.val_ids + cfg.test_ids
    people = sample_identities(n_bench + cfg.webperson_images, cfg.seed)
    jobs: list[tuple[dict[str, Any], int, tuple[int, int], str, str, int]] = []

    # ---- benchmark (CUHK-PEDES layout) --------------------------------------
    bench_root = out / BENCHMARK_DIR
    splits = ["train"] * cfg.identities + ["val"] * cfg.val_ids + ["test"] * cfg.test_ids
    for split in ("train", "val", "test"):
        (bench_root / "imgs" / split).mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    bench_noise: dict[str, dict[str, Any]] = {}
    bench_attrs: dict[str, dict[str, Any]] = {}
    for index, split in enumerate(splits):
        pid = index + 1
        attrs = people[index]
        bench_attrs[str(pid)] = attrs.to_dict()
        rate = cfg.benchmark_noise_rate if split == "train" else 0.0
        for k in range(cfg.images_per_id):
            rel = f"{split}/{pid:05d}_{k:02d}.{ext}"
            jobs.append(
                (
                    attrs.to_dict(),
                    _derive_seed(cfg.seed, "benchmark-image", pid, k),
                    cfg.image_size,
                    str(bench_root / "imgs" / rel),
                    ext,
                    quality,
                )
            )
            pair = caption_pair(
                attrs,
                random.Random(_derive_seed(cfg.seed, "benchmark-captions", pid, k)),
                rate,
                cfg.wrong_attr_rate,
                cfg.irrelevant_rate,
            )
            captions = [text for text, _ in pair]
            for j, (text, info) in enumerate(pair):
                if info is not None:
                    bench_noise[str(2 * len(records) + j)] = _noise_entry(info, rel, j, split, text)
            records.append(
                {
                    "split": split,
                    "captions": captions,
                    "file_path": rel,
                    "processed_tokens": [tokenize_caption(c) for c in captions],
                    "id": pid,
                }
            )

    # ---- WebPerson ------------------------------------------------------------
    web_root = out / WEBPERSON_DIR
    web_entries: list[dict[str, dict[str, str]]] = []
    web_noise: dict[str, dict[str, Any]] = {}
    web_attrs: dict[str, dict[str, Any]] = {}
    shard_samples: list[tuple[str, Path, dict[str, str]]] = []
    for i in range(cfg.webperson_images):
        attrs = people[n_bench + i]
        rel = f"{i // 1000:04d}/{i:08d}.{ext}"
        image_path = web_root / "images" / rel
        image_path.parent.mkdir(parents=True, exist_ok=True)
        jobs.append(
            (
                attrs.to_dict(),
                _derive_seed(cfg.seed, "webperson-image", i),
                cfg.image_size,
                str(image_path),
                ext,
                quality,
            )
        )
        pair = caption_pair(
            attrs,
            random.Random(_derive_seed(cfg.seed, "webperson-captions", i)),
            cfg.noise_rate,
            cfg.wrong_attr_rate,
            cfg.irrelevant_rate,
        )
        caps = {"caption1": pair[0][0], "caption2": pair[1][0]}
        for j, (text, info) in enumerate(pair):
            if info is not None:
                web_noise[str(2 * i + j)] = _noise_entry(info, rel, j, "train", text)
        web_entries.append({rel: caps})
        web_attrs[rel] = attrs.to_dict()
        shard_samples.append((rel.rsplit(".", 1)[0], image_path, caps))

    logger.info("rendering %d images with %d worker(s)", len(jobs), workers)
    _run_jobs(jobs, workers)

    _write_text(bench_root / "reid_raw.json", _dump_json(records))
    web_root.mkdir(parents=True, exist_ok=True)
    _write_text(web_root / "annotations.json", _dump_json(web_entries))
    _write_text(web_root / "annotations.jsonl", "".join(_dump_json(e) for e in web_entries))
    shards = write_shards(shard_samples, web_root / "shards", cfg.shard_size)

    def split_counts(split: str) -> dict[str, int]:
        recs = [r for r in records if r["split"] == split]
        return {
            "ids": len({r["id"] for r in recs}),
            "images": len(recs),
            "captions": sum(len(r["captions"]) for r in recs),
            "noisy_captions": sum(1 for e in bench_noise.values() if e["split"] == split),
        }

    counts = {
        "benchmark": {split: split_counts(split) for split in ("train", "val", "test")},
        "webperson": {
            "images": cfg.webperson_images,
            "captions": 2 * cfg.webperson_images,
            "noisy_captions": len(web_noise),
            "shards": len(shards),
        },
    }
    meta = {
        "generator": GENERATOR_VERSION,
        "config": cfg.to_dict(),
        "counts": counts,
        "files": {
            "benchmark": f"{BENCHMARK_DIR}/reid_raw.json",
            "webperson": [
                f"{WEBPERSON_DIR}/annotations.json",
                f"{WEBPERSON_DIR}/annotations.jsonl",
                f"{WEBPERSON_DIR}/shards/",
            ],
            "attributes": "attributes.json",
            "noise_report": "noise_report.json",
        },
    }
    _write_text(out / "meta.json", _dump_json(meta, indent=2, sort_keys=True))
    _write_text(out / "attributes.json", _dump_json({"benchmark": bench_attrs, "webperson": web_attrs}, indent=1))
    noise_doc = {
        "description": (
            "keys are flat caption indices 2 * record + caption (0-based) in the order of "
            "reid_raw.json / annotations.json; 'words' are the inserted or changed tokens"
        ),
        "benchmark": bench_noise,
        "webperson": web_noise,
    }
    _write_text(out / "noise_report.json", _dump_json(noise_doc, indent=1))
    _write_text(out / "README.txt", _readme(cfg, counts))
    return counts


def _readme(cfg: SyntheticConfig, counts: dict[str, Any]) -> str:
    b = counts["benchmark"]
    w = counts["webperson"]
    lines = [
        "Synthetic text-based person retrieval data (GA-DMS framework)",
        f"generator: {GENERATOR_VERSION}",
        "",
        "CUHK-PEDES/   benchmark in CUHK-PEDES format: imgs/<file_path>, reid_raw.json",
        "WebPerson/    pretraining corpus: images/, annotations.json (list of {path: {caption1, caption2}}),",
        "              annotations.jsonl (same, one object per line), shards/*.tar (webdataset <key>.jpg + <key>.json)",
        "attributes.json    true attributes per benchmark id / WebPerson image",
        "noise_report.json  corrupted captions: kind, clean text, inserted/changed words",
        "",
    ]
    for split in ("train", "val", "test"):
        s = b[split]
        lines.append(
            f"benchmark {split:5s}: {s['ids']} ids, {s['images']} images, {s['captions']} captions, "
            f"{s['noisy_captions']} noisy"
        )
    lines.append(
        f"webperson: {w['images']} images, {w['captions']} captions, {w['noisy_captions']} noisy, {w['shards']} shards"
    )
    lines.append("")
    lines.append("parameters:")
    for key, value in sorted(cfg.to_dict().items()):
        lines.append(f"  {key} = {value}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- generic corpus

#: Random stream of the generic corpus's identities: another population than the
#: benchmark's and WebPerson's (``sample_identities``' default stream).
GENERIC_STREAM = "generic-identities"
#: Openers of web alt-text: words that come with every kind of image, so a contrastive
#: model learns that they say nothing about the person (as OpenAI's CLIP saw them).
_ALT_TEXT_OPENERS = ("", "", "a photo of ", "a picture of ", "an image of ", "a street photo of ",
                     "a cropped photo of ", "a low-resolution photo of ")
#: Web boilerplate that comes with images of anyone (its own list, not the noise phrases of
#: :func:`_insert_irrelevant`, though words such as "photo" or "street" occur in both).
_WEB_BOILERPLATE = ("stock image", "royalty free", "hd wallpaper", "free download", "editorial use only",
                    "high quality photo", "street style", "city life", "daily commute", "urban lifestyle",
                    "shot on a phone", "view more pictures", "spring fashion", "people walking downtown",
                    "image source: social media", "all images copyrighted")


def generic_caption(attrs: PersonAttributes, rng: random.Random) -> str:
    """One clean caption of the generic corpus: a benchmark-style sentence or web alt-text.

    Half the captions use :data:`TEMPLATES`; the other half are alt-text that names
    the person and a random subset of what they wear (``"a photo of a woman in a red
    coat and a black handbag"``, ``"grey trousers, white sneakers"``). Every word about
    the person is true of the image; 30% carry web boilerplate that says nothing about
    anyone (``"... - stock image"``), as the web captions OpenAI's CLIP learnt from do.
    """
    if rng.random() < 0.5:
        text = describe(attrs, random.Random(rng.getrandbits(64)))[0]
    else:
        v = _Verbaliser(attrs, random.Random(rng.getrandbits(64)))
        items = [x for x in (v.top(), v.bottom(), v.shoes(), v.bag()) if x]
        chosen = rng.sample(items, rng.randint(1, len(items)))
        if rng.random() < 0.3:
            chosen.append(f"with {v.hair()}")
        if rng.random() < 0.25:
            text = _fix_articles(", ".join(c.removeprefix("a ").removeprefix("an ") for c in chosen))
        else:
            text = _fix_articles(f"{rng.choice(_ALT_TEXT_OPENERS)}{v.subject()} in {_join(chosen, oxford=False)}")
    if rng.random() < 0.3:
        extra = rng.choice(_WEB_BOILERPLATE)
        text = f"{extra} | {text}" if rng.random() < 0.5 else f"{text} - {extra}"
    return text


def _render_array(job: tuple[dict[str, Any], int, tuple[int, int]]) -> np.ndarray:
    """Worker: one rendered image as uint8 [H, W, 3] (module level so it pickles)."""
    attrs_dict, seed, size = job
    return np.asarray(render_person(PersonAttributes.from_dict(attrs_dict), random.Random(seed), size))


def generic_corpus(
    count: int,
    seed: int,
    *,
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (128, 64),
    exclude: Iterable[tuple[str | None, ...]] = (),
    workers: int = 1,
) -> tuple[list[PersonAttributes], np.ndarray, list[list[str]]]:
    """A clean image-text corpus for pretraining a backbone, kept in memory.

    One image per identity; identities come from their own random stream
    (:data:`GENERIC_STREAM`) and differ in at least two described attributes from
    each other and from every key in ``exclude`` (pass the benchmark's and WebPerson's
    identities: the backbone then never sees anyone it is evaluated on). Captions are
    :func:`generic_caption`: every word true, a broader wording than the benchmark's.

    Returns:
        (identities, images uint8 [count, H, W, 3], captions per image).
    """
    if count < 1 or captions_per_image < 1:
        raise ValueError(f"generic_corpus: count and captions_per_image must be >= 1, got {count}, "
                         f"{captions_per_image}")
    people = sample_identities(count, seed, stream=GENERIC_STREAM, exclude=exclude)
    jobs = [(p.to_dict(), _derive_seed(seed, "generic-image", i), tuple(image_size)) for i, p in enumerate(people)]
    if workers <= 1 or count < 2:
        images = [_render_array(job) for job in jobs]
    else:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ctx.Pool(processes=workers) as pool:
            images = pool.map(_render_array, jobs, chunksize=max(1, min(64, count // (workers * 4))))
    captions = [[generic_caption(p, random.Random(_derive_seed(seed, "generic-captions", i, k)))
                 for k in range(captions_per_image)] for i, p in enumerate(people)]
    return people, np.stack(images), captions
