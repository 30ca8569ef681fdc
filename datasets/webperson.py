"""WebPerson pretraining corpus (1M / 5M images, two MLLM captions each).

Four on-disk formats give the same samples in the same order:

1. the authors' JSON list of one-key objects
   ``{"<relative image path>": {"caption1": str, "caption2": str}}`` with
   images under ``<WebPerson>/images/``;
2. JSONL, one such object per line;
3. webdataset-style uncompressed tar shards: ``<key>.jpg`` + ``<key>.json``
   (``{"caption1", "caption2"}``); image path = ``shard.tar::<key>.jpg``;
4. the hub release's Parquet files (``data/train-XXXXX-of-NNNNN.parquet``):
   columns ``image`` (struct of ``bytes`` and ``path``), ``image_path``,
   ``caption1``, ``caption2``; image path = ``file.parquet::<row group>/<row>``,
   the image decoded from the embedded bytes (from ``images/<image_path>`` when
   they are null).

Every caption is a sample and every image its own identity, so sample ``i``
belongs to image (= pid = image id) ``i // 2``: ``caption1`` then ``caption2``.

Memory: the index keeps no per-sample Python objects and no caption text.
Per image it stores the byte span of the record in its source file (int
arrays), for tar shards the member name (one UTF-8 buffer) and location, and
for Parquet the (file, row group, row) triple. Captions and JSON image paths
are read back from the source with one ``pread`` per sample, so the text lives
in the OS page cache, shared by every DataLoader worker and every DDP rank on
the node, instead of in each process; Parquet rows are read through the one row
group each process holds (``_ParquetRows``). Building streams the source (the
JSON list is parsed element by element, Parquet row group by row group) and the
result is cached as ``.npz`` next to the annotation, or under ``cache_dir``
(default ``~/.cache/gadms``) when the dataset folder is not writable, keyed by
the sources' size and mtime and carrying a CRC-32 of its arrays that is checked
on load: a stale, damaged or unreadable cache is rebuilt (and atomically
replaced), never served.
"""

from __future__ import annotations

import array
import codecs
import collections
import functools
import glob
import hashlib
import json
import logging
import os
import re
import uuid
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

from datasets.bases import (
    IMAGE_EXTENSIONS,
    TAR_SEPARATOR,
    AnnotationError,
    RecordProblems,
    StringTable,
    StringTableBuilder,
    TextReIDDataset,
    TrainIndex,
    caption_is_empty,
    check_caption,
    check_relative_path,
    iter_tar_members,
    name_hash,
    read_file_range,
    register_container_reader,
    register_dataset,
    register_tar_resolver,
    type_name,
)

logger = logging.getLogger(__name__)

CAPTION_KEYS = ("caption1", "caption2")
FORMATS = {".json": "json", ".jsonl": "jsonl", ".tar": "tar", ".parquet": "parquet"}
#: Where index caches go when the dataset folder is not writable (``data.cache_dir`` = "").
DEFAULT_CACHE_DIR = "~/.cache/gadms"
#: Columns of the hub's Parquet files that are read; others are ignored.
PARQUET_COLUMNS = ("image", "image_path", "caption1", "caption2")
_PARQUET_TEXT = ("image_path", "caption1", "caption2")
_PARQUET_IMAGE = "image.bytes"
#: A process holds one row group of these columns, and a random sample reads a whole one (``_ParquetRows``):
#: above this size a warning suggests smaller row groups (the hub's hold 100 images, ~10 MiB).
_LARGE_ROW_GROUP = 64 << 20
# 2: the metadata carries a checksum of the arrays; 3: image paths leaving images/ and captions that
# clean to nothing are bad records (an older index may hold them)
CACHE_VERSION = 3
_CHUNK_BYTES = 1 << 20
# A JSON element that does not parse within this many characters is malformed, not truncated.
_MAX_RECORD_CHARS = 64 << 20
_NON_WHITESPACE = re.compile(r"[^ \t\n\r]")
# webdataset's key/extension split: the key is everything before the first dot of the basename.
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_LAYOUT = ("<root>/WebPerson/ with either images/ plus an annotation (*.json list or *.jsonl), "
           "webdataset tar shards (*.tar, or shards/*.tar), or the hub's Parquet files (*.parquet, or "
           "data/*.parquet)")


# --------------------------------------------------------------------------- record checks


def _check_captions(value: Any, file: str, index: int, where: str) -> None:
    if not isinstance(value, dict):
        raise AnnotationError(file, index, f"{where} must be an object with 'caption1' and 'caption2', "
                              f"got {type_name(value)}")
    for key in CAPTION_KEYS:
        if key not in value:
            raise AnnotationError(file, index, f"{where} misses key {key!r} (keys present: {sorted(value)})")
        check_caption(value[key], file, index, f"{where} {key!r}")


def _check_json_record(obj: Any, file: str, index: int, image_root: str) -> str:
    """Validate one ``{"<image path>": {"caption1", "caption2"}}`` record; return the image path."""
    if type(obj) is dict and len(obj) == 1:
        # Fast path for well-formed records (millions of them); the checks below only explain failures.
        ((path, captions),) = obj.items()
        if type(captions) is dict:
            c1, c2 = captions.get("caption1"), captions.get("caption2")
            if (type(c1) is str and type(c2) is str and path and not path.isspace()
                    and not path.startswith("/") and ".." not in path
                    and not (caption_is_empty(c1) or caption_is_empty(c2))):
                return path
    if not isinstance(obj, dict):
        raise AnnotationError(file, index, 'expected a one-key object {"<image path>": {"caption1": ..., '
                              f'"caption2": ...}}, got {type_name(obj)}')
    if len(obj) != 1:
        raise AnnotationError(file, index, f"expected exactly one image path key, got {len(obj)} keys")
    ((path, captions),) = obj.items()
    if not path.strip():
        raise AnnotationError(file, index, "empty image path")
    check_relative_path(path, file, index, "image path", image_root)
    _check_captions(captions, file, index, f"captions of {path!r}")
    return path


# --------------------------------------------------------------------------- streaming readers


def _line_col(path: str, byte_offset: int) -> tuple[int, int]:
    """1-based line and character column of ``byte_offset`` (only computed for error messages)."""
    line, line_start, done = 1, 0, 0
    with open(path, "rb") as f:
        while done < byte_offset:
            chunk = f.read(min(_CHUNK_BYTES, byte_offset - done))
            if not chunk:
                break
            newlines = chunk.count(b"\n")
            if newlines:
                line += newlines
                line_start = done + chunk.rindex(b"\n") + 1
            done += len(chunk)
        if byte_offset - line_start > _CHUNK_BYTES:
            return line, byte_offset - line_start + 1  # a huge one-line file: a byte column will do
        f.seek(line_start)
        prefix = f.read(byte_offset - line_start)
    return line, len(prefix.decode("utf-8", errors="replace")) + 1


