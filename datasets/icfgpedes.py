"""ICFG-PEDES: ``<root>/ICFG-PEDES/{ICFG-PEDES.json, imgs/}`` (docs/data.md)."""

from __future__ import annotations

from datasets.bases import PedesJsonDataset, register_dataset


@register_dataset("ICFG-PEDES")
class ICFGPEDES(PedesJsonDataset):
    """ICFG-PEDES: same record shape as CUHK-PEDES, splits train/test only.

    ``.val`` is None; evaluation uses ``.test``. The annotation may also be
    named ``ICFG_PEDES.json`` (the spelling some releases use).

    Args:
        root: the data root holding ``ICFG-PEDES/``, or that folder itself.
        skip_bad_records: skip (and count) malformed records instead of raising.
    """

    dataset_dir = "ICFG-PEDES"
    annotation_names = ("ICFG-PEDES.json", "ICFG_PEDES.json")
    image_dir = "imgs"
    path_key = "file_path"
    splits = ("train", "test")
