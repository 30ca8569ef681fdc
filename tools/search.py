#!/usr/bin/env python
"""Text-to-image search: rank a gallery of person images for free-text queries.

    python tools/search.py --checkpoint RUN/best_CUHK-PEDES.pth --images photos/ \\
        --query "a woman in a red coat with a black backpack" [--query ...] [--topk 10] [--grid hits.png]
    python tools/search.py --checkpoint RUN/last.pth --dataset CUHK-PEDES --root data/synthetic --split test \\
        --query "..." --json hits.json

The config defaults to the `config.yaml` next to the checkpoint. Gallery
features are cached on disk (`--cache-dir`, default `<checkpoint dir>/gallery_cache/`),
keyed by the checkpoint (path, size, mtime), the gallery files (paths, sizes,
mtimes), the image size and the backbone config, so repeated searches only embed
the queries. A cache that no longer matches (an image replaced in place, a
rewritten checkpoint) or cannot be read is recomputed, with one line on stderr
saying why, and replaced atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from datasets.bases import IMAGE_EXTENSIONS, TAR_SEPARATOR, ImageReadError  # noqa: E402
from datasets.build import ImageDataset  # noqa: E402
from datasets.transforms import build_transforms  # noqa: E402
from model.tokenizer import Tokenizer, cleans_to_empty  # noqa: E402
from processor.inference import image_size_of, image_thumbnail, load_run_model, open_dataset  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.config import Config  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.threads import apply_threads  # noqa: E402
from utils.visualize import (  # noqa: E402
    BLACK,
    GREY,
    WHITE,
    check_thumb_height,
    load_font,
    save_png,
    text_size,
    wrap_text,
)

CACHE_VERSION = 2  # 2: keyed by the gallery files' sizes and mtimes too
SPLITS = ("test", "val", "train")


# --------------------------------------------------------------------------- embedding


@torch.inference_mode()
def embed_images(model: torch.nn.Module, paths: list[str], *, image_size: tuple[int, int], batch_size: int,
                 device: torch.device, num_workers: int = 0) -> torch.Tensor:
    """L2-normalised image features [N, D] (float32, CPU), with the evaluation transform."""
    dataset = ImageDataset(paths, np.zeros(len(paths), dtype=np.int64), build_transforms(image_size, is_train=False))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats = [torch.zeros(0, model.embed_dim)]
    for _, images in loader:
        feats.append(F.normalize(model.encode_image(images.to(device)).float(), dim=-1).cpu())
    return torch.cat(feats)


@torch.inference_mode()
def embed_texts(model: torch.nn.Module, texts: list[str], *, tokenizer: Tokenizer, text_length: int,
                device: torch.device, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text features [N, D] (float32, CPU)."""
    feats = [torch.zeros(0, model.embed_dim)]
    for start in range(0, len(texts), batch_size):
        ids = tokenizer.tokenize(list(texts[start:start + batch_size]), text_length).to(device)
        feats.append(F.normalize(model.encode_text(ids).float(), dim=-1).cpu())
    return torch.cat(feats)


def list_images(folder: str) -> list[str]:
    """Image files under `folder` (recursive, sorted).

    Raises:
        ToolError: the folder does not exist, is empty, or holds no image files.
    """
    if not os.path.isdir(folder):
        raise ToolError(f"--images folder {folder} does not exist or is not a folder")
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())
    if not files:
        raise ToolError(f"--images folder {folder} is empty")
    images = [f for f in files if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS]
    if not images:
        raise ToolError(f"no images ({', '.join('*.' + e for e in IMAGE_EXTENSIONS)}) found in {folder} "
                        f"({len(files)} other file(s), e.g. {files[0]})")
    return images


def dataset_gallery(name: str, root: str, split: str, annotation: str | None = None) -> tuple[list[str], np.ndarray]:
    """Image paths and pids of a dataset split (`train` lists each training image once)."""
    data = open_dataset(name, root, annotation)
    if split == "train":
        index = data.train
        images, first = np.unique(index.image_ids, return_index=True)
        return [index.image_path(int(i)) for i in images], index.pids[first]
    subset = getattr(data, split, None)
    if subset is None:
        raise ToolError(f"{name} has no {split} split")
    return list(subset.img_paths), np.asarray(subset.image_pids)


# --------------------------------------------------------------------------- gallery cache


