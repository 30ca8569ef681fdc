"""The fuzz corpus (issue #12): bad inputs for every entry point, each with its exact outcome.

Every case is generated here (no binary blobs): a `Case` names the tool it runs
(`tools/<tool>.py`), builds its inputs under its own folder and returns the
command line, and says what must happen:

* ``error``: exit status 2 and one line ``error: <message>`` ending stderr, whose
  message names the thing (every string of `says`); no traceback.
* ``usage``: argparse's own refusal: exit status 2, ``usage:`` and a last line
  ``<prog>: error: ...`` holding `says`.
* ``problems``: tools/check_data.py's report of bad data: exit status 1, the
  PROBLEMS list on stderr holding `says`.
* ``skip``: exit status 0 with the skip counted in the output (`says`).
* ``ok``: exit status 0, `says` somewhere in the output.

A `says` string starting with ``re:`` is a regular expression. `check` looks for
silent wrongs after the run (a marker file that unpickled code created, a file a
refusal should not have written or changed) and returns what it found.

tests/fuzz_runner.py runs the cases of one group in one process (each through
the tool's `main(argv)`, the path `python tools/<tool>.py` takes); tests/test_fuzz.py
runs the groups and reports every failing case at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import io
import json
import os
import random
import re
import shutil
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PRETRAIN = str(REPO / "configs" / "demo" / "tiny_pretrain.yaml")
FINETUNE = str(REPO / "configs" / "demo" / "tiny_finetune.yaml")
TOOLS = ("train", "test", "check_data", "search", "export", "make_synthetic", "demo")
KINDS = ("error", "usage", "problems", "skip", "ok")
#: Train cases that get past validation end after one step on the CPU.
QUICK = ("train.max_steps=1", "solver.epochs=1", "solver.warmup_epochs=0", "data.batch_size=8",
         "data.num_workers=0", "device=cpu", "eval.period=0", "log_period=1")
#: The shared corpus: 8 train identities x 2 images x 2 captions = 32 training samples
#: (so `data.batch_size=32` puts every training image into the first batch).
SYNTHETIC = dict(identities=8, images_per_id=2, val_ids=2, test_ids=2, webperson_images=16, shard_size=8, seed=3)
ALL_SAMPLES = "data.batch_size=32"
#: Created by the pickled code of the "needs --trust" checkpoints, should it ever run.
MARKER = "UNPICKLED_CODE_RAN"

#: Annotation formats of the three benchmarks: folder, file name, image-path key.
PEDES = {
    "reid_raw": ("CUHK-PEDES", "reid_raw.json", "file_path"),
    "caption_all": ("CUHK-PEDES", "caption_all.json", "file_path"),
    "icfg": ("ICFG-PEDES", "ICFG-PEDES.json", "file_path"),
    "icfg_alt": ("ICFG-PEDES", "ICFG_PEDES.json", "file_path"),
    "rstp": ("RSTPReid", "data_captions.json", "img_path"),
}
WEBPERSON_FILES = {"json": "annotations.json", "jsonl": "annotations.jsonl", "tar": "shards"}


# --------------------------------------------------------------------------- shared assets


def load_tool(name: str) -> Any:
    """tools/<name>.py as the module `tools.<name>` (imported once per process)."""
    return importlib.import_module(f"tools.{name}")


def quiet_logging() -> None:
    """Drop every root logging handler (a tool's console handler holds the stream it was given)."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.WARNING)


class Assets:
    """What every case starts from: a pristine synthetic corpus and one trained tiny run.

    Args:
        root: a folder shared by the runners; `prepare` writes ``root/data``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.data = self.root / "data"

    @classmethod
    def prepare(cls, root: str | os.PathLike) -> Assets:
        """Generate the synthetic corpus (once)."""
        from datasets.synthetic import SyntheticConfig, generate

        assets = cls(root)
        assets.root.mkdir(parents=True, exist_ok=True)
        with open(assets.root / "data.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (assets.data / "meta.json").is_file():
                generate(assets.data, SyntheticConfig(**SYNTHETIC), workers=1)
        return assets

    def cuhk_records(self) -> list[dict]:
        return json.loads((self.data / "CUHK-PEDES" / "reid_raw.json").read_text(encoding="utf-8"))

    def webperson_records(self) -> list[dict]:
        return json.loads((self.data / "WebPerson" / "annotations.json").read_text(encoding="utf-8"))

    @property
    def run(self) -> Path:
        """A finished tiny fine-tuning run (config.yaml, last.pth), trained once for all runners."""
        run, failed = self.root / "run", self.root / "run.failed"
        with open(self.root / "run.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # runners in parallel: one trains, the others wait
            if failed.is_file():  # tried once already: do not retrain for every case
                raise RuntimeError(failed.read_text())
            if not (run / "last.pth").is_file():
                import contextlib

                out = io.StringIO()
                try:
                    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                        status = load_tool("train").main(
                            ["--config", FINETUNE, f"data.root={self.data}", f"output_dir={run}", *QUICK])
                except Exception as err:  # noqa: BLE001
                    status = f"{type(err).__name__}: {err}"
                finally:
                    quiet_logging()
                if status != 0 or not (run / "last.pth").is_file():
                    message = (f"fuzz assets: the tiny training run that test/search/export cases need failed "
                               f"({status}); its output ends: {out.getvalue()[-400:]}")
                    failed.write_text(message)
                    raise RuntimeError(message)
        return run


# --------------------------------------------------------------------------- bad bytes


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def png_bytes(width: int, height: int, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring `width` x `height` pixels with almost no pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def image_bytes(mode: str, fmt: str) -> bytes:
    """A 64 x 32 image of the given PIL mode, encoded as `fmt`."""
    import numpy as np
    from PIL import Image

    if mode == "1x1":
        image = Image.new("RGB", (1, 1), (200, 30, 30))
    elif mode == "I;16":
        image = Image.fromarray((np.arange(64 * 32).reshape(64, 32) * 31).astype(np.uint16))
    else:
        image = Image.new(mode, (32, 64), {"CMYK": (10, 80, 30, 0), "RGBA": (200, 30, 30, 128),
                                             "LA": (90, 200)}.get(mode, 90))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Evil:
    """Unpickling this calls open(MARKER path, "w"): a checkpoint that runs code when loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


# --------------------------------------------------------------------------- the case context


class Ctx:
    """Helpers a case uses to build its inputs in its own folder `tmp` (also the working directory).

    Args:
        tmp: the case's folder.
        assets: the shared corpus and trained run.
    """

    def __init__(self, tmp: Path, assets: Assets) -> None:
        self.tmp = Path(tmp)
        self.assets = assets

    # -- files
    def write(self, rel: str, content: bytes | str) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        return path

    def folder(self, rel: str) -> Path:
        path = self.tmp / rel
        path.mkdir(parents=True, exist_ok=True)
        return path

    def foreign_folder(self, rel: str) -> Path:
        """A folder holding a file of the user's own (which no tool may touch)."""
        self.write(f"{rel}/mine.txt", "the user's own file\n")
        return self.tmp / rel

    # -- benchmark annotations
    def pedes_records(self, fmt: str) -> list[dict]:
        """The corpus's records in the given benchmark format (a valid annotation)."""
        records = self.assets.cuhk_records()
        if fmt == "caption_all":
            # Splits follow the id: val 11,004.., test 12,004.. (docs/data.md).
            firsts = {"val": 11_004, "test": 12_004}
            ids = {s: sorted({r["id"] for r in records if r["split"] == s}) for s in firsts}
            for r in records:
                split = r.pop("split")
                if split in firsts:
                    r["id"] = firsts[split] + ids[split].index(r["id"])
        elif fmt in ("icfg", "icfg_alt"):
            for r in records:
                r["split"] = "test" if r["split"] == "val" else r["split"]
        elif fmt == "rstp":
            records = [{"id": r["id"], "img_path": r["file_path"], "captions": r["captions"], "split": r["split"]}
                       for r in records]
        return records

    def pedes(self, fmt: str, records: list | None = None, *, text: str | None = None, data: bytes | None = None,
              mutate: Callable[[list], Any] | None = None, copy_images: bool = False,
              annotation: bool = True) -> Path:
        """A data root holding one benchmark in format `fmt`; returns the root.

        The annotation is `data` (bytes), `text`, `records` or the valid records passed
        through `mutate`. Images are the corpus's (a link unless `copy_images`).
        """
        folder, name, _ = PEDES[fmt]
        root = self.tmp / "data"
        dataset = root / folder
        dataset.mkdir(parents=True, exist_ok=True)
        source = self.assets.data / "CUHK-PEDES" / "imgs"
        if copy_images:
            shutil.copytree(source, dataset / "imgs")
        else:
            os.symlink(source, dataset / "imgs")
        if annotation:
            if data is None and text is None:
                if records is None:
                    records = self.pedes_records(fmt)
                    if mutate is not None:
                        mutate(records)
                text = json.dumps(records)
            self.write(str((dataset / name).relative_to(self.tmp)), data if data is not None else text)
        return root

    def image(self, root: Path, rel: str = "train/00001_00.jpg", dataset: str = "CUHK-PEDES") -> Path:
        return root / dataset / "imgs" / rel

    # -- WebPerson
    def webperson(self, form: str, records: list | None = None, *, text: str | None = None,
                  data: bytes | None = None, mutate: Callable[[list], Any] | None = None,
                  members: Callable[[list[list[tuple[str, bytes]]]], Any] | None = None,
                  copy_images: bool = False) -> tuple[Path, str]:
        """A data root with WebPerson in `form` (json, jsonl, tar); returns (root, data.annotation value).

        `members` may edit the shards' member lists (one list of (name, bytes) per shard).
        """
        root = self.tmp / "data"
        wp = root / "WebPerson"
        wp.mkdir(parents=True, exist_ok=True)
        source = self.assets.data / "WebPerson" / "images"
        if records is None:
            records = self.assets.webperson_records()
            if mutate is not None:
                mutate(records)
        if form == "tar":
            shards: list[list[tuple[str, bytes]]] = [[], []]
            for i, record in enumerate(records):
                ((path, captions),) = record.items()
                key = path.rsplit(".", 1)[0]
                shards[i * 2 // len(records)].extend([(f"{key}.jpg", (source / path).read_bytes()),
                                                      (f"{key}.json", json.dumps(captions).encode())])
            if members is not None:
                members(shards)
            for k, shard in enumerate(shards):
                self.write(f"data/WebPerson/shards/webperson-{k:06d}.tar",
                           data if (data is not None and k == 0) else tar_bytes(shard))
            return root, "shards"
        if copy_images:
            shutil.copytree(source, wp / "images")
        else:
            os.symlink(source, wp / "images")
        if data is None and text is None:
            if form == "json":
                text = json.dumps(records)
            else:
                text = "".join(json.dumps(r) + "\n" for r in records)
        self.write(f"data/WebPerson/{WEBPERSON_FILES[form]}", data if data is not None else text)
        return root, WEBPERSON_FILES[form]

    # -- command lines
    def train(self, root: Path, *overrides: str, config: str = FINETUNE, name: str = "CUHK-PEDES") -> list[str]:
        return ["--config", config, f"data.root={root}", f"output_dir={self.tmp / 'run'}", *QUICK,
                f"data.name={name}", f"eval.datasets=[{name}]", *overrides]

    def pretrain(self, root: Path, annotation: str, *overrides: str) -> list[str]:
        return ["--config", PRETRAIN, f"data.root={root}", f"data.annotation={annotation}",
                f"output_dir={self.tmp / 'run'}", *QUICK, *overrides]

    def train_pedes(self, fmt: str, root: Path, *overrides: str) -> list[str]:
        name = {"CUHK-PEDES": "CUHK-PEDES", "ICFG-PEDES": "ICFG-PEDES", "RSTPReid": "RSTPReid"}[PEDES[fmt][0]]
        return self.train(root, *overrides, name=name)

    # -- checkpoints
    @property
    def run(self) -> Path:
        return self.assets.run

    def checkpoint(self) -> dict:
        """The trained run's last.pth, loaded (a fresh copy to edit)."""
        import torch

        return torch.load(self.run / "last.pth", map_location="cpu", weights_only=True)

    def save(self, rel: str, obj: Any) -> Path:
        import torch

        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        return path

    def config_file(self, rel: str, text: str) -> Path:
        return self.write(rel, text)


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input and the exact outcome it must have.

    Args:
        name: unique, ``<tool>.<what>``.
        tool: the entry point, tools/<tool>.py.
        build: makes the inputs in `Ctx.tmp`; returns the argument list.
        expect: one of `KINDS`.
        says: strings the outcome must hold (see the module docstring).
        check: after the run: the silent wrongs found (empty list: none).
        avoid: strings the error must not hold (a misleading hint).
        group: the runner process the case runs in.
        requires: returns why the case cannot run here (None: it can).
        timeout: seconds the case may run before it counts as hanging.
    """

    name: str
    tool: str
    build: Callable[[Ctx], list[str]]
    expect: str
    says: tuple[str, ...] = ()
    check: Callable[[Ctx], list[str]] | None = None
    avoid: tuple[str, ...] = ()
    group: str = ""
    requires: Callable[[], str | None] | None = None
    timeout: int = 90

    def __post_init__(self) -> None:
        if self.tool not in TOOLS or self.expect not in KINDS:
            raise ValueError(f"{self.name}: bad tool {self.tool!r} or expectation {self.expect!r}")
        if not self.group:
            object.__setattr__(self, "group", self.tool)


CASES: list[Case] = []


def add(name: str, tool: str, expect: str, says: Sequence[str], build: Callable[[Ctx], list[str]], **kw: Any) -> None:
    full = f"{tool}.{name}"
    if any(c.name == full for c in CASES):
        raise ValueError(f"duplicate fuzz case {full}")
    CASES.append(Case(full, tool, build, expect, tuple(says), **kw))


def no_cuda() -> str | None:
    import torch

    return "CUDA is available here" if torch.cuda.is_available() else None


# ---- silent-wrong checks


def no_marker(ctx: Ctx) -> list[str]:
    return [f"the checkpoint's pickled code ran: {MARKER} was created"] if (ctx.tmp / MARKER).exists() else []


def absent(*rels: str) -> Callable[[Ctx], list[str]]:
    def check(ctx: Ctx) -> list[str]:
        return [f"{rel} was written although the command was refused" for rel in rels if (ctx.tmp / rel).exists()]
    return check


def untouched(rel: str) -> Callable[[Ctx], list[str]]:
    """The user's folder `rel` (made by Ctx.foreign_folder) still holds only mine.txt, unchanged."""
    def check(ctx: Ctx) -> list[str]:
        folder = ctx.tmp / rel
        if not (folder / "mine.txt").is_file():
            return [f"{rel}/mine.txt (the user's own file) was removed"]
        found = sorted(p.name for p in folder.iterdir())
        if found != ["mine.txt"] or (folder / "mine.txt").read_text() != "the user's own file\n":
            return [f"{rel} was written into: it now holds {found}"]
        return []
    return check


