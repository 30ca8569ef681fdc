"""Prepare WebPerson training shards: images resized once, in tar shards the WebPerson loader reads.

    python tools/prepare_webperson.py --root data --out data/WebPerson/prepared --workers 8

Reads any form the loader reads (the hub's Parquet files, the authors' JSON + images,
JSONL, tar shards; ``--root``/``--annotation`` as ``data.root``/``data.annotation``) and
writes ``webperson-NNNNNN.tar`` shards of ``<key>.jpg`` + ``<key>.json``
(``{"caption1", "caption2"}``), the key being the image's 0-based position in the
source (9 digits). Train on them with ``data.annotation=<out>`` (for ``--out
<root>/WebPerson/prepared``: ``data.annotation=prepared``), keeping ``data.root``.

By default an image is shrunk to the smallest size that covers ``--size`` (384 x 128,
H x W) with its aspect ratio kept, so the training transform's ``Resize`` only ever
downscales it, and stored as a baseline JPEG (quality 95, no chroma subsampling); an
image that needs no shrinking and is a JPEG already is copied unchanged.

The output is a function of the source and the flags only: shard k holds source images
``[k * shard_size, (k + 1) * shard_size)`` (less the skipped ones), whatever ``--workers``.
A killed run (even ``kill -9``) is resumed by running the same command again: shards
whose sha256 matches their record in ``.parts/`` are kept, the others redone. ``--out``
must be new, empty, or made by this tool (it holds ``.gadms-prepared``); an earlier
output of other sources or flags is replaced only with ``--overwrite``. The manifest
(``manifest.json``, written last: it exists only once the output is complete) lists the
counts, flags, source, skipped records and images with their reasons, and each shard's
sha256 (also in ``SHA256SUMS``, for ``sha256sum -c``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PIL  # noqa: E402
from PIL import Image, UnidentifiedImageError, features  # noqa: E402
from tqdm import tqdm  # noqa: E402

from datasets.bases import AnnotationError, ImageReadError, tar_member  # noqa: E402
from datasets.bases import read_image_bytes as read_source_bytes  # noqa: E402
from datasets.synthetic import OutputExistsError, check_claimable, claim_folder  # noqa: E402
from datasets.webperson import CAPTION_KEYS, PREPARED_MARKER, WebPerson, WebPersonIndex  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.threads import available_cores, cgroup_cpu_quota  # noqa: E402

TOOL = "tools/prepare_webperson.py"
#: Marks a folder as this tool's output (JSON: the plan it was made for).
MARKER = PREPARED_MARKER
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
#: Per-shard records (sha256, counts, skipped images), each written once its shard is complete.
PARTS = ".parts"
FORMAT_VERSION = 1
DEFAULT_SIZE = (384, 128)
DEFAULT_QUALITY = 95
DEFAULT_SHARD_SIZE = 1000
FITS = ("cover", "inside")
#: Member extensions of the formats stored as they are with --keep-original (the loader's image extensions).
_KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
_SHARD = re.compile(r"^webperson-\d{6}\.tar$")
_PART = re.compile(r"^\d{6}\.json$")
#: Temp files of utils.checkpoint.atomic_write (".<name>.<pid>@<host>.<random>.tmp") and of the tool's
#: versions before it ("<name>.<uuid hex>.tmp"): what a run killed mid-write leaves.
_TMP = re.compile(r"^\..+\.\d+@.+\.tmp$|\.[0-9a-f]{32}\.tmp$")
# Index caches the loader writes beside the shards (disposable; removed with the shards).
_LOADER_CACHE = re.compile(r"^(webperson-index-[0-9a-f]+\.npz|webperson-\d{6}\.tar\.index\.npz)$")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data.root: the folder holding WebPerson/, or that folder itself")
    p.add_argument("--annotation", default=None,
                   help="data.annotation: annotation file, shard or Parquet folder, or glob (default: auto-detect)")
    p.add_argument("--out", required=True, help=f"output folder: new, empty, or made by this tool ({MARKER})")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help=f"target size (default {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}, the training image_size)")
    p.add_argument("--fit", choices=FITS, default=None,
                   help="cover (default): smallest size with height >= H and width >= W, so training only "
                        "downscales; inside: largest size within H x W (smaller files, but the training Resize "
                        "then enlarges one side)")
    p.add_argument("--quality", type=int, default=None, help=f"JPEG quality 1-100 (default {DEFAULT_QUALITY})")
    p.add_argument("--keep-original", action="store_true",
                   help="store the source images' bytes unchanged (no resizing, no re-encoding)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="source images per shard")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="prepare only the first N images in source order (0.1M / 0.5M subsets)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: the cores available); the output does not depend on it")
    p.add_argument("--strict", action="store_true",
                   help="a bad record or an unreadable image is an error (exit 2) instead of being skipped")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier output of this tool made from other sources or flags")
    p.add_argument("--cache-dir", default="",
                   help="where the source's index cache goes when its folder is read-only (default ~/.cache/gadms)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- one image


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How images are stored: ``size`` (H, W) and ``fit``, JPEG ``quality``, or ``keep_original``."""

    size: tuple[int, int] | None
    fit: str | None
    quality: int | None
    keep_original: bool

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["size"] = list(self.size) if self.size else None
        d["subsampling"] = None if self.keep_original else "4:4:4"
        return d


