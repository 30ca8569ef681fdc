"""Caption noise: wrong attributes and irrelevant phrases, each with the words it changes.

A corruption returns a record of what it did (the field and its true and noisy values,
or the inserted phrase and where it went), from which :func:`~datasets.synthetic.describe`
derives the corrupted words of the noise report.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.verbaliser import _capitalise
from datasets.synthetic.vocabulary import _BOTTOMS_BY_GENDER, _COLOUR_NAMES, _TOPS_BY_GENDER, BAGS, HAIR_PALETTE, HATS

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
