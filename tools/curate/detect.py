"""Person detection + pose backends and the METHOD §9 keep rules.

Backends implement two small interfaces:

* ``Detector.detect(image) -> list[Box]`` (all classes; the rules keep the person class);
* ``PoseEstimator.keypoints(image, box) -> array [17, 3]`` of COCO keypoints ``(x, y, confidence)``.

``ultralytics`` (YOLO11 + YOLO11-pose from local weight files) is the real backend;
``fake`` is a deterministic backend for tests that reads boxes and keypoints from
flat colour blobs (see ``FakeDetector``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Protocol

import numpy as np
from PIL import Image

from tools.curate.store import StageError

NUM_KEYPOINTS = 17
#: COCO keypoint indices: nose, left/right eye, left/right ear.
HEAD_KEYPOINTS = (0, 1, 2, 3, 4)
#: COCO keypoint indices: left/right hip.
HIP_KEYPOINTS = (11, 12)


@dataclasses.dataclass(frozen=True)
class Box:
    """A detection in pixel coordinates (``x2``/``y2`` exclusive) with its confidence and class id."""

    x1: float
    y1: float
    x2: float
    y2: float
    conf: float
    cls: int = 0

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1


class Detector(Protocol):
    def detect(self, image: Image.Image) -> list[Box]: ...


class PoseEstimator(Protocol):
    def keypoints(self, image: Image.Image, box: Box) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class FilterRules:
    """Keep rules of METHOD §9 (all thresholds configurable).

    Args:
        person_class: detector class id of "person" (0 for COCO-trained YOLO).
        min_conf: keep when confidence is above this.
        min_side: keep when the box's shorter side is above this (pixels).
        min_aspect: smallest height / width kept (1:2 -> 2).
        max_aspect: largest height / width kept (1:4 -> 4).
        min_keypoints: visible keypoints needed.
        min_hips: visible hip keypoints needed (COCO 11, 12).
        min_head: visible head keypoints needed (COCO 0-4).
        kp_threshold: a keypoint is visible when its confidence is at least this.
    """

    person_class: int = 0
    min_conf: float = 0.85
    min_side: float = 90.0
    min_aspect: float = 2.0
    max_aspect: float = 4.0
    min_keypoints: int = 8
    min_hips: int = 1
    min_head: int = 2
    kp_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.min_aspect <= self.max_aspect:
            raise StageError(f"aspect bounds must satisfy 0 < min ({self.min_aspect}) <= max ({self.max_aspect})")
        if self.min_keypoints > NUM_KEYPOINTS or self.min_hips > 2 or self.min_head > 5:
            raise StageError("keypoint thresholds exceed the 17 COCO keypoints (2 hips, 5 head keypoints)")

    def box_problem(self, box: Box) -> str | None:
        """First box rule that fails: ``not_person``, ``low_confidence``, ``too_small``, ``aspect_ratio``."""
        if box.cls != self.person_class:
            return "not_person"
        if not box.conf > self.min_conf:
            return "low_confidence"
        if not min(box.width, box.height) > self.min_side:
            return "too_small"
        if not self.min_aspect <= box.height / box.width <= self.max_aspect:
            return "aspect_ratio"
        return None

    def keypoint_counts(self, keypoints: np.ndarray) -> dict[str, int]:
        visible = np.asarray(keypoints, dtype=np.float64)[:, 2] >= self.kp_threshold
        return {"visible": int(visible.sum()), "head": int(visible[list(HEAD_KEYPOINTS)].sum()),
                "hips": int(visible[list(HIP_KEYPOINTS)].sum())}

    def pose_problem(self, counts: dict[str, int]) -> str | None:
        """First pose rule that fails: ``few_keypoints``, ``no_hip``, ``few_head_keypoints``."""
        if counts["visible"] < self.min_keypoints:
            return "few_keypoints"
        if counts["hips"] < self.min_hips:
            return "no_hip"
        if counts["head"] < self.min_head:
            return "few_head_keypoints"
        return None


def check_keypoints(keypoints: Any) -> np.ndarray:
    """Validate a pose backend's output: ``[17, 3]`` finite numbers."""
    array = np.asarray(keypoints, dtype=np.float64)
    if array.shape != (NUM_KEYPOINTS, 3) or not np.isfinite(array).all():
        raise StageError(f"pose backend returned keypoints of shape {array.shape}; expected ({NUM_KEYPOINTS}, 3) "
                         "finite (x, y, confidence) rows in COCO order")
    return array


