"""RSTPReid: ``<root>/RSTPReid/{data_captions.json, imgs/}`` (docs/data.md)."""

from __future__ import annotations

from datasets.bases import PedesJsonDataset, register_dataset


@register_dataset("RSTPReid")
class RSTPReid(PedesJsonDataset):
    """RSTPReid: 4,101 identities, five images each, two captions per image.

    Records: ``{"id", "img_path", "captions", "split"}``; image path =
    ``imgs/<img_path>``.

    Args:
        root: the data root holding ``RSTPReid/``, or that folder itself.
        skip_bad_records: skip (and count) malformed records instead of raising.
    """

    dataset_dir = "RSTPReid"
    annotation_names = ("data_captions.json",)
    image_dir = "imgs"
    path_key = "img_path"
    splits = ("train", "val", "test")
