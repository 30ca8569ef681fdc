"""Fine-tuning task (IRRA recipe on a benchmark), starting from pretrained weights."""

from __future__ import annotations

import logging

import torch

from model import build_model
from model.clip import backbone_state_dict, build_clip_from_config, is_torchscript_archive, load_clip_state_dict
from model.weights import load_model_weights, unwrap_state_dict
from processor.pretrain import GassTask
from utils.checkpoint import read_checkpoint
from utils.config import Config

logger = logging.getLogger(__name__)

__all__ = ["FinetuneTask"]


class FinetuneTask(GassTask):
    """`sdm+id+mlm` with plain random MLM masking; the ID classifier is the only new module.

    `model.finetune` names the starting checkpoint: a full retrieval checkpoint (ours,
    the GA-DMS authors' or IRRA's; pretraining or fine-tuning) gives every weight, the
    backbone included, so `model.clip.pretrained` is not read; a plain CLIP file (e.g.
    OpenAI's ViT-B-16.pt: IRRA's own starting point) gives the backbone only.
    A config that turns GASS scoring or score-driven masks on gets the pretraining's
    score cache (`processor.pretrain.GassTask`); the IRRA recipe has neither.
    """

    name = "finetune"

    def build_model(self, cfg: Config, num_classes: int) -> torch.nn.Module:
        path = cfg.model.finetune
        if not path:
            logger.warning("model.finetune is empty: fine-tuning from model.clip.pretrained only "
                           "(no GA-DMS pretraining)")
            return build_model(cfg, num_classes=num_classes)
        if is_torchscript_archive(path):
            state, clip_state = {}, load_clip_state_dict(path)
        else:
            state = unwrap_state_dict(read_checkpoint(path, trust=cfg.train.trust_checkpoints), source=path)
            clip_state = backbone_state_dict(state, source=path)
        backbone = build_clip_from_config(cfg.model.clip, clip_state, source=path)
        model = build_model(cfg, num_classes=num_classes, backbone=backbone)
        if not any(k.startswith("base_model.") for k in state):
            logger.info("fine-tuning from the CLIP weights of %s: backbone from that file; the cross-modal "
                        "MLM branch and the ID classifier start from random weights", path)
            return model
        # Every module but the ID classifier must come from the checkpoint (the
        # classifier may be absent, or sized for another dataset's identities).
        report = load_model_weights(model, state, allowed_missing=("classifier.",), source=path)
        fresh = "the ID classifier starts from random weights" if report.missing else "the ID classifier too"
        logger.info("initialised from %s: backbone from that checkpoint (model.clip.pretrained=%r is not read), "
                    "cross-modal heads from it, %s (%s)", path, cfg.model.clip.pretrained, fresh, report.summary())
        return model