class BadImage(Exception):
    """An image that cannot be read or decoded; ``reason`` says why (no memory addresses: it goes in the manifest)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def target_size(width: int, height: int, size: tuple[int, int], fit: str) -> tuple[int, int]:
    """``(width, height)`` an image is stored at: scaled by ``fit`` to ``size`` (H, W), never enlarged."""
    scale = (max if fit == "cover" else min)(size[0] / height, size[1] / width)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def read_image_bytes(path: str) -> bytes:
    """The encoded bytes of an image path as the loader resolves it (file, ``shard.tar::member``, Parquet row)."""
    try:
        return read_source_bytes(path)
    except FileNotFoundError as e:
        raise BadImage("file not found") from e
    except AnnotationError as e:
        raise BadImage(e.message) from e
    except OSError as e:
        raise BadImage(_ADDRESS.sub("", f"{type(e).__name__}: {e}")) from e


def _decode(data: bytes) -> tuple[Image.Image, str]:
    """The fully decoded pixels as ``datasets.open_image`` gives them to training (RGB, no EXIF rotation),
    and the file format."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB"), img.format
    except UnidentifiedImageError as e:
        raise BadImage("not an image PIL can identify") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(_ADDRESS.sub("", f"{type(e).__name__}: {e}")) from e


def _encode(img: Image.Image, fmt: str, quality: int | None = None) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        # Baseline, optimised Huffman tables, no chroma subsampling, no EXIF/ICC: the same bytes for the
        # same pixels with the same libjpeg. 4:4:4 keeps the colour of thin details (the captions name colours).
        img.save(buf, "JPEG", quality=quality, subsampling=0, optimize=True, progressive=False)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


def prepare_image(data: bytes, options: ImageOptions) -> tuple[str, bytes, str]:
    """``(member extension, stored bytes, action)`` of one image; action: resized, encoded or copied.

    Raises:
        BadImage: ``data`` does not decode fully.
    """
    img, fmt = _decode(data)
    if options.keep_original:
        if fmt in _KEPT_FORMATS:
            return _KEPT_FORMATS[fmt], data, "copied"
        # A GIF or TIFF is no image member the loader recognises: lossless PNG instead.
        return "png", _encode(img, "PNG"), "encoded"
    size = target_size(img.width, img.height, options.size, options.fit)
    if size != img.size:
        return "jpg", _encode(img.resize(size, Image.Resampling.BICUBIC), "JPEG", options.quality), "resized"
    if fmt == "JPEG":
        return "jpg", data, "copied"  # re-encoding would only lose quality
    return "jpg", _encode(img, "JPEG", options.quality), "encoded"


# --------------------------------------------------------------------------- files


def _write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    atomic_write(path, lambda f: f.write(data))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def shard_name(shard: int) -> str:
    return f"webperson-{shard:06d}.tar"


