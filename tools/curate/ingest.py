"""Stage 1 — ingest: web image-text pairs or local folders -> ``images/<xx>/<key>.jpg``.

Inputs are COYO-style pair lists (JSONL, or parquet when ``pyarrow`` is
installed) with a URL column and a text column, or folders of images (an
optional ``<name>.txt`` next to an image is its text). The key of an item is
the SHA-1 of its URL (or of its path relative to the folder). Downloads run in
a thread pool with timeouts, retries with seeded exponential backoff, a size
limit, a per-host politeness limit, and content-type / magic-byte / decode
checks; a failed item is recorded in ``failures.jsonl`` with its reason.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from tools.curate.net import FetchError, HostLimiter, RetryPolicy, bounded_map, fetch, with_retries
from tools.curate.store import StageDir, StageError, item_rng, iter_records, latest_failures, sha1_hex

logger = logging.getLogger(__name__)

STAGE = "ingest"
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
_EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass(frozen=True)
class IngestItem:
    """One input: a URL or a local file, with its alt text."""

    key: str
    text: str
    url: str | None = None
    path: str | None = None
    relpath: str | None = None


def image_relpath(key: str) -> str:
    """Where an item's image goes inside the stage folder."""
    return f"images/{key[:2]}/{key}.jpg"


# --------------------------------------------------------------------------- inputs


def read_pairs(path: str, url_col: str = "url", text_col: str = "text") -> Iterator[IngestItem]:
    """Items of a pair list: ``.jsonl`` (one object per line) or ``.parquet`` (needs pyarrow)."""
    if path.endswith(".parquet"):
        yield from _read_parquet(path, url_col, text_col)
        return
    if not path.endswith((".jsonl", ".json")):
        raise StageError(f"--pairs {path}: unsupported file type; expected .jsonl (one JSON object per line) "
                         "or .parquet")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise StageError(f"{path} line {number}: not valid JSON ({e})") from e
            yield _pair_item(row, path, number, url_col, text_col)


def _read_parquet(path: str, url_col: str, text_col: str) -> Iterator[IngestItem]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise StageError(f"--pairs {path}: reading parquet needs pyarrow (pip install pyarrow); or convert the list "
                         f"to JSONL with one {{\"{url_col}\": ..., \"{text_col}\": ...}} object per line") from e
    table = pq.ParquetFile(path)
    names = table.schema_arrow.names
    missing = [c for c in (url_col, text_col) if c not in names]
    if missing:
        raise StageError(f"{path}: column(s) {', '.join(missing)} not found; columns are {', '.join(names)} "
                         "(choose them with --url-col / --text-col)")
    number = 0
    for batch in table.iter_batches(columns=[url_col, text_col]):
        for row in batch.to_pylist():
            number += 1
            yield _pair_item(row, path, number, url_col, text_col)


def _pair_item(row: Any, path: str, number: int, url_col: str, text_col: str) -> IngestItem:
    if not isinstance(row, dict):
        raise StageError(f"{path} record {number}: expected an object, got {type(row).__name__}")
    url = row.get(url_col)
    if not isinstance(url, str) or not url.strip():
        raise StageError(f"{path} record {number}: missing or empty {url_col!r} (keys: {', '.join(sorted(row))}; "
                         "choose the column with --url-col)")
    text = row.get(text_col)
    if text is not None and not isinstance(text, str):
        raise StageError(f"{path} record {number}: {text_col!r} must be a string, got {type(text).__name__}")
    url = url.strip()
    return IngestItem(key=sha1_hex(url), text=text or "", url=url)


def scan_folder(folder: str) -> Iterator[IngestItem]:
    """Image files under ``folder`` (recursive, sorted); text from a same-stem ``.txt`` file if present."""
    if not os.path.isdir(folder):
        raise StageError(f"--folder {folder}: not a directory")
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(FOLDER_IMAGE_EXTENSIONS):
                continue
            full = os.path.join(root, name)
            rel = os.path.relpath(full, folder).replace(os.sep, "/")
            sidecar = os.path.splitext(full)[0] + ".txt"
            text = ""
            if os.path.isfile(sidecar):
                with open(sidecar, encoding="utf-8", errors="replace") as f:
                    text = f.read().strip()
            yield IngestItem(key=sha1_hex(rel), text=text, path=full, relpath=rel)


# --------------------------------------------------------------------------- images


