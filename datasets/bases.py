"""Shared pieces of every corpus loader (formats: docs/data.md).

* the dataset registry (``DATASETS``, ``register_dataset``);
* ``AnnotationError`` (names the file and the record index) and the bad-record
  collector that either raises it or skips and counts;
* the training index (``TrainIndex``: ``(pid, image_id, img_path, caption)``
  samples in compact numpy storage, so forked DataLoader workers share its
  pages) and the evaluation split (``EvalSplit``);
* ``PedesJsonDataset``, the loader shared by CUHK-PEDES, ICFG-PEDES and
  RSTPReid (one JSON list of per-image records; a repeated image path is kept
  as its own image, as the IRRA loaders do, and counted);
* ``open_image``, which reads plain files, ``shard.tar::member`` paths and
  members of registered containers (``register_container_reader``).
"""

from __future__ import annotations

import abc
import array
import collections
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from prettytable import PrettyTable

from utils.errors import UserInputError

logger = logging.getLogger(__name__)

DATASETS: dict[str, type] = {}

#: Separator between a tar shard and a member inside it in image paths.
TAR_SEPARATOR = "::"
#: Member extensions treated as images in webdataset-style shards.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
#: At most this many skipped-record errors are kept for reporting (the count is exact).
MAX_KEPT_PROBLEMS = 1000
#: Identity ids are stored as int64; any value in this range is accepted, negative ones too
#: (ids are labels: training remaps them to 0..K-1 and evaluation only compares them).
ID_RANGE = (-(2**63), 2**63 - 1)


def tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """`tarfile.addfile` arguments for one shard member with fixed metadata (mtime 0, mode 0644, owner
    0/""): a shard's bytes then depend on its members' names and contents only."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def register_dataset(name: str) -> Callable[[type], type]:
    """Class decorator adding a corpus class to ``DATASETS`` under ``name``."""

    def decorator(cls: type) -> type:
        if name in DATASETS and DATASETS[name] is not cls:
            raise ValueError(f"dataset name {name!r} is already registered by {DATASETS[name].__qualname__}")
        DATASETS[name] = cls
        cls.name = name
        return cls

    return decorator


class AnnotationError(UserInputError, ValueError):
    """A problem with a dataset's files or one of its records.

    Args:
        file: the annotation file (or folder) concerned.
        index: 0-based record index, or None for file-level problems.
        message: what is wrong and what was expected.
    """

    def __init__(self, file: str, index: int | None, message: str) -> None:
        self.file = str(file)
        self.index = index
        self.message = message
        where = self.file if index is None else f"{self.file}: record {index}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self) -> tuple[type, tuple[str, int | None, str]]:
        # Keeps the exception picklable across DataLoader workers / multiprocessing.
        return (type(self), (self.file, self.index, self.message))


class ImageReadError(UserInputError, OSError):
    """An image that is missing (``missing=True``), truncated or cannot be decoded."""

    def __init__(self, path: str, reason: str, missing: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.missing = missing
        super().__init__(f"cannot read image {path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str, bool]]:
        return (type(self), (self.path, self.reason, self.missing))


class RecordProblems:
    """Raises each bad-record error at once, or (when skipping) counts and keeps it.

    Args:
        skip: skip bad records instead of raising.
        keep: how many errors to keep for reporting; the count is always exact.
    """

    def __init__(self, skip: bool, keep: int = MAX_KEPT_PROBLEMS) -> None:
        self.skip = skip
        self.keep = keep
        self.count = 0
        self.errors: list[AnnotationError] = []

    def report(self, error: AnnotationError) -> None:
        """Raise ``error`` unless skipping; otherwise record it."""
        if not self.skip:
            raise error
        self.count += 1
        if len(self.errors) < self.keep:
            self.errors.append(error)

    def log_summary(self, what: str) -> None:
        """Log how many records were skipped (with the first few reasons)."""
        if self.count == 0:
            return
        first = "; ".join(str(e) for e in self.errors[:3])
        logger.warning("%s: skipped %d bad record(s) (skip_bad_records=True); first: %s", what, self.count, first)


# --------------------------------------------------------------------------- compact strings


class StringTable:
    """Immutable list of strings stored as one UTF-8 byte buffer plus int64 offsets.

    Unlike a list of ``str``, reading an element never touches a per-element
    Python object, so pages stay shared after ``fork``.
    """

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray) -> None:
        if buffer.dtype != np.uint8 or offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) == 0:
            raise ValueError("StringTable needs a uint8 buffer and a non-empty int64 offsets array")
        if int(offsets[-1]) != len(buffer):
            raise ValueError(f"last offset {int(offsets[-1])} does not match buffer length {len(buffer)}")
        self.buffer = buffer
        self.offsets = offsets

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringTable:
        """Build a table from any iterable of strings."""
        builder = StringTableBuilder()
        for s in strings:
            builder.append(s)
        return builder.finish()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.buffer[start:end].tobytes().decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        """Memory held by the table."""
        return int(self.buffer.nbytes + self.offsets.nbytes)


class StringTableBuilder:
    """Appends strings into a growing byte buffer (no per-string objects kept)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._offsets = array.array("q", [0])

    def append(self, s: str) -> None:
        """Add one string."""
        self._buffer += s.encode("utf-8")
        self._offsets.append(len(self._buffer))

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def finish(self) -> StringTable:
        """Return the table (copies into right-sized numpy arrays)."""
        table = StringTable(np.frombuffer(self._buffer, dtype=np.uint8).copy(),
                            np.frombuffer(self._offsets, dtype=np.int64).copy())
        self._buffer = bytearray()
        self._offsets = array.array("q", [0])
        return table


