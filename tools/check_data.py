"""Validate dataset folders before training: layout, annotations, and every image.

    python tools/check_data.py --root DIR [--name CUHK-PEDES ...] [--sample N] [--workers K]

For each dataset (default: every corpus folder found under ``--root``) the
annotation is parsed with bad records collected instead of raised, split
statistics are printed, and each referenced image (or a random sample of N
per dataset) must exist, pass ``PIL.Image.verify`` and fully decode. The
annotation file each dataset was read from is printed; for WebPerson also its
format and source files, and for the hub's Parquet files their row groups, rows
and rows without embedded image bytes (a missing or mistyped column is a
problem; ``--sample N`` decodes N image payloads). Warnings (an image path
listed by several records, kept as separate images as the IRRA loaders do;
CUHK-PEDES split counts that differ from the published ones) are printed but
do not fail the check. Exits 0 with a short OK summary when clean, 1 with the
list of problems otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets import DATASETS, AnnotationError, ImageReadError, TextReIDDataset, verify_image  # noqa: E402
from datasets.webperson import (  # noqa: E402
    PREPARED_MARKER,
    WebPerson,
    annotation_candidates,
    find_webperson_dir,
    parquet_summary,
)
from utils.cli import ToolError, run_tool  # noqa: E402

MAX_LISTED = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder holding CUHK-PEDES/, ICFG-PEDES/, RSTPReid/, WebPerson/")
    parser.add_argument("--name", nargs="+", choices=sorted(DATASETS), help="datasets to check (default: all found)")
    parser.add_argument("--sample", type=int, default=None, metavar="N",
                        help="check a random sample of N images per dataset instead of all")
    parser.add_argument("--workers", type=int, default=1, metavar="K", help="processes decoding images")
    parser.add_argument("--annotation", default=None,
                        help="WebPerson annotation file, shard or Parquet folder, or glob")
    parser.add_argument("--cache-dir", default="", help="WebPerson index cache when the dataset folder is read-only "
                        "(default ~/.cache/gadms)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")
    args = parser.parse_args(argv)
    if args.sample is not None and args.sample < 1:
        parser.error("--sample must be positive")
    if args.workers < 1:
        parser.error("--workers must be positive")
    return args


def detect_datasets(root: str) -> list[str]:
    """Registered datasets whose folder exists under ``root`` (or that ``root`` itself is)."""
    found = [name for name, cls in sorted(DATASETS.items()) if os.path.isdir(os.path.join(root, cls.dataset_dir))]
    if not found:
        base = os.path.basename(os.path.normpath(root))
        found = [name for name, cls in sorted(DATASETS.items()) if cls.dataset_dir == base]
        if not found and os.path.exists(os.path.join(root, PREPARED_MARKER)):
            found = ["WebPerson"]  # a folder of prepared shards is a WebPerson data root by itself
    return found


def image_paths(dataset: TextReIDDataset, sample: int | None = None, seed: int = 0) -> tuple[list[str], int]:
    """The distinct image paths to check (all, or a random sample of ``sample``) and how many there are."""
    train = dataset.train
    if sample is not None and dataset.val is None and dataset.test is None:
        # A training-only corpus (WebPerson, millions of images): draw image ids, not a list of every path;
        # in id order, so Parquet rows are read row group by row group.
        if sample < train.num_images:
            ids = sorted(random.Random(seed).sample(range(train.num_images), sample))
            return [train.image_path(i) for i in ids], train.num_images
    paths = list_image_paths(dataset)
    total = len(paths)
    if sample is not None and sample < total:
        paths = sorted(random.Random(seed).sample(paths, sample))
    return paths, total


def list_image_paths(dataset: TextReIDDataset) -> list[str]:
    """Every distinct image path the dataset references, in order."""
    paths = [dataset.train.image_path(i) for i in range(dataset.train.num_images)]
    for split in (dataset.val, dataset.test):
        if split is not None:
            paths.extend(split.img_paths)
    return list(dict.fromkeys(paths))


def check_image(path: str) -> tuple[str, str, str] | None:
    """``(kind, path, reason)`` for a bad image, None when it is fine."""
    try:
        verify_image(path)
    except ImageReadError as e:
        return ("missing" if e.missing else "corrupt", path, e.reason)
    return None


def webperson_checks(root: str, annotation: str | None) -> list[tuple[str, str | None]]:
    """(label, annotation) of each WebPerson annotation to check.

    One entry for `annotation` when given or when the folder holds a single annotation;
    otherwise one per annotation found (each JSON file, the tar shards, the Parquet
    files), so a folder holding the same corpus in several formats is checked in each.
    """
    if annotation:
        return [("WebPerson", annotation)]
    try:
        found = annotation_candidates(find_webperson_dir(root, None))
    except AnnotationError:
        return [("WebPerson", None)]  # check_dataset reports what is wrong with the folder
    if len(found) < 2:
        return [("WebPerson", None)]
    checks = []
    for _, files in found:
        # A multi-file annotation (shards, Parquet files) is the glob of its folder.
        if len(files) == 1 and files[0].endswith((".json", ".jsonl")):
            chosen = files[0]
        else:
            chosen = os.path.join(os.path.dirname(files[0]), "*" + os.path.splitext(files[0])[1])
        shown = os.path.relpath(chosen, find_webperson_dir(root, None))
        checks.append((f"WebPerson ({shown})", chosen))
    return checks


def check_dataset(name: str, args: argparse.Namespace, annotation: str | None = None,
                  label: str | None = None) -> tuple[list[str], list[str]]:
    """Check one dataset; print its statistics and warnings; return its problems and warnings as lines."""
    print(f"== {label or name} ==", flush=True)
    kwargs: dict[str, str] = {}
    if name == "WebPerson":
        kwargs["cache_dir"] = args.cache_dir
        if annotation:
            kwargs["annotation"] = annotation
    start = time.time()
    try:
        dataset = DATASETS[name](args.root, skip_bad_records=True, **kwargs)
    except AnnotationError as e:
        return [str(e)], []
    label = name
    if dataset.annotation_path is not None:
        print(f"{name}: annotation {dataset.annotation_path}")
        label = f"{name} ({os.path.basename(dataset.annotation_path)})"
    prepared_problems: list[str] = []
    if isinstance(dataset, WebPerson):
        describe_webperson(dataset)
        shard_folder = os.path.dirname(dataset.sources[0])
        if dataset.format == "tar" and os.path.exists(os.path.join(shard_folder, PREPARED_MARKER)):
            prepared_problems = check_prepared(shard_folder)
    print(dataset.show_statistics().split("\n", 1)[1])
    for warning in dataset.warnings:
        print(f"warning: {warning}")
    problems = [str(e) for e in dataset.skipped]
    if dataset.num_skipped > len(dataset.skipped):
        problems.append(f"... and {dataset.num_skipped - len(dataset.skipped)} more bad records")
    if problems:
        problems.insert(0, f"{dataset.num_skipped} bad annotation record(s):")
    problems = prepared_problems + problems

    paths, total = image_paths(dataset, args.sample, args.seed)
    print(f"checking {len(paths)} of {total} images with {args.workers} worker(s)...", flush=True)
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            results = pool.map(check_image, paths, chunksize=64)
    else:
        results = [check_image(p) for p in paths]
    for kind in ("missing", "corrupt"):
        bad = [r for r in results if r is not None and r[0] == kind]
        if bad:
            problems.append(f"{len(bad)} {kind} image(s) (first {min(len(bad), MAX_LISTED)}):")
            problems.extend(f"  {path}" + (f": {reason}" if kind == "corrupt" else "")
                            for _, path, reason in bad[:MAX_LISTED])
    print(f"{label}: {len(paths)} images checked in {time.time() - start:.1f}s, "
          f"{'OK' if not problems else 'PROBLEMS FOUND'}", flush=True)
    return problems, dataset.warnings


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_prepared(folder: str) -> list[str]:
    """Problems of a folder written by tools/prepare_webperson.py: shards against its manifest.

    Prints the manifest's counts. An unfinished preparation (the marker without a
    manifest), a shard missing or whose sha256 differs, and a shard the manifest does not
    list are problems.
    """
    manifest_path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest_path):
        return [f"{folder}: unfinished preparation ({PREPARED_MARKER} but no manifest.json): rerun "
                "tools/prepare_webperson.py with the same flags to finish it"]
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        shards, counts = manifest["shards"], manifest["counts"]
        listed = {entry["name"]: entry["sha256"] for entry in shards}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{manifest_path}: not a readable manifest ({err})"]
    print(f"WebPerson: prepared shards: {counts.get('images')} images, {len(listed)} shards "
          f"({counts.get('skipped_images', 0)} images and {counts.get('skipped_records', 0)} records skipped "
          "when preparing); checking their sha256 ...", flush=True)
    problems = []
    for name, expected in listed.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: listed in manifest.json but missing")
        elif file_sha256(path) != expected:
            problems.append(f"{path}: sha256 differs from manifest.json (changed or damaged after preparation)")
    problems += [f"{os.path.join(folder, name)}: not listed in manifest.json"
                 for name in sorted(os.listdir(folder)) if name.endswith(".tar") and name not in listed]
    return problems


def describe_webperson(dataset: WebPerson) -> None:
    """Print the format and sources WebPerson was read from (Parquet: row groups, rows, embedded images)."""
    sources = dataset.sources
    shown = sources[0] if len(sources) == 1 else f"{sources[0]} ... {os.path.basename(sources[-1])}"
    print(f"WebPerson: {dataset.format} format, {len(sources)} source file(s): {shown}")
    if dataset.format == "parquet":
        print(f"WebPerson: {parquet_summary(sources)}")
    if dataset.train.cache_file is not None:
        print(f"WebPerson: index cache {dataset.train.cache_file}")


def run(args: argparse.Namespace) -> int:
    """Check every dataset; 0 when all pass, 1 when the report lists problems."""
    if not os.path.isdir(args.root):
        raise ToolError(f"--root {args.root} is not a folder")
    names = args.name or detect_datasets(args.root)
    if not names:
        layout = ", ".join(sorted(cls.dataset_dir for cls in DATASETS.values()))
        inner = sorted(os.path.join(args.root, sub) for sub in os.listdir(args.root) if detect_datasets(
            os.path.join(args.root, sub)) and os.path.isdir(os.path.join(args.root, sub)))
        hint = (f"; {inner[0]} holds datasets: pass it as --root" if len(inner) == 1 else
                f"; {', '.join(inner)} hold datasets: pass one as --root" if inner else "")
        raise ToolError(f"no dataset folder found under {args.root} (expected one of: {layout}){hint}")
    report: dict[str, tuple[list[str], list[str]]] = {}
    for name in names:
        checks = webperson_checks(args.root, args.annotation) if name == "WebPerson" else [(name, None)]
        for label, annotation in checks:
            report[label] = check_dataset(name, args, annotation, label)
    failed = {name: problems for name, (problems, _) in report.items() if problems}
    num_warnings = sum(len(warnings) for _, warnings in report.values())
    if not failed:
        print(f"OK: {', '.join(names)} passed all checks" + (f" ({num_warnings} warning(s) above)" if num_warnings else ""))
        return 0
    print("\nPROBLEMS:", file=sys.stderr)
    for name, problems in failed.items():
        print(f"[{name}]", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
    print(f"FAILED: {', '.join(failed)} ({sum(len(p) for p in failed.values())} problem line(s))", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
