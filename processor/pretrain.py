"""Pretraining task (GA-DMS on WebPerson): the score cache learns from every step.

After each optimisation step the batch's GASS scores overwrite the cache rows of
its captions (on every rank: the update is a collective that gathers all ranks'
rows, so no update is lost). Masks drawn by the data workers read the cache as
`gass.refresh` says (epoch snapshot, or the latest rows).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from processor.engine import Task, Trainer
from utils.config import Config

__all__ = ["PretrainTask"]


class PretrainTask(Task):
    """GA-DMS pretraining: SDM on noise-masked captions + informative MLM, GASS every step."""

    name = "pretrain"

    def build_model(self, cfg: Config, num_classes: int) -> torch.nn.Module:
        # The backbone comes from model.clip.pretrained (OpenAI CLIP); the heads start fresh.
        if cfg.model.finetune:
            raise ValueError("model.finetune is set in a pretraining config; use task=finetune "
                             "(or clear model.finetune) — pretraining starts from model.clip.pretrained")
        return super().build_model(cfg, num_classes)

    def after_step(self, trainer: Trainer, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> None:
        if trainer.score_cache is not None and "gass_scores" in out:
            trainer.score_cache.update(batch["index"], out["gass_scores"])
