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
from utils.config import ConfigError

__all__ = ["DATASETS", "AnnotationError", "EvalSplit", "ImageReadError", "TextReIDDataset", "TrainIndex",
           "build_dataset", "dataset_class", "open_image", "register_dataset", "verify_image"]


def dataset_class(name: str, key: str | None = None) -> type[TextReIDDataset]:
    """The corpus class registered as ``name``.

    Args:
        name: a key of ``DATASETS``.
        key: the config key that named it (``data.name``, ``eval.datasets``), for the message.

    Raises:
        ConfigError: for an unknown name, listing the valid ones and the closest match.
    """
    if name not in DATASETS:
        by_lower = {n.lower(): n for n in DATASETS}
        close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1, cutoff=0.5)
        hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
        where = f"{key}: " if key else ""
        raise ConfigError(f"{where}unknown dataset {name!r}{hint}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def build_dataset(name: str, root: str, *, key: str | None = None, **kwargs: Any) -> TextReIDDataset:
    """Load the corpus registered as ``name`` from the data root ``root``.

    Args:
        name: a key of ``DATASETS`` (``CUHK-PEDES``, ``ICFG-PEDES``, ``RSTPReid``, ``WebPerson``).
        root: folder holding ``<name>/`` (the layout of docs/data.md), or that folder itself.
        key: the config key that named the corpus, for the unknown-name message.
        **kwargs: passed to the corpus class (e.g. ``skip_bad_records``, ``annotation``).

    Raises:
        ConfigError: for an unknown name, listing the valid ones and the closest match.
    """
    return dataset_class(name, key)(root, **kwargs)