# --------------------------------------------------------------------------- splits


class TrainIndex(abc.ABC):
    """Training samples ``(pid, image_id, img_path, caption)``, one per caption.

    Subclasses keep per-image data in numpy arrays; ``pids``/``image_ids``
    give the per-sample labels as int64 arrays (what samplers need).
    """

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples (captions)."""

    @abc.abstractmethod
    def __getitem__(self, i: int) -> tuple[int, int, str, str]:
        """Sample ``i`` as ``(pid, image_id, img_path, caption)``."""

    @property
    @abc.abstractmethod
    def num_classes(self) -> int:
        """Number of training identities (pids are 0..num_classes-1)."""

    @property
    @abc.abstractmethod
    def num_images(self) -> int:
        """Number of distinct training images (image ids are 0..num_images-1)."""

    @property
    @abc.abstractmethod
    def pids(self) -> np.ndarray:
        """Per-sample pid, int64 array of length ``len(self)``."""

    @property
    @abc.abstractmethod
    def image_ids(self) -> np.ndarray:
        """Per-sample image id, int64 array of length ``len(self)``."""

    @abc.abstractmethod
    def image_path(self, image_id: int) -> str:
        """Path of one training image (``shard.tar::member`` for tar shards)."""

    def _check_index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        return i % n if i < 0 else i


class CompactTrainIndex(TrainIndex):
    """In-memory training index: per-image pid and path, per-sample caption.

    Args:
        image_pids: contiguous pid (0..K-1) of each image.
        image_paths: path of each image.
        sample_images: image id of each sample.
        captions: caption of each sample.
        num_classes: K.
    """

    def __init__(self, image_pids: np.ndarray, image_paths: StringTable, sample_images: np.ndarray,
                 captions: StringTable, num_classes: int) -> None:
        if len(image_pids) != len(image_paths) or len(sample_images) != len(captions):
            raise ValueError("CompactTrainIndex: per-image or per-sample arrays have different lengths")
        self._image_pids = np.ascontiguousarray(image_pids, dtype=np.int64)
        self._image_paths = image_paths
        self._sample_images = np.ascontiguousarray(sample_images, dtype=np.int64)
        self._captions = captions
        self._num_classes = int(num_classes)

    def __len__(self) -> int:
        return len(self._sample_images)

    def __getitem__(self, i: int) -> tuple[int, int, str, str]:
        i = self._check_index(i)
        image_id = int(self._sample_images[i])
        return int(self._image_pids[image_id]), image_id, self._image_paths[image_id], self._captions[i]

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_images(self) -> int:
        return len(self._image_pids)

    @property
    def pids(self) -> np.ndarray:
        return self._image_pids[self._sample_images]

    @property
    def image_ids(self) -> np.ndarray:
        return self._sample_images.copy()

    def image_path(self, image_id: int) -> str:
        return self._image_paths[image_id]


@dataclasses.dataclass
class EvalSplit:
    """A retrieval test set: an image gallery and text queries.

    Pids keep the dataset's original ids; only equality between them matters.
    """

    img_paths: list[str]
    image_pids: np.ndarray
    captions: list[str]
    caption_pids: np.ndarray

    def __post_init__(self) -> None:
        self.image_pids = np.asarray(self.image_pids, dtype=np.int64)
        self.caption_pids = np.asarray(self.caption_pids, dtype=np.int64)
        if len(self.img_paths) != len(self.image_pids) or len(self.captions) != len(self.caption_pids):
            raise ValueError("EvalSplit: paths/captions and their pids have different lengths")

    @property
    def num_ids(self) -> int:
        """Number of distinct identities among images and captions."""
        return len(np.union1d(self.image_pids, self.caption_pids))


# --------------------------------------------------------------------------- dataset base


class TextReIDDataset:
    """Base of every corpus: ``.train`` (TrainIndex), ``.val``/``.test`` (EvalSplit or None)."""

    name: ClassVar[str] = ""
    #: Folder name under the data root (layout in docs/data.md).
    dataset_dir: ClassVar[str] = ""

    train: TrainIndex
    val: EvalSplit | None
    test: EvalSplit | None
    #: Why a split is missing, shown in the statistics (e.g. "no val split").
    missing_split_notes: dict[str, str]

    def __init__(self) -> None:
        self.missing_split_notes = {}
        self.num_skipped = 0
        self.skipped: list[AnnotationError] = []
        #: The annotation file that was read (None where there is no single file, e.g. tar shards).
        self.annotation_path: str | None = None
        #: Records whose image path an earlier record already listed (kept, each as its own image).
        self.num_duplicate_images = 0
        #: Problems worth a user's attention that are not errors (check_data prints them).
        self.warnings: list[str] = []

    @property
    def num_classes(self) -> int:
        """Number of training identities."""
        return self.train.num_classes

    def statistics_table(self) -> PrettyTable:
        """Per-split ids / images / captions as a PrettyTable."""
        table = PrettyTable(["subset", "ids", "images", "captions"])
        table.add_row(["train", self.train.num_classes, self.train.num_images, len(self.train)])
        for split in ("val", "test"):
            data = getattr(self, split)
            if data is None:
                note = self.missing_split_notes.get(split, "none")
                table.add_row([split, "-", "-", f"- ({note})"])
            else:
                table.add_row([split, data.num_ids, len(data.img_paths), len(data.captions)])
        return table

    def show_statistics(self) -> str:
        """Log and return the statistics table."""
        text = f"{self.name or type(self).__name__} statistics:\n{self.statistics_table()}"
        if self.num_skipped:
            text += f"\n{self.num_skipped} bad record(s) skipped"
        logger.info("%s", text)
        return text


def find_dataset_dir(root: str, dataset_dir: str, markers: Sequence[str]) -> str:
    """Return ``root/<dataset_dir>``, or ``root`` itself if it is the dataset folder.

    Args:
        root: the data root, or the dataset folder itself.
        dataset_dir: the folder name the layout prescribes (e.g. ``CUHK-PEDES``).
        markers: file/folder names whose presence identifies the dataset folder.
    """
    root = os.path.expanduser(str(root))
    candidate = os.path.join(root, dataset_dir)
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(root) and (os.path.basename(os.path.normpath(root)) == dataset_dir
                                or any(os.path.exists(os.path.join(root, m)) for m in markers)):
        return root
    if not os.path.isdir(root):
        reason = f"data root {root} does not exist"
    else:
        reason = f"dataset folder {candidate} not found (and {root} contains none of {', '.join(markers)})"
    raise AnnotationError(candidate, None, f"{reason}; expected layout: <root>/{dataset_dir}/"
                          f"{{{', '.join(markers)}}} with <root> given as data.root")


def find_annotation(dataset_path: str, names: Sequence[str], layout: str) -> str:
    """Return the first existing ``dataset_path/<name>`` or raise naming all candidates."""
    for name in names:
        path = os.path.join(dataset_path, name)
        if os.path.isfile(path):
            return path
    looked = ", ".join(os.path.join(dataset_path, n) for n in names)
    raise AnnotationError(os.path.join(dataset_path, names[0]), None,
                          f"annotation file not found (looked for {looked}); expected layout: {layout}")


def load_json_file(path: str) -> Any:
    """``json.load`` with errors that name the file and the line/column; a UTF-8 byte-order mark is skipped."""
    try:
        # utf-8-sig: some Windows editors start UTF-8 files with a byte-order mark.
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, None, f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except ValueError as e:
        # Python refuses to parse integers of more than 4300 digits (sys.int_info.default_max_str_digits).
        raise AnnotationError(path, None, f"malformed JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(path, None, f"not valid UTF-8 text (byte {e.start}): {e.reason}") from e
    except OSError as e:
        raise AnnotationError(path, None, f"cannot read annotation file: {e.strerror or e}") from e


def type_name(value: Any) -> str:
    """JSON-ish name of a value's type for error messages."""
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null",
            int: "integer", float: "number"}.get(type(value), type(value).__name__)


