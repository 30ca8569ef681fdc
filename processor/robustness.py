"""Retrieval under noisy queries: the library side of tools/robustness.py (and of tools/ablate.py).

A benchmark split's captions are corrupted with `datasets.text_noise` (kind and rate,
deterministic per seed); the gallery is embedded once per model and never touched; the
clean queries are always ranked too (noise ``none``, rate 0: what tools/test.py reports).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from datasets import EvalSplit
from datasets.text_noise import NoisyCaption, corrupt_captions
from processor.evaluate import build_evaluator, eval_splits
from processor.inference import load_for_evaluation
from utils.device import resolve_device
from utils.metrics import TABLE_COLUMNS

__all__ = ["CLEAN", "evaluate_under_noise", "noisy_queries", "noisy_retrieval"]

#: The `noise` of the clean queries.
CLEAN = "none"


def noisy_queries(splits: Mapping[str, EvalSplit], kinds: Sequence[str], rates: Sequence[float], seed: int,
                  vocabulary: Any) -> dict[str, dict[tuple[str, float], list[NoisyCaption]]]:
    """{dataset: {(kind, rate): corrupted captions}} for every rate above 0; the same for every model."""
    return {name: {(kind, rate): corrupt_captions(split.captions, kind, rate, seed=seed, vocabulary=vocabulary)
                   for kind in kinds for rate in rates if rate > 0}
            for name, split in splits.items()}


def evaluate_under_noise(model: torch.nn.Module, evaluator: Any, split: EvalSplit,
                         queries: Mapping[tuple[str, float], Sequence[NoisyCaption]]) -> list[dict[str, Any]]:
    """Metrics of the clean queries and of every corrupted set, the gallery embedded once.

    Returns:
        One row per (noise, rate, task): {"noise", "rate", "task", "changed", R1 ... mINP};
        the clean queries first (noise ``none``, rate 0).
    """
    clean = evaluator.extract(model, split)
    conditions: list[tuple[str, float, float, dict[str, dict]]] = [(CLEAN, 0.0, 0.0, evaluator.rank(clean))]
    for (kind, rate), noisy in queries.items():
        # A split without images: only the queries are embedded; the gallery features are the clean pass's.
        texts = EvalSplit(img_paths=[], image_pids=[], captions=[q.text for q in noisy],
                          caption_pids=split.caption_pids)
        feats = evaluator.extract(model, texts)
        merged = {**clean, "text_pids": feats["text_pids"], "text_feats": feats["text_feats"]}
        changed = sum(q.changed for q in noisy) / max(1, sum(q.words for q in noisy))
        conditions.append((kind, rate, changed, evaluator.rank(merged)))
    return [{"noise": noise, "rate": rate, "task": task, "changed": changed,
             **{k: float(m[k]) for k in TABLE_COLUMNS}}
            for noise, rate, changed, tasks in conditions for task, m in tasks.items()]


def noisy_retrieval(cfg: Any, checkpoint: str, kind: str, rate: float, *, seed: int = 0, split: str = "test",
                    vocabulary: Any = None) -> dict[str, list[dict[str, Any]]]:
    """{benchmark: rows of `evaluate_under_noise`} for one checkpoint and one (kind, rate) of query noise.

    The benchmarks are `cfg.eval.datasets` (their `split`); the model is the checkpoint's
    backbone (`processor.inference.load_for_evaluation`); `vocabulary` defaults to the
    repository's word list (`datasets.text_noise.load_vocabulary`).
    """
    splits = eval_splits(cfg, split)
    queries = {name: {(kind, rate): corrupt_captions(s.captions, kind, rate, seed=seed, vocabulary=vocabulary)}
               for name, s in splits.items()}
    device = resolve_device(cfg.device)
    evaluator = build_evaluator(cfg, splits, device)
    model = load_for_evaluation(cfg, checkpoint).to(device).eval()
    with torch.inference_mode():
        return {name: evaluate_under_noise(model, evaluator, s, queries[name]) for name, s in splits.items()}
