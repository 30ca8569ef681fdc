"""Orchestration of :func:`generate`: claim, plan, render, write.

Claims the output folder, plans both corpora, renders their images, then writes the
annotation files and the side files.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from datasets.synthetic.attributes import sample_identities
from datasets.synthetic.config import BENCHMARK_DIR, GENERATOR_VERSION, WEBPERSON_DIR, SyntheticConfig
from datasets.synthetic.corpora import BenchmarkPlan, WebPersonPlan, plan_benchmark, plan_webperson
from datasets.synthetic.folders import MARKER, OutputExistsError, check_claimable, claim_folder
from datasets.synthetic.side_files import corpus_counts, write_side_files
from datasets.synthetic.writers import _dump_json, _run_jobs, _write_text, write_shards

logger = logging.getLogger(__name__)


def _prepare_out(out: Path, cfg: SyntheticConfig, overwrite: bool) -> None:
    check_claimable(out)
    existing = [p for p in (out / BENCHMARK_DIR, out / WEBPERSON_DIR) if p.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"synthetic output already exists: {', '.join(map(str, existing))} (pass overwrite=True / --overwrite)"
        )
    # Marked before anything is written: an interrupted run leaves a folder a rerun may replace.
    claim_folder(out, MARKER, {"generator": GENERATOR_VERSION, "config": cfg.to_dict()},
                 "the synthetic data generator")
    for p in existing:
        shutil.rmtree(p)


def generate(
    out_dir: str | os.PathLike[str], config: SyntheticConfig | None = None, workers: int = 1, overwrite: bool = False
) -> dict[str, Any]:
    """Write the synthetic benchmark and pretraining corpus under ``out_dir``.

    Args:
        out_dir: output root; gets ``CUHK-PEDES/``, ``WebPerson/`` and side files.
        config: sizes, rates and seed (defaults when None).
        workers: rendering processes (does not affect any output byte).
        overwrite: replace the ``CUHK-PEDES/`` and ``WebPerson/`` folders of an earlier run.

    ``out_dir`` must be new, empty, or made by an earlier call (it holds :data:`MARKER`,
    written first): a folder of other files is never written into or cleared.

    Returns:
        The counts also written to ``meta.json``.

    Raises:
        OutputExistsError: ``out_dir`` holds files this generator did not make, or
            an earlier corpus and ``overwrite`` is False.
    """
    cfg = config or SyntheticConfig()
    out = Path(out_dir)
    _prepare_out(out, cfg, overwrite)
    n_bench = cfg.identities + cfg.val_ids + cfg.test_ids
    people = sample_identities(n_bench + cfg.webperson_images, cfg.seed)
    bench = plan_benchmark(cfg, people[:n_bench], out / BENCHMARK_DIR)
    web = plan_webperson(cfg, people[n_bench:], out / WEBPERSON_DIR)
    jobs = bench.jobs + web.jobs
    logger.info("rendering %d images with %d worker(s)", len(jobs), workers)
    _run_jobs(jobs, workers)
    shards = _write_annotations(out, bench, web, cfg.shard_size)
    counts = corpus_counts(cfg, bench, web, len(shards))
    write_side_files(out, cfg, counts, bench, web)
    return counts


def _write_annotations(out: Path, bench: BenchmarkPlan, web: WebPersonPlan, shard_size: int) -> list[Path]:
    """reid_raw.json, WebPerson's annotations.json / .jsonl and its tar shards; returns the shards."""
    _write_text(out / BENCHMARK_DIR / "reid_raw.json", _dump_json(bench.records))
    web_root = out / WEBPERSON_DIR
    web_root.mkdir(parents=True, exist_ok=True)
    _write_text(web_root / "annotations.json", _dump_json(web.entries))
    _write_text(web_root / "annotations.jsonl", "".join(_dump_json(e) for e in web.entries))
    return write_shards(web.shard_samples, web_root / "shards", shard_size)