class _JsonListStream:
    """Incremental reader of a top-level JSON list that tracks byte offsets."""

    def __init__(self, path: str, f: BinaryIO) -> None:
        self.path = path
        self.f = f
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.raw_decode = json.JSONDecoder().raw_decode
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.base = 0  # byte offset of buf[0] in the file
        self.ascii = True  # then character and byte offsets coincide (the common case, no re-encoding)
        self.mark = (0, 0)  # a (character, byte) pair of the buffer, to convert offsets incrementally

    def byte_at(self, pos: int) -> int:
        """File byte offset of buffer position ``pos`` (positions are asked in increasing order)."""
        if self.ascii:
            return self.base + pos
        mark_pos, mark_byte = self.mark
        seg = self.buf[mark_pos:pos]
        byte = mark_byte + (len(seg) if seg.isascii() else len(seg.encode("utf-8")))
        self.mark = (pos, byte)
        return byte

    def refill(self) -> bool:
        """Append the next chunk to the buffer; False once the file is exhausted."""
        if self.eof:
            return False
        raw = self.f.read(_CHUNK_BYTES)
        self.eof = not raw
        try:
            text = self.utf8.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            raise AnnotationError(self.path, None, f"not valid UTF-8 text near byte "
                                  f"{self.f.tell() - len(raw) + e.start}: {e.reason}") from e
        self.base = self.byte_at(self.pos)
        self.buf = self.buf[self.pos:] + text
        self.pos = 0
        self.ascii = self.buf.isascii()
        self.mark = (0, self.base)
        return True

    def peek(self) -> str:
        """Skip whitespace; return the next character, or '' at end of file."""
        buf, pos = self.buf, self.pos
        if pos < len(buf) and buf[pos] not in " \t\n\r":
            return buf[pos]
        while True:
            match = _NON_WHITESPACE.search(self.buf, self.pos)
            if match:
                self.pos = match.start()
                return self.buf[self.pos]
            self.pos = len(self.buf)
            if not self.refill():
                return ""

    def value(self, index: int) -> tuple[Any, int, int]:
        """Decode the value at the cursor; return it with its byte span."""
        while True:
            try:
                obj, end = self.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # The element may just be cut by the chunk boundary: read on and retry.
                if len(self.buf) - self.pos < _MAX_RECORD_CHARS and self.refill():
                    continue
                raise self.error(index, e.pos, f"malformed JSON: {e.msg}") from e
            if end == len(self.buf) and self.refill():
                continue
            start = self.byte_at(self.pos)
            self.pos = end
            return obj, start, self.byte_at(end)

    def error(self, index: int | None, char_pos: int, message: str) -> AnnotationError:
        line, col = _line_col(self.path, self.byte_at(char_pos))
        return AnnotationError(self.path, index, f"line {line}, column {col}: {message}")


def _iter_json_list(path: str) -> Iterator[tuple[int, Any, int, int]]:
    """Yield ``(index, element, start byte, end byte)`` of a JSON list without loading it whole."""
    with open(path, "rb") as f:
        stream = _JsonListStream(path, f)
        if stream.peek() == "\ufeff":
            stream.pos += 1
        first = stream.peek()
        if first != "[":
            raise stream.error(None, stream.pos, "expected a JSON list ('[') at the top level, "
                               f"found {first or 'end of file'!r}")
        stream.pos += 1
        index = 0
        if stream.peek() == "]":
            stream.pos += 1
        else:
            while True:
                if stream.peek() == "":
                    raise stream.error(index, stream.pos, "end of file inside the list")
                obj, start, end = stream.value(index)
                yield index, obj, start, end
                index += 1
                c = stream.peek()
                if c == ",":
                    stream.pos += 1
                    continue
                if c == "]":
                    stream.pos += 1
                    break
                what = f"expected ',' or ']' after the record, found {c!r}" if c else "end of file inside the list"
                raise stream.error(index - 1, stream.pos, what)
        if stream.peek() != "":
            raise stream.error(None, stream.pos, "extra data after the closing ']'")


def _iter_jsonl(path: str, problems: RecordProblems) -> Iterator[tuple[int, Any, int, int]]:
    """Yield ``(line index, object, start byte, end byte)`` per non-blank line."""
    offset = 0
    decode = json.JSONDecoder().decode
    with open(path, "rb") as f:
        for index, line in enumerate(f):
            start = offset
            offset += len(line)
            if index == 0 and line.startswith(codecs.BOM_UTF8):
                # A byte-order mark (some Windows editors write one) is not part of record 0.
                line = line[len(codecs.BOM_UTF8):]
                start += len(codecs.BOM_UTF8)
            if not line or line.isspace():
                continue
            try:
                obj = decode(line.decode("utf-8"))
            except json.JSONDecodeError as e:
                problems.report(AnnotationError(path, index, f"line {index + 1}, column {e.colno}: "
                                                f"malformed JSON: {e.msg}"))
                continue
            except UnicodeDecodeError as e:
                problems.report(AnnotationError(path, index, f"line {index + 1}: not valid UTF-8 ({e.reason})"))
                continue
            yield index, obj, start, offset


# --------------------------------------------------------------------------- Parquet


@functools.cache
def _pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, imported on first use: ``import datasets`` stays light."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("reading WebPerson's Parquet files needs pyarrow: pip install -r requirements.txt") from e
    return pyarrow, pyarrow.parquet


def _reason(error: Exception) -> str:
    """pyarrow's message on one line (some span several)."""
    return " ".join(str(error).split())


def _open_parquet(path: str, **options: Any) -> Any:
    """The ``pyarrow.parquet.ParquetFile`` of ``path``; a file pyarrow cannot open is an AnnotationError."""
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(path, **options)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise AnnotationError(path, None, f"not a readable Parquet file ({_reason(e)}); a truncated or partial download? "
                              "fetch it again") from e