def checkpoint_stamp(checkpoint: str) -> dict[str, Any]:
    """The checkpoint's identity: real path, size and mtime (hashing the weights would cost a full read)."""
    stat = os.stat(checkpoint)
    return {"path": os.path.realpath(checkpoint), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_stamps(paths: list[str]) -> np.ndarray:
    """(size, mtime_ns) per gallery image [N, 2]; a tar member counts as its shard; (-1, -1) if missing."""
    seen: dict[str, tuple[int, int]] = {}
    stamps = np.empty((len(paths), 2), dtype=np.int64)
    for i, path in enumerate(paths):
        file = path.split(TAR_SEPARATOR, 1)[0]
        if file not in seen:
            try:
                stat = os.stat(file)
                seen[file] = (stat.st_size, stat.st_mtime_ns)
            except OSError:
                seen[file] = (-1, -1)
        stamps[i] = seen[file]
    return stamps


def _settings(image_size: tuple[int, int], model_cfg: dict) -> dict[str, Any]:
    """What besides the weights changes the features."""
    return {"version": CACHE_VERSION, "image_size": list(image_size), "model": model_cfg}


def _encoded_paths(paths: list[str]) -> bytes:
    # NUL cannot occur in a path, so "ab"+"c" and "a"+"bc" stay distinct.
    return b"\0".join(p.encode("utf-8", "surrogateescape") for p in paths)


def gallery_cache_key(checkpoint: str, paths: list[str], image_size: tuple[int, int], model_cfg: dict,
                      stamps: np.ndarray | None = None) -> str:
    """Hex digest of everything the gallery features depend on.

    The checkpoint (path, size, mtime), the image files (paths, sizes, mtimes;
    `stamps` from :func:`file_stamps`, computed when None), the image size and
    the backbone config.
    """
    header = {"checkpoint": checkpoint_stamp(checkpoint), **_settings(image_size, model_cfg)}
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    digest.update(_encoded_paths(paths))
    digest.update(np.ascontiguousarray(file_stamps(paths) if stamps is None else stamps, dtype="<i8").tobytes())
    return digest.hexdigest()


def _cache_slot(checkpoint: str, paths: list[str], settings: dict[str, Any]) -> str:
    """The cache file's name: the key without the sizes and mtimes, so a stale entry is replaced, not kept."""
    digest = hashlib.sha256(json.dumps([os.path.realpath(checkpoint), settings], sort_keys=True,
                                       default=str).encode())
    digest.update(_encoded_paths(paths))
    return f"gallery-{digest.hexdigest()[:24]}.npz"


def _stale_reason(data: Any, checkpoint: dict[str, Any], settings: dict[str, Any], paths: list[str],
                  stamps: np.ndarray) -> str:
    """Why a cache entry with a different key no longer matches (for the note on stderr)."""
    meta = json.loads(str(data["meta"]))
    if meta.get("checkpoint") != checkpoint:
        return f"the checkpoint {checkpoint['path']} changed since the cache was built"
    if meta.get("settings") != settings:
        return "the image size, backbone config or cache version changed"
    if data["paths"].tolist() != paths:
        return "the gallery file list changed"
    changed = np.flatnonzero((data["stamps"] != stamps).any(axis=1))
    if len(changed):
        return (f"{len(changed)} gallery image(s) changed since the cache was built (size or mtime), "
                f"e.g. {paths[int(changed[0])]}")
    return "its key does not match"


def _plain(value: Any) -> Any:
    """Config sections as plain dicts (for a stable JSON cache key)."""
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def _read_gallery_cache(cache_file: str, key: str, checkpoint: dict[str, Any], settings: dict[str, Any],
                        paths: list[str], stamps: np.ndarray) -> torch.Tensor | None:
    """The cached features when the entry matches `key`; else None, with one stderr line saying why."""
    if not os.path.isfile(cache_file):
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as data:
            if str(data["key"]) == key and data["paths"].tolist() == paths:
                feats = data["feats"].astype(np.float32)
                if feats.shape[0] == len(paths):
                    return torch.from_numpy(feats)
            reason = _stale_reason(data, checkpoint, settings, paths, stamps)
        print(f"note: gallery cache {cache_file} is stale: {reason}; recomputing it", file=sys.stderr)
    except Exception as err:
        # A cache is disposable: whatever is wrong with the file (truncated, torn, not an .npz, odd
        # contents), recomputing the features is the answer, never a crash.
        print(f"warning: gallery cache {cache_file} is unreadable ({type(err).__name__}: {err}); recomputing it",
              file=sys.stderr)
    return None


def gallery_features(model: torch.nn.Module, paths: list[str], *, checkpoint: str, cfg: Config,
                     device: torch.device, cache_dir: str | None,
                     batch_size: int | None = None) -> tuple[torch.Tensor, bool]:
    """Gallery features, from the cache when a matching entry exists; returns (features, from_cache).

    A missing, stale or unreadable cache entry is (re)computed and replaced
    atomically, so a concurrent reader never sees half a file.
    """
    image_size = image_size_of(cfg)
    cache_file = None
    if cache_dir:
        model_cfg = _plain(dict(cfg.model.clip))
        settings, stamps, ckpt = _settings(image_size, model_cfg), file_stamps(paths), checkpoint_stamp(checkpoint)
        key = gallery_cache_key(checkpoint, paths, image_size, model_cfg, stamps)
        cache_file = os.path.join(cache_dir, _cache_slot(checkpoint, paths, settings))
        cached = _read_gallery_cache(cache_file, key, ckpt, settings, paths, stamps)
        if cached is not None:
            return cached, True
    try:
        feats = embed_images(model, paths, image_size=image_size, batch_size=batch_size or cfg.data.test_batch_size,
                             device=device, num_workers=cfg.data.num_workers)
    except ImageReadError as err:
        raise ToolError(str(err)) from err
    if cache_file:
        meta = json.dumps({"checkpoint": ckpt, "settings": settings}, sort_keys=True, default=str)
        entry = {"feats": feats.numpy(), "paths": np.array(paths), "key": np.array(key), "stamps": stamps,
                 "meta": np.array(meta)}
        try:
            atomic_write(cache_file, lambda f: np.savez(f, **entry))
        except OSError as err:
            print(f"warning: could not write gallery cache in {cache_dir}: {err}", file=sys.stderr)
    return feats, False


# --------------------------------------------------------------------------- search


@dataclass
class Hit:
    """One retrieved gallery image."""

    rank: int
    index: int
    path: str
    score: float
    pid: int | None = None


def top_hits(query_feats: torch.Tensor, gallery_feats: torch.Tensor, paths: list[str], topk: int,
             pids: np.ndarray | None = None) -> list[list[Hit]]:
    """Top-k gallery images per query by cosine similarity (ties keep gallery order)."""
    sim = query_feats @ gallery_feats.T
    k = min(topk, sim.shape[1])
    # A stable sort keeps equal scores in gallery order, so results are reproducible.
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return [[Hit(rank=r + 1, index=int(j), path=paths[int(j)], score=float(sim[q, j]),
                 pid=None if pids is None else int(pids[int(j)]))
             for r, j in enumerate(order[q])] for q in range(sim.shape[0])]


def render_grid(queries: list[str], hits: list[list[Hit]], *, thumb_height: int = 160,
                image_size: tuple[int, int] = (384, 128)) -> Image.Image:
    """One row per query: the wrapped query above its top-k thumbnails, rank and score under each."""
    font, small, bold = load_font(15), load_font(13), load_font(16)
    thumb_w = max(24, round(thumb_height * image_size[1] / image_size[0]))
    cell_w = max(thumb_w, text_size(small, "#10 0.000")[0]) + 12
    k = max((len(h) for h in hits), default=1)
    width = max(24 + k * cell_w, 480)
    _, line_h = text_size(font, "Hg")
    blocks = [wrap_text(f'query {i + 1}: "{q}"', bold, width - 24, max_lines=3) for i, q in enumerate(queries)]
    row_h = thumb_height + 2 * line_h + 16
    height = 12 + sum(len(b) * (line_h + 2) + 6 + row_h for b in blocks)
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = 12
    for lines, row in zip(blocks, hits):
        for line in lines:
            draw.text((12, y), line, fill=BLACK, font=bold)
            y += line_h + 2
        y += 6
        for c, hit in enumerate(row):
            x = 12 + c * cell_w
            thumb = image_thumbnail(hit.path, (thumb_w, thumb_height))
            canvas.paste(thumb, (x, y))
            draw.rectangle((x - 1, y - 1, x + thumb_w, y + thumb_height), outline=GREY)
            label = f"#{hit.rank} {hit.score:.3f}"
            draw.text((x, y + thumb_height + 4), label, fill=BLACK, font=small)
            if hit.pid is not None:
                draw.text((x, y + thumb_height + 4 + line_h), f"pid {hit.pid}", fill=GREY, font=small)
        y += row_h
    return canvas


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="retrieval checkpoint (or a plain CLIP file)")
    parser.add_argument("--config", default=None, help="config YAML (default: config.yaml next to the checkpoint)")
    gallery = parser.add_mutually_exclusive_group(required=True)
    gallery.add_argument("--images", default=None, help="folder of gallery images (searched recursively)")
    gallery.add_argument("--dataset", default=None, help="dataset whose split is the gallery, e.g. CUHK-PEDES")
    parser.add_argument("--root", default=None, help="data root of --dataset (default: eval.root or data.root)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="gallery split of --dataset")
    parser.add_argument("--annotation", default=None,
                        help="WebPerson annotation file or shard folder (default: data.annotation)")
    parser.add_argument("--query", action="append", required=True, help="text query (repeat for several)")
    parser.add_argument("--topk", type=int, default=10, help="results per query")
    parser.add_argument("--grid", default=None, help="save a PNG with one row of top-k images per query")
    parser.add_argument("--thumb-height", type=int, default=160, help="thumbnail height in the grid (px)")
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    parser.add_argument("--cache-dir", default=None,
                        help="gallery feature cache folder (default: <checkpoint dir>/gallery_cache)")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the gallery cache")
    parser.add_argument("--trust", action="store_true", help="allow checkpoints that need full unpickling")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. device=cpu")
    return parser.parse_args(argv)


def check_arguments(args: argparse.Namespace) -> list[str]:
    """Refuse bad numbers, empty queries and unwritable outputs before any work; returns the queries.

    Raises:
        ToolError, OutputPathError: naming the flag and its value.
    """
    if args.topk < 1:
        raise ToolError(f"--topk must be >= 1, got {args.topk}")
    check_thumb_height(args.thumb_height)
    queries = [q.strip() for q in args.query]
    for i, query in enumerate(queries):
        if not query:
            raise ToolError(f"--query number {i + 1} is empty")
        if cleans_to_empty(query):
            raise ToolError(f"--query number {i + 1} ({query!r:.60}) has no text once cleaned for the tokenizer "
                            "(HTML entities, control characters and whitespace are dropped); write words")
    for flag, path in (("--json", args.json), ("--grid", args.grid)):
        if path:
            check_output_path(path, flag)
    return queries


def run(args: argparse.Namespace) -> list[list[Hit]]:
    """Search as the parsed arguments say; prints the results and returns them."""
    queries = check_arguments(args)
    if args.images is not None:
        paths, pids = list_images(args.images), None
    cfg, model, device = load_run_model(args.checkpoint, args.config, args.overrides, trust=args.trust)
    if args.dataset is not None:
        root = args.root or cfg.eval.root or cfg.data.root
        annotation = args.annotation or (cfg.data.annotation if cfg.data.name == args.dataset else None)
        paths, pids = dataset_gallery(args.dataset, root, args.split, annotation)
        if not paths:
            raise ToolError(f"{args.dataset} {args.split} split has no images")
    setup_logging(None, console_level=logging.WARNING)
    apply_threads(cfg.num_threads, data_workers=cfg.data.num_workers)
    cache_dir = None if args.no_cache else (
        args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "gallery_cache"))
    start = time.time()
    gallery, cached = gallery_features(model, paths, checkpoint=args.checkpoint, cfg=cfg, device=device,
                                       cache_dir=cache_dir)
    if cached:
        print(f"using cached gallery features ({len(paths)} images) from {cache_dir}")
    else:
        print(f"embedded {len(paths)} gallery images in {time.time() - start:.1f}s"
              + (f" (cached in {cache_dir})" if cache_dir else ""))
    text = embed_texts(model, queries, tokenizer=Tokenizer(), text_length=cfg.data.text_length, device=device)
    hits = top_hits(text, gallery, paths, args.topk, pids)
    for q, (query, row) in enumerate(zip(queries, hits)):
        print(f'\nquery {q + 1}: "{query}"')
        print(f"  {'rank':>4}  {'score':>7}  {'pid':>6}  path")
        for hit in row:
            pid = "-" if hit.pid is None else str(hit.pid)
            print(f"  {hit.rank:>4}  {hit.score:7.4f}  {pid:>6}  {hit.path}")
    if args.json:
        records = [{"query": query, "results": [vars(h) for h in row]} for query, row in zip(queries, hits)]
        try:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(records, indent=1), encoding="utf-8")
        except OSError as err:
            raise ToolError(f"cannot write --json {args.json}: {err.strerror or err}") from err
        print(f"results written to {args.json}")
    if args.grid:
        grid = render_grid(queries, hits, thumb_height=args.thumb_height, image_size=image_size_of(cfg))
        print(f"grid saved to {save_png(grid, args.grid)}")
    return hits


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