def unchanged_file(rel: str, content: str) -> Callable[[Ctx], list[str]]:
    def check(ctx: Ctx) -> list[str]:
        path = ctx.tmp / rel
        if not path.is_file() or path.read_text() != content:
            return [f"{rel} was replaced or changed although the command was refused"]
        return []
    return check


def both(*checks: Callable[[Ctx], list[str]]) -> Callable[[Ctx], list[str]]:
    return lambda ctx: [p for c in checks for p in c(ctx)]


# ---- benchmark annotations ------------------------------------------------------------------


def setter(index: int, key: str, value: Any) -> Callable[[list], None]:
    def mutate(records: list) -> None:
        records[index][key] = value
    return mutate


def dropper(index: int, key: str) -> Callable[[list], None]:
    def mutate(records: list) -> None:
        del records[index][key]
    return mutate


def replacer(index: int, value: Any) -> Callable[[list], None]:
    def mutate(records: list) -> None:
        records[index] = value
    return mutate


def _pedes_case(name: str, fmt: str, says: Sequence[str], *, mutate: Callable | None = None,
                text: str | None = None, data: bytes | None = None, tools: Sequence[str] = ("train",),
                expect: str = "error", train_overrides: Sequence[str] = ()) -> None:
    """One bad annotation, run through train (error) and, where listed, check_data (problems)."""
    file = PEDES[fmt][1]

    def build_root(ctx: Ctx) -> Path:
        return ctx.pedes(fmt, mutate=mutate, text=text, data=data)

    if "train" in tools:
        add(f"{fmt}.{name}", "train", expect, (file, *says),
            lambda ctx: ctx.train_pedes(fmt, build_root(ctx), *train_overrides))
    if "check_data" in tools:
        folder = PEDES[fmt][0]
        add(f"{fmt}.{name}", "check_data", "problems" if expect == "error" else expect, (file, *says),
            lambda ctx: ["--root", str(build_root(ctx)), "--name", folder])