def _check_parquet_schema(path: str, parquet_file: Any) -> None:
    """Raise AnnotationError naming the file and column unless the hub's columns are there with their types."""
    pa, _ = _pyarrow()
    schema = parquet_file.schema_arrow
    missing = [c for c in PARQUET_COLUMNS if c not in schema.names]
    if missing:
        raise AnnotationError(path, None, f"missing column{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(c) for c in missing)} (columns present: {', '.join(schema.names)}); "
                              "expected the hub layout: image {bytes, path}, image_path, caption1, caption2")
    image = schema.field("image").type
    if not (pa.types.is_struct(image) and image.get_field_index("bytes") >= 0
            and (pa.types.is_binary(image.field("bytes").type) or pa.types.is_large_binary(image.field("bytes").type))):
        raise AnnotationError(path, None, f"column 'image' has type {image}, expected a struct with a binary "
                              "field 'bytes' (the encoded image) and 'path'")
    for name in _PARQUET_TEXT:
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise AnnotationError(path, None, f"column {name!r} has type {kind}, expected string")


def _row_group_size(metadata: Any, group: int) -> int:
    """Uncompressed bytes of the columns a process holds for one row group."""
    wanted = {_PARQUET_IMAGE, *_PARQUET_TEXT}
    row_group = metadata.row_group(group)
    return sum(row_group.column(j).total_uncompressed_size for j in range(row_group.num_columns)
               if row_group.column(j).path_in_schema in wanted)


def parquet_summary(sources: list[str]) -> str:
    """Files, row groups and rows of Parquet sources, and how many rows lack embedded image bytes."""
    groups = rows = without_bytes = 0
    known = True
    for path in sources:
        metadata = _open_parquet(path).metadata
        groups += metadata.num_row_groups
        rows += metadata.num_rows
        for g in range(metadata.num_row_groups):
            row_group = metadata.row_group(g)
            column = next((row_group.column(j) for j in range(row_group.num_columns)
                           if row_group.column(j).path_in_schema == _PARQUET_IMAGE), None)
            stats = column.statistics if column is not None else None
            if stats is None or not stats.has_null_count:
                known = False
            else:
                without_bytes += stats.null_count
    nulls = (f"{without_bytes} without embedded image bytes (read from images/<image_path>)" if known
             else "null image bytes not counted (no column statistics)")
    return f"{len(sources)} Parquet file(s), {groups} row group(s), {rows} rows; {nulls}"


class _ParquetRows:
    """Rows of the Parquet sources as one process reads them: open files and the row group read last.

    A sample is read through its whole row group (image bytes and text at once), which the
    process keeps until it needs another one. Reading single rows instead (``iter_batches``
    of one row, stopping at the row, the row kept) was measured through this index: 600 x
    1000 JPEGs of 60 KiB in 2 files written with pyarrow's defaults, of 200 rows in 100-row
    groups (what the hub writes for images) or of 1000 rows in one group; caption + image
    bytes per sample, JPEG decoding (4.4 ms) excluded; pyarrow 26, one core, page cache
    warm; 400 samples (40 for 1000-row groups), best of 5 (2) runs:

                            100-row groups      1000-row groups
        ms per sample           sequential  random  sequential  random
        (a) row group kept      0.03        1.87    1.24        16
        (b) single rows         0.90        1.61    10.6        29

    Single rows save little at random (14%) because pyarrow's writer puts a small row
    group's image column in one dictionary page, which any row must read and decompress;
    they lose on large row groups (a batch per row before the row) and 30x on sequential
    access, so (a). Random access to large row groups is slow either way: building the
    index warns about them.
    """

    _MAX_OPEN = 16

    def __init__(self, sources: list[str]) -> None:
        self.sources = sources
        self.pid = -1
        self._fresh()

    def _fresh(self) -> None:
        # A forked worker must not share the parent's open files and buffers: start empty.
        if self.pid == os.getpid():
            return
        self.pid = os.getpid()
        self.files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.group: tuple[int, int] | None = None
        self.table: Any = None
        self.image_error: Exception | None = None

    def file(self, source: int) -> Any:
        """The open ParquetFile of one source (a small per-process LRU)."""
        self._fresh()
        parquet_file = self.files.get(source)
        if parquet_file is None:
            # Buffered reads instead of pyarrow's pre-buffering: measured faster for one row group at a time.
            parquet_file = self.files[source] = _open_parquet(self.sources[source], pre_buffer=False,
                                                              buffer_size=1 << 20)
            if len(self.files) > self._MAX_OPEN:
                self.files.popitem(last=False)
        else:
            self.files.move_to_end(source)
        return parquet_file

    def _load(self, source: int, group: int) -> Any:
        """The held row group, read first when another one is held."""
        self._fresh()
        if self.group == (source, group):
            return self.table
        pa, _ = _pyarrow()
        parquet_file = self.file(source)
        self.group = None
        try:
            table = parquet_file.read_row_group(group, columns=[_PARQUET_IMAGE, *_PARQUET_TEXT], use_threads=False)
            error = None
        except (OSError, pa.ArrowException) as e:
            # Damaged image data should fail the image read only (data.skip_bad_images), not the caption's.
            try:
                table = parquet_file.read_row_group(group, columns=list(_PARQUET_TEXT), use_threads=False)
            except (OSError, pa.ArrowException) as text_error:
                raise AnnotationError(self.sources[source], None, f"row group {group} cannot be read "
                                      f"({_reason(text_error)}); the file is damaged or changed after it was "
                                      "indexed") from text_error
            error = e
        self.group, self.table, self.image_error = (source, group), table, error
        return table

    def text_value(self, source: int, group: int, row: int, column: str) -> Any:
        """One text cell (``image_path``, ``caption1`` or ``caption2``)."""
        return self._load(source, group).column(column)[row].as_py()

    def image_bytes(self, source: int, group: int, row: int) -> bytes | None:
        """The embedded image bytes of one row (None when null)."""
        table = self._load(source, group)
        if self.image_error is not None:
            raise AnnotationError(self.sources[source], None, f"row group {group}: the image column cannot be "
                                  f"read ({_reason(self.image_error)})")
        value = table.column("image")[row].as_py()
        return None if value is None else value["bytes"]

    def first_row(self, source: int, group: int) -> int:
        """Row number, within its file, of a row group's first row."""
        metadata = self.file(source).metadata
        return sum(metadata.row_group(g).num_rows for g in range(group))


# --------------------------------------------------------------------------- building