# --------------------------------------------------------------------------- fake backend

#: Visibility orders of the fake pose backend: the first N keypoints of the order are visible.
FAKE_ORDERS = {
    "head_hips_first": (0, 1, 2, 3, 4, 11, 12, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16),
    "hips_last": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16, 11, 12),
    "head_last": (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 1, 2, 3, 4),
}
#: Canonical keypoint positions (fractions of the box) of a standing person, COCO order.
_CANONICAL = np.array([
    (0.50, 0.06), (0.53, 0.04), (0.47, 0.04), (0.57, 0.05), (0.43, 0.05), (0.65, 0.20), (0.35, 0.20),
    (0.72, 0.36), (0.28, 0.36), (0.74, 0.50), (0.26, 0.50), (0.60, 0.52), (0.40, 0.52), (0.60, 0.74),
    (0.40, 0.74), (0.60, 0.95), (0.40, 0.95)])
_FAKE_FG_THRESHOLD = 60
_FAKE_MIN_BLOB = 4


def _fake_blobs(image: Image.Image) -> list[tuple[int, int, int, int, np.ndarray]]:
    """Flat-colour blobs on a flat background: ``(x1, y1, x2, y2, median RGB)`` left to right."""
    a = np.asarray(image.convert("RGB"), dtype=np.int16)
    foreground = np.abs(a - a[0, 0]).max(axis=2) > _FAKE_FG_THRESHOLD
    columns = np.concatenate([[False], foreground.any(axis=0), [False]])
    edges = np.flatnonzero(columns[1:] != columns[:-1])
    blobs = []
    for x1, x2 in zip(edges[::2], edges[1::2]):
        if x2 - x1 < _FAKE_MIN_BLOB:
            continue  # compression speckle, not a blob
        rows = np.flatnonzero(foreground[:, x1:x2].any(axis=1))
        y1, y2 = int(rows[0]), int(rows[-1]) + 1
        pixels = a[y1:y2, x1:x2][foreground[y1:y2, x1:x2]]
        blobs.append((int(x1), y1, int(x2), y2, np.median(pixels, axis=0)))
    return blobs


class FakeDetector:
    """Deterministic test detector: every flat-colour blob on a flat background is a detection.

    The background colour is the top-left pixel; blobs are separated by background columns.
    The blob's median colour encodes the detection: confidence = R / 255 (2 decimals);
    class = 2 ("car") when B >= 192, else 0 (person). See ``FakePose`` for G and B.
    """

    def detect(self, image: Image.Image) -> list[Box]:
        boxes = []
        for x1, y1, x2, y2, rgb in _fake_blobs(image):
            cls = 2 if rgb[2] >= 192 else 0
            boxes.append(Box(float(x1), float(y1), float(x2), float(y2), round(float(rgb[0]) / 255.0, 2), cls))
        return boxes


