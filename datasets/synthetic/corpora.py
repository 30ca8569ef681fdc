"""The two corpora :func:`~datasets.synthetic.generate` writes, planned in memory first.

Planning draws every caption (and its noise record) and lists the images to render, in
a fixed order; writing them is left to :mod:`datasets.synthetic.generation`. Flat caption
indices (the keys of the noise report) are ``2 * record + caption`` in the order of
``reid_raw.json`` / ``annotations.json``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.captions import caption_pair
from datasets.synthetic.config import SyntheticConfig
from datasets.synthetic.vocabulary import _derive_seed, tokenize_caption
from datasets.synthetic.writers import RenderJob

#: Caption draws of one image: (caption, noise info or None) for its two captions.
_Pair = list[tuple[str, dict[str, Any] | None]]


@dataclass
class BenchmarkPlan:
    """The CUHK-PEDES-format benchmark of a run, before any file is written.

    Attributes:
        records: the ``reid_raw.json`` records, one per image.
        noise: flat caption index -> noise report entry (train captions only).
        attributes: person id -> true attributes.
        jobs: the images to render.
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    noise: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: list[RenderJob] = field(default_factory=list)


@dataclass
class WebPersonPlan:
    """The WebPerson pretraining corpus of a run, before any file is written.

    Attributes:
        entries: the ``annotations.json`` entries, ``{image path: {caption1, caption2}}``.
        noise: flat caption index -> noise report entry.
        attributes: image path -> true attributes.
        shard_samples: (webdataset key, image file, captions) per image.
        jobs: the images to render.
    """

    entries: list[dict[str, dict[str, str]]] = field(default_factory=list)
    noise: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    shard_samples: list[tuple[str, Path, dict[str, str]]] = field(default_factory=list)
    jobs: list[RenderJob] = field(default_factory=list)


def _noise_entry(info: dict[str, Any], image: str, caption_no: int, split: str, caption: str) -> dict[str, Any]:
    entry = {
        "image": image,
        "caption": caption_no,
        "split": split,
        "kind": info["kind"],
        "text": caption,
        "clean": info["clean"],
        "words": info["words"],
    }
    entry.update((k, v) for k, v in info.items() if k not in entry)
    return entry


def _job(cfg: SyntheticConfig, attrs: PersonAttributes, seed: int, path: Path) -> RenderJob:
    return (attrs.to_dict(), seed, cfg.image_size, str(path), cfg.image_format, cfg.jpeg_quality)


def _captions(cfg: SyntheticConfig, attrs: PersonAttributes, seed: int, noise_rate: float) -> _Pair:
    return caption_pair(attrs, random.Random(seed), noise_rate, cfg.wrong_attr_rate, cfg.irrelevant_rate)


def plan_benchmark(cfg: SyntheticConfig, people: list[PersonAttributes], root: Path) -> BenchmarkPlan:
    """Captions and render jobs of the benchmark; creates ``root/imgs/<split>/``.

    Args:
        cfg: the run's settings.
        people: the benchmark identities, train then val then test (person id = index + 1).
        root: the benchmark folder (``<out>/CUHK-PEDES``).
    """
    plan = BenchmarkPlan()
    splits = ["train"] * cfg.identities + ["val"] * cfg.val_ids + ["test"] * cfg.test_ids
    for split in ("train", "val", "test"):
        (root / "imgs" / split).mkdir(parents=True, exist_ok=True)
    for index, split in enumerate(splits):
        pid = index + 1
        attrs = people[index]
        plan.attributes[str(pid)] = attrs.to_dict()
        rate = cfg.benchmark_noise_rate if split == "train" else 0.0
        for k in range(cfg.images_per_id):
            _plan_benchmark_image(plan, cfg, root, attrs, split, pid, k, rate)
    return plan


def _plan_benchmark_image(plan: BenchmarkPlan, cfg: SyntheticConfig, root: Path, attrs: PersonAttributes,
                          split: str, pid: int, k: int, rate: float) -> None:
    """Image ``k`` of person ``pid``: its render job, record and noise entries."""
    rel = f"{split}/{pid:05d}_{k:02d}.{cfg.image_format}"
    plan.jobs.append(_job(cfg, attrs, _derive_seed(cfg.seed, "benchmark-image", pid, k), root / "imgs" / rel))
    pair = _captions(cfg, attrs, _derive_seed(cfg.seed, "benchmark-captions", pid, k), rate)
    captions = [text for text, _ in pair]
    for j, (text, info) in enumerate(pair):
        if info is not None:
            plan.noise[str(2 * len(plan.records) + j)] = _noise_entry(info, rel, j, split, text)
    plan.records.append(
        {
            "split": split,
            "captions": captions,
            "file_path": rel,
            "processed_tokens": [tokenize_caption(c) for c in captions],
            "id": pid,
        }
    )


def plan_webperson(cfg: SyntheticConfig, people: list[PersonAttributes], root: Path) -> WebPersonPlan:
    """Captions and render jobs of WebPerson (one identity per image); creates the image folders.

    Args:
        cfg: the run's settings.
        people: one identity per WebPerson image, in image order.
        root: the WebPerson folder (``<out>/WebPerson``).
    """
    plan = WebPersonPlan()
    for i in range(cfg.webperson_images):
        attrs = people[i]
        rel = f"{i // 1000:04d}/{i:08d}.{cfg.image_format}"
        image_path = root / "images" / rel
        image_path.parent.mkdir(parents=True, exist_ok=True)
        plan.jobs.append(_job(cfg, attrs, _derive_seed(cfg.seed, "webperson-image", i), image_path))
        pair = _captions(cfg, attrs, _derive_seed(cfg.seed, "webperson-captions", i), cfg.noise_rate)
        caps = {"caption1": pair[0][0], "caption2": pair[1][0]}
        for j, (text, info) in enumerate(pair):
            if info is not None:
                plan.noise[str(2 * i + j)] = _noise_entry(info, rel, j, "train", text)
        plan.entries.append({rel: caps})
        plan.attributes[rel] = attrs.to_dict()
        plan.shard_samples.append((rel.rsplit(".", 1)[0], image_path, caps))
    return plan