def check_id(value: Any, file: str, index: int, what: str = "'id'") -> int:
    """Return ``value`` if it is an integer that fits in int64, else raise AnnotationError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise AnnotationError(file, index, f"{what} must be an integer, got {type_name(value)} {value!r:.40}")
    low, high = ID_RANGE
    if not low <= value <= high:
        digits = str(value)
        shown = digits if len(digits) <= 40 else f"{digits[:20]}...({len(digits)} digits)"
        raise AnnotationError(file, index, f"{what} {shown} does not fit in a 64-bit integer "
                              f"(allowed: {low}..{high})")
    return value


@functools.cache
def _tokenizer_cleans_to_empty() -> Callable[[str], bool]:
    # Imported on first use: `import datasets` stays free of torch, which the model package loads.
    from model.tokenizer import cleans_to_empty

    return cleans_to_empty


def caption_is_empty(text: str) -> bool:
    """Whether the tokenizer's cleaning leaves nothing of ``text`` (``model.tokenizer.cleans_to_empty``)."""
    return _tokenizer_cleans_to_empty()(text)


def check_caption(value: Any, file: str, index: int, what: str) -> str:
    """Return ``value`` if it is a string with text the tokenizer keeps, else raise AnnotationError."""
    if not isinstance(value, str):
        raise AnnotationError(file, index, f"{what} must be a string, got {type_name(value)}")
    if not value.strip():
        raise AnnotationError(file, index, f"{what} is empty")
    if caption_is_empty(value):
        raise AnnotationError(file, index, f"{what} {value!r:.60} is empty once cleaned for the tokenizer "
                              "(HTML entities, control characters and whitespace are dropped); write the "
                              "caption's text, or remove the caption")
    return value