class _Builder:
    """Accumulates per-image arrays while the sources are scanned."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.image_source = array.array("q")
        self.record_offset = array.array("q")
        self.record_length = array.array("q")
        self.key_hash = array.array("q")
        self.record_index = array.array("q")
        self.member_names = StringTableBuilder()
        self.member_offset = array.array("q")
        self.member_size = array.array("q")
        self.row_group = array.array("q")
        self.row = array.array("q")

    def add(self, source: int, index: int, offset: int, length: int, key_hash: int,
            member: tuple[str, int, int] | None = None) -> None:
        self.image_source.append(source)
        self.record_offset.append(offset)
        self.record_length.append(length)
        self.key_hash.append(key_hash)
        self.record_index.append(index)
        if member is not None:
            name, member_offset, member_size = member
            self.member_names.append(name)
            self.member_offset.append(member_offset)
            self.member_size.append(member_size)

    def scan_json(self, source: int, path: str, image_root: str, problems: RecordProblems) -> None:
        records = _iter_json_list(path) if self.fmt == "json" else _iter_jsonl(path, problems)
        # Bound methods and the builtin hash() keep this per-record loop short; the hash is only
        # compared within this process (duplicate detection), so its per-process salt is harmless.
        add_source, add_offset = self.image_source.append, self.record_offset.append
        add_length, add_hash, add_index = self.record_length.append, self.key_hash.append, self.record_index.append
        for index, obj, start, end in records:
            try:
                image_path = _check_json_record(obj, path, index, image_root)
            except AnnotationError as error:
                problems.report(error)
                continue
            add_source(source)
            add_offset(start)
            add_length(end - start)
            add_hash(hash(image_path))
            add_index(index)

    def scan_tar(self, source: int, shard: str, problems: RecordProblems) -> None:
        fd = os.open(shard, os.O_RDONLY)
        try:
            group_key: str | None = None
            group: dict[str, Any] = {}
            ordinal = 0
            for member in iter_tar_members(shard):
                match = _WDS_KEY.match(member.name)
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if key != group_key:
                    if group_key is not None:
                        self._add_tar_sample(source, shard, fd, ordinal, group_key, group, problems)
                        ordinal += 1
                    group_key, group = key, {}
                if ext in IMAGE_EXTENSIONS:
                    if "image" in group:
                        group["error"] = f"sample {key!r} has several image members ({group['image'][0]}, {member.name})"
                    group["image"] = (member.name, member.offset_data, member.size)
                elif ext == "json":
                    group["json"] = (member.offset_data, member.size)
            if group_key is not None:
                self._add_tar_sample(source, shard, fd, ordinal, group_key, group, problems)
        finally:
            os.close(fd)

    def scan_parquet(self, source: int, path: str, problems: RecordProblems) -> None:
        pa, _ = _pyarrow()
        parquet_file = _open_parquet(path)
        _check_parquet_schema(path, parquet_file)
        metadata = parquet_file.metadata
        largest = max((_row_group_size(metadata, g) for g in range(metadata.num_row_groups)), default=0)
        if largest > _LARGE_ROW_GROUP:
            logger.warning("%s has row groups of up to %d MiB: each DataLoader worker holds one, and a random "
                           "sample reads a whole row group; rewrite it with small row groups (the hub uses 100 "
                           "rows) or prepare tar shards", path, largest >> 20)
        add_source, add_group, add_row = self.image_source.append, self.row_group.append, self.row.append
        add_hash, add_index = self.key_hash.append, self.record_index.append
        first_row = 0
        for group in range(metadata.num_row_groups):
            try:
                table = parquet_file.read_row_group(group, columns=list(_PARQUET_TEXT), use_threads=False)
            except (OSError, pa.ArrowException) as e:
                raise AnnotationError(path, None, f"row group {group} cannot be read ({_reason(e)}); the file is "
                                      "damaged or truncated, fetch it again") from e
            columns = zip(*(table.column(c).to_pylist() for c in _PARQUET_TEXT), strict=True)
            for row, (image_path, c1, c2) in enumerate(columns):
                if not (type(c1) is str and type(c2) is str and not caption_is_empty(c1)
                        and not caption_is_empty(c2)):
                    try:
                        for key, caption in zip(CAPTION_KEYS, (c1, c2), strict=True):
                            check_caption(caption, path, first_row + row, f"row group {group}, row {row}: {key!r}")
                    except AnnotationError as error:
                        problems.report(error)
                        continue
                add_source(source)
                add_group(group)
                add_row(row)
                # The image path identifies the image (repeats are duplicates, as in the JSON form);
                # a row without one is its own key.
                add_hash(hash(image_path or _parquet_member(path, group, row)))
                add_index(first_row + row)
            first_row += table.num_rows

    def _add_tar_sample(self, source: int, shard: str, fd: int, ordinal: int, key: str,
                        group: dict[str, Any], problems: RecordProblems) -> None:
        try:
            if "error" in group:
                raise AnnotationError(shard, ordinal, group["error"])
            if "image" not in group:
                raise AnnotationError(shard, ordinal, f"sample {key!r} has no image member "
                                      f"({', '.join('.' + e for e in IMAGE_EXTENSIONS)}); a sample's files "
                                      "must be adjacent in the shard (webdataset convention)")
            if "json" not in group:
                raise AnnotationError(shard, ordinal, f"sample {key!r} has no {key}.json member with its captions")
            offset, size = group["json"]
            try:
                captions = json.loads(os.pread(fd, size, offset))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AnnotationError(shard, ordinal, f"{key}.json is not valid JSON: {e}") from e
            _check_captions(captions, shard, ordinal, f"{key}.json")
        except AnnotationError as error:
            problems.report(error)
            return
        self.add(source, ordinal, offset, size, name_hash(group["image"][0]), member=group["image"])


def _duplicate_pairs(groups: np.ndarray, hashes: np.ndarray) -> list[tuple[int, int]]:
    """``(first, later)`` image pairs whose (group, key hash) coincide, ordered by ``later``."""
    n = len(hashes)
    if n < 2:
        return []
    order = np.lexsort((np.arange(n), hashes, groups))
    g, h = groups[order], hashes[order]
    same = (g[1:] == g[:-1]) & (h[1:] == h[:-1])
    if not same.any():
        return []
    run_start = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(n), 0))
    later = np.nonzero(np.concatenate([[False], same]))[0]
    pairs = [(int(order[run_start[k]]), int(order[k])) for k in later]
    return sorted(pairs, key=lambda p: p[1])


# --------------------------------------------------------------------------- the index


class WebPersonIndex(TrainIndex):
    """Lean training index over WebPerson sources (see the module docstring).

    Args:
        fmt: "json", "jsonl", "tar" or "parquet".
        sources: annotation files, tar shards or Parquet files, in sample order.
        source_stats: ``(size, mtime_ns)`` of each source when indexed.
        image_root: folder the JSON/JSONL image paths (and the Parquet ``image_path``
            of rows without image bytes) are relative to (None for tar).
        arrays: per-image arrays: ``image_source``; for JSON/JSONL and tar
            ``record_offset``, ``record_length``; for tar also ``member_name_buffer``,
            ``member_name_offsets``, ``member_offset``, ``member_size``,
            ``lookup_hash``, ``lookup_image``; for Parquet ``row_group``, ``row``.
        skipped: bad records skipped while building (first few) and their count.
        cache_file: the ``.npz`` cache this index was loaded from or saved to.
    """

    def __init__(self, fmt: str, sources: list[str], source_stats: list[tuple[int, int]], image_root: str | None,
                 arrays: dict[str, np.ndarray], skipped: tuple[int, list[AnnotationError]] | None = None,
                 cache_file: str | None = None) -> None:
        self.fmt = fmt
        self.sources = list(sources)
        self.source_stats = [tuple(s) for s in source_stats]
        self.image_root = image_root
        self.arrays = arrays
        self.num_skipped, self.skipped = skipped if skipped is not None else (0, [])
        self.cache_file = cache_file
        self.loaded_from_cache = False
        self._image_source = arrays["image_source"]
        self._member_names: StringTable | None = None
        self._rows: _ParquetRows | None = None
        if fmt == "parquet":
            self._row_group, self._row = arrays["row_group"], arrays["row"]
            self._rows = _ParquetRows(self.sources)
        else:
            self._record_offset, self._record_length = arrays["record_offset"], arrays["record_length"]
        if fmt == "tar":
            self._member_names = StringTable(arrays["member_name_buffer"], arrays["member_name_offsets"])
        self._checked_pid = -1
        self._checked_sources: set[int] = set()
        self._register_readers()

    # ---- TrainIndex API

    def __len__(self) -> int:
        return 2 * len(self._image_source)

    def __getitem__(self, i: int) -> tuple[int, int, str, str]:
        i = self._check_index(i)
        image = i // 2
        if self._rows is not None:
            source, group, row = self._location(image)
            self._check_source(source)
            caption = self._rows.text_value(source, group, row, CAPTION_KEYS[i % 2])
            return image, image, _parquet_member(self.sources[source], group, row), caption
        path, captions = self._record(image)
        return image, image, path, captions[CAPTION_KEYS[i % 2]]

    @property
    def num_classes(self) -> int:
        return len(self._image_source)

    @property
    def num_images(self) -> int:
        return len(self._image_source)

    @property
    def pids(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_images, dtype=np.int64), 2)

    @property
    def image_ids(self) -> np.ndarray:
        return self.pids

    def image_path(self, image_id: int) -> str:
        if self.fmt == "tar":
            return self.sources[int(self._image_source[image_id])] + TAR_SEPARATOR + self._member_names[image_id]
        if self.fmt == "parquet":
            source, group, row = self._location(image_id)
            return _parquet_member(self.sources[source], group, row)
        return self._record(image_id)[0]

    @property
    def nbytes(self) -> int:
        """Memory held by the index arrays."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    # ---- record access

    def _location(self, image: int) -> tuple[int, int, int]:
        """``(source, row group, row)`` of a Parquet image."""
        return int(self._image_source[image]), int(self._row_group[image]), int(self._row[image])

    def _read_parquet_image(self, source: int, member: str) -> bytes:
        """Encoded bytes of ``<source>::<row group>/<row>``: embedded, else ``images/<image_path>``."""
        path = self.sources[source]
        group_text, sep, row_text = member.partition("/")
        if not (sep and group_text.isdigit() and row_text.isdigit()):
            raise FileNotFoundError(f"{path}: no row {member!r} (expected <row group>/<row>)")
        group, row = int(group_text), int(row_text)
        self._check_source(source)
        metadata = self._rows.file(source).metadata
        if group >= metadata.num_row_groups or row >= metadata.row_group(group).num_rows:
            raise FileNotFoundError(f"{path}: no row {row} in row group {group}")
        data = self._rows.image_bytes(source, group, row)
        if data is not None:
            return data
        image_path = self._rows.text_value(source, group, row, "image_path")
        record = self._rows.first_row(source, group) + row
        if not image_path:
            raise AnnotationError(path, record, f"row group {group}, row {row}: no image bytes and no image_path")
        check_relative_path(image_path, path, record, f"row group {group}, row {row}: image_path", self.image_root)
        with open(os.path.join(self.image_root, image_path), "rb") as f:
            return f.read()

    def _record(self, image: int) -> tuple[str, dict[str, str]]:
        """``(image path, {"caption1", "caption2"})`` of one image, read from its source."""
        source = int(self._image_source[image])
        path = self.sources[source]
        self._check_source(source)
        data = read_file_range(path, int(self._record_offset[image]), int(self._record_length[image]))
        try:
            obj = json.loads(data)
            if self.fmt == "tar":
                return self.image_path(image), obj
            ((rel, captions),) = obj.items()
            return os.path.join(self.image_root, rel), captions
        except (ValueError, AttributeError) as e:
            # Size and mtime matched (_check_source), so a restart would trust the same cache: remove it.
            _discard_cache(self.cache_file)
            raise AnnotationError(path, None, f"the record of image {image} no longer parses; the file changed "
                                  "after it was indexed, restart to rebuild the index") from e

    def _check_source(self, source: int) -> None:
        # Spans are only valid for the exact file that was indexed; check once per process and source.
        if self._checked_pid != os.getpid():
            self._checked_pid, self._checked_sources = os.getpid(), set()
        if source in self._checked_sources:
            return
        path = self.sources[source]
        try:
            stat = os.stat(path)
        except OSError as e:
            raise AnnotationError(path, None, f"indexed source is no longer readable: {e.strerror or e}") from e
        if (stat.st_size, stat.st_mtime_ns) != self.source_stats[source]:
            raise AnnotationError(path, None, "changed on disk after it was indexed; restart to rebuild the index")
        self._checked_sources.add(source)

    def _register_readers(self) -> None:
        if self.fmt == "parquet":
            for source, path in enumerate(self.sources):
                register_container_reader(path, functools.partial(self._read_parquet_image, source))
        if self.fmt != "tar":
            return
        bounds = np.searchsorted(self._image_source, np.arange(len(self.sources) + 1))
        for source, shard in enumerate(self.sources):
            register_tar_resolver(shard, functools.partial(self._locate_member, int(bounds[source]),
                                                           int(bounds[source + 1])))

    def _locate_member(self, start: int, end: int, member: str) -> tuple[int, int] | None:
        hashes = self.arrays["lookup_hash"][start:end]
        h = name_hash(member)
        k = int(np.searchsorted(hashes, h))
        if k == len(hashes) or hashes[k] != h:
            return None
        image = int(self.arrays["lookup_image"][start + k])
        if self._member_names[image] != member:
            return None
        return int(self.arrays["member_offset"][image]), int(self.arrays["member_size"][image])

    def __getstate__(self) -> dict[str, Any]:
        return {"fmt": self.fmt, "sources": self.sources, "source_stats": self.source_stats,
                "image_root": self.image_root, "arrays": self.arrays,
                "skipped": (self.num_skipped, self.skipped), "cache_file": self.cache_file}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Spawned workers get a fresh process: re-register the shard and Parquet readers there.
        self.__init__(**state)

    # ---- building and caching

    @classmethod
    def build(cls, fmt: str, sources: list[str], image_root: str | None, skip_bad_records: bool) -> WebPersonIndex:
        """Scan the sources (streaming) and build the index."""
        stats = [_source_stat(p) for p in sources]
        problems = RecordProblems(skip_bad_records)
        builder = _Builder(fmt)
        for source, path in enumerate(sources):
            if fmt == "tar":
                builder.scan_tar(source, path, problems)
            elif fmt == "parquet":
                builder.scan_parquet(source, path, problems)
            else:
                builder.scan_json(source, path, image_root, problems)
        arrays = {"image_source": np.frombuffer(builder.image_source, np.int64).astype(np.int32)}
        if fmt == "parquet":
            arrays.update(row_group=np.frombuffer(builder.row_group, np.int64).astype(np.int32),
                          row=np.frombuffer(builder.row, np.int64).astype(np.int32))
        else:
            arrays.update(record_offset=np.frombuffer(builder.record_offset, np.int64).copy(),
                          record_length=_narrow(np.frombuffer(builder.record_length, np.int64), "record length"))
        if fmt == "tar":
            names = builder.member_names.finish()
            arrays.update(member_name_buffer=names.buffer, member_name_offsets=names.offsets,
                          member_offset=np.frombuffer(builder.member_offset, np.int64).copy(),
                          member_size=_narrow(np.frombuffer(builder.member_size, np.int64), "image member size"))
        hashes = np.frombuffer(builder.key_hash, np.int64).copy()
        record_index = np.frombuffer(builder.record_index, np.int64).copy()
        del builder
        keep = _drop_duplicates(fmt, sources, arrays, hashes, record_index, problems)
        if keep is not None:
            arrays = _filter_images(arrays, keep)
            hashes = hashes[keep]
        if fmt == "tar":
            # Per-shard sorted member hashes let open_image find a member without rescanning the shard.
            order = np.lexsort((hashes, arrays["image_source"]))
            arrays["lookup_hash"] = hashes[order]
            arrays["lookup_image"] = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        if not len(arrays["image_source"]):
            raise AnnotationError(sources[0], None, "no usable WebPerson record found"
                                  + (f" ({problems.count} bad record(s) skipped)" if problems.count else ""))
        problems.log_summary(f"WebPerson ({len(sources)} source file(s))")
        return cls(fmt, sources, stats, image_root, arrays, (problems.count, problems.errors))

    @classmethod
    def load(cls, fmt: str, sources: list[str], image_root: str | None, skip_bad_records: bool = False,
             cache: bool = True, cache_dir: str = "") -> WebPersonIndex:
        """Load the index from its ``.npz`` cache when still valid, else build (and cache) it.

        The cache lives next to the annotation, or under ``cache_dir`` ("" = ``DEFAULT_CACHE_DIR``)
        when that folder is not writable; both places are looked at when loading.
        """
        if cache:
            for path in (cache_path(sources), fallback_cache_path(sources, cache_dir)):
                index = cls._from_cache(path, fmt, sources, image_root, skip_bad_records)
                if index is not None:
                    return index
        index = cls.build(fmt, sources, image_root, skip_bad_records)
        if cache:
            index._save(cache_dir)
        return index

    def _save(self, cache_dir: str) -> None:
        """Write the cache next to the annotation, or under ``cache_dir`` when that folder is not writable."""
        beside = cache_path(self.sources)
        folder = os.path.dirname(beside)
        if os.access(folder, os.W_OK):
            error = self._write(beside)
            if error is None:
                return
            logger.info("could not write the WebPerson index cache next to the annotation (%s)", error)
        fallback = fallback_cache_path(self.sources, cache_dir)
        logger.info("%s is not writable: the WebPerson index cache goes to %s (data.cache_dir)", folder,
                    os.path.dirname(fallback))
        try:
            os.makedirs(os.path.dirname(fallback), exist_ok=True)
            error = None
        except OSError as e:
            error = e
        error = error or self._write(fallback)
        if error is not None:
            logger.warning("could not write the WebPerson index cache %s (%s); it will be rebuilt next time",
                           fallback, error)

    def _write(self, path: str) -> OSError | None:
        """Write the cache to ``path`` atomically; the error, or None once written."""
        meta = {"version": CACHE_VERSION, "format": self.fmt,
                "sources": [[_relative(p, path), *s] for p, s in zip(self.sources, self.source_stats, strict=True)],
                "num_skipped": self.num_skipped,
                "skipped": [[e.file, e.index, e.message] for e in self.skipped[:20]],
                "checksum": _arrays_checksum(self.arrays)}
        # Each writer renames its own temp file over the cache, so ranks that rebuild at once each replace
        # it whole and readers never see a torn file. The name is random, not the pid: ranks on several
        # hosts (containers) can share a pid. Created with open(), not mkstemp, so the cache gets the
        # umask's permissions (others sharing the data folder can read it), not 0600.
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "xb") as f:
                np.savez(f, meta=np.array(json.dumps(meta)), **self.arrays)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            return e
        self.cache_file = path
        logger.info("cached the WebPerson index in %s", path)
        return None

    @classmethod
    def _from_cache(cls, path: str, fmt: str, sources: list[str], image_root: str | None,
                    skip_bad_records: bool) -> WebPersonIndex | None:
        """The cached index, or None (the reason logged) when it has to be rebuilt."""
        if not os.path.isfile(path):
            return None
        stats = [_source_stat(p) for p in sources]
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                expected = [[_relative(p, path), *s] for p, s in zip(sources, stats, strict=True)]
                if meta.get("version") != CACHE_VERSION or meta.get("format") != fmt or meta.get("sources") != expected:
                    logger.info("WebPerson index cache %s is stale (sources changed); rebuilding", path)
                    return None
                # An index built with skipping would hide bad records from a strict run.
                if meta["num_skipped"] and not skip_bad_records:
                    return None
                arrays = {k: z[k] for k in z.files if k != "meta"}
            skipped = [AnnotationError(f, i, m) for f, i, m in meta["skipped"]]
            intact = _arrays_checksum(arrays) == meta["checksum"]
        except Exception as e:
            # A cache is disposable: whatever is wrong with the file (torn, truncated, not an .npz,
            # odd metadata), rebuilding from the sources is the answer, never a crash.
            logger.warning("WebPerson index cache %s is unreadable (%s: %s); rebuilding it",
                           path, type(e).__name__, e)
            return None
        if not intact:
            logger.warning("WebPerson index cache %s is damaged (its arrays do not match their checksum); "
                           "rebuilding it", path)
            return None
        index = cls(fmt, sources, stats, image_root, arrays, (meta["num_skipped"], skipped), cache_file=path)
        index.loaded_from_cache = True
        logger.info("loaded the WebPerson index from %s (%d images)", path, index.num_images)
        if meta["num_skipped"]:
            logger.warning("WebPerson: %d bad record(s) were skipped when this index was built", meta["num_skipped"])
        return index


