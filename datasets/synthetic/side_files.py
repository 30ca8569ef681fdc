"""Side files of a synthetic corpus: meta.json, attributes.json, noise_report.json, README.txt.

They record how the corpus was made (generator version, settings, counts), the true
attributes behind every image, and which captions were corrupted and how: the ground
truth against which GASS scores are checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets.synthetic.config import BENCHMARK_DIR, GENERATOR_VERSION, WEBPERSON_DIR, SyntheticConfig
from datasets.synthetic.corpora import BenchmarkPlan, WebPersonPlan
from datasets.synthetic.writers import _dump_json, _write_text


def corpus_counts(cfg: SyntheticConfig, bench: BenchmarkPlan, web: WebPersonPlan, shards: int) -> dict[str, Any]:
    """Ids, images, captions and noisy captions per benchmark split, and WebPerson's (with ``shards``)."""

    def split_counts(split: str) -> dict[str, int]:
        recs = [r for r in bench.records if r["split"] == split]
        return {
            "ids": len({r["id"] for r in recs}),
            "images": len(recs),
            "captions": sum(len(r["captions"]) for r in recs),
            "noisy_captions": sum(1 for e in bench.noise.values() if e["split"] == split),
        }

    return {
        "benchmark": {split: split_counts(split) for split in ("train", "val", "test")},
        "webperson": {
            "images": cfg.webperson_images,
            "captions": 2 * cfg.webperson_images,
            "noisy_captions": len(web.noise),
            "shards": shards,
        },
    }


def _meta(cfg: SyntheticConfig, counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION,
        "config": cfg.to_dict(),
        "counts": counts,
        "files": {
            "benchmark": f"{BENCHMARK_DIR}/reid_raw.json",
            "webperson": [
                f"{WEBPERSON_DIR}/annotations.json",
                f"{WEBPERSON_DIR}/annotations.jsonl",
                f"{WEBPERSON_DIR}/shards/",
            ],
            "attributes": "attributes.json",
            "noise_report": "noise_report.json",
        },
    }


def write_side_files(out: Path, cfg: SyntheticConfig, counts: dict[str, Any], bench: BenchmarkPlan,
                     web: WebPersonPlan) -> None:
    """Write meta.json, attributes.json, noise_report.json and README.txt under ``out``."""
    _write_text(out / "meta.json", _dump_json(_meta(cfg, counts), indent=2, sort_keys=True))
    attributes = {"benchmark": bench.attributes, "webperson": web.attributes}
    _write_text(out / "attributes.json", _dump_json(attributes, indent=1))
    noise_doc = {
        "description": (
            "keys are flat caption indices 2 * record + caption (0-based) in the order of "
            "reid_raw.json / annotations.json; 'words' are the inserted or changed tokens"
        ),
        "benchmark": bench.noise,
        "webperson": web.noise,
    }
    _write_text(out / "noise_report.json", _dump_json(noise_doc, indent=1))
    _write_text(out / "README.txt", _readme(cfg, counts))


def _readme(cfg: SyntheticConfig, counts: dict[str, Any]) -> str:
    b = counts["benchmark"]
    w = counts["webperson"]
    lines = [
        "Synthetic text-based person retrieval data (GA-DMS framework)",
        f"generator: {GENERATOR_VERSION}",
        "",
        "CUHK-PEDES/   benchmark in CUHK-PEDES format: imgs/<file_path>, reid_raw.json",
        "WebPerson/    pretraining corpus: images/, annotations.json (list of {path: {caption1, caption2}}),",
        "              annotations.jsonl (same, one object per line), shards/*.tar (webdataset <key>.jpg + <key>.json)",
        "attributes.json    true attributes per benchmark id / WebPerson image",
        "noise_report.json  corrupted captions: kind, clean text, inserted/changed words",
        "",
    ]
    for split in ("train", "val", "test"):
        s = b[split]
        lines.append(
            f"benchmark {split:5s}: {s['ids']} ids, {s['images']} images, {s['captions']} captions, "
            f"{s['noisy_captions']} noisy"
        )
    lines.append(
        f"webperson: {w['images']} images, {w['captions']} captions, {w['noisy_captions']} noisy, {w['shards']} shards"
    )
    lines.append("")
    lines.append("parameters:")
    for key, value in sorted(cfg.to_dict().items()):
        lines.append(f"  {key} = {value}")
    return "\n".join(lines) + "\n"
