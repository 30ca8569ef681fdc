"""Generic pretraining corpus: clean, broadly worded image-text pairs kept in memory.

Used to pretrain a backbone (``tools/pretrain_backbone.py``) on identities none of which
is within one attribute of anyone in the benchmark or WebPerson.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterable
from typing import Any

import numpy as np

from datasets.synthetic.attributes import PersonAttributes, sample_identities
from datasets.synthetic.captions import describe
from datasets.synthetic.rendering import render_person
from datasets.synthetic.verbaliser import _fix_articles, _join, _Verbaliser
from datasets.synthetic.vocabulary import _derive_seed

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