def _define_pedes_cases() -> None:
    both_tools = ("train", "check_data")
    # File-level damage, for every benchmark format.
    for fmt in PEDES:
        tools = both_tools if fmt in ("reid_raw", "icfg", "rstp") else ("train",)
        _pedes_case("not_json", fmt, ("line 1",), text="this is not JSON\n", tools=tools)
        _pedes_case("empty_file", fmt, (), text="", tools=("train",))
        _pedes_case("invalid_utf8", fmt, ("re:(?i)utf-8",),
                    data=b'[{"split": "train", "id": 1, "captions": ["a man in a \xff\xfe coat"], '
                         b'"file_path": "train/00001_00.jpg", "img_path": "train/00001_00.jpg"}]',
                    tools=("train",))
        _pedes_case("record_not_object", fmt, ("record 3", "object"), mutate=replacer(3, "train/00002_01.jpg"),
                    tools=tools)
        _pedes_case("huge_id", fmt, ("record 2", "'id'", "1000000000000000000000000000000"),
                    mutate=setter(2, "id", 10**30), tools=tools)
        _pedes_case("empty_caption", fmt, ("record 4", "caption 1"),
                    mutate=lambda r: r[4].update(captions=["a man", " "]), tools=tools)
        path_key = PEDES[fmt][2]
        _pedes_case(f"missing_{path_key}", fmt, ("record 1", path_key), mutate=dropper(1, path_key), tools=tools)
    # Truncated JSON (cut in the middle of a record).
    for fmt in ("reid_raw", "caption_all", "icfg", "rstp"):
        def build(ctx: Ctx, fmt: str = fmt) -> list[str]:
            full = json.dumps(ctx.pedes_records(fmt))
            return ctx.train_pedes(fmt, ctx.pedes(fmt, text=full[: len(full) // 2]))
        add(f"{fmt}.truncated_json", "train", "error", (PEDES[fmt][1], "line 1"), build)
        # A UTF-8 byte-order mark (what some Windows editors write) is read past: the file is valid.
        def bom_root(ctx: Ctx, fmt: str = fmt) -> Path:
            return ctx.pedes(fmt, data=b"\xef\xbb\xbf" + json.dumps(ctx.pedes_records(fmt)).encode())
        add(f"{fmt}.utf8_bom", "check_data", "ok", ("OK:",),
            lambda ctx, fmt=fmt: ["--root", str(bom_root(ctx, fmt)), "--name", PEDES[fmt][0]])
    add("reid_raw.utf8_bom", "train", "ok", ("run directory",), lambda ctx: ctx.train(bom_root(ctx, "reid_raw")))

    # Record-level damage in CUHK-PEDES reid_raw.json: every key, every wrong type.
    f = "reid_raw"
    _pedes_case("top_level_object", f, ("list",), text='{"annotations": []}', tools=both_tools)
    _pedes_case("top_level_number", f, ("list",), text="42", tools=("train",))
    _pedes_case("empty_list", f, ("train",), text="[]", tools=both_tools)
    for key in ("split", "id", "captions"):
        _pedes_case(f"missing_{key}", f, ("record 2", repr(key)), mutate=dropper(2, key), tools=both_tools)
    for label, value in (("string", "7"), ("float", 1.5), ("bool", True), ("null", None), ("list", [1])):
        _pedes_case(f"id_{label}", f, ("record 1", "'id'"), mutate=setter(1, "id", value))
    _pedes_case("id_huge_negative", f, ("record 1", "'id'"), mutate=setter(1, "id", -(10**25)))
    _pedes_case("captions_string", f, ("record 0", "'captions'"), mutate=setter(0, "captions", "a man in a red coat"),
                tools=both_tools)
    _pedes_case("captions_empty_list", f, ("record 0", "'captions'"), mutate=setter(0, "captions", []))
    _pedes_case("captions_null", f, ("record 0", "'captions'"), mutate=setter(0, "captions", None))
    _pedes_case("caption_not_string", f, ("record 5", "caption 0"), mutate=setter(5, "captions", [42, "a man"]))
    _pedes_case("caption_empty_string", f, ("record 5", "caption 0"), mutate=setter(5, "captions", ["", "a man"]))
    # Captions that are not blank to str.strip() but empty to the tokenizer's cleaning.
    _pedes_case("caption_control_chars", f, ("record 5", "caption 0"),
                mutate=setter(5, "captions", ["\x00\x01\x02", "a man"]), train_overrides=(ALL_SAMPLES,))
    _pedes_case("caption_html_space", f, ("record 5", "caption 1"), mutate=setter(5, "captions", ["a man", "&nbsp;"]),
                train_overrides=(ALL_SAMPLES,))
    _pedes_case("path_empty", f, ("record 3", "'file_path'"), mutate=setter(3, "file_path", ""))
    _pedes_case("path_not_string", f, ("record 3", "'file_path'"), mutate=setter(3, "file_path", 17))
    _pedes_case("split_unknown", f, ("record 6", "'training'"), mutate=setter(6, "split", "training"),
                tools=both_tools)
    _pedes_case("split_not_string", f, ("record 6", "split"), mutate=setter(6, "split", 1))

    # Image paths that leave the image folder: an error naming the record, never a silent read elsewhere.
    def outside(ctx: Ctx, how: str) -> Path:
        def mutate(records: list) -> None:
            outside_image = ctx.write("elsewhere/person.jpg",
                                      (ctx.assets.data / "CUHK-PEDES" / "imgs" / records[0]["file_path"]).read_bytes())
            records[0]["file_path"] = str(outside_image) if how == "absolute" else "../../../elsewhere/person.jpg"
        return ctx.pedes("reid_raw", mutate=mutate, copy_images=True)
    for how in ("absolute", "dotdot"):
        add(f"reid_raw.path_{how}", "train", "error", ("reid_raw.json", "record 0", "'file_path'"),
            lambda ctx, how=how: ctx.train_pedes("reid_raw", outside(ctx, how), ALL_SAMPLES))
        add(f"reid_raw.path_{how}", "check_data", "problems", ("reid_raw.json", "record 0", "'file_path'"),
            lambda ctx, how=how: ["--root", str(outside(ctx, how)), "--name", "CUHK-PEDES"])

    # caption_all.json: no split; the id decides it and must be in 1..13,003.
    g = "caption_all"
    _pedes_case("missing_id", g, ("record 2", "'id'"), mutate=dropper(2, "id"), tools=both_tools)
    _pedes_case("id_out_of_range", g, ("record 2", "20000"), mutate=setter(2, "id", 20000), tools=both_tools)
    _pedes_case("id_zero", g, ("record 2", "'id' 0"), mutate=setter(2, "id", 0))
    _pedes_case("id_negative", g, ("record 2", "-3"), mutate=setter(2, "id", -3))
    # ICFG-PEDES has no val split; RSTPReid's image key is img_path.
    _pedes_case("split_val", "icfg", ("record 16", "'val'"),
                mutate=setter(16, "split", "val"), tools=both_tools)
    _pedes_case("file_path_key", "rstp", ("record 0", "img_path"),
                mutate=lambda r: r[0].update(file_path=r[0].pop("img_path")))
    _pedes_case("id_string", "rstp", ("record 0", "'id'"), mutate=setter(0, "id", "0001"))

    # Layout problems.
    def no_annotation(ctx: Ctx) -> Path:
        return ctx.pedes("reid_raw", annotation=False)
    add("layout.no_annotation", "train", "error", ("reid_raw.json", "caption_all.json"),
        lambda ctx: ctx.train(no_annotation(ctx)))
    add("layout.no_annotation", "check_data", "problems", ("reid_raw.json",),
        lambda ctx: ["--root", str(no_annotation(ctx)), "--name", "CUHK-PEDES"])

    def no_images(ctx: Ctx) -> Path:
        root = ctx.pedes("reid_raw")
        os.remove(root / "CUHK-PEDES" / "imgs")
        return root
    add("layout.no_image_folder", "train", "error", ("imgs", "image folder"), lambda ctx: ctx.train(no_images(ctx)))
    add("layout.no_image_folder", "check_data", "problems", ("imgs",),
        lambda ctx: ["--root", str(no_images(ctx)), "--name", "CUHK-PEDES"])

    def annotation_folder(ctx: Ctx) -> Path:
        root = ctx.pedes("reid_raw", annotation=False)
        (root / "CUHK-PEDES" / "reid_raw.json").mkdir()
        return root
    add("layout.annotation_is_folder", "train", "error", ("reid_raw.json",),
        lambda ctx: ctx.train(annotation_folder(ctx)))
    add("layout.no_dataset_folder", "train", "error", ("CUHK-PEDES",),
        lambda ctx: ctx.train(ctx.folder("data")))
    add("layout.data_root_missing", "train", "error", ("nowhere", "does not exist"),
        lambda ctx: ctx.train(ctx.tmp / "nowhere"))
    add("layout.data_root_is_file", "train", "error", ("notes.txt",),
        lambda ctx: ctx.train(ctx.write("notes.txt", "not a folder\n")))

    # What is not an error: repeated image paths (a warning), a bad record skipped on request, other spellings.
    def duplicates(records: list) -> None:
        records[1]["file_path"] = records[0]["file_path"]
    add("reid_raw.duplicate_paths", "train", "ok", ("repeat",),
        lambda ctx: ctx.train(ctx.pedes("reid_raw", mutate=duplicates)))
    add("reid_raw.duplicate_paths", "check_data", "ok", ("warning:", "repeat", "OK"),
        lambda ctx: ["--root", str(ctx.pedes("reid_raw", mutate=duplicates)), "--name", "CUHK-PEDES"])
    add("reid_raw.skip_bad_record", "train", "skip", ("skipped 1 bad record", "record 3"),
        lambda ctx: ctx.train(ctx.pedes("reid_raw", mutate=dropper(3, "captions")), "data.skip_bad_records=true"))
    add("reid_raw.all_records_bad_skipped", "train", "error", ("reid_raw.json", "train"),
        lambda ctx: ctx.train(ctx.pedes("reid_raw", mutate=lambda r: [x.pop("id") for x in r]),
                              "data.skip_bad_records=true"))
    add("caption_all.valid_subset", "train", "ok", ("caption_all.json", "published"),
        lambda ctx: ctx.train(ctx.pedes("caption_all")))
    add("icfg_alt.valid", "train", "ok", ("run directory",),
        lambda ctx: ctx.train_pedes("icfg_alt", ctx.pedes("icfg_alt")))
    add("rstp.negative_id", "train", "ok", ("run directory",),
        lambda ctx: ctx.train_pedes("rstp", ctx.pedes("rstp", mutate=lambda r: [x.update(id=-x["id"]) for x in r])))


# ---- WebPerson ------------------------------------------------------------------------------


def _define_webperson_cases() -> None:
    def wp(name: str, form: str, says: Sequence[str], expect: str = "error", check_data: bool = False,
           overrides: Sequence[str] = (), **kw: Any) -> None:
        file = WEBPERSON_FILES[form] if form != "tar" else "webperson-000000.tar"

        def build(ctx: Ctx) -> list[str]:
            root, annotation = ctx.webperson(form, **kw)
            return ctx.pretrain(root, annotation, *overrides)
        add(f"webperson.{form}.{name}", "train", expect, (file, *says), build)
        if check_data:
            def build_check(ctx: Ctx) -> list[str]:
                root, annotation = ctx.webperson(form, **kw)
                return ["--root", str(root), "--name", "WebPerson", "--annotation", annotation]
            add(f"webperson.{form}.{name}", "check_data", "problems" if expect == "error" else expect,
                (file, *says), build_check)

    first = "0000/00000000.jpg"
    wp("not_json", "json", ("line 1",), text="nonsense\n", check_data=True)
    wp("truncated", "json", ("line 1",), text='[{"0000/00000000.jpg": {"caption1": "a man", "capt')
    wp("top_level_object", "json", ("list",), text='{"0000/00000000.jpg": {"caption1": "a", "caption2": "b"}}')
    wp("empty_file", "json", (), text="")
    wp("empty_list", "json", ("no usable",), text="[]")
    wp("invalid_utf8", "json", ("re:(?i)utf-8",),
       data=b'[{"0000/00000000.jpg": {"caption1": "a \xff man", "caption2": "b"}}]')
    wp("record_not_object", "json", ("record 2", "object"), mutate=replacer(2, ["a", "b"]), check_data=True)
    wp("two_keys", "json", ("record 2", "2 keys"),
       mutate=lambda r: r[2].update({"extra.jpg": {"caption1": "a", "caption2": "b"}}))
    wp("missing_caption2", "json", ("record 3", "'caption2'"),
       mutate=lambda r: next(iter(r[3].values())).pop("caption2"), check_data=True)
    wp("caption_not_string", "json", ("record 3", "'caption1'"),
       mutate=lambda r: next(iter(r[3].values())).update(caption1=["a", "list"]))
    wp("caption_empty", "json", ("record 3", "'caption2'"),
       mutate=lambda r: next(iter(r[3].values())).update(caption2="   "))
    wp("captions_list", "json", ("record 4", "object"),
       mutate=lambda r: r.__setitem__(4, {k: ["a", "b"] for k in r[4]}))
    wp("path_empty", "json", ("record 5", "empty image path"),
       mutate=lambda r: r.__setitem__(5, {"": next(iter(r[5].values()))}))
    # Paths leaving images/ (here to a real image elsewhere): refused, naming the record.
    def absolute_path(ctx: Ctx) -> list[str]:
        records = ctx.assets.webperson_records()
        elsewhere = ctx.assets.data / "CUHK-PEDES" / "imgs" / "train" / "00001_00.jpg"
        records[5] = {str(elsewhere): next(iter(records[5].values()))}
        return ctx.pretrain(*ctx.webperson("json", records=records), ALL_SAMPLES)
    add("webperson.json.path_absolute", "train", "error", ("annotations.json", "record 5"), absolute_path)
    wp("path_dotdot", "json", ("record 5", "../"), overrides=(ALL_SAMPLES,),
       mutate=lambda r: r.__setitem__(5, {"../../CUHK-PEDES/imgs/train/00001_00.jpg": next(iter(r[5].values()))}))
    wp("duplicate_path", "json", ("record 6", first),
       mutate=lambda r: r.__setitem__(6, {first: next(iter(r[6].values()))}))
    # JSONL: line numbers are 1-based, record indexes 0-based.

    def jsonl_text(ctx_records: list, bad_line: int, bad: str) -> str:
        lines = [json.dumps(r) for r in ctx_records]
        lines[bad_line] = bad
        return "\n".join(lines) + "\n"

    def jsonl_case(name: str, bad: str, says: Sequence[str], check_data: bool = False) -> None:
        def build(ctx: Ctx) -> list[str]:
            root, annotation = ctx.webperson("jsonl", text=jsonl_text(ctx.assets.webperson_records(), 3, bad))
            return ctx.pretrain(root, annotation)
        add(f"webperson.jsonl.{name}", "train", "error", ("annotations.jsonl", *says), build)
        if check_data:
            def build_check(ctx: Ctx) -> list[str]:
                root, annotation = ctx.webperson("jsonl", text=jsonl_text(ctx.assets.webperson_records(), 3, bad))
                return ["--root", str(root), "--name", "WebPerson", "--annotation", annotation]
            add(f"webperson.jsonl.{name}", "check_data", "problems", ("annotations.jsonl", *says), build_check)

    jsonl_case("not_json_line", "{oops", ("line 4",), check_data=True)
    jsonl_case("list_line", '["a", "b"]', ("record 3",))
    jsonl_case("missing_caption1", '{"0000/00000003.jpg": {"caption2": "a man"}}', ("record 3", "'caption1'"))
    wp("empty_file", "jsonl", ("no usable",), text="")
    wp("invalid_utf8", "jsonl", ("re:(?i)utf-8",),
       data=b'{"0000/00000000.jpg": {"caption1": "a \xff man", "caption2": "b"}}\n')

    def skip_line(ctx: Ctx) -> list[str]:
        root, annotation = ctx.webperson("jsonl", text=jsonl_text(ctx.assets.webperson_records(), 3, "{oops"))
        return ctx.pretrain(root, annotation, "data.skip_bad_records=true")
    add("webperson.jsonl.skip_bad_record", "train", "skip", ("skipped 1 bad record", "line 4"), skip_line)

    def with_bom(ctx: Ctx, form: str) -> list[str]:
        root, annotation = ctx.webperson(form)
        path = root / "WebPerson" / annotation
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        return ["--root", str(root), "--name", "WebPerson", "--annotation", annotation]
    for form in ("json", "jsonl"):
        add(f"webperson.{form}.utf8_bom", "check_data", "ok", ("OK:",), lambda ctx, form=form: with_bom(ctx, form))

    # Tar shards.
    def drop(member_suffix: str) -> Callable:
        def edit(shards: list) -> None:
            shards[0][:] = [(n, d) for n, d in shards[0] if n != f"0000/00000002{member_suffix}"]
        return edit

    def replace(member: str, data: bytes) -> Callable:
        def edit(shards: list) -> None:
            shards[0][:] = [(n, data if n == member else d) for n, d in shards[0]]
        return edit

    wp("corrupt_shard", "tar", ("tar",), data=random_bytes(5000, 1), check_data=True)
    wp("missing_json_member", "tar", ("0000/00000002", ".json"), members=drop(".json"), check_data=True)
    wp("missing_image_member", "tar", ("0000/00000002", "image"), members=drop(".jpg"))
    wp("json_member_not_json", "tar", ("0000/00000002.json", "JSON"),
       members=replace("0000/00000002.json", b"{not json"), check_data=True)
    wp("json_member_missing_caption", "tar", ("0000/00000002", "'caption2'"),
       members=replace("0000/00000002.json", b'{"caption1": "a man"}'))
    wp("json_member_list", "tar", ("0000/00000002",), members=replace("0000/00000002.json", b'["a", "b"]'))

    def truncated_shard(ctx: Ctx) -> list[str]:
        root, annotation = ctx.webperson("tar")
        shard = root / "WebPerson" / "shards" / "webperson-000000.tar"
        shard.write_bytes(shard.read_bytes()[:3000])
        return ctx.pretrain(root, annotation)
    add("webperson.tar.truncated_shard", "train", "error", ("webperson-000000.tar",), truncated_shard)

    def corrupt_member_image(ctx: Ctx) -> tuple[Path, str]:
        return ctx.webperson("tar", members=replace("0000/00000002.jpg", b"not an image at all"))
    add("webperson.tar.image_member_corrupt", "train", "error", ("webperson-000000.tar::0000/00000002.jpg",),
        lambda ctx: ctx.pretrain(*corrupt_member_image(ctx), ALL_SAMPLES))
    add("webperson.tar.image_member_corrupt", "check_data", "problems", ("webperson-000000.tar::0000/00000002.jpg",),
        lambda ctx: ["--root", str(corrupt_member_image(ctx)[0]), "--name", "WebPerson", "--annotation", "shards"])
    add("webperson.tar.image_member_skipped", "train", "skip", ("re:skipped [12] unreadable image",),
        lambda ctx: ctx.pretrain(*corrupt_member_image(ctx), ALL_SAMPLES, "data.skip_bad_images=true"))

    # Finding the annotation.
    def only_images(ctx: Ctx) -> Path:
        root, _ = ctx.webperson("json")
        os.remove(root / "WebPerson" / "annotations.json")
        return root
    add("webperson.no_annotation", "train", "error", ("WebPerson", "no WebPerson annotation"),
        lambda ctx: ctx.pretrain(only_images(ctx), ""))

    def json_and_tar(ctx: Ctx) -> Path:
        root, _ = ctx.webperson("tar")
        ctx.write("data/WebPerson/annotations.json", json.dumps(ctx.assets.webperson_records()))
        return root
    add("webperson.json_and_tar", "train", "error", ("data.annotation",),
        lambda ctx: ctx.pretrain(json_and_tar(ctx), ""))
    add("webperson.annotation_missing", "train", "error", ("nope.jsonl",),
        lambda ctx: ctx.pretrain(ctx.webperson("json")[0], "nope.jsonl"))
    add("webperson.annotation_csv", "train", "error", (".csv",),
        lambda ctx: ctx.pretrain(ctx.webperson("json")[0], str(ctx.write("data/WebPerson/ann.csv", "a,b\n"))))

    def no_images(ctx: Ctx) -> tuple[Path, str]:
        root, annotation = ctx.webperson("json")
        os.remove(root / "WebPerson" / "images")
        return root, annotation
    add("webperson.json.no_image_folder", "train", "error", ("images",), lambda ctx: ctx.pretrain(*no_images(ctx)))

    # A damaged index cache is rebuilt, never served.
    def damaged_cache(ctx: Ctx, content: bytes) -> list[str]:
        root, annotation = ctx.webperson("json")
        ctx.write("data/WebPerson/annotations.json.index.npz", content)
        return ctx.pretrain(root, annotation)

    def cache_rebuilt(ctx: Ctx) -> list[str]:
        import numpy as np

        try:
            with np.load(ctx.tmp / "data" / "WebPerson" / "annotations.json.index.npz", allow_pickle=False) as data:
                data.files  # noqa: B018
        except Exception as err:  # noqa: BLE001
            return [f"the damaged index cache was not rebuilt: {type(err).__name__}: {err}"]
        return []
    add("webperson.cache_random_bytes", "train", "ok", ("run directory",),
        lambda ctx: damaged_cache(ctx, random_bytes(3000, 2)), check=cache_rebuilt)

    def truncated_cache(ctx: Ctx) -> list[str]:
        root, annotation = ctx.webperson("json")
        from datasets.webperson import WebPerson

        WebPerson(str(root), annotation=annotation)  # writes the cache
        cache = root / "WebPerson" / "annotations.json.index.npz"
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
        return ctx.pretrain(root, annotation)
    add("webperson.cache_truncated", "train", "ok", ("run directory",), truncated_cache, check=cache_rebuilt)


# ---- images ---------------------------------------------------------------------------------


BAD_IMAGES: dict[str, Callable[[Ctx, Path], None]] = {
    "zero_bytes": lambda ctx, p: p.write_bytes(b""),
    "truncated_jpeg": lambda ctx, p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "jpeg_header_only": lambda ctx, p: p.write_bytes(p.read_bytes()[:200]),
    "truncated_png": lambda ctx, p: p.write_bytes(png_bytes(32, 64)[:60]),
    "random_bytes": lambda ctx, p: p.write_bytes(random_bytes(4000, 3)),
    "text_file": lambda ctx, p: p.write_text("this is a text file, not a JPEG\n"),
    "directory": lambda ctx, p: (p.unlink(), p.mkdir()),
    "missing": lambda ctx, p: p.unlink(),
    "decompression_bomb": lambda ctx, p: p.write_bytes(png_header_only(100_000, 100_000)),
}
#: In train, these run through the full training batch (every image is loaded).
TRAIN_IMAGE_CASES = ("zero_bytes", "truncated_jpeg", "random_bytes", "directory", "missing", "decompression_bomb")
ODD_MODES = {"grayscale": ("L", "JPEG"), "cmyk": ("CMYK", "JPEG"), "rgba": ("RGBA", "PNG"), "palette": ("P", "PNG"),
             "sixteen_bit": ("I;16", "PNG"), "one_pixel": ("1x1", "JPEG")}


def _define_image_cases() -> None:
    target = "00001_00.jpg"

    def damaged(ctx: Ctx, kind: str) -> Path:
        root = ctx.pedes("reid_raw", copy_images=True)
        BAD_IMAGES[kind](ctx, ctx.image(root))
        return root

    for kind in BAD_IMAGES:
        expect_says = (target, "missing") if kind == "missing" else (target,)
        add(f"image.{kind}", "check_data", "problems", expect_says,
            lambda ctx, kind=kind: ["--root", str(damaged(ctx, kind)), "--name", "CUHK-PEDES"])
    for kind in TRAIN_IMAGE_CASES:
        add(f"image.{kind}", "train", "error", (target,),
            lambda ctx, kind=kind: ctx.train(damaged(ctx, kind), ALL_SAMPLES))
    add("image.corrupt_skipped", "train", "skip", ("re:skipped [12] unreadable image",),
        lambda ctx: ctx.train(damaged(ctx, "truncated_jpeg"), ALL_SAMPLES, "data.skip_bad_images=true"))
    add("image.corrupt_two_workers", "check_data", "problems", (target,),
        lambda ctx: ["--root", str(damaged(ctx, "random_bytes")), "--name", "CUHK-PEDES", "--workers", "2"])
    add("image.corrupt_test_split", "test", "error", ("00011_00.jpg",),
        lambda ctx: _test_argv(ctx, f"data.root={_damaged_test(ctx)}"))

    # Unusual but valid images load (converted to RGB).
    def odd(ctx: Ctx, which: Sequence[str]) -> Path:
        root = ctx.pedes("reid_raw", copy_images=True)
        for k, name in enumerate(which):
            mode, fmt = ODD_MODES[name]
            path = ctx.image(root, f"train/{k + 1:05d}_00.jpg")
            path.write_bytes(image_bytes(mode, fmt))
        return root
    for name in ODD_MODES:
        add(f"image.{name}", "check_data", "ok", ("OK",),
            lambda ctx, name=name: ["--root", str(odd(ctx, [name])), "--name", "CUHK-PEDES"])
    add("image.odd_modes", "train", "ok", ("run directory",), lambda ctx: ctx.train(odd(ctx, list(ODD_MODES)),
                                                                                     ALL_SAMPLES))


def _damaged_test(ctx: Ctx) -> Path:
    root = ctx.pedes("reid_raw", copy_images=True)
    ctx.image(root, "test/00011_00.jpg").write_bytes(random_bytes(3000, 4))
    return root


# ---- configs --------------------------------------------------------------------------------


def _define_config_cases() -> None:
    def override(name: str, says: Sequence[str], *overrides: str, requires: Callable | None = None) -> None:
        add(f"config.{name}", "train", "error", says, lambda ctx: ctx.train(ctx.assets.data, *overrides),
            requires=requires)

    override("unknown_key", ("'foo'",), "foo.bar=1")
    override("typo_key", ("'solver.lrr'", "solver.lr"), "solver.lrr=0.1")
    override("section_as_value", ("'solver'",), "solver=3")
    override("key_under_leaf", ("solver.lr",), "solver.lr.x=1")
    override("batch_size_text", ("data.batch_size", "abc"), "data.batch_size=abc")
    override("bool_text", ("data.img_aug", "maybe"), "data.img_aug=maybe")
    override("betas_scalar", ("solver.betas",), "solver.betas=0.9")
    override("lr_zero", ("solver.lr", "0"), "solver.lr=0")
    override("lr_negative", ("solver.lr", "-0.001"), "solver.lr=-0.001")
    override("lr_nan", ("solver.lr", "nan"), "solver.lr=.nan")
    override("batch_size_negative", ("data.batch_size", "-8"), "data.batch_size=-8")
    override("batch_size_zero", ("data.batch_size", "0"), "data.batch_size=0")
    override("text_length_2", ("data.text_length", "2"), "data.text_length=2")
    override("text_length_100", ("data.text_length", "100"), "data.text_length=100")
    override("probability_above_1", ("masking.noise_max_prob", "1.5"), "masking.noise_max_prob=1.5")
    override("probability_negative", ("masking.random_prob", "-0.1"), "masking.random_prob=-0.1")
    override("mask_plus_random_ratio", ("masking.mask_ratio", "masking.random_ratio"),
             "masking.mask_ratio=0.8", "masking.random_ratio=0.3")
    override("epochs_below_warmup", ("solver.epochs", "solver.warmup_epochs"), "solver.epochs=1",
             "solver.warmup_epochs=2")
    override("target_lr_above_lr", ("solver.target_lr",), "solver.target_lr=1.0")
    override("milestones_decreasing", ("solver.milestones",), "solver.milestones=[50, 20]")
    override("momentum_2", ("solver.momentum",), "solver.momentum=2")
    override("num_workers_negative", ("data.num_workers",), "data.num_workers=-1")
    override("seed_negative", ("seed", "-1"), "seed=-1")
    override("loss_weight_negative", ("model.loss_weights.sdm",), "model.loss_weights.sdm=-1")
    override("gass_layers_zero", ("gass.num_layers", "0"), "gass.num_layers=0", "gass.enabled=true")
    override("gass_layers_deeper_than_text", ("gass.num_layers", "99"), "gass.num_layers=99", "gass.enabled=true")
    override("image_size_one_value", ("model.clip.image_size",), "model.clip.image_size=[64]")
    override("image_size_below_patch", ("model.clip.image_size",), "model.clip.image_size=[8, 8]")
    override("precision_fp8", ("precision", "fp8"), "precision=fp8")
    override("optimizer_unknown", ("solver.optimizer", "Adamm"), "solver.optimizer=Adamm")
    override("scheduler_unknown", ("solver.scheduler", "cosin"), "solver.scheduler=cosin")
    override("warmup_method_unknown", ("solver.warmup_method", "cubic"), "solver.warmup_method=cubic")
    override("sampler_unknown", ("data.sampler", "pk"), "data.sampler=pk")
    override("scoring_unknown", ("gass.scoring", "bm25"), "gass.scoring=bm25", "gass.enabled=true")
    override("attn_norm_unknown", ("gass.attn_norm", "softmax"), "gass.attn_norm=softmax", "gass.enabled=true")
    override("arch_unknown", ("model.clip.arch", "ViT-Z/99"), "model.clip.arch=ViT-Z/99")
    override("task_unknown", ("task", "distill"), "task=distill")
    override("dataset_unknown", ("data.name", "Market1501"), "data.name=Market1501")
    override("mlm_mode_unknown", ("masking.mlm", "bert"), "masking.mlm=bert")
    override("loss_name_unknown", ("model.loss_names", "foo"), "model.loss_names=sdm+foo")
    override("eval_dataset_unknown", ("eval.datasets", "Bogus"), "eval.datasets=[Bogus]", "eval.period=1")
    override("batch_larger_than_data", ("data.batch_size",), "data.batch_size=1000")
    override("identity_sampler_batch", ("data.batch_size", "data.num_instances"), "data.sampler=identity",
             "data.batch_size=10", "data.num_instances=4")
    override("device_cuda_without_cuda", ("device", "cuda"), "device=cuda", requires=no_cuda)
    override("device_bogus", ("device", "gpu0"), "device=gpu0")
    override("override_without_equals", ("solver.lr",), "solver.lr")
    override("override_empty_key", ("=1",), "=1")
    override("override_bad_yaml", ("solver.betas",), "solver.betas=[0.9,")
    override("pretrained_missing_file", ("nope.pt",), "model.clip.pretrained=nope.pt")
    override("pretrained_unknown_name", ("ViT-Q/99",), "model.clip.pretrained=ViT-Q/99")
    override("resume_missing_file", ("nope.pth",), "train.resume=nope.pth")

    def output_under_file(ctx: Ctx) -> list[str]:
        blocker = ctx.write("blocker", "a file where a folder is expected\n")
        return ctx.train(ctx.assets.data, f"output_dir={blocker / 'run'}")
    add("config.output_dir_under_file", "train", "error", ("blocker",), output_under_file)

    def pretrained_random(ctx: Ctx) -> list[str]:
        return ctx.train(ctx.assets.data, f"model.clip.pretrained={ctx.write('clip.pt', random_bytes(2000, 5))}")
    add("config.pretrained_random_bytes", "train", "error", ("clip.pt",), pretrained_random)

    def resume_random(ctx: Ctx) -> list[str]:
        return ctx.train(ctx.assets.data, f"train.resume={ctx.write('old.pth', random_bytes(2000, 6))}")
    add("config.resume_random_bytes", "train", "error", ("old.pth",), resume_random)

    # Config files.
    def config_file(name: str, says: Sequence[str], files: dict[str, str | bytes], main: str = "bad.yaml",
                    check: Callable | None = None) -> None:
        def build(ctx: Ctx) -> list[str]:
            for rel, content in files.items():
                ctx.write(rel, content.replace("@FINETUNE@", FINETUNE) if isinstance(content, str) else content)
            return ["--config", str(ctx.tmp / main), f"data.root={ctx.assets.data}", f"output_dir={ctx.tmp / 'run'}",
                    *QUICK]
        add(f"config.file_{name}", "train", "error", says, build, check=check)

    config_file("yaml_syntax", ("bad.yaml",), {"bad.yaml": "_base_: @FINETUNE@\nsolver: [1, 2\n"})
    config_file("tabs", ("bad.yaml",), {"bad.yaml": "_base_: @FINETUNE@\nsolver:\n\tlr: 0.1\n"})
    config_file("top_level_list", ("bad.yaml", "mapping"), {"bad.yaml": "- _base_\n- solver\n"})
    config_file("top_level_string", ("bad.yaml", "mapping"), {"bad.yaml": "just some words\n"})
    config_file("base_missing", ("nope.yaml",), {"bad.yaml": "_base_: nope.yaml\n"})
    config_file("base_cycle", ("circular", "a.yaml", "b.yaml"),
                {"a.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: a.yaml\n"}, main="a.yaml")
    config_file("base_self", ("circular", "bad.yaml"), {"bad.yaml": "_base_: bad.yaml\n"})
    config_file("base_not_string", ("bad.yaml", "_base_"), {"bad.yaml": "_base_: 5\n"})
    config_file("base_nested", ("bad.yaml", "_base_"), {"bad.yaml": "_base_: @FINETUNE@\nsolver:\n  _base_: x.yaml\n"})
    config_file("unknown_key", ("bad.yaml", "solver.lrr"), {"bad.yaml": "_base_: @FINETUNE@\nsolver:\n  lrr: 0.1\n"})
    config_file("invalid_utf8", ("bad.yaml",), {"bad.yaml": b"_base_: x.yaml\nsolver:\n  lr: \xff\xfe\n"})
    config_file("binary", ("bad.yaml",), {"bad.yaml": random_bytes(300, 7)})
    config_file("python_tag", ("bad.yaml",), {"bad.yaml": f"!!python/object/apply:builtins.open ['{MARKER}', 'w']\n"},
                check=no_marker)
    add("config.file_not_found", "train", "error", ("nope.yaml",),
        lambda ctx: ["--config", str(ctx.tmp / "nope.yaml"), f"data.root={ctx.assets.data}"])
    add("config.file_is_folder", "train", "error", ("configs_dir",),
        lambda ctx: ["--config", str(ctx.folder("configs_dir")), f"data.root={ctx.assets.data}"])
    # An empty file is all defaults: here the default data root (data/, relative to the case folder) is missing.
    add("config.file_empty", "train", "error", ("WebPerson", "does not exist"),
        lambda ctx: ["--config", str(ctx.write("empty.yaml", ""))])


# ---- checkpoints ----------------------------------------------------------------------------


def _bad_checkpoint(ctx: Ctx, kind: str) -> Path:
    """A damaged checkpoint file (or folder) `bad.pth` in the case folder."""
    path = ctx.tmp / "bad.pth"
    if kind == "random_bytes":
        ctx.write("bad.pth", random_bytes(5000, 8))
    elif kind == "empty_file":
        ctx.write("bad.pth", b"")
    elif kind == "text_file":
        ctx.write("bad.pth", "model: not a checkpoint\n")
    elif kind == "truncated":
        data = (ctx.run / "last.pth").read_bytes()
        ctx.write("bad.pth", data[: len(data) // 2])
    elif kind == "directory":
        ctx.folder("bad.pth")
    elif kind == "missing":
        pass
    elif kind == "needs_trust":
        ckpt = ctx.checkpoint()
        ckpt["payload"] = Evil(str(ctx.tmp / MARKER))
        ctx.save("bad.pth", ckpt)
    elif kind == "wrong_shape":
        ckpt = ctx.checkpoint()
        ckpt["model"]["base_model.visual.ln_pre.weight"] = ckpt["model"]["base_model.visual.ln_pre.weight"][:64].clone()
        ctx.save("bad.pth", ckpt)
    elif kind == "missing_key":
        ckpt = ctx.checkpoint()
        del ckpt["model"]["base_model.visual.ln_pre.weight"]
        ctx.save("bad.pth", ckpt)
    elif kind == "no_tensors":
        ctx.save("bad.pth", {"model": {"epoch": 3, "note": "no weights here"}})
    elif kind == "empty_dict":
        ctx.save("bad.pth", {})
    elif kind == "list":
        ctx.save("bad.pth", [1, 2, 3])
    else:
        raise ValueError(kind)
    return path


CHECKPOINT_SAYS = {"wrong_shape": ("ln_pre",), "missing_key": ("ln_pre",), "needs_trust": ("--trust",)}
#: A file that is no pickle at all must not be blamed on "objects that need --trust".
CHECKPOINT_AVOID = {kind: ("--trust", "trust_checkpoints", "arbitrary unpickling")
                    for kind in ("random_bytes", "empty_file", "text_file", "truncated")}


def _test_argv(ctx: Ctx, *extra: str, checkpoint: Path | None = None) -> list[str]:
    return ["--config", str(ctx.run / "config.yaml"), "--checkpoint", str(checkpoint or ctx.run / "last.pth"),
            f"output_dir={ctx.tmp / 'out'}", "device=cpu", "eval.datasets=[CUHK-PEDES]", *extra]


def _gallery(ctx: Ctx) -> Path:
    """A folder of four gallery images (the corpus's test split)."""
    images = ctx.tmp / "gallery"
    if not images.exists():
        shutil.copytree(ctx.assets.data / "CUHK-PEDES" / "imgs" / "test", images)
    return images


def _search_argv(ctx: Ctx, *extra: str, checkpoint: Path | None = None, images: Path | None = None,
                 config: Path | None = None, cache_dir: Path | None = None) -> list[str]:
    return ["--checkpoint", str(checkpoint or ctx.run / "last.pth"), "--config", str(config or ctx.run / "config.yaml"),
            "--images", str(images or _gallery(ctx)), "--query", "a man in a red coat",
            "--cache-dir", str(cache_dir or ctx.tmp / "cache"), *extra, "device=cpu"]


def _define_checkpoint_cases() -> None:
    kinds = ("random_bytes", "empty_file", "text_file", "truncated", "directory", "missing", "needs_trust",
             "wrong_shape", "missing_key", "no_tensors", "empty_dict", "list")
    for kind in kinds:
        says = ("bad.pth", *CHECKPOINT_SAYS.get(kind, ()))
        check = no_marker if kind == "needs_trust" else None
        avoid = CHECKPOINT_AVOID.get(kind, ())
        add(f"checkpoint.{kind}", "test", "error", says,
            lambda ctx, kind=kind: _test_argv(ctx, checkpoint=_bad_checkpoint(ctx, kind)), check=check, avoid=avoid)
        add(f"checkpoint.{kind}", "export", "error", says,
            lambda ctx, kind=kind: ["--checkpoint", str(_bad_checkpoint(ctx, kind)), "--out", str(ctx.tmp / "rel.pth"),
                                    "--safetensors"],
            check=both(absent("rel.pth", "rel.safetensors"), no_marker), avoid=avoid)
    for kind in ("random_bytes", "empty_file", "truncated", "directory", "missing", "needs_trust", "wrong_shape",
                 "no_tensors"):
        says = ("bad.pth", *CHECKPOINT_SAYS.get(kind, ()))
        add(f"finetune.{kind}", "train", "error", says,
            lambda ctx, kind=kind: ["--finetune", str(_bad_checkpoint(ctx, kind)), *ctx.train(ctx.assets.data)],
            check=no_marker if kind == "needs_trust" else None, group="train_model",
            avoid=CHECKPOINT_AVOID.get(kind, ()))
    for kind in ("random_bytes", "missing", "needs_trust", "wrong_shape"):
        says = ("bad.pth", *CHECKPOINT_SAYS.get(kind, ()))
        add(f"checkpoint.{kind}", "search", "error", says,
            lambda ctx, kind=kind: _search_argv(ctx, checkpoint=_bad_checkpoint(ctx, kind)),
            check=no_marker if kind == "needs_trust" else None, avoid=CHECKPOINT_AVOID.get(kind, ()))

    # A config stored in the checkpoint that describes no buildable model.
    def bad_stored_config(ctx: Ctx) -> list[str]:
        ckpt = ctx.checkpoint()
        ckpt["config"]["model"]["clip"]["arch"] = "ViT-Z/99"
        return ["--checkpoint", str(ctx.save("bad.pth", ckpt)), "--out", str(ctx.tmp / "rel.pth")]
    add("stored_config_unbuildable", "export", "error", ("bad.pth", "ViT-Z/99"), bad_stored_config,
        check=absent("rel.pth"))


# ---- command lines of each tool -------------------------------------------------------------


def _define_cli_cases() -> None:
    # train
    add("cli.no_arguments", "train", "usage", ("--config",), lambda ctx: [])
    add("cli.unknown_flag", "train", "usage", ("--epochs",),
        lambda ctx: ["--config", FINETUNE, "--epochs", "3"])
    # test
    add("cli.missing_checkpoint_flag", "test", "usage", ("--checkpoint",), lambda ctx: ["--config", FINETUNE])
    add("cli.split_bogus", "test", "usage", ("bogus",),
        lambda ctx: ["--config", FINETUNE, "--checkpoint", "x.pth", "--split", "bogus"])
    add("cli.config_missing", "test", "error", ("nope.yaml",),
        lambda ctx: ["--config", str(ctx.tmp / "nope.yaml"), "--checkpoint", str(ctx.run / "last.pth")])
    add("cli.config_is_checkpoint", "test", "error", ("last.pth",),
        lambda ctx: ["--config", str(ctx.run / "last.pth"), "--checkpoint", str(ctx.run / "last.pth")])
    add("cli.checkpoint_is_config", "test", "error", ("config.yaml",),
        lambda ctx: _test_argv(ctx, checkpoint=ctx.run / "config.yaml"))
    add("cli.eval_datasets_empty", "test", "error", ("eval.datasets",), lambda ctx: _test_argv(ctx, "eval.datasets=[]"))
    add("cli.eval_dataset_unknown", "test", "error", ("Bogus",), lambda ctx: _test_argv(ctx, "eval.datasets=[Bogus]"))
    add("cli.data_root_missing", "test", "error", ("nowhere",),
        lambda ctx: _test_argv(ctx, f"data.root={ctx.tmp / 'nowhere'}", "eval.root="))
    add("cli.val_split_of_icfg", "test", "error", ("ICFG-PEDES", "val"),
        lambda ctx: ["--split", "val", *_test_argv(ctx, f"data.root={ctx.pedes('icfg')}", "eval.root=",
                                                   "eval.datasets=[ICFG-PEDES]")])
    add("cli.valid", "test", "ok", ("CUHK-PEDES t2i",), lambda ctx: _test_argv(ctx))

    # check_data
    add("cli.no_arguments", "check_data", "usage", ("--root",), lambda ctx: [])
    add("cli.name_bogus", "check_data", "usage", ("Bogus",), lambda ctx: ["--root", str(ctx.tmp), "--name", "Bogus"])
    add("cli.sample_zero", "check_data", "usage", ("--sample",), lambda ctx: ["--root", str(ctx.tmp), "--sample", "0"])
    add("cli.sample_text", "check_data", "usage", ("--sample",), lambda ctx: ["--root", str(ctx.tmp), "--sample", "x"])
    add("cli.workers_zero", "check_data", "usage", ("--workers",),
        lambda ctx: ["--root", str(ctx.tmp), "--workers", "0"])
    add("cli.root_missing", "check_data", "error", ("nowhere",), lambda ctx: ["--root", str(ctx.tmp / "nowhere")])
    add("cli.root_is_file", "check_data", "error", ("notes.txt",),
        lambda ctx: ["--root", str(ctx.write("notes.txt", "hello\n"))])
    add("cli.root_empty", "check_data", "error", ("empty_root", "CUHK-PEDES"),
        lambda ctx: ["--root", str(ctx.folder("empty_root"))])
    add("cli.webperson_annotation_missing", "check_data", "problems", ("nope.jsonl",),
        lambda ctx: ["--root", str(ctx.webperson("json")[0]), "--name", "WebPerson", "--annotation", "nope.jsonl"])
    add("cli.valid", "check_data", "ok", ("OK: CUHK-PEDES",),
        lambda ctx: ["--root", str(ctx.pedes("reid_raw")), "--name", "CUHK-PEDES"])
    add("cli.valid_sampled", "check_data", "ok", ("checking 3 of",),
        lambda ctx: ["--root", str(ctx.pedes("reid_raw")), "--name", "CUHK-PEDES", "--sample", "3"])

    # search
    add("cli.no_query", "search", "usage", ("--query",),
        lambda ctx: ["--checkpoint", "x.pth", "--images", str(ctx.tmp)])
    add("cli.images_and_dataset", "search", "usage", ("--dataset",),
        lambda ctx: ["--checkpoint", "x.pth", "--images", str(ctx.tmp), "--dataset", "CUHK-PEDES", "--query", "a"])
    add("cli.topk_zero", "search", "error", ("--topk",), lambda ctx: _search_argv(ctx, "--topk", "0"))
    add("cli.topk_text", "search", "usage", ("--topk",), lambda ctx: _search_argv(ctx, "--topk", "ten"))
    add("cli.query_blank", "search", "error", ("--query",),
        lambda ctx: _search_argv(ctx, "--query", "   "))
    add("cli.images_missing", "search", "error", ("nowhere",),
        lambda ctx: _search_argv(ctx, images=ctx.tmp / "nowhere"))
    add("cli.images_empty", "search", "error", ("empty_gallery",),
        lambda ctx: _search_argv(ctx, images=ctx.folder("empty_gallery")))
    add("cli.images_is_file", "search", "error", ("one.jpg",),
        lambda ctx: _search_argv(ctx, images=ctx.write("one.jpg", png_bytes(32, 64))))
    add("cli.images_no_images", "search", "error", ("docs",),
        lambda ctx: _search_argv(ctx, images=ctx.write("docs/notes.txt", "hi\n").parent))  # names the folder

    def corrupt_gallery(ctx: Ctx) -> list[str]:
        argv = _search_argv(ctx)
        (ctx.tmp / "gallery" / "00011_01.jpg").write_bytes(random_bytes(2000, 9))
        return argv
    add("cli.gallery_image_corrupt", "search", "error", ("00011_01.jpg",), corrupt_gallery)
    add("cli.dataset_unknown", "search", "error", ("Bogus",),
        lambda ctx: ["--checkpoint", str(ctx.run / "last.pth"), "--dataset", "Bogus", "--query", "a man",
                     "--no-cache", "device=cpu"])
    add("cli.dataset_root_missing", "search", "error", ("nowhere",),
        lambda ctx: ["--checkpoint", str(ctx.run / "last.pth"), "--dataset", "CUHK-PEDES", "--root",
                     str(ctx.tmp / "nowhere"), "--query", "a man", "--no-cache", "device=cpu"])
    add("cli.webperson_test_split", "search", "error", ("WebPerson", "test"),
        lambda ctx: ["--checkpoint", str(ctx.run / "last.pth"), "--dataset", "WebPerson", "--root",
                     str(ctx.webperson("json")[0]), "--annotation", "annotations.json", "--query", "a man",
                     "--no-cache", "device=cpu"])
    add("cli.config_missing", "search", "error", ("nope.yaml",),
        lambda ctx: _search_argv(ctx, config=ctx.tmp / "nope.yaml"))

    def lonely_checkpoint(ctx: Ctx) -> list[str]:
        lonely = ctx.folder("lonely") / "model.pth"
        shutil.copy(ctx.run / "last.pth", lonely)
        return ["--checkpoint", str(lonely), "--images", str(_gallery(ctx)), "--query", "a man", "--no-cache",
                "device=cpu"]
    add("cli.no_config_next_to_checkpoint", "search", "error", ("model.pth", "config.yaml"), lonely_checkpoint)
    add("cli.json_under_file", "search", "error", ("blocker",),
        lambda ctx: _search_argv(ctx, "--json", str(ctx.write("blocker", "x\n") / "out.json")))
    add("cli.grid_under_file", "search", "error", ("blocker",),
        lambda ctx: _search_argv(ctx, "--grid", str(ctx.write("blocker", "x\n") / "grid.png")))
    add("cli.thumb_height_zero", "search", "error", ("--thumb-height",),
        lambda ctx: _search_argv(ctx, "--grid", str(ctx.tmp / "grid.png"), "--thumb-height", "0"),
        check=absent("grid.png"))
    add("cli.cache_dir_is_file", "search", "ok", ("gallery cache",),
        lambda ctx: _search_argv(ctx, cache_dir=ctx.write("cachefile", "x\n")))

    def damaged_cache(ctx: Ctx, how: str) -> list[str]:
        argv = _search_argv(ctx)
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            status = load_tool("search").main(argv)
        quiet_logging()
        caches = sorted((ctx.tmp / "cache").glob("*.npz"))
        if status != 0 or not caches:
            raise RuntimeError("fuzz case setup: the first search wrote no gallery cache")
        for cache in caches:
            cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2] if how == "truncated"
                              else random_bytes(3000, 10))
        return argv
    for how in ("truncated", "random_bytes"):
        add(f"cli.gallery_cache_{how}", "search", "ok", ("embedded",),
            lambda ctx, how=how: damaged_cache(ctx, how))
    add("cli.valid", "search", "ok", ("query 1",), lambda ctx: _search_argv(ctx, "--json", str(ctx.tmp / "r.json")),
        check=lambda ctx: [] if (ctx.tmp / "r.json").is_file() else ["--json file not written"])

    # export
    def export_argv(ctx: Ctx, out: Path, *extra: str) -> list[str]:
        return ["--checkpoint", str(ctx.run / "last.pth"), "--out", str(out), *extra]
    add("cli.missing_out", "export", "usage", ("--out",), lambda ctx: ["--checkpoint", "x.pth"])
    add("cli.out_is_checkpoint", "export", "error", ("last.pth",),
        lambda ctx: export_argv(ctx, ctx.run / "last.pth", "--overwrite"))
    add("cli.out_is_folder", "export", "error", ("outdir",), lambda ctx: export_argv(ctx, ctx.folder("outdir")))
    add("cli.out_exists", "export", "error", ("rel.pth", "--overwrite"),
        lambda ctx: export_argv(ctx, ctx.write("rel.pth", "keep me\n")), check=unchanged_file("rel.pth", "keep me\n"))
    add("cli.out_under_file", "export", "error", ("blocker",),
        lambda ctx: export_argv(ctx, ctx.write("blocker", "x\n") / "rel.pth"))
    add("cli.safetensors_out", "export", "error", ("rel.safetensors",),
        lambda ctx: export_argv(ctx, ctx.tmp / "rel.safetensors", "--safetensors"), check=absent("rel.safetensors"))

    def release_loads(ctx: Ctx) -> list[str]:
        import torch

        try:
            release = torch.load(ctx.tmp / "rel.pth", weights_only=True)
        except Exception as err:  # noqa: BLE001
            return [f"the release does not load weights-only: {err}"]
        return [] if "optimizer" not in release and release.get("model") else ["the release is not weights-only"]
    add("cli.valid", "export", "ok", ("wrote",), lambda ctx: export_argv(ctx, ctx.tmp / "rel.pth"), check=release_loads)

    # make_synthetic: refused before any rendering, nothing of the user's touched.
    def synth(ctx: Ctx, *extra: str, out: Path | None = None) -> list[str]:
        return ["--out", str(out or ctx.tmp / "synth"), "--identities", "2", "--images-per-id", "1", "--val-ids", "1",
                "--test-ids", "1", "--webperson-images", "2", "--shard-size", "2", "--workers", "1", *extra]
    for flag, value, says in (("--identities", "0", ("identities", "0")), ("--images-per-id", "-1", ("images_per_id",)),
                              ("--val-ids", "-2", ("val_ids",)), ("--webperson-images", "-5", ("webperson_images",)),
                              ("--noise-rate", "1.5", ("noise", "1.5")), ("--shard-size", "0", ("shard_size",)),
                              ("--jpeg-quality", "0", ("jpeg_quality",)), ("--wrong-attr-rate", "-1", ("wrong_attr",))):
        add(f"cli.{flag.strip('-').replace('-', '_')}_{value}", "make_synthetic", "error", says,
            lambda ctx, flag=flag, value=value: synth(ctx, flag, value), check=absent("synth"))
    add("cli.image_size_tiny", "make_synthetic", "error", ("image_size",),
        lambda ctx: synth(ctx, "--image-size", "8", "8"), check=absent("synth"))
    add("cli.identities_text", "make_synthetic", "usage", ("--identities",),
        lambda ctx: synth(ctx, "--identities", "x"))
    add("cli.image_format_gif", "make_synthetic", "usage", ("gif",), lambda ctx: synth(ctx, "--image-format", "gif"))
    add("cli.no_out", "make_synthetic", "usage", ("--out",), lambda ctx: [])
    add("cli.out_is_file", "make_synthetic", "error", ("synth",),
        lambda ctx: synth(ctx, out=ctx.write("synth", "keep me\n")), check=unchanged_file("synth", "keep me\n"))
    add("cli.out_foreign_folder", "make_synthetic", "error", ("mine",),
        lambda ctx: synth(ctx, out=ctx.foreign_folder("mine")), check=untouched("mine"))
    add("cli.out_under_file", "make_synthetic", "error", ("blocker",),
        lambda ctx: synth(ctx, out=ctx.write("blocker", "x\n") / "synth"))

    def existing_synthetic(ctx: Ctx) -> list[str]:
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):
            load_tool("make_synthetic").main(synth(ctx))
        return synth(ctx)
    add("cli.out_exists_without_overwrite", "make_synthetic", "error", ("--overwrite",), existing_synthetic)
    add("cli.sheet_exists", "make_synthetic", "error", ("sheet.png", "--overwrite"),
        lambda ctx: synth(ctx, "--sheet", str(ctx.write("sheet.png", "keep me\n"))),
        check=both(unchanged_file("sheet.png", "keep me\n"), absent("synth")))
    add("cli.sheet_under_file", "make_synthetic", "error", ("blocker",),
        lambda ctx: synth(ctx, "--sheet", str(ctx.write("blocker", "x\n") / "sheet.png")), check=absent("synth"))
    add("cli.valid", "make_synthetic", "ok", ("wrote",), lambda ctx: synth(ctx),
        check=lambda ctx: [] if (ctx.tmp / "synth" / "CUHK-PEDES" / "reid_raw.json").is_file() else ["no corpus"])

    # demo: every refusal comes before any data is generated or any training starts.
    def demo(ctx: Ctx, out: Path, data: Path) -> list[str]:
        return ["--out", str(out), "--data", str(data), "--small", "--no-figures"]
    add("cli.unknown_flag", "demo", "usage", ("--fast",), lambda ctx: ["--fast"])
    add("cli.seed_text", "demo", "usage", ("--seed",), lambda ctx: ["--seed", "x"])
    add("cli.out_is_file", "demo", "error", ("demo_out",),
        lambda ctx: demo(ctx, ctx.write("demo_out", "keep me\n"), ctx.tmp / "demo_data"),
        check=both(unchanged_file("demo_out", "keep me\n"), absent("demo_data")))
    add("cli.out_foreign_folder", "demo", "error", ("mine",),
        lambda ctx: demo(ctx, ctx.foreign_folder("mine"), ctx.tmp / "demo_data"),
        check=both(untouched("mine"), absent("demo_data")))
    add("cli.data_foreign_folder", "demo", "error", ("mine",),
        lambda ctx: demo(ctx, ctx.tmp / "demo_out", ctx.foreign_folder("mine")),
        check=both(untouched("mine"), absent("demo_out")))
    add("cli.data_is_file", "demo", "error", ("demo_data",),
        lambda ctx: demo(ctx, ctx.tmp / "demo_out", ctx.write("demo_data", "keep me\n")),
        check=both(unchanged_file("demo_data", "keep me\n"), absent("demo_out")))
    add("cli.out_under_file", "demo", "error", ("blocker",),
        lambda ctx: demo(ctx, ctx.write("blocker", "x\n") / "out", ctx.tmp / "demo_data"), check=absent("demo_data"))
    add("cli.data_under_file", "demo", "error", ("blocker",),
        lambda ctx: demo(ctx, ctx.tmp / "demo_out", ctx.write("blocker", "x\n") / "data"), check=absent("demo_out"))
    add("cli.out_equals_data", "demo", "error", ("--out", "--data"),
        lambda ctx: demo(ctx, ctx.tmp / "same", ctx.tmp / "same"), check=absent("same"))


_define_pedes_cases()
_define_webperson_cases()
_define_image_cases()
_define_config_cases()
_define_checkpoint_cases()
_define_cli_cases()

#: Cases whose runs get past validation and train a step (the slow ones) run in their own process.
_SLOW_TRAIN = ("train.image.", "train.webperson.cache", "train.webperson.tar.image", "train.reid_raw.duplicate",
               "train.reid_raw.skip", "train.caption_all.valid", "train.icfg_alt.valid", "train.rstp.negative",
               "train.webperson.jsonl.skip", "train.reid_raw.path_", "train.config.gass_layers_deeper",
               "train.config.image_size_below", "train.config.optimizer", "train.config.scheduler",
               "train.config.warmup_method", "train.config.scoring", "train.config.attn_norm",
               "train.config.loss_name", "train.config.pretrained", "train.config.batch_larger",
               "train.reid_raw.caption_", "train.webperson.json.path_", "train.reid_raw.utf8_bom")
CASES[:] = [dataclasses.replace(c, group="train_model") if c.tool == "train" and c.name.startswith(_SLOW_TRAIN)
            else c for c in CASES]
# Fewer processes, fewer torch imports: the tools that load a trained model share one, the data tools another.
_TOOL_GROUPS = {"test": "model_tools", "export": "model_tools", "search": "model_tools",
                "check_data": "data_tools", "make_synthetic": "data_tools", "demo": "data_tools"}
CASES[:] = [dataclasses.replace(c, group=_TOOL_GROUPS[c.tool]) if c.group == c.tool and c.tool in _TOOL_GROUPS
            else c for c in CASES]
# A demo that fails to refuse would generate data and train for minutes: stop it early.
CASES[:] = [dataclasses.replace(c, timeout=45) if c.tool == "demo" else c for c in CASES]
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(c.group for c in CASES))
BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


# --------------------------------------------------------------------------- judging


def says_in(text: str, needle: str) -> bool:
    if needle.startswith("re:"):
        return re.search(needle[3:], text) is not None
    return needle in text


def judge(case: Case, result: dict[str, Any]) -> tuple[str, str] | None:
    """(cause, detail) when `result` is not the outcome `case` expects, else None.

    Causes: ``traceback`` (an exception escaped, or a traceback was printed),
    ``silent wrong`` (exit 0 where it must fail, or `check` found damage),
    ``wrong exit status``, ``message`` (the error is not one line or does not name the thing),
    ``harness`` (the case could not be set up or run).
    """
    if result.get("harness"):
        return "harness", result["harness"]
    status, out, err = result.get("status"), result.get("stdout", ""), result.get("stderr", "")
    if result.get("exception"):
        return "traceback", f"{result['exception']} at {result.get('where', '?')}"
    if "Traceback (most recent call last)" in out + err:
        lines = [ln for ln in err.splitlines() if ln and not ln.startswith(" ")]
        return "traceback", "printed: " + (lines[-1] if lines else "?")
    problems = result.get("check_problems") or []
    lines = [ln for ln in err.splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    if case.expect in ("error", "usage", "problems"):
        wanted = {"error": 2, "usage": 2, "problems": 1}[case.expect]
        if status == 0:
            return "silent wrong", f"exit status 0 where {case.expect} (status {wanted}) was expected" + (
                f"; {'; '.join(problems)}" if problems else "")
        if problems:
            return "silent wrong", "; ".join(problems)
        if status != wanted:
            return "wrong exit status", f"exit status {status}, expected {wanted}; last stderr line: {last[:300]}"
        if case.expect == "error":
            errors = [ln for ln in lines if ln.startswith("error:")]
            if len(errors) != 1:
                return "message", f"{len(errors)} lines start with 'error:' (expected one)"
            if last != errors[0]:
                return "message", f"the error message is not one line (lines follow it): {last[:200]}"
            missing = [s for s in case.says if not says_in(errors[0], s)]
            if missing:
                return "message", f"does not name {missing}: {errors[0][:400]}"
            misleading = [s for s in case.avoid if s in errors[0]]
            if misleading:
                return "message", f"misleading (mentions {misleading}): {errors[0][:400]}"
        elif case.expect == "usage":
            if "usage:" not in err or not re.match(r"^[\w.\-]+: error: ", last):
                return "message", f"not argparse's usage error: {last[:300]}"
            missing = [s for s in case.says if not says_in(last, s)]
            if missing:
                return "message", f"does not name {missing}: {last[:400]}"
        else:
            missing = [s for s in case.says if not says_in(err, s)]
            if missing or "PROBLEMS" not in err:
                return "message", f"the problem report does not name {missing}: {err[-400:]}"
        return None
    if status != 0:
        return "wrong exit status", f"exit status {status}, expected 0; last stderr line: {last[:300]}"
    if problems:
        return "silent wrong", "; ".join(problems)
    missing = [s for s in case.says if not says_in(out + err, s)]
    if missing:
        return "message", f"exit 0 but the output does not show {missing}"
    return None