def _remove_own_files(out: Path, *, everything: bool) -> None:
    """Remove this tool's leftovers in ``out``: temp files, the manifest; with ``everything`` its whole output.

    Only names this tool (or the loader's index cache) writes are touched.
    """
    parts = out / PARTS
    own = [p for p in out.iterdir() if p.is_file() and (_TMP.search(p.name) or p.name in (MANIFEST, SUMS) or (
        everything and (_SHARD.match(p.name) or _LOADER_CACHE.match(p.name))))]
    if parts.is_dir():
        own += [p for p in parts.iterdir() if p.is_file() and (_TMP.search(p.name) or (
            everything and _PART.match(p.name)))]
    for path in own:
        path.unlink()
    if everything and parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()


# --------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker needs: the source index, the output folder, the plan's digest and the options."""

    index: WebPersonIndex
    out: str
    plan_digest: str
    options: ImageOptions
    shard_size: int
    num_images: int
    strict: bool

    def bounds(self, shard: int) -> tuple[int, int]:
        return shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_images)


def _finished_record(job: Job, shard: int) -> dict[str, Any] | None:
    """The record of a shard an earlier run completed, when the shard on disk still matches it; else None."""
    name = shard_name(shard)
    try:
        with open(os.path.join(job.out, PARTS, f"{shard:06d}.json"), encoding="utf-8") as f:
            record = json.load(f)
        if (record.get("plan") != job.plan_digest or record.get("name") != name
                or [record.get("first_image"), record.get("end_image")] != list(job.bounds(shard))):
            return None
        path = os.path.join(job.out, name)
        if os.path.getsize(path) != record["bytes"] or _sha256(path) != record["sha256"]:
            return None
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return record


def write_shard(job: Job, shard: int) -> dict[str, Any]:
    """Write one shard (atomically) and then its record in ``.parts/``; return the record."""
    first, end = job.bounds(shard)
    name = shard_name(shard)
    path = os.path.join(job.out, name)
    actions = {"resized": 0, "encoded": 0, "copied": 0}
    skipped: list[dict[str, str]] = []

    def write(raw: IO[bytes]) -> None:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for image in range(first, end):
                key = f"{image:09d}"
                _, _, image_path, caption1 = job.index[2 * image]
                caption2 = job.index[2 * image + 1][3]
                try:
                    ext, data, action = prepare_image(read_image_bytes(image_path), job.options)
                except BadImage as e:
                    if job.strict:
                        raise ImageReadError(image_path, f"{e.reason} (--strict; without it the image is skipped "
                                                         "and listed in the manifest)") from e
                    skipped.append({"key": key, "image": image_path, "reason": e.reason})
                    continue
                actions[action] += 1
                tar.addfile(*tar_member(f"{key}.{ext}", data))
                captions = dict(zip(CAPTION_KEYS, (caption1, caption2), strict=True))
                tar.addfile(*tar_member(f"{key}.json", json.dumps(captions, ensure_ascii=False).encode("utf-8")))

    # Whole or not at all: a run killed mid-shard leaves only a temp file (_TMP), which the next run deletes.
    atomic_write(path, write)
    record = {"plan": job.plan_digest, "name": name, "first_image": first, "end_image": end,
              "images": end - first - len(skipped), "bytes": os.path.getsize(path), "sha256": _sha256(path),
              "actions": actions, "skipped_images": skipped}
    # The record comes after the shard: a shard without one (killed in between) is redone, never trusted.
    _write_atomic(os.path.join(job.out, PARTS, f"{shard:06d}.json"), _json_bytes(record))
    return record


_JOB: Job | None = None  # set in the parent before the pool forks: workers inherit the index


def _do_shard(shard: int) -> tuple[int, dict[str, Any], bool]:
    """``(shard, record, kept)``: the shard verified from an earlier run (kept) or written now."""
    record = _finished_record(_JOB, shard)
    if record is not None:
        return shard, record, True
    return shard, write_shard(_JOB, shard), False


