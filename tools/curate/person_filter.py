"""Stage 2 — filter: person detection + pose rules (METHOD §9) -> ``crops/<xx>/<crop key>.jpg``.

One record per ingested image lists every detection with its box, confidence,
class, keypoint counts and either the crop it produced or the first rule that
rejected it; ``stats.json`` holds the rejection-reason histogram. A crop's key
is ``<image key>_<detection index>``.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from PIL import Image

from tools.curate.detect import Detector, FilterRules, PoseEstimator, check_keypoints
from tools.curate.store import StageDir, iter_records, latest_failures, require_stage

logger = logging.getLogger(__name__)

STAGE = "filter"
NO_DETECTION = "no_detection"


def crop_relpath(crop_key: str) -> str:
    return f"crops/{crop_key[:2]}/{crop_key}.jpg"


def crop_box(box: tuple[float, float, float, float], width: int, height: int, pad: float) -> tuple[int, int, int, int]:
    """Integer crop rectangle: the box grown by ``pad`` of its size on each side, clipped to the image."""
    x1, y1, x2, y2 = box
    px, py = pad * (x2 - x1), pad * (y2 - y1)
    return (max(0, math.floor(x1 - px)), max(0, math.floor(y1 - py)),
            min(width, math.ceil(x2 + px)), min(height, math.ceil(y2 + py)))


def run_filter(out: str, images: str, detector: Detector, pose: PoseEstimator, rules: FilterRules | None = None,
               backend: dict[str, Any] | None = None, jpeg_quality: int = 95, pad: float = 0.0, limit: int = 0,
               retry_failed: bool = False, shard_size: int = 10000, fsync: bool = False) -> dict[str, Any]:
    """Run (or resume) the filter stage over an ingest folder; return its statistics.

    Args:
        out: stage output folder.
        images: the ingest stage's output folder.
        detector: person detector backend.
        pose: pose backend.
        rules: keep rules (defaults: METHOD §9).
        backend: backend description recorded in the manifest (name, weight files).
        jpeg_quality: quality of the crop JPEGs.
        pad: crop margin as a fraction of the box size (0 = the box itself).
        limit: process at most this many new images (0 = all).
        retry_failed: retry images that could not be read before.
        shard_size: records per JSONL shard.
        fsync: fsync crops and records.
    """
    rules = rules or FilterRules()
    require_stage(images, "ingest", "--images")
    params = {"rules": dataclasses.asdict(rules), "backend": backend or {}, "jpeg_quality": jpeg_quality, "pad": pad}
    with StageDir(out, STAGE, params, {"images": os.path.abspath(images)}, shard_size, fsync) as stage:
        done = stage.done(retry_failed)
        processed = 0
        for source in iter_records(images):
            key = source["key"]
            if key in done:
                continue
            if limit and processed >= limit:
                break
            processed += 1
            path = os.path.join(images, source["path"])
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")
            except (OSError, SyntaxError, ValueError) as e:
                stage.fail(key, "unreadable", f"{path}: {type(e).__name__}: {e}")
                continue
            detections = [_evaluate(stage, image, key, index, box, pose, rules, jpeg_quality, pad)
                          for index, box in enumerate(detector.detect(image))]
            stage.records.append({"key": key, "width": image.width, "height": image.height,
                                  "detections": detections, "reason": None if detections else NO_DETECTION})
        logger.info("filter: %d images processed in this run", processed)
        stats = filter_stats(stage.out)
        stage.write_stats(stats)
    return stats


def _evaluate(stage: StageDir, image: Image.Image, key: str, index: int, box: Any, pose: PoseEstimator,
              rules: FilterRules, jpeg_quality: int, pad: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"index": index, "box": [round(v, 2) for v in (box.x1, box.y1, box.x2, box.y2)],
                             "conf": round(float(box.conf), 4), "cls": int(box.cls)}
    reason = rules.box_problem(box)
    if reason is None:
        keypoints = check_keypoints(pose.keypoints(image, box))
        counts = rules.keypoint_counts(keypoints)
        entry["keypoints"] = counts
        reason = rules.pose_problem(counts)
        if reason is None:
            crop_key = f"{key}_{index:02d}"
            rect = crop_box((box.x1, box.y1, box.x2, box.y2), image.width, image.height, pad)
            buf = io.BytesIO()
            image.crop(rect).save(buf, format="JPEG", quality=jpeg_quality)
            rel = crop_relpath(crop_key)
            stage.write_file(rel, buf.getvalue())
            entry.update(crop_key=crop_key, crop=rel, crop_rect=list(rect),
                         pose=[[round(float(v), 2) for v in row] for row in keypoints])
    entry["reason"] = reason
    return entry


def iter_crops(folder: str) -> Iterator[tuple[str, str, str]]:
    """``(crop key, source image key, crop path relative to the filter folder)`` of every kept crop."""
    for record in iter_records(folder):
        for det in record["detections"]:
            if det.get("crop_key"):
                yield det["crop_key"], record["key"], det["crop"]


def filter_stats(folder: str) -> dict[str, Any]:
    """Statistics of a filter folder, recomputed from its records."""
    reasons: collections.Counter[str] = collections.Counter()
    images = with_person = detections = crops = 0
    keys = []
    for record in iter_records(folder):
        images += 1
        keys.append(record["key"])
        if record.get("reason"):
            reasons[record["reason"]] += 1
        kept = 0
        for det in record["detections"]:
            detections += 1
            if det["reason"] is None:
                kept += 1
            else:
                reasons[det["reason"]] += 1
        crops += kept
        with_person += kept > 0
    failures = latest_failures(folder, keys)
    return {"stage": STAGE, "images": images, "images_with_crops": with_person, "detections": detections,
            "crops": crops, "rejections": dict(sorted(reasons.items())), "failed": len(failures),
            "failure_reasons": dict(sorted(collections.Counter(f["reason"] for f in failures.values()).items()))}
