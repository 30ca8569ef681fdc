"""File formats of the synthetic corpus: encoded images, JSON and text, webdataset shards.

Every writer here produces the same bytes for the same input: JPEG/PNG settings are
fixed, JSON is ASCII with Unix line ends, and tar members carry no time, owner or mode of
the machine.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from datasets.bases import tar_member
from datasets.synthetic.attributes import PersonAttributes
from datasets.synthetic.rendering import render_person

#: One image to render and write: (attributes dict, seed, (height, width), output path,
#: image format, JPEG quality). Plain values, so a job pickles to a worker process.
RenderJob = tuple[dict[str, Any], int, tuple[int, int], str, str, int]


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 keeps thin coloured straps from bleeding into their surroundings.
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    else:
        img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _render_job(job: RenderJob) -> None:
    """Worker: render one image and write it (module level so it pickles)."""
    attrs_dict, seed, size, path, fmt, quality = job
    img = render_person(PersonAttributes.from_dict(attrs_dict), random.Random(seed), size)
    with open(path, "wb") as fh:
        fh.write(_encode(img, fmt, quality))


def _run_jobs(jobs: list[RenderJob], workers: int) -> None:
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            _render_job(job)
        return
    methods = multiprocessing.get_all_start_methods()
    # fork skips re-importing the package in every worker; each job carries
    # its own seed, so the start method cannot change the bytes.
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(processes=workers) as pool:
        for _ in pool.imap_unordered(_render_job, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 4)))):
            pass


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


def _dump_json(obj: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    return json.dumps(obj, ensure_ascii=True, indent=indent, sort_keys=sort_keys) + "\n"


def write_shards(
    samples: Sequence[tuple[str, Path, dict[str, str]]], shard_dir: Path, shard_size: int, prefix: str = "webperson"
) -> list[Path]:
    """Write webdataset tar shards with reproducible bytes.

    Args:
        samples: (key, image file, captions dict) per sample; the member names
            are ``<key><image suffix>`` and ``<key>.json``.
        shard_dir: output folder (created).
        shard_size: samples per shard.
        prefix: shard file name prefix.

    Returns:
        The shard paths, in order.
    """
    if shard_size < 1:
        raise ValueError(f"write_shards: shard_size must be >= 1, got {shard_size}")
    shard_dir.mkdir(parents=True, exist_ok=True)
    ordered = sorted(samples, key=lambda s: s[0])
    paths = []
    for shard_index, start in enumerate(range(0, len(ordered), shard_size)):
        members: list[tuple[str, bytes]] = []
        for key, image_path, captions in ordered[start : start + shard_size]:
            members.append((key + image_path.suffix, image_path.read_bytes()))
            members.append((key + ".json", _dump_json(captions, indent=None).encode("utf-8")))
        members.sort(key=lambda m: m[0])
        path = shard_dir / f"{prefix}-{shard_index:06d}.tar"
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                tar.addfile(*tar_member(name, data))
        paths.append(path)
    return paths
