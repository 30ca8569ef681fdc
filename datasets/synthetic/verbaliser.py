"""Caption phrases: the words and patterns that name each attribute, and :class:`_Verbaliser`."""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.drawing import RGB
from datasets.synthetic.vocabulary import HAIR_PALETTE, PALETTE

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