def _parquet_member(path: str, group: int, row: int) -> str:
    """The image path of a Parquet row: ``file.parquet::<row group>/<row>``."""
    return f"{path}{TAR_SEPARATOR}{group}/{row}"


def _image_key(fmt: str, sources: list[str], arrays: dict[str, np.ndarray], image: int) -> str:
    """The string that identifies an image: tar member name, JSON image path, Parquet image_path (or row)."""
    if fmt == "tar":
        return StringTable(arrays["member_name_buffer"], arrays["member_name_offsets"])[image]
    if fmt == "parquet":
        source, group, row = (int(arrays[k][image]) for k in ("image_source", "row_group", "row"))
        image_path = _ParquetRows(sources).text_value(source, group, row, "image_path")
        return image_path or _parquet_member(sources[source], group, row)
    data = read_file_range(sources[int(arrays["image_source"][image])], int(arrays["record_offset"][image]),
                           int(arrays["record_length"][image]))
    return next(iter(json.loads(data)))


def _drop_duplicates(fmt: str, sources: list[str], arrays: dict[str, np.ndarray], hashes: np.ndarray,
                     record_index: np.ndarray, problems: RecordProblems) -> np.ndarray | None:
    """Report repeated images; return a keep-mask (None when nothing is dropped)."""
    # JSON image paths share one image root, so they repeat across files; tar members repeat within a shard.
    groups = arrays["image_source"] if fmt == "tar" else np.zeros(len(hashes), np.int32)
    keep = None
    for first, later in _duplicate_pairs(groups, hashes):
        key = _image_key(fmt, sources, arrays, later)
        if _image_key(fmt, sources, arrays, first) != key:
            continue  # a 64-bit hash collision, not a duplicate
        first_source = os.path.basename(sources[int(arrays["image_source"][first])])
        problems.report(AnnotationError(sources[int(arrays["image_source"][later])], int(record_index[later]),
                                        f"duplicate image entry {key!r} (first listed in {first_source} "
                                        f"record {int(record_index[first])})"))
        if keep is None:
            keep = np.ones(len(hashes), dtype=bool)
        keep[later] = False
    return keep