def _run_shards(job: Job, num_shards: int, workers: int) -> tuple[list[dict[str, Any]], int]:
    """Every shard's record in shard order, and how many were kept from an earlier run."""
    global _JOB
    _JOB = job
    records: dict[int, dict[str, Any]] = {}
    kept = 0
    try:
        with tqdm(total=job.num_images, unit="img", desc="preparing", file=sys.stderr, dynamic_ncols=True) as bar:
            if workers <= 1 or num_shards <= 1:
                results = map(_do_shard, range(num_shards))
                pool = None
            else:
                pool = multiprocessing.get_context("fork").Pool(min(workers, num_shards))
                results = pool.imap_unordered(_do_shard, range(num_shards))
            try:
                for shard, record, was_kept in results:
                    records[shard] = record
                    kept += was_kept
                    first, end = job.bounds(shard)
                    bar.update(end - first)
            finally:
                if pool is not None:
                    pool.terminate()
                    pool.join()
    finally:
        _JOB = None
    return [records[k] for k in range(num_shards)], kept


# --------------------------------------------------------------------------- plan and manifest


def _options(args: argparse.Namespace) -> ImageOptions:
    if args.keep_original:
        given = [flag for flag, value in (("--size", args.size), ("--fit", args.fit), ("--quality", args.quality))
                 if value is not None]
        if given:
            raise ToolError(f"--keep-original stores the images unchanged: {', '.join(given)} cannot apply; "
                            "drop one or the other")
        return ImageOptions(size=None, fit=None, quality=None, keep_original=True)
    size = tuple(args.size) if args.size is not None else DEFAULT_SIZE
    if min(size) < 1:
        raise ToolError(f"--size must be two positive numbers (H W), got {size[0]} {size[1]}")
    quality = DEFAULT_QUALITY if args.quality is None else args.quality
    if not 1 <= quality <= 100:
        raise ToolError(f"--quality must be within 1-100, got {quality}")
    return ImageOptions(size=size, fit=args.fit or "cover", quality=quality, keep_original=False)


def _check_args(args: argparse.Namespace) -> None:
    if args.shard_size < 1:
        raise ToolError(f"--shard-size must be positive, got {args.shard_size}")
    if args.limit is not None and args.limit < 1:
        raise ToolError(f"--limit must be positive, got {args.limit}")
    if args.workers is not None and args.workers < 1:
        raise ToolError(f"--workers must be positive, got {args.workers}")


def _default_workers() -> int:
    quota = cgroup_cpu_quota()
    cores = available_cores()
    return max(1, min(cores, int(quota)) if quota else cores)


def _plan(dataset: WebPerson, args: argparse.Namespace, options: ImageOptions, num_images: int) -> dict[str, Any]:
    """Everything the output depends on (and nothing else: not --workers, not the output folder)."""
    sources = dataset.sources
    return {
        "format_version": FORMAT_VERSION,
        "source": {"dataset_dir": os.path.abspath(dataset.dataset_path), "format": dataset.format,
                   "files": [{"path": os.path.relpath(p, dataset.dataset_path), "bytes": os.path.getsize(p)}
                             for p in sources]},
        "options": {**options.as_dict(), "shard_size": args.shard_size, "limit": args.limit, "strict": args.strict},
        # The JPEG bytes are those of this encoder: another Pillow or libjpeg may encode the same pixels otherwise.
        "encoder": {"pillow": PIL.__version__, "libjpeg": features.version("jpg"),
                    "libjpeg_turbo": features.version("libjpeg_turbo")},
        "selected_images": num_images,
    }


def _marker_record(plan: dict[str, Any], dataset: WebPerson) -> dict[str, Any]:
    # Modification times identify the sources for resuming, but stay out of the manifest (a copy of the
    # same data prepares to the same manifest).
    return {"tool": TOOL, "plan": plan, "source_mtimes_ns": [os.stat(p).st_mtime_ns for p in dataset.sources]}


def _differences(old: Any, new: dict[str, Any]) -> str:
    """What made an earlier output (its marker's record ``old``) differ from the one asked, for the message."""
    old_plan = old.get("plan") if isinstance(old, dict) else None
    if not isinstance(old_plan, dict):
        return "a plan that cannot be read"
    plan = new["plan"]
    if old_plan.get("source") != plan["source"] or old.get("source_mtimes_ns") != new["source_mtimes_ns"]:
        return "other source files, or sources changed since"
    old_options = old_plan.get("options") if isinstance(old_plan.get("options"), dict) else {}
    flags = [k for k, v in plan["options"].items() if old_options.get(k) != v]
    if flags:
        return f"other flags ({', '.join(flags)})"
    return f"a different {', '.join(k for k in plan if old_plan.get(k) != plan[k]) or 'tool version'}"


