"""Attribute vocabulary of the synthetic corpus: colours, garments, their weights, seeds.

Every attribute value an identity can have, with the words captions use for the
colours, the sampling weights that give wardrobes a realistic skew, the caption
tokeniser and the seed derivation every random stream of the generator starts from.
"""

from __future__ import annotations

import hashlib
import re

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
