"""Identities of the synthetic corpus: :class:`PersonAttributes` and their sampling."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from datasets.synthetic.vocabulary import (
    _BAG_WEIGHTS,
    _BOTTOM_COLOUR_WEIGHTS,
    _BOTTOMS_BY_GENDER,
    _COLOUR_NAMES,
    _HAIR_COLOUR_WEIGHTS,
    _HAIR_STYLE_WEIGHTS,
    _SHOE_COLOUR_WEIGHTS,
    _TOPS_BY_GENDER,
    BAGS,
    BOTTOM_TYPES,
    BUILDS,
    GENDERS,
    HAIR_PALETTE,
    HAIR_STYLES,
    HATS,
    SKIN_TONES,
    TOP_TYPES,
    _derive_seed,
)


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
