"""CUHK-PEDES: ``<root>/CUHK-PEDES/{reid_raw.json or caption_all.json, imgs/}`` (docs/data.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from datasets.bases import AnnotationError, PedesJsonDataset, register_dataset

logger = logging.getLogger(__name__)

#: The file the IRRA family reads (records carry ``split``).
REID_RAW = "reid_raw.json"
#: The file CUHK-PEDES's owners distribute: the same records without ``split``.
CAPTION_ALL = "caption_all.json"
#: The standard split by identity: (split, first id, last id), ids inclusive.
ID_RANGES = (("train", 1, 11_003), ("val", 11_004, 12_003), ("test", 12_004, 13_003))
#: Images per split of the full corpus in the standard split.
PUBLISHED_IMAGE_COUNTS = {"train": 34_054, "val": 3_078, "test": 3_074}


def split_of_id(pid: int) -> str | None:
    """The standard split of a CUHK-PEDES identity, None when ``pid`` is outside 1..13,003."""
    for split, first, last in ID_RANGES:
        if first <= pid <= last:
            return split
    return None


def compare_published_counts(counts: Mapping[str, int]) -> list[str]:
    """Describe each split whose image count differs from the published one (empty list: all match).

    Args:
        counts: images per split; a missing split counts as 0.
    """
    return [f"{split} {counts.get(split, 0)} (published {published})"
            for split, published in PUBLISHED_IMAGE_COUNTS.items() if counts.get(split, 0) != published]


@register_dataset("CUHK-PEDES")
class CUHKPEDES(PedesJsonDataset):
    """CUHK-PEDES: 13,003 identities, 1-based ids, splits train/val/test.

    Records: ``{"split", "captions", "file_path", "processed_tokens", "id"}``;
    image path = ``imgs/<file_path>``. ``reid_raw.json`` is read when present;
    otherwise ``caption_all.json``, whose records have no ``split`` (any such
    key is ignored): the split then follows the id (train 1–11,003, val
    11,004–12,003, test 12,004–13,003), and the per-split image counts are
    compared with the published ones. ``annotation_path`` names the file read.

    Args:
        root: the data root holding ``CUHK-PEDES/``, or that folder itself.
        skip_bad_records: skip (and count) malformed records instead of raising.
    """

    dataset_dir = "CUHK-PEDES"
    annotation_names = (REID_RAW, CAPTION_ALL)
    image_dir = "imgs"
    path_key = "file_path"
    splits = ("train", "val", "test")

    def __init__(self, root: str, skip_bad_records: bool = False) -> None:
        super().__init__(root, skip_bad_records)
        if not self.splits_from_ids:
            return
        counts = {"train": self.train.num_images, "val": len(self.val.img_paths), "test": len(self.test.img_paths)}
        shown = ", ".join(f"{split} {n}" for split, n in counts.items())
        logger.info("%s: %s has no 'split'; split by id range: images %s", self.name, self.annotation_path, shown)
        differences = compare_published_counts(counts)
        if differences:
            message = (f"{self.annotation_path}: per-split image counts differ from the published ones "
                       f"({', '.join(differences)}): a subset or a modified file")
            logger.warning("%s: %s", self.name, message)
            self.warnings.append(message)
        else:
            logger.info("%s: per-split image counts match the published ones", self.name)

    @property
    def splits_from_ids(self) -> bool:
        """Whether splits are assigned by id range (the annotation is ``caption_all.json``)."""
        return os.path.basename(self.annotation_path) == CAPTION_ALL

    def _required_keys(self) -> tuple[str, ...]:
        keys = super()._required_keys()
        return tuple(k for k in keys if k != "split") if self.splits_from_ids else keys

    def _record_split(self, raw: dict[str, Any], pid: int, index: int) -> str:
        if not self.splits_from_ids:
            return super()._record_split(raw, pid, index)
        split = split_of_id(pid)
        if split is None:
            ranges = ", ".join(f"{s} {first}..{last}" for s, first, last in ID_RANGES)
            raise AnnotationError(self.annotation_path, index, f"'id' {pid} is outside 1..13003; {CAPTION_ALL} "
                                  f"has no 'split', so splits follow the id ({ranges})")
        return split