def _claim(out: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Take ``out`` for this plan: resume the same plan, replace another only with ``overwrite``."""
    marker = out / MARKER
    resume = False
    if marker.is_file():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != record and not overwrite:
            raise OutputExistsError(f"--out {out} holds an earlier output of {TOOL} made from "
                                    f"{_differences(old, record)}; pass --overwrite to replace it, or choose "
                                    "another --out")
        resume = old == record and not overwrite
        if not resume:
            _remove_own_files(out, everything=True)
    if not resume:
        # The marker goes first: a run killed at any later point leaves a folder the next run takes back.
        claim_folder(out, MARKER, record, TOOL)
    (out / PARTS).mkdir(exist_ok=True)
    _remove_own_files(out, everything=False)


def _manifest(plan: dict[str, Any], dataset: WebPerson, records: list[dict[str, Any]]) -> dict[str, Any]:
    images = sum(r["images"] for r in records)
    skipped_images = [s for r in records for s in r["skipped_images"]]
    actions = {k: sum(r["actions"][k] for r in records) for k in ("resized", "encoded", "copied")}
    return {
        "tool": TOOL,
        **{k: v for k, v in plan.items() if k != "selected_images"},
        "counts": {"source_images": dataset.train.num_images, "selected_images": plan["selected_images"],
                   "images": images,
                   "captions": 2 * images, "shards": len(records), "skipped_records": dataset.num_skipped,
                   "skipped_images": len(skipped_images), **{f"images_{k}": v for k, v in actions.items()}},
        # The loader keeps the first 1000 bad records' reasons; the count above is exact.
        "skipped_records": [{"file": e.file, "record": e.index, "reason": e.message} for e in dataset.skipped],
        "skipped_images": skipped_images,
        "shards": [{k: r[k] for k in ("name", "first_image", "end_image", "images", "bytes", "sha256")}
                   for r in records],
    }


def run(args: argparse.Namespace) -> int:
    """Prepare the shards as ``args`` says; 0 when done."""
    _check_args(args)
    options = _options(args)
    out = Path(args.out)
    # Refused before the source is indexed (minutes for the 5M corpus), not after.
    check_claimable(out, MARKER, TOOL, what="--out")
    start = time.perf_counter()
    dataset = WebPerson(args.root, annotation=args.annotation, skip_bad_records=not args.strict,
                        cache_dir=args.cache_dir)
    num_images = dataset.train.num_images if args.limit is None else min(args.limit, dataset.train.num_images)
    plan = _plan(dataset, args, options, num_images)
    record = _marker_record(plan, dataset)
    _claim(out, record, args.overwrite)
    digest = hashlib.sha256(_json_bytes(record)).hexdigest()
    job = Job(index=dataset.train, out=str(out), plan_digest=digest, options=options, shard_size=args.shard_size,
              num_images=num_images, strict=args.strict)
    num_shards = -(-num_images // args.shard_size)
    workers = args.workers or _default_workers()
    records, kept = _run_shards(job, num_shards, workers)
    manifest = _manifest(plan, dataset, records)
    _write_atomic(str(out / SUMS), "".join(f"{r['sha256']}  {r['name']}\n" for r in records).encode("ascii"))
    _write_atomic(str(out / MANIFEST), _json_bytes(manifest))
    counts = manifest["counts"]
    if kept:
        print(f"resumed: {kept} of {num_shards} shard(s) were complete and verified, the others written now")
    print(f"wrote {counts['images']} images ({counts['captions']} captions) in {num_shards} shard(s) to {out} "
          f"in {time.perf_counter() - start:.1f} s with {min(workers, max(num_shards, 1))} worker(s); skipped "
          f"{counts['skipped_records']} bad record(s) and {counts['skipped_images']} unreadable image(s) "
          f"(listed in {out / MANIFEST})")
    print(f"train on it with: data.annotation={out.resolve()} (data.root stays the folder of the evaluation sets)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
