"""Text-based person retrieval corpora: registry and ``build_dataset``.

Kept light on purpose: importing ``datasets`` loads only the corpus loaders
(numpy, PIL), not torch-heavy modules such as masking or the score cache.
"""

from __future__ import annotations

import difflib
from typing import Any

from datasets import cuhkpedes, icfgpedes, rstpreid, webperson  # noqa: F401  (registers the corpora)
from datasets.bases import (
    DATASETS,
    AnnotationError,
    EvalSplit,
    ImageReadError,
    TextReIDDataset,
    TrainIndex,
    open_image,
    register_dataset,
    verify_image,
)

__all__ = ["DATASETS", "AnnotationError", "EvalSplit", "ImageReadError", "TextReIDDataset", "TrainIndex",
           "build_dataset", "open_image", "register_dataset", "verify_image"]


def build_dataset(name: str, root: str, **kwargs: Any) -> TextReIDDataset:
    """Load the corpus registered as ``name`` from the data root ``root``.

    Args:
        name: a key of ``DATASETS`` (``CUHK-PEDES``, ``ICFG-PEDES``, ``RSTPReid``, ``WebPerson``).
        root: folder holding ``<name>/`` (the layout of docs/data.md), or that folder itself.
        **kwargs: passed to the corpus class (e.g. ``skip_bad_records``, ``annotation``).

    Raises:
        ValueError: for an unknown name, listing the valid ones and the closest match.
    """
    if name not in DATASETS:
        by_lower = {n.lower(): n for n in DATASETS}
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.5)
        hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](root, **kwargs)