def check_relative_path(path: str, file: str, index: int, what: str, image_root: str) -> str:
    """Return ``path`` if it stays inside ``image_root`` once joined to it, else raise AnnotationError.

    The check is on the text alone (absolute, or ``..`` climbing above the root):
    a symlinked image folder is the user's choice and stays allowed.
    """
    normal = os.path.normpath(path)
    if os.path.isabs(path) or normal == ".." or normal.startswith(".." + os.sep):
        raise AnnotationError(file, index, f"{what} {path!r} leaves the image folder: image paths are relative "
                              f"to {image_root} and must stay inside it; move the image there and give its "
                              "path relative to that folder")
    return path


# --------------------------------------------------------------------------- PEDES-style corpora


@dataclasses.dataclass
class _PedesRecord:
    split: str
    pid: int
    path: str
    captions: list[str]


class PedesJsonDataset(TextReIDDataset):
    """Loader for corpora stored as one JSON list of per-image records.

    Each record: ``{"split", "captions": [str, ...], "id": int, <path_key>: str}``;
    images live under ``<dataset dir>/<image_dir>/``. Subclasses set the class
    attributes below. Every record is one image, as in the IRRA loaders: a
    record repeating an earlier record's image path is kept as a separate
    image (next image id in train, another gallery entry in test), counted in
    ``num_duplicate_images`` and reported as a warning.

    Args:
        root: the data root holding ``<dataset_dir>/``, or that folder itself.
        skip_bad_records: skip (and count) malformed records instead of raising.
    """

    #: Candidate annotation file names, in order of preference.
    annotation_names: ClassVar[tuple[str, ...]] = ()
    image_dir: ClassVar[str] = "imgs"
    path_key: ClassVar[str] = "file_path"
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")

    def __init__(self, root: str, skip_bad_records: bool = False) -> None:
        super().__init__()
        layout = f"<root>/{self.dataset_dir}/{{{self.image_dir}/, {self.annotation_names[0]}}}"
        self.dataset_path = find_dataset_dir(root, self.dataset_dir, (*self.annotation_names, self.image_dir))
        self.annotation_path = find_annotation(self.dataset_path, self.annotation_names, layout)
        self.image_root = os.path.join(self.dataset_path, self.image_dir)
        if not os.path.isdir(self.image_root):
            raise AnnotationError(self.image_root, None, f"image folder not found; expected layout: {layout}")
        logger.info("%s: reading %s", self.name, self.annotation_path)

        problems = RecordProblems(skip_bad_records)
        records = self._parse(problems)
        problems.log_summary(f"{self.name} ({self.annotation_path})")
        self.num_skipped, self.skipped = problems.count, problems.errors

        by_split: dict[str, list[_PedesRecord]] = {s: [] for s in self.splits}
        for record in records:
            by_split[record.split].append(record)
        if not by_split["train"]:
            raise AnnotationError(self.annotation_path, None, "no usable record has split 'train'")
        self.train = self._build_train(by_split["train"])
        self.val = self._build_eval(by_split["val"]) if "val" in self.splits else None
        self.test = self._build_eval(by_split["test"])
        if "val" not in self.splits:
            self.missing_split_notes["val"] = f"{self.name} has no val split; evaluate on test"
            logger.info("%s has no val split; validation uses the test split", self.name)
        for split in self.splits:
            if not by_split[split]:
                logger.warning("%s: split %r is empty in %s", self.name, split, self.annotation_path)

    def _parse(self, problems: RecordProblems) -> list[_PedesRecord]:
        data = load_json_file(self.annotation_path)
        if not isinstance(data, list):
            raise AnnotationError(self.annotation_path, None,
                                  f"expected a JSON list of image records at the top level, got {type_name(data)}")
        records: list[_PedesRecord] = []
        first_seen: dict[str, int] = {}
        repeats: list[str] = []
        for index, raw in enumerate(data):
            try:
                record = self._check_record(raw, index)
            except AnnotationError as error:
                problems.report(error)
                continue
            first = first_seen.setdefault(record.path, index)
            if first != index:
                self.num_duplicate_images += 1
                if len(repeats) < 3:
                    repeats.append(f"{record.path!r} (records {first} and {index})")
            records.append(record)
        if self.num_duplicate_images:
            message = (f"{self.num_duplicate_images} record(s) repeat an earlier record's image path in "
                       f"{self.annotation_path}; each is kept as a separate image, as the IRRA loaders do "
                       f"(first: {', '.join(repeats)})")
            logger.warning("%s: %s", self.name, message)
            self.warnings.append(message)
        return records

    def _check_record(self, raw: Any, index: int) -> _PedesRecord:
        file = self.annotation_path
        if not isinstance(raw, dict):
            raise AnnotationError(file, index, f"expected an object, got {type_name(raw)}")
        for key in self._required_keys():
            if key not in raw:
                raise AnnotationError(file, index, f"missing key {key!r} (keys present: {sorted(raw)})")
        pid, path, captions = check_id(raw["id"], file, index), raw[self.path_key], raw["captions"]
        split = self._record_split(raw, pid, index)
        if not isinstance(path, str) or not path.strip():
            raise AnnotationError(file, index, f"{self.path_key!r} must be a non-empty string, got {path!r:.60}")
        check_relative_path(path, file, index, repr(self.path_key), self.image_root)
        if not isinstance(captions, list) or not captions:
            raise AnnotationError(file, index, f"'captions' must be a non-empty list of strings, "
                                  f"got {type_name(captions)} {captions!r:.40}")
        for k, caption in enumerate(captions):
            check_caption(caption, file, index, f"caption {k}")
        return _PedesRecord(split, pid, path, captions)

    def _required_keys(self) -> tuple[str, ...]:
        """Keys every record of the annotation file must have."""
        return ("split", "id", self.path_key, "captions")

    def _record_split(self, raw: dict[str, Any], pid: int, index: int) -> str:
        """The split a checked record belongs to (here: its ``split`` value); raises AnnotationError."""
        split = raw["split"]
        if not isinstance(split, str) or split not in self.splits:
            raise AnnotationError(self.annotation_path, index,
                                  f"unknown split {split!r} (expected one of {', '.join(self.splits)})")
        return split

    def _build_train(self, records: list[_PedesRecord]) -> CompactTrainIndex:
        # Contiguous 0..K-1 in order of the sorted original ids: IRRA's id-1 for CUHK-PEDES (1-based ids)
        # and its id for ICFG-PEDES / RSTPReid (0-based).
        pid_map = {pid: k for k, pid in enumerate(sorted({r.pid for r in records}))}
        image_pids = np.fromiter((pid_map[r.pid] for r in records), dtype=np.int64, count=len(records))
        paths = StringTable.from_strings(os.path.join(self.image_root, r.path) for r in records)
        sample_images = np.repeat(np.arange(len(records), dtype=np.int64), [len(r.captions) for r in records])
        captions = StringTable.from_strings(c for r in records for c in r.captions)
        return CompactTrainIndex(image_pids, paths, sample_images, captions, len(pid_map))

    def _build_eval(self, records: list[_PedesRecord]) -> EvalSplit:
        return EvalSplit(
            img_paths=[os.path.join(self.image_root, r.path) for r in records],
            image_pids=np.array([r.pid for r in records], dtype=np.int64),
            captions=[c for r in records for c in r.captions],
            caption_pids=np.array([r.pid for r in records for _ in r.captions], dtype=np.int64),
        )


