"""CUHK-PEDES: ``<root>/CUHK-PEDES/{reid_raw.json, imgs/}`` (DATA_FORMATS.md)."""

from __future__ import annotations

from datasets.bases import PedesJsonDataset, register_dataset


@register_dataset("CUHK-PEDES")
class CUHKPEDES(PedesJsonDataset):
    """CUHK-PEDES: 13,003 identities, 1-based ids, splits train/val/test.

    Records: ``{"split", "captions", "file_path", "processed_tokens", "id"}``;
    image path = ``imgs/<file_path>``.

    Args:
        root: the data root holding ``CUHK-PEDES/``, or that folder itself.
        skip_bad_records: skip (and count) malformed records instead of raising.
    """

    dataset_dir = "CUHK-PEDES"
    annotation_names = ("reid_raw.json",)
    image_dir = "imgs"
    path_key = "file_path"
    splits = ("train", "val", "test")
