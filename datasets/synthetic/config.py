"""Settings of a synthetic corpus (:class:`SyntheticConfig`) and the names of its folders."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GENERATOR_VERSION = "ga-dms-synthetic-1"
BENCHMARK_DIR = "CUHK-PEDES"
WEBPERSON_DIR = "WebPerson"


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and rates of a synthetic corpus (all plain values, saved in meta.json).

    Attributes:
        identities: benchmark training identities.
        images_per_id: images per benchmark identity (all splits).
        val_ids: benchmark validation identities.
        test_ids: benchmark test identities.
        webperson_images: pretraining images (one identity each, disjoint from the benchmark).
        noise_rate: share of WebPerson captions that are corrupted.
        benchmark_noise_rate: share of benchmark *train* captions corrupted (val/test stay clean).
        wrong_attr_rate: relative weight of wrong-attribute corruptions.
        irrelevant_rate: relative weight of irrelevant-phrase corruptions.
        image_size: (height, width) of every image.
        shard_size: WebPerson samples per tar shard.
        seed: global seed.
        image_format: "jpg" or "png".
        jpeg_quality: JPEG quality when image_format is "jpg".
    """

    identities: int = 200
    images_per_id: int = 4
    val_ids: int = 50
    test_ids: int = 50
    webperson_images: int = 1000
    noise_rate: float = 0.3
    benchmark_noise_rate: float = 0.0
    wrong_attr_rate: float = 0.5
    irrelevant_rate: float = 0.5
    image_size: tuple[int, int] = (128, 64)
    shard_size: int = 250
    seed: int = 0
    image_format: str = "jpg"
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name in ("identities", "images_per_id", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 1, got {value!r}")
        for name in ("val_ids", "test_ids", "webperson_images", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"SyntheticConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("noise_rate", "benchmark_noise_rate", "wrong_attr_rate", "irrelevant_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise ValueError(f"SyntheticConfig.{name} must be a number in [0, 1], got {value!r}")
        if self.wrong_attr_rate + self.irrelevant_rate <= 0.0:
            raise ValueError("SyntheticConfig: wrong_attr_rate + irrelevant_rate must be > 0")
        size = tuple(self.image_size)
        if len(size) != 2 or not all(isinstance(s, int) for s in size) or size[0] < 32 or size[1] < 16:
            raise ValueError(
                f"SyntheticConfig.image_size must be (height>=32, width>=16) ints, got {self.image_size!r}"
            )
        object.__setattr__(self, "image_size", size)
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"SyntheticConfig.image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if not isinstance(self.jpeg_quality, int) or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"SyntheticConfig.jpeg_quality must be an int in [1, 100], got {self.jpeg_quality!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``config`` block of meta.json)."""
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size)
        return out