# --------------------------------------------------------------------------- image reading


def name_hash(name: str) -> int:
    """Stable signed 64-bit hash of a string (same in every process, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def split_tar_path(path: str) -> tuple[str, str] | None:
    """``("shard.tar", "member")`` for a ``shard.tar::member`` path, else None."""
    shard, sep, member = path.partition(TAR_SEPARATOR)
    if sep and shard.lower().endswith(".tar") and member:
        return shard, member
    return None


def iter_tar_members(shard: str) -> Iterator[tarfile.TarInfo]:
    """Yield the regular-file members of an uncompressed tar in archive order.

    ``TarFile`` remembers every member it has read; clearing that list keeps
    memory flat for shards with millions of members.
    """
    try:
        tar = tarfile.open(shard, mode="r:")
    except tarfile.ReadError as e:
        raise AnnotationError(shard, None, f"not an uncompressed tar archive ({e})") from e
    except FileNotFoundError:
        raise
    except OSError as e:
        raise AnnotationError(shard, None, f"cannot open tar shard: {e.strerror or e}") from e
    with tar:
        while True:
            try:
                member = tar.next()
            except tarfile.TarError as e:
                raise AnnotationError(shard, None, f"corrupt tar archive: {e}") from e
            if member is None:
                return
            tar.members.clear()
            if member.isfile():
                yield member


class _MemberTable:
    """Member name -> (data offset, size) for one shard, as sorted hash arrays."""

    def __init__(self, hashes: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> None:
        order = np.argsort(hashes, kind="stable")
        self.hashes = hashes[order]
        self.offsets = offsets[order]
        self.sizes = sizes[order]

    @classmethod
    def scan(cls, shard: str) -> _MemberTable:
        hashes, offsets, sizes = array.array("q"), array.array("q"), array.array("q")
        for member in iter_tar_members(shard):
            hashes.append(name_hash(member.name))
            offsets.append(member.offset_data)
            sizes.append(member.size)
        return cls(np.frombuffer(hashes, np.int64), np.frombuffer(offsets, np.int64), np.frombuffer(sizes, np.int64))

    def lookup(self, member: str) -> tuple[int, int] | None:
        h = name_hash(member)
        k = int(np.searchsorted(self.hashes, h))
        if k < len(self.hashes) and self.hashes[k] == h:
            return int(self.offsets[k]), int(self.sizes[k])
        return None


#: Resolvers registered by indexes that already know member offsets (no rescan needed).
_TAR_RESOLVERS: dict[str, Callable[[str], tuple[int, int] | None]] = {}
#: Member tables scanned once per process for shards nobody registered.
_TAR_TABLES: dict[str, _MemberTable] = {}
_MAX_OPEN_FILES = 64


class _OpenFiles:
    """Per-process LRU of read-only file descriptors (reopened after fork)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.fds: collections.OrderedDict[str, int] = collections.OrderedDict()

    def fd(self, path: str) -> int:
        if self.pid != os.getpid():
            # A forked child: the inherited descriptors belong to the parent's bookkeeping.
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()
            self.pid = os.getpid()
        fd = self.fds.get(path)
        if fd is not None:
            self.fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY)
        self.fds[path] = fd
        if len(self.fds) > _MAX_OPEN_FILES:
            os.close(self.fds.popitem(last=False)[1])
        return fd


