"""Captions of one identity: :func:`describe` (clean or corrupted) and :func:`caption_pair`."""

from __future__ import annotations

import random
from typing import Any

from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.noise import NOISE_KINDS, _corrupt, _corruption_candidates, _insert_irrelevant
from datasets.synthetic.templates import TEMPLATES
from datasets.synthetic.verbaliser import _fix_articles, _Verbaliser
from datasets.synthetic.vocabulary import tokenize_caption


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