def _narrow(values: np.ndarray, what: str) -> np.ndarray:
    if len(values) and int(values.max()) >= 2**31:
        raise ValueError(f"{what} of {int(values.max())} bytes does not fit the index (max 2 GiB)")
    return values.astype(np.int32)


def _filter_images(arrays: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    per_image = ("image_source", "record_offset", "record_length", "row_group", "row")
    out = {k: arrays[k][keep] for k in per_image if k in arrays}
    if "member_name_buffer" in arrays:
        offsets = arrays["member_name_offsets"]
        lengths = np.diff(offsets)
        out["member_name_buffer"] = arrays["member_name_buffer"][np.repeat(keep, lengths)]
        out["member_name_offsets"] = np.concatenate([[0], np.cumsum(lengths[keep])]).astype(np.int64)
        out["member_offset"] = arrays["member_offset"][keep]
        out["member_size"] = arrays["member_size"][keep]
    return out


def _arrays_checksum(arrays: dict[str, np.ndarray]) -> str:
    """CRC-32 over every array's name, dtype, shape and bytes.

    It catches damaged or mismatched arrays (not tampering) at ~4 GB/s: a few ms per
    million images, where blake2b would double the reload time of the cache.
    """
    crc = 0
    for name in sorted(arrays):
        values = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(f"{name}:{values.dtype.str}:{values.shape};".encode(), crc)
        crc = zlib.crc32(values, crc)
    return f"crc32:{crc:08x}"


def _discard_cache(path: str | None) -> None:
    """Remove an index cache that no longer matches its sources, so the next start rebuilds it."""
    if path is None:
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        return
    except OSError as e:
        logger.warning("could not remove the stale WebPerson index cache %s (%s)", path, e)
        return
    logger.warning("removed the stale WebPerson index cache %s; it is rebuilt at the next start", path)


def _source_stat(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def _relative(path: str, cache_file: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.abspath(cache_file)))


def _sources_digest(sources: list[str], length: int) -> str:
    return hashlib.sha1("\n".join(os.path.abspath(p) for p in sources).encode("utf-8")).hexdigest()[:length]


def cache_path(sources: list[str]) -> str:
    """Where the ``.npz`` index cache of these sources lives next to the annotation."""
    if len(sources) == 1:
        return sources[0] + ".index.npz"
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in sources])
    return os.path.join(folder, f"webperson-index-{_sources_digest(sources, 12)}.npz")