_OPEN_FILES = _OpenFiles()


def read_file_range(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes of ``path`` at ``offset`` through a per-process cached descriptor.

    ``pread`` keeps no file position, so concurrent readers never interfere.
    """
    data = os.pread(_OPEN_FILES.fd(os.path.abspath(path)), size, offset)
    if len(data) != size:
        raise OSError(f"{path}: expected {size} bytes at offset {offset}, got {len(data)} (file truncated?)")
    return data


def register_tar_resolver(shard: str, resolver: Callable[[str], tuple[int, int] | None]) -> None:
    """Let ``open_image`` find members of ``shard`` via ``resolver(member) -> (offset, size)``.

    Indexes that scanned the shard already know where each image is; registering
    avoids a per-process rescan of its headers.
    """
    _TAR_RESOLVERS[os.path.abspath(shard)] = resolver


#: Readers of images stored in other containers (e.g. Parquet files), by absolute container path.
_CONTAINER_READERS: dict[str, Callable[[str], bytes]] = {}


def register_container_reader(container: str, reader: Callable[[str], bytes]) -> None:
    """Let ``open_image`` read ``<container>::<member>`` paths as ``reader(member)`` (encoded image bytes).

    The reader raises FileNotFoundError for a member it does not hold, and
    AnnotationError or OSError for one it cannot read.
    """
    _CONTAINER_READERS[os.path.abspath(container)] = reader


def _image_source(path: str) -> Any:
    """What ``Image.open`` reads for ``path``: the path itself, or the bytes of a container member."""
    container, sep, member = path.partition(TAR_SEPARATOR)
    if sep and member:
        reader = _CONTAINER_READERS.get(os.path.abspath(container))
        if reader is not None:
            return io.BytesIO(reader(member))
    tar = split_tar_path(path)
    return io.BytesIO(read_tar_member(*tar)) if tar else path


def read_image_bytes(path: str) -> bytes:
    """The encoded bytes of an image path as the loaders resolve it: a file, ``shard.tar::member``,
    or a member of a registered container (a Parquet row).

    Raises:
        FileNotFoundError: no such file or member.
        OSError: the file or container cannot be read.
    """
    source = _image_source(path)
    if isinstance(source, str):
        with open(source, "rb") as f:
            return f.read()
    return source.getvalue()


def read_tar_member(shard: str, member: str) -> bytes:
    """Bytes of one member of an uncompressed tar shard."""
    key = os.path.abspath(shard)
    location = None
    resolver = _TAR_RESOLVERS.get(key)
    if resolver is not None:
        location = resolver(member)
    if location is None:
        table = _TAR_TABLES.get(key)
        if table is None:
            table = _TAR_TABLES[key] = _MemberTable.scan(shard)
        location = table.lookup(member)
    if location is None:
        raise FileNotFoundError(f"no member {member!r} in {shard}")
    offset, size = location
    return read_file_range(key, offset, size)


def open_image(path: str, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open an image (plain path or ``shard.tar::member``) as RGB.

    Args:
        path: the image.
        draft_size: ``(height, width)``: decode a JPEG at the smallest 1/2, 1/4 or 1/8
            scale that is still at least this size (PIL's draft mode; much less work
            for a large image that is resized down anyway). The pixels then differ
            slightly from a full decode followed by the same resize, so it is opt-in.

    Raises:
        ImageReadError: naming the path, if it is missing, unreadable or corrupt.
    """
    try:
        with Image.open(_image_source(path)) as img:
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size[1], draft_size[0]))
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageReadError(path, "file not found", missing=True) from e
    except AnnotationError as e:
        raise ImageReadError(path, e.message) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


def verify_image(path: str) -> None:
    """Check that an image exists, passes ``PIL.Image.verify`` and fully decodes.

    Raises:
        ImageReadError: naming the path and the reason.
    """
    try:
        with Image.open(_image_source(path)) as img:
            img.verify()
    except FileNotFoundError as e:
        raise ImageReadError(path, "file not found", missing=True) from e
    except AnnotationError as e:
        raise ImageReadError(path, e.message) from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e
    # verify() checks structure only; a full decode catches truncated pixel data.
    open_image(path)
