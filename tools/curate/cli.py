"""Command line of the curation pipeline: ``python -m tools.curate <stage> [options]``.

Stages (each resumable; rerun the same command to continue after an interruption)::

    ingest     --out DIR (--pairs FILE.jsonl|.parquet ... | --folder DIR ...)
    filter     --images INGEST_DIR --out DIR [--backend ultralytics --det-weights yolo11x.pt
                                              --pose-weights yolo11x-pose.pt | --backend fake]
    templates  --captions FILE ... --out DIR --llm-url URL --llm-model NAME
    caption    --crops FILTER_DIR (--templates TEMPLATES_DIR | --reviewed FILE) --out DIR
               --vlm-url URL --vlm-model NAME [--vlm-model NAME2]
    export     --captions CAPTION_DIR --out .../WebPerson

See docs/curation.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from tools.curate.store import StageError

logger = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser, records: bool = True, limit: bool = True) -> None:
    parser.add_argument("--out", required=True, help="output folder of this stage")
    if records:
        parser.add_argument("--shard-records", type=int, default=10000, help="records per JSONL shard (10000)")
        parser.add_argument("--fsync", action="store_true", help="fsync every file and record (power-loss safety)")
    if records and limit:
        parser.add_argument("--limit", type=int, default=0, help="process at most N new items (0 = all)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (INFO)")


def _retry_args(parser: argparse.ArgumentParser, timeout: float, retries: int, backoff: float) -> None:
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds per request ({timeout:g})")
    parser.add_argument("--retries", type=int, default=retries,
                        help=f"retries of a request on timeouts, connection errors, 408/429/5xx ({retries})")
    parser.add_argument("--backoff", type=float, default=backoff,
                        help=f"first retry delay in seconds, doubled each retry, plus seeded jitter ({backoff:g})")
    parser.add_argument("--max-backoff", type=float, default=60.0, help="cap of a retry delay in seconds (60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (0)")


def _endpoint_args(parser: argparse.ArgumentParser, prefix: str, what: str, repeat: bool = False) -> None:
    parser.add_argument(f"--{prefix}-url", required=True, action="append" if repeat else "store",
                        help=f"OpenAI-compatible API root of the {what}, e.g. http://localhost:8000/v1"
                        + (" (give twice to match two models)" if repeat else ""))
    parser.add_argument(f"--{prefix}-model", required=True, action="append" if repeat else "store",
                        help=f"model name served by the {what}" + (
                            "; give twice for caption1 / caption2 from two models" if repeat else ""))
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key (OPENAI_API_KEY; unset = no key)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent requests (8)")
    parser.add_argument("--answer-attempts", type=int, default=3,
                        help="asks per item when answers are unusable (empty, refusal, ...) (3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.curate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = sub.add_parser("ingest", help="download pairs / read folders into images/")
    _common(p)
    p.add_argument("--pairs", action="append", default=[], help="pair list: .jsonl or .parquet (repeatable)")
    p.add_argument("--folder", action="append", default=[], help="local image folder (repeatable)")
    p.add_argument("--url-col", default="url", help="URL column of the pair lists (url)")
    p.add_argument("--text-col", default="text", help="text column of the pair lists (text)")
    p.add_argument("--workers", type=int, default=16, help="concurrent downloads (16)")
    p.add_argument("--per-host", type=int, default=4, help="max concurrent requests per host (4)")
    p.add_argument("--host-interval", type=float, default=0.0, help="min seconds between requests to a host (0)")
    p.add_argument("--max-bytes", type=int, default=20_000_000, help="size limit of a download (20 MB)")
    p.add_argument("--min-side", type=int, default=0, help="reject images with a side below this (0)")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="reject larger images (1e8)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="quality when re-encoding non-JPEG images (95)")
    p.add_argument("--user-agent", default="gadms-curate/1.0 (+research data curation)")
    p.add_argument("--retry-failed", action="store_true", help="try failed items of earlier runs again")
    _retry_args(p, timeout=10.0, retries=2, backoff=0.5)

    p = sub.add_parser("filter", help="person detection + pose rules -> crops")
    _common(p)
    p.add_argument("--images", required=True, help="output folder of the ingest stage")
    p.add_argument("--backend", default="ultralytics", help="ultralytics (YOLO11) | fake (tests) (ultralytics)")
    p.add_argument("--det-weights", help="local YOLO11 detection weights, e.g. weights/yolo11x.pt")
    p.add_argument("--pose-weights", help="local YOLO11-pose weights, e.g. weights/yolo11x-pose.pt")
    p.add_argument("--device", default=None, help="cpu, cuda:0, ... (ultralytics default)")
    p.add_argument("--person-class", type=int, default=0, help="class id of person (0, COCO)")
    p.add_argument("--min-conf", type=float, default=0.85, help="keep when confidence > this (0.85)")
    p.add_argument("--min-side", type=float, default=90.0, help="keep when the shorter box side > this px (90)")
    p.add_argument("--min-aspect", type=float, default=2.0, help="min height/width (2 = 1:2)")
    p.add_argument("--max-aspect", type=float, default=4.0, help="max height/width (4 = 1:4)")
    p.add_argument("--min-keypoints", type=int, default=8, help="visible keypoints needed (8)")
    p.add_argument("--min-hips", type=int, default=1, help="visible hips needed, COCO 11-12 (1)")
    p.add_argument("--min-head", type=int, default=2, help="visible head keypoints needed, COCO 0-4 (2)")
    p.add_argument("--kp-threshold", type=float, default=0.5, help="keypoint visible when conf >= this (0.5)")
    p.add_argument("--pad", type=float, default=0.0, help="crop margin as a fraction of the box (0)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="crop JPEG quality (95)")
    p.add_argument("--retry-failed", action="store_true", help="retry unreadable images of earlier runs")

    p = sub.add_parser("templates", help="benchmark captions -> attribute templates (LLM)")
    _common(p, limit=False)
    p.add_argument("--captions", action="append", required=True,
                   help="CUHK-PEDES reid_raw.json / ICFG-PEDES.json / RSTPReid data_captions.json / .txt "
                        "(repeatable)")
    p.add_argument("--split", default="train", help="benchmark split to read, or 'all' (train)")
    p.add_argument("--max-captions", type=int, default=0, help="seeded subset of unique captions (0 = all)")
    _endpoint_args(p, "llm", "template LLM")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0)")
    p.add_argument("--max-tokens", type=int, default=256, help="answer token limit per template (256)")
    p.add_argument("--clusters", type=int, default=50, help="k-means clusters (50)")
    p.add_argument("--seeds-per-cluster", type=int, default=5, help="random members per cluster as seeds (5)")
    p.add_argument("--synth-per-cluster", type=int, default=20, help="new templates asked per cluster (20)")
    p.add_argument("--embedder", default="hash", help="hash (offline) | open_clip (local weights) (hash)")
    p.add_argument("--embed-model", default="ViT-bigG-14",
                   help="OpenCLIP architecture with --embed-weights, or local-dir:FOLDER holding "
                        "open_clip_config.json + weights (ViT-bigG-14)")
    p.add_argument("--embed-weights", help="local OpenCLIP weight file for a named --embed-model")
    p.add_argument("--embed-device", default="cpu", help="device of the OpenCLIP text tower (cpu)")
    p.add_argument("--embed-dim", type=int, default=512, help="dimension of the hash embedder (512)")
    p.add_argument("--stop-words", help="file of words that must not remain outside placeholders")
    p.add_argument("--min-placeholders", type=int, default=2, help="placeholders a template needs (2)")
    p.add_argument("--min-words", type=int, default=5, help="shortest template in words (5)")
    p.add_argument("--max-words", type=int, default=60, help="longest template in words (60)")
    _retry_args(p, timeout=120.0, retries=4, backoff=1.0)

    p = sub.add_parser("caption", help="two VLM captions per crop")
    _common(p)
    p.add_argument("--crops", required=True, help="output folder of the filter stage")
    p.add_argument("--templates", help="output folder of the templates stage (or its templates.jsonl)")
    p.add_argument("--reviewed", help="reviewed template list (edited templates_review.txt); used alone")
    _endpoint_args(p, "vlm", "vision-language model server", repeat=True)
    p.add_argument("--max-words", type=int, default=50, help="word limit of a caption (50)")
    p.add_argument("--min-words", type=int, default=5, help="shortest acceptable caption (5)")
    p.add_argument("--json", action="store_true", help='ask for {"caption": ...} JSON answers')
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature (0.2)")
    p.add_argument("--max-tokens", type=int, default=200, help="answer token limit (200)")
    p.add_argument("--retry-failed", action="store_true", help="retry crops that failed in earlier runs")
    _retry_args(p, timeout=120.0, retries=4, backoff=1.0)

    p = sub.add_parser("export", help="WebPerson JSON / JSONL / tar shards + statistics")
    _common(p, records=False)
    p.add_argument("--captions", required=True, help="output folder of the caption stage")
    p.add_argument("--crops", help="filter stage folder (default: the one the caption stage used)")
    p.add_argument("--formats", default="json,jsonl,tar", help="comma-separated: json, jsonl, tar (all)")
    p.add_argument("--name", default="webperson", help="base name of annotation files and shards (webperson)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard (1000)")
    return parser


def _retry_policy(args: argparse.Namespace) -> Any:
    from tools.curate.net import RetryPolicy

    if args.retries < 0:
        raise StageError(f"--retries must be >= 0, got {args.retries}")
    return RetryPolicy(attempts=args.retries + 1, base_delay=args.backoff, max_delay=args.max_backoff)


def _clients(urls: list[str], models: list[str], args: argparse.Namespace) -> list[Any]:
    from tools.curate.net import ChatClient

    if len(urls) not in (1, len(models)):
        raise StageError(f"give one endpoint URL or one per model ({len(models)}), got {len(urls)}")
    key = os.environ.get(args.api_key_env) or None
    try:
        return [ChatClient(urls[i if len(urls) > 1 else 0], model, key, args.timeout, _retry_policy(args))
                for i, model in enumerate(models)]
    except ValueError as e:
        raise StageError(str(e)) from e


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.stage == "ingest":
        from tools.curate.ingest import IngestSettings, run_ingest

        settings = IngestSettings(workers=args.workers, timeout=args.timeout, retry=_retry_policy(args),
                                  max_bytes=args.max_bytes, max_per_host=args.per_host,
                                  host_interval=args.host_interval, jpeg_quality=args.jpeg_quality,
                                  min_side=args.min_side, max_pixels=args.max_pixels, seed=args.seed,
                                  user_agent=args.user_agent)
        return run_ingest(args.out, args.pairs, args.folder, args.url_col, args.text_col, settings, args.limit,
                          args.retry_failed, args.shard_records, args.fsync)
    if args.stage == "filter":
        from tools.curate.detect import FilterRules, build_backend
        from tools.curate.person_filter import run_filter

        rules = FilterRules(args.person_class, args.min_conf, args.min_side, args.min_aspect, args.max_aspect,
                            args.min_keypoints, args.min_hips, args.min_head, args.kp_threshold)
        detector, pose = build_backend(args.backend, args.det_weights, args.pose_weights, args.device)
        backend = {"name": args.backend}
        if args.backend == "ultralytics":
            backend.update(det_weights=os.path.basename(args.det_weights or ""),
                           pose_weights=os.path.basename(args.pose_weights or ""))
        return run_filter(args.out, args.images, detector, pose, rules, backend, args.jpeg_quality, args.pad,
                          args.limit, args.retry_failed, args.shard_records, args.fsync)
    if args.stage == "templates":
        from tools.curate.embed import build_embedder
        from tools.curate.templates import LLMSettings, TemplateRules, read_stop_words, run_templates
        from tools.curate.text import DEFAULT_STOP_WORDS

        (llm,) = _clients([args.llm_url], [args.llm_model], args)
        stop = read_stop_words(args.stop_words) if args.stop_words else DEFAULT_STOP_WORDS
        rules = TemplateRules(stop, args.min_placeholders, args.min_words, args.max_words)
        settings = LLMSettings(args.temperature, args.max_tokens, args.answer_attempts, args.seed, args.workers)
        embedder = build_embedder(args.embedder, args.embed_dim, args.embed_model, args.embed_weights,
                                  args.embed_device)
        name = args.embedder if args.embedder == "hash" else f"open_clip:{args.embed_model}"
        return run_templates(args.out, args.captions, llm, embedder, name, args.split, args.max_captions or 0,
                             args.clusters, args.seeds_per_cluster, args.synth_per_cluster, rules, settings,
                             args.shard_records, args.fsync)
    if args.stage == "caption":
        from tools.curate.caption import CaptionSettings, run_caption
        from tools.curate.templates import load_templates

        if len(args.vlm_model) > 2:
            raise StageError(f"--vlm-model given {len(args.vlm_model)} times; at most 2 (caption1, caption2)")
        source = args.reviewed or args.templates
        if not source:
            raise StageError("caption needs --templates TEMPLATES_DIR or --reviewed FILE")
        if args.reviewed and args.templates:
            logger.info("--reviewed given: using only %s (ignoring --templates)", args.reviewed)
        templates, reviewed = load_templates(source)
        clients = _clients(args.vlm_url, args.vlm_model, args)
        settings = CaptionSettings(args.max_words, args.min_words, args.json, args.temperature, args.max_tokens,
                                   args.answer_attempts, args.seed, args.workers)
        return run_caption(args.out, args.crops, templates, clients, source, reviewed, settings, args.limit,
                           args.retry_failed, args.shard_records, args.fsync)
    from tools.curate.export import run_export

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    return run_export(args.out, args.captions, args.crops, formats, args.name, args.shard_size)


def main(argv: list[str] | None = None, configure_logging: bool = False) -> int:
    """Run one stage; return the exit code (0 ok, 2 usage or input error).

    Args:
        argv: command line (default: ``sys.argv[1:]``).
        configure_logging: set up root logging at ``--log-level`` (the console entry points do;
            library callers keep their own logging setup).
    """
    args = build_parser().parse_args(argv)
    if configure_logging:
        logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        stats = _run(args)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.stage == "export":
        from tools.curate.export import format_stats

        print(format_stats(stats))
        print(f"statistics: {os.path.join(os.path.abspath(args.out), 'stats.json')}")
    else:
        print(json.dumps(stats, indent=2, sort_keys=True))
    return 0