def fallback_cache_path(sources: list[str], cache_dir: str = "") -> str:
    """Where the index cache goes when the annotation's folder is not writable.

    The name carries a hash of the sources' absolute paths, so two datasets never share a file.
    """
    folder = os.path.abspath(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR))
    return os.path.join(folder, f"webperson-index-{_sources_digest(sources, 16)}.npz")


# --------------------------------------------------------------------------- source discovery


def _format_of(paths: list[str], origin: str) -> str:
    exts = {os.path.splitext(p)[1].lower() for p in paths}
    unknown = sorted(e or "(none)" for e in exts if e not in FORMATS)
    if unknown:
        raise AnnotationError(origin, None, f"unsupported annotation extension(s) {', '.join(unknown)}; expected "
                              ".json (list of one-key objects), .jsonl (one object per line), .tar (shards) or "
                              ".parquet (the hub release)")
    if len(exts) > 1:
        raise AnnotationError(origin, None, f"mixed annotation formats ({', '.join(sorted(exts))}); use one format")
    return FORMATS[exts.pop()]


def _files_with(folder: str, extensions: tuple[str, ...]) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n.lower().endswith(extensions) and os.path.isfile(os.path.join(folder, n)))


#: Marks a folder of training shards written by tools/prepare_webperson.py (with its manifest.json).
PREPARED_MARKER = ".gadms-prepared"


