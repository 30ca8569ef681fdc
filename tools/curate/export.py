"""Stage 5 — export: the WebPerson formats of docs/data.md + a statistics report.

Output folder (point ``data.root`` at its parent when it is named ``WebPerson``, or
at the folder itself, and ``data.annotation`` at one of the annotation files)::

    images/<xx>/<key>.jpg        the crops
    <name>.json                  authors' format: [{"<xx>/<key>.jpg": {"caption1", "caption2"}}, ...]
    <name>.jsonl                 one such object per line
    shards/<name>-000000.tar     webdataset shards: <key>.jpg + <key>.json ({"caption1", "caption2"})
    stats.json                   counts, caption lengths, vocabulary, rejection histograms of all stages

Samples are sorted by key, and tar headers carry fixed metadata (mtime 0, uid/gid 0,
mode 0644), so the export is a pure function of the caption records: a resumed run
exports the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from datasets.bases import tar_member
from tools.curate.store import (
    STATS,
    StageError,
    atomic_write_bytes,
    atomic_write_json,
    iter_records,
    read_manifest,
    require_stage,
)
from tools.curate.text import word_count, words

logger = logging.getLogger(__name__)

STAGE = "export"
FORMATS = ("json", "jsonl", "tar")


def export_relpath(key: str) -> str:
    """Image path relative to ``images/`` (the key inside the JSON annotations)."""
    return f"{key[:2]}/{key}.jpg"


def _tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(*tar_member(name, data))
    return buf.getvalue()


def _captions_json(record: dict[str, Any]) -> dict[str, str]:
    return {"caption1": record["caption1"], "caption2": record["caption2"]}


def run_export(out: str, captions: str, crops: str | None = None, formats: Sequence[str] = FORMATS,
               name: str = "webperson", shard_size: int = 1000) -> dict[str, Any]:
    """Export a caption stage folder as a WebPerson corpus; return the statistics.

    Args:
        out: the corpus folder (conventionally ``.../WebPerson``).
        captions: the caption stage's output folder.
        crops: the filter stage's folder (default: the one the caption stage read).
        formats: any of ``json``, ``jsonl``, ``tar``.
        name: base name of the annotation files and shards.
        shard_size: samples per tar shard.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise StageError(f"--formats: unknown or empty {unknown or formats}; valid: {', '.join(FORMATS)}")
    if shard_size < 1:
        raise StageError(f"--shard-size must be >= 1, got {shard_size}")
    manifest = require_stage(captions, "caption", "--captions")
    crops = crops or manifest["inputs"]["crops"]
    records = sorted(iter_records(captions), key=lambda r: r["key"])
    if not records:
        raise StageError(f"--captions {captions}: no captioned crops to export")
    for prev, cur in zip(records, records[1:]):
        if prev["key"] == cur["key"]:
            raise StageError(f"{captions}: duplicate record for {cur['key']!r}")
    out = os.path.abspath(out)
    tmp = os.path.join(out, ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of an interrupted export
    os.makedirs(tmp)

    def crop_bytes(record: dict[str, Any]) -> bytes:
        path = os.path.join(crops, record["crop"])
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise StageError(f"crop of {record['key']} missing: {path} ({e}); was the filter folder moved? "
                             "pass it with --crops") from e

    for record in records:
        data = crop_bytes(record)
        target = os.path.join(out, "images", export_relpath(record["key"]))
        if not (os.path.isfile(target) and os.path.getsize(target) == len(data) and _same(target, data)):
            atomic_write_bytes(target, data, tmp)
    if "json" in formats:
        body = ",\n".join(json.dumps({export_relpath(r["key"]): _captions_json(r)}, ensure_ascii=False)
                          for r in records)
        atomic_write_bytes(os.path.join(out, f"{name}.json"), f"[\n{body}\n]\n".encode(), tmp)
    if "jsonl" in formats:
        body = "".join(json.dumps({export_relpath(r["key"]): _captions_json(r)}, ensure_ascii=False) + "\n"
                       for r in records)
        atomic_write_bytes(os.path.join(out, f"{name}.jsonl"), body.encode("utf-8"), tmp)
    shards = []
    if "tar" in formats:
        shard_dir = os.path.join(out, "shards")
        for start in range(0, len(records), shard_size):
            members = []
            for r in records[start:start + shard_size]:
                members.append((f"{r['key']}.jpg", crop_bytes(r)))
                members.append((f"{r['key']}.json", json.dumps(_captions_json(r), sort_keys=True,
                                                               ensure_ascii=False).encode("utf-8")))
            shard = os.path.join(shard_dir, f"{name}-{start // shard_size:06d}.tar")
            atomic_write_bytes(shard, _tar_bytes(members), tmp)
            shards.append(shard)
        # Shards of an earlier, larger export would be read as part of this corpus: remove them.
        for stale in sorted(os.listdir(shard_dir)):
            path = os.path.join(shard_dir, stale)
            if stale.startswith(f"{name}-") and stale.endswith(".tar") and path not in shards:
                os.remove(path)
    stats = export_stats(records, captions, formats, len(shards))
    atomic_write_json(os.path.join(out, STATS), stats, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    return stats


def _same(path: str, data: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read() == data


def _stage_stats(folder: str | None) -> dict[str, Any] | None:
    if not folder:
        return None
    path = os.path.join(folder, STATS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def export_stats(records: list[dict[str, Any]], captions: str, formats: Sequence[str], shards: int) -> dict[str, Any]:
    """Corpus statistics plus the statistics of every earlier stage found through the manifests."""
    texts = [r[k] for r in records for k in ("caption1", "caption2")]
    lengths = np.array([word_count(t) for t in texts], dtype=np.float64)
    vocabulary = {w for t in texts for w in words(t)}
    p5, p50, p95 = np.percentile(lengths, [5, 50, 95])
    stages: dict[str, Any] = {}
    caption_manifest = read_manifest(captions) or {}
    crops = caption_manifest.get("inputs", {}).get("crops")
    filter_manifest = read_manifest(crops) if crops and os.path.isdir(crops) else None
    images = (filter_manifest or {}).get("inputs", {}).get("images")
    templates = caption_manifest.get("inputs", {}).get("templates") or None
    if templates and os.path.isfile(templates):
        templates = os.path.dirname(templates)
    for stage, folder in (("ingest", images), ("filter", crops), ("templates", templates), ("caption", captions)):
        stats = _stage_stats(folder)
        if stats is not None and stats.get("stage") == stage:
            stages[stage] = stats
    return {"stage": STAGE, "images": len(records), "captions": len(texts), "formats": list(formats),
            "tar_shards": shards,
            "caption_words": {"mean": round(float(lengths.mean()), 2), "p5": float(p5), "p50": float(p50),
                              "p95": float(p95), "min": int(lengths.min()), "max": int(lengths.max())},
            "vocabulary": len(vocabulary), "stages": stages}


def format_stats(stats: dict[str, Any]) -> str:
    """A plain-text table of the export statistics (for the CLI)."""
    rows: list[tuple[str, str]] = [("images", str(stats["images"])), ("captions", str(stats["captions"]))]
    w = stats["caption_words"]
    rows.append(("caption words mean / p5 / p50 / p95 / max",
                 f"{w['mean']} / {w['p5']:g} / {w['p50']:g} / {w['p95']:g} / {w['max']}"))
    rows.append(("vocabulary (words)", str(stats["vocabulary"])))
    rows.append(("tar shards", str(stats["tar_shards"])))
    for stage, s in stats["stages"].items():
        for field in ("images", "crops", "templates", "failed"):
            if field in s:
                rows.append((f"{stage}: {field}", str(s[field])))
        for field in ("failure_reasons", "rejections"):
            for reason, count in s.get(field, {}).items():
                rows.append((f"{stage}: {reason}", str(count)))
    width = max(len(k) for k, _ in rows)
    vwidth = max(5, *(len(v) for _, v in rows))
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [line, f"| {'statistic'.ljust(width)} | {'value'.rjust(vwidth)} |", line]
    out += [f"| {k.ljust(width)} | {v.rjust(vwidth)} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)
