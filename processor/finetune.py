"""Fine-tuning task (IRRA recipe on a benchmark), starting from pretrained weights."""

from __future__ import annotations

import logging

import torch

from model.weights import load_pretrained
from processor.engine import Task, Trainer

logger = logging.getLogger(__name__)

__all__ = ["FinetuneTask"]


class FinetuneTask(Task):
    """`sdm+id+mlm` with plain random MLM masking; the ID classifier is the only new module."""

    name = "finetune"

    def init_model(self, trainer: Trainer, model: torch.nn.Module) -> None:
        path = trainer.cfg.model.finetune
        if not path:
            logger.warning("model.finetune is empty: fine-tuning from model.clip.pretrained only "
                           "(no GA-DMS pretraining)")
            return
        # Only the ID classifier may be missing (or differ in shape): every other
        # module, the MLM branch included, must come from the checkpoint.
        report = load_pretrained(model, path, allowed_missing=("classifier.",),
                                 trust=trainer.cfg.train.trust_checkpoints)
        logger.info("initialised from %s (%s)", path, report.summary())