def annotation_candidates(dataset_path: str) -> list[tuple[str, list[str]]]:
    """Every annotation the WebPerson folder holds, as (kind, files) in detection order.

    Each JSON or JSON-lines file is one candidate; tar shards (in the folder or its
    `shards/`) are one, and so are the Parquet files (in the folder or its `data/`).
    Training needs exactly one (else `data.annotation` chooses); a checker can take each.
    """
    # A folder written by tools/prepare_webperson.py holds shards plus its manifest.json, which is no annotation.
    prepared = os.path.exists(os.path.join(dataset_path, PREPARED_MARKER))
    jsons = [] if prepared else _files_with(dataset_path, (".json", ".jsonl"))
    tars = _files_with(dataset_path, (".tar",)) or _files_with(os.path.join(dataset_path, "shards"), (".tar",))
    parquets = (_files_with(dataset_path, (".parquet",))
                or _files_with(os.path.join(dataset_path, "data"), (".parquet",)))
    return ([("JSON annotations", [path]) for path in jsons] + ([("tar shards", tars)] if tars else [])
            + ([("Parquet files", parquets)] if parquets else []))


def resolve_sources(dataset_path: str, annotation: str | None) -> tuple[list[str], str]:
    """Find the annotation file(s) and their format.

    Args:
        dataset_path: the WebPerson folder.
        annotation: None (auto-detect in ``dataset_path``), a file, a folder of
            shards, or a glob; relative paths are tried under ``dataset_path``
            first, then the working directory.

    Returns:
        Absolute source paths in sample order and the format name.
    """
    if annotation is None:
        found = annotation_candidates(dataset_path)
        first_of_kind: dict[str, str] = {}
        for what, files in found:
            first_of_kind.setdefault(what, files[0])
        if len(first_of_kind) > 1:
            listed = " and ".join(f"{what} ({os.path.basename(path)})" for what, path in first_of_kind.items())
            raise AnnotationError(dataset_path, None, f"both {listed} found; choose one with data.annotation")
        if len(found) > 1:
            raise AnnotationError(dataset_path, None, "several annotation files found ("
                                  f"{', '.join(os.path.basename(files[0]) for _, files in found)}); "
                                  "choose one with data.annotation")
        if not found:
            raise AnnotationError(dataset_path, None, f"no WebPerson annotation found; expected layout: {_LAYOUT}")
        sources = found[0][1]
        return [os.path.abspath(p) for p in sources], _format_of(sources, dataset_path)

    annotation = os.path.expanduser(str(annotation))
    candidates = [annotation] if os.path.isabs(annotation) else [os.path.join(dataset_path, annotation), annotation]
    for candidate in candidates:
        if glob.has_magic(candidate):
            sources = sorted(p for p in glob.glob(candidate) if os.path.isfile(p))
        elif os.path.isdir(candidate):
            sources = (_files_with(candidate, (".tar",)) or _files_with(candidate, (".parquet",))
                       or _files_with(candidate, (".jsonl",)) or _files_with(candidate, (".json",)))
            if not sources:
                raise AnnotationError(candidate, None, "folder holds no .tar, .parquet, .jsonl or .json annotation "
                                      "files")
        elif os.path.isfile(candidate):
            sources = [candidate]
        else:
            continue
        if sources:
            return [os.path.abspath(p) for p in sources], _format_of(sources, candidate)
    raise AnnotationError(annotation, None, f"annotation not found (looked for {' and '.join(candidates)}); "
                          f"expected layout: {_LAYOUT}")


# --------------------------------------------------------------------------- dataset


@register_dataset("WebPerson")
class WebPerson(TextReIDDataset):
    """WebPerson pretraining corpus: ``.train`` only (``.val``/``.test`` are None).

    Args:
        root: the data root holding ``WebPerson/``, or that folder itself.
        annotation: file, shard or Parquet folder, or glob (None: auto-detect in the folder).
        skip_bad_records: skip (and count) malformed records instead of raising.
        cache: load/save the ``.npz`` index cache (next to the annotation when writable).
        cache_dir: where the cache goes when the annotation's folder is not writable
            ("" = ``~/.cache/gadms``).
    """

    dataset_dir = "WebPerson"
    image_dir = "images"

    def __init__(self, root: str, annotation: str | None = None, skip_bad_records: bool = False,
                 cache: bool = True, cache_dir: str = "") -> None:
        super().__init__()
        self.dataset_path = find_webperson_dir(os.path.expanduser(str(root)), annotation)
        sources, fmt = resolve_sources(self.dataset_path, annotation)
        image_root = None
        if fmt != "tar":
            # Parquet rows carry their image; images/ is only read for rows whose bytes are null.
            image_root = os.path.join(self.dataset_path, self.image_dir)
            if fmt != "parquet" and not os.path.isdir(image_root):
                raise AnnotationError(image_root, None, f"image folder not found; the {fmt.upper()} format "
                                      "expects images under <WebPerson>/images/")
        logger.info("WebPerson: reading %d %s source(s): %s", len(sources), fmt,
                    sources[0] if len(sources) == 1 else f"{sources[0]} ... {os.path.basename(sources[-1])}")
        self.format, self.sources = fmt, sources
        if len(sources) == 1:
            self.annotation_path = sources[0]
        self.train: WebPersonIndex = WebPersonIndex.load(fmt, sources, image_root, skip_bad_records, cache,
                                                         cache_dir)
        self.val = None
        self.test = None
        self.missing_split_notes = {"val": "pretraining corpus", "test": "pretraining corpus"}
        self.num_skipped, self.skipped = self.train.num_skipped, self.train.skipped


def find_webperson_dir(root: str, annotation: str | None) -> str:
    """The WebPerson folder under the data root `root` (or `root` itself when it is one)."""
    candidate = os.path.join(root, WebPerson.dataset_dir)
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(root) and (annotation is not None or os.path.basename(os.path.normpath(root)) == "WebPerson"
                                or os.path.isdir(os.path.join(root, WebPerson.image_dir))
                                or os.path.isdir(os.path.join(root, "shards")) or _files_with(root, tuple(FORMATS))
                                or _files_with(os.path.join(root, "data"), (".parquet",))):
        return root
    reason = f"data root {root} does not exist" if not os.path.isdir(root) else f"{candidate} not found"
    raise AnnotationError(candidate, None, f"{reason}; expected layout: {_LAYOUT}")
