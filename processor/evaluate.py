"""Evaluation: feature extraction per test set and bounded-memory ranking (docs/method.md §8).

One `Evaluator` loops over the configured test sets (no copy per dataset).
Under DDP every rank embeds a strided shard of each set; features travel with
their pids to rank 0, which ranks them in query chunks (`utils.metrics`), so a
large gallery never needs a full query x gallery sort.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from datasets import build_dataset
from datasets.bases import EvalSplit
from datasets.build import ImageDataset, TextDataset
from datasets.transforms import build_transforms
from model.tokenizer import Tokenizer
from utils import comm
from utils.device import autocast_dtype, dtype_autocast, unwrap_model
from utils.errors import UserInputError
from utils.metrics import format_table, rank_metrics_from_features

logger = logging.getLogger(__name__)

__all__ = ["Evaluator", "NothingToEvaluateError", "build_evaluator", "eval_splits"]


class Evaluator:
    """Text-to-image (and optionally image-to-text) retrieval metrics on several test sets.

    Args:
        splits: Test-set name -> split (image gallery + caption queries).
        image_size: Model input (H, W).
        tokenizer: CLIP tokenizer.
        text_length: Context length.
        batch_size: Images or captions embedded at a time.
        num_workers: DataLoader workers.
        device: Where the model runs.
        amp_dtype: Autocast dtype on CUDA (None = float32).
        i2t: Also report image-to-text.
        chunk_size: Queries ranked at a time.
    """

    def __init__(self, splits: Mapping[str, EvalSplit], *, image_size: tuple[int, int], tokenizer: Tokenizer,
                 text_length: int = 77, batch_size: int = 512, num_workers: int = 0,
                 device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
                 i2t: bool = False, chunk_size: int = 1024) -> None:
        self.splits = dict(splits)
        self.transform = build_transforms(tuple(image_size), is_train=False)
        self.tokenizer = tokenizer
        self.text_length = text_length
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.i2t = i2t
        self.chunk_size = chunk_size

    def _loader(self, dataset: Any) -> DataLoader:
        rank, world = comm.get_rank(), comm.get_world_size()
        shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
        return DataLoader(shard, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return dtype_autocast(self.device, self.amp_dtype)

    @torch.inference_mode()
    def _embed(self, loader: DataLoader, encode: Any, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        pids = [torch.zeros(0, dtype=torch.long, device=self.device)]
        feats = [torch.zeros(0, dim, device=self.device)]  # a rank may get an empty shard
        for batch_pids, inputs in loader:
            with self._autocast():
                out = encode(inputs.to(self.device, non_blocking=True))
            feats.append(F.normalize(out.float(), dim=-1))
            pids.append(batch_pids.to(self.device))
        return torch.cat(pids), torch.cat(feats)

    def extract(self, model: nn.Module, split: EvalSplit) -> dict[str, torch.Tensor]:
        """Normalised features and pids of a split's captions and images (gathered to every rank)."""
        core = unwrap_model(model)
        text_pids, text_feats = self._embed(
            self._loader(TextDataset(split.captions, split.caption_pids, self.tokenizer, self.text_length)),
            core.encode_text, core.embed_dim)
        image_pids, image_feats = self._embed(
            self._loader(ImageDataset(split.img_paths, split.image_pids, self.transform)), core.encode_image,
            core.embed_dim)
        if comm.get_world_size() > 1:
            text_pids, text_feats = comm.all_gather_tensor(text_pids), comm.all_gather_tensor(text_feats)
            image_pids, image_feats = comm.all_gather_tensor(image_pids), comm.all_gather_tensor(image_feats)
        return {"text_pids": text_pids, "text_feats": text_feats,
                "image_pids": image_pids, "image_feats": image_feats}

    def rank(self, feats: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
        """Metrics of extracted features: {'t2i': {...}} and, if enabled, {'i2t': {...}}."""
        out = {"t2i": rank_metrics_from_features(feats["text_feats"], feats["image_feats"], feats["text_pids"],
                                                 feats["image_pids"], chunk_size=self.chunk_size)}
        if self.i2t:
            out["i2t"] = rank_metrics_from_features(feats["image_feats"], feats["text_feats"], feats["image_pids"],
                                                    feats["text_pids"], chunk_size=self.chunk_size)
        return out

    def evaluate(self, model: nn.Module, names: Iterable[str] | None = None) -> dict[str, dict[str, dict]]:
        """Evaluate `model` on the named (default: all) test sets.

        Returns:
            {test set: {"t2i": metrics, ["i2t": metrics]}} on rank 0; {} elsewhere.
        """
        was_training = model.training
        model.eval()
        results: dict[str, dict[str, dict]] = {}
        try:
            for name in names or list(self.splits):
                start = time.time()
                feats = self.extract(model, self.splits[name])
                if comm.is_main_process():
                    results[name] = self.rank(feats)
                    logger.info("%s evaluated in %.1fs (%d queries, %d gallery images)\n%s", name,
                                time.time() - start, len(feats["text_pids"]), len(feats["image_pids"]),
                                format_table({f"{name} {task}": m for task, m in results[name].items()}))
        finally:
            model.train(was_training)
        comm.synchronize()
        return results


def build_evaluator(cfg: Any, splits: Mapping[str, EvalSplit], device: torch.device | str,
                    tokenizer: Tokenizer | None = None) -> Evaluator:
    """An Evaluator over `splits` with the config's sizes, batch and precision."""
    return Evaluator(splits, image_size=tuple(cfg.model.clip.image_size), tokenizer=tokenizer or Tokenizer(),
                     text_length=cfg.data.text_length, batch_size=cfg.data.test_batch_size,
                     num_workers=cfg.data.num_workers, device=device, amp_dtype=autocast_dtype(cfg.precision),
                     i2t=cfg.eval.i2t, chunk_size=cfg.eval.chunk_size)


class NothingToEvaluateError(UserInputError, ValueError):
    """No benchmark of `eval.datasets` has the split asked for (or the list is empty)."""


def eval_splits(cfg: Any, split_name: str) -> dict[str, EvalSplit]:
    """The `split_name` split ("test" or "val") of every benchmark in `eval.datasets`, read from
    `eval.root` (else `data.root`); a benchmark without that split is skipped with a warning.

    Raises:
        NothingToEvaluateError: `eval.datasets` is empty, or none of its benchmarks has the split.
    """
    root = cfg.eval.root or cfg.data.root
    splits, lacking = {}, []
    for name in cfg.eval.datasets:
        dataset = build_dataset(name, root)
        split = getattr(dataset, split_name, None)
        if split is None:
            has = [s for s in ("val", "test") if getattr(dataset, s, None) is not None]
            lacking.append(f"{name} has no {split_name} split (it has: {', '.join(has) or 'no evaluation split'})")
            logger.warning("%s; skipped", lacking[-1])
            continue
        splits[name] = split
    if not splits:
        if not lacking:
            raise NothingToEvaluateError("nothing to evaluate: eval.datasets is empty; list the benchmarks to "
                                         "evaluate, e.g. eval.datasets=[CUHK-PEDES]")
        raise NothingToEvaluateError(f"nothing to evaluate: {'; '.join(lacking)}; choose another --split or "
                                     "eval.datasets")
    return splits