class FakePose:
    """Deterministic test pose estimator reading the blob inside the box.

    Visible keypoints = round(G / 15) (max 17), taken in the order chosen by B:
    B < 32 ``head_hips_first``, 32 <= B < 96 ``hips_last``, otherwise ``head_last``.
    Visible keypoints get confidence 0.9, the others 0.1; positions are canonical.
    """

    def keypoints(self, image: Image.Image, box: Box) -> np.ndarray:
        crop = image.crop((int(box.x1), int(box.y1), int(box.x2), int(box.y2)))
        a = np.asarray(crop.convert("RGB"), dtype=np.int16)
        # Median of the box interior: robust to the blurred border of a JPEG-compressed blob.
        h, w = a.shape[:2]
        inner = a[h // 4: max(h // 4 + 1, 3 * h // 4), w // 4: max(w // 4 + 1, 3 * w // 4)].reshape(-1, 3)
        g, b = float(np.median(inner[:, 1])), float(np.median(inner[:, 2]))
        count = min(NUM_KEYPOINTS, int(round(g / 15.0)))
        order = FAKE_ORDERS["head_hips_first"] if b < 32 else FAKE_ORDERS["hips_last"] if b < 96 else \
            FAKE_ORDERS["head_last"]
        out = np.zeros((NUM_KEYPOINTS, 3))
        out[:, 0] = box.x1 + _CANONICAL[:, 0] * box.width
        out[:, 1] = box.y1 + _CANONICAL[:, 1] * box.height
        out[:, 2] = 0.1
        out[list(order[:count]), 2] = 0.9
        return out


# --------------------------------------------------------------------------- ultralytics backend


def _load_yolo(weights: str | None, flag: str, example: str) -> Any:
    try:
        from ultralytics import YOLO
    except ImportError as e:
        raise StageError("the 'ultralytics' backend needs the ultralytics package: pip install ultralytics "
                         "(or choose another --backend)") from e
    if not weights:
        raise StageError(f"{flag} is required for the ultralytics backend: the path of a local {example} file")
    if not os.path.isfile(weights):
        raise StageError(f"{flag} {weights}: file not found. Download {example} from the Ultralytics releases "
                         "yourself and pass its local path; weights are never downloaded by this tool")
    return YOLO(weights)


class UltralyticsDetector:
    """YOLO11 detector from a local weight file (all classes, low confidence floor; the rules filter).

    Args:
        weights: e.g. ``yolo11x.pt``.
        device: e.g. ``cpu``, ``cuda:0`` (None: ultralytics decides).
        conf: minimum confidence reported (below the keep threshold, for the rejection statistics).
        imgsz: inference size.
    """

    def __init__(self, weights: str | None, device: str | None = None, conf: float = 0.25, imgsz: int = 640) -> None:
        self.model = _load_yolo(weights, "--det-weights", "yolo11x.pt")
        self.device, self.conf, self.imgsz = device, conf, imgsz

    def detect(self, image: Image.Image) -> list[Box]:
        result = self.model.predict(image, conf=self.conf, imgsz=self.imgsz, device=self.device, verbose=False)[0]
        xyxy = result.boxes.xyxy.cpu().numpy()
        conf = result.boxes.conf.cpu().numpy()
        cls = result.boxes.cls.cpu().numpy()
        return [Box(*map(float, xyxy[i]), float(conf[i]), int(cls[i])) for i in range(len(xyxy))]


class UltralyticsPose:
    """YOLO11-pose on the (margin-padded) box crop; returns the best-overlapping person's keypoints.

    Args:
        weights: e.g. ``yolo11x-pose.pt``.
        device: torch device string or None.
        margin: crop margin as a fraction of the box size (pose models like some context).
        imgsz: inference size.
    """

    def __init__(self, weights: str | None, device: str | None = None, margin: float = 0.1, imgsz: int = 640) -> None:
        self.model = _load_yolo(weights, "--pose-weights", "yolo11x-pose.pt")
        self.device, self.margin, self.imgsz = device, margin, imgsz

    def keypoints(self, image: Image.Image, box: Box) -> np.ndarray:
        mx, my = self.margin * box.width, self.margin * box.height
        x0, y0 = max(0, int(box.x1 - mx)), max(0, int(box.y1 - my))
        x1, y1 = min(image.width, int(box.x2 + mx)), min(image.height, int(box.y2 + my))
        result = self.model.predict(image.crop((x0, y0, x1, y1)), imgsz=self.imgsz, device=self.device,
                                    verbose=False)[0]
        out = np.zeros((NUM_KEYPOINTS, 3))
        if result.keypoints is None or len(result.boxes) == 0:
            return out
        target = np.array([box.x1 - x0, box.y1 - y0, box.x2 - x0, box.y2 - y0])
        boxes = result.boxes.xyxy.cpu().numpy()
        best = int(np.argmax([_iou(target, b) for b in boxes]))
        kps = result.keypoints.data[best].cpu().numpy()
        out[:, 0], out[:, 1] = kps[:, 0] + x0, kps[:, 1] + y0
        out[:, 2] = kps[:, 2] if kps.shape[1] > 2 else 1.0
        return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


BACKENDS = ("ultralytics", "fake")


def build_backend(name: str, det_weights: str | None = None, pose_weights: str | None = None,
                  device: str | None = None) -> tuple[Detector, PoseEstimator]:
    """``(detector, pose estimator)`` of a backend by name."""
    if name == "fake":
        return FakeDetector(), FakePose()
    if name == "ultralytics":
        return UltralyticsDetector(det_weights, device), UltralyticsPose(pose_weights, device)
    raise StageError(f"unknown --backend {name!r}; valid: {', '.join(BACKENDS)}")