def sniff_format(data: bytes) -> str | None:
    """Image format from magic bytes (None when the data is not a supported image)."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def to_jpeg(data: bytes, quality: int = 95, min_side: int = 0, max_pixels: int = 100_000_000) -> tuple[bytes, int, int]:
    """Check and normalise image bytes to an RGB JPEG; return ``(jpeg bytes, width, height)``.

    An upright RGB JPEG is kept byte for byte (no second lossy compression); anything else is
    decoded, rotated upright (EXIF), flattened onto white and re-encoded.

    Raises:
        FetchError: ``not_an_image``, ``decode_error``, ``too_many_pixels``, ``too_small``.
    """
    fmt = sniff_format(data)
    if fmt is None:
        raise FetchError("not_an_image", f"unrecognised magic bytes {data[:8]!r}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise FetchError("too_many_pixels", f"{img.width}x{img.height} exceeds {max_pixels} pixels")
            img.load()
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            keep = fmt == "JPEG" and img.mode == "RGB" and orientation == 1
            if not keep:
                img = ImageOps.exif_transpose(img)
                if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    flat = Image.new("RGB", rgba.size, (255, 255, 255))
                    flat.paste(rgba, mask=rgba.getchannel("A"))
                    img = flat
                else:
                    img = img.convert("RGB")
            width, height = img.size
            if min(width, height) < min_side:
                raise FetchError("too_small", f"{width}x{height} has a side below {min_side} px")
            if keep:
                return data, width, height
            out = io.BytesIO()
            img.save(out, format="JPEG", quality=quality)
            return out.getvalue(), width, height
    except FetchError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise FetchError("decode_error", f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- stage


@dataclasses.dataclass(frozen=True)
class IngestSettings:
    """Download and image settings of the ingest stage (see the CLI for meanings and defaults)."""

    workers: int = 16
    timeout: float = 10.0
    retry: RetryPolicy = dataclasses.field(default_factory=lambda: RetryPolicy(attempts=3, base_delay=0.5))
    max_bytes: int = 20_000_000
    max_per_host: int = 4
    host_interval: float = 0.0
    jpeg_quality: int = 95
    min_side: int = 0
    max_pixels: int = 100_000_000
    seed: int = 0
    user_agent: str = "gadms-curate/1.0 (+research data curation)"


def run_ingest(out: str, pairs: Sequence[str] = (), folders: Sequence[str] = (), url_col: str = "url",
               text_col: str = "text", settings: IngestSettings | None = None, limit: int = 0,
               retry_failed: bool = False, shard_size: int = 10000, fsync: bool = False) -> dict[str, Any]:
    """Run (or resume) the ingest stage; return its statistics.

    Args:
        out: stage output folder.
        pairs: pair-list files (``.jsonl`` / ``.parquet``).
        folders: local image folders.
        url_col: URL column of the pair lists.
        text_col: text column of the pair lists.
        settings: download/image settings.
        limit: process at most this many new items (0 = all).
        retry_failed: try items that failed in an earlier run again.
        shard_size: records per JSONL shard.
        fsync: fsync images and records (power-loss safety; slower).
    """
    s = settings or IngestSettings()
    if not pairs and not folders:
        raise StageError("ingest needs at least one --pairs file or --folder")
    for path in pairs:
        if not os.path.isfile(path):
            raise StageError(f"--pairs {path}: file not found")
    params = {"jpeg_quality": s.jpeg_quality, "min_side": s.min_side, "max_pixels": s.max_pixels}
    inputs = {"pairs": [os.path.abspath(p) for p in pairs], "folders": [os.path.abspath(f) for f in folders]}
    limiter = HostLimiter(s.max_per_host, s.host_interval)
    with StageDir(out, STAGE, params, inputs, shard_size, fsync) as stage:
        done = stage.done(retry_failed)

        def items() -> Iterator[IngestItem]:
            seen: set[str] = set()
            count = 0
            sources = [read_pairs(p, url_col, text_col) for p in pairs] + [scan_folder(f) for f in folders]
            for source in sources:
                for item in source:
                    if item.key in seen or item.key in done:
                        continue  # duplicates within the inputs, or finished in an earlier run
                    if limit and count >= limit:
                        return
                    count += 1
                    seen.add(item.key)
                    yield item

        def process(item: IngestItem) -> dict[str, Any]:
            if item.url is not None:
                host = urllib.parse.urlsplit(item.url).hostname or ""

                def attempt() -> bytes:
                    with limiter.slot(host):
                        return fetch(item.url, s.timeout, s.max_bytes, s.user_agent).data

                data = with_retries(attempt, s.retry, item_rng(s.seed, "ingest", item.key), what=item.url)
            else:
                try:
                    size = os.path.getsize(item.path)
                    if size > s.max_bytes:
                        raise FetchError("too_large", f"{size} bytes > limit {s.max_bytes}")
                    with open(item.path, "rb") as f:
                        data = f.read()
                except OSError as e:
                    raise FetchError("read_error", f"{item.path}: {e}") from e
            jpeg, width, height = to_jpeg(data, s.jpeg_quality, s.min_side, s.max_pixels)
            rel = image_relpath(item.key)
            stage.write_file(rel, jpeg)
            record = {"key": item.key, "path": rel, "width": width, "height": height, "bytes": len(jpeg),
                      "text": item.text}
            record.update({"url": item.url} if item.url is not None else {"source": item.relpath})
            return record

        done_now = failed_now = 0
        for item, result in bounded_map(process, items(), s.workers):
            if isinstance(result, FetchError):
                stage.fail(item.key, result.reason, result.detail,
                           **({"url": item.url} if item.url is not None else {"source": item.relpath}))
                failed_now += 1
            elif isinstance(result, BaseException):
                raise result
            else:
                stage.records.append(result)
                done_now += 1
        logger.info("ingest: %d images stored, %d failed in this run", done_now, failed_now)
        stats = ingest_stats(stage.out)
        stage.write_stats(stats)
    return stats


def ingest_stats(folder: str) -> dict[str, Any]:
    """Statistics of an ingest folder, recomputed from its records."""
    keys, total_bytes = [], 0
    for record in iter_records(folder):
        keys.append(record["key"])
        total_bytes += record["bytes"]
    failures = latest_failures(folder, keys)
    reasons = collections.Counter(f["reason"] for f in failures.values())
    return {"stage": STAGE, "images": len(keys), "bytes": total_bytes, "failed": len(failures),
            "failure_reasons": dict(sorted(reasons.items()))}
