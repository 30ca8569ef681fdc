"""Loading any checkpoint for evaluation, search and figures."""

from __future__ import annotations

import logging
import os
from typing import Any

from model.build import GADMS
from model.clip import build_clip

logger = logging.getLogger(__name__)

__all__ = ["load_for_evaluation"]


def load_for_evaluation(cfg: Any, path: str | os.PathLike, *, trust: bool = False) -> GADMS:
    """A retrieval model holding the backbone of the checkpoint at `path`.

    Evaluation needs image and text features only, so only the backbone is built:
    never the MLM branch or an ID classifier sized from the config. Any checkpoint
    therefore evaluates with any config: ours, the GA-DMS authors' or IRRA's (pretraining
    or fine-tuning; wrapped, with DDP's ``module.`` prefix, fp16), or a plain OpenAI
    CLIP file (zero-shot CLIP, the "none" row of the direct-transfer table). The
    architecture comes from the checkpoint; the input size and stride from
    ``model.clip``; the backbone must fit exactly.

    Args:
        cfg: The full config (reads ``model.clip.image_size``, ``stride_size``,
            ``model.temperature`` and ``gass.*``).
        path: The checkpoint file.
        trust: Allow files that need full unpickling.
    """
    path = os.fspath(path)
    backbone = build_clip(path, image_size=tuple(int(v) for v in cfg.model.clip.image_size),
                          stride_size=int(cfg.model.clip.stride_size), trust=trust)
    logger.info("evaluating the backbone of %s (heads and classifier are not used for retrieval)", path)
    # Token scoring (figures, search) follows the config's GASS settings.
    return GADMS(backbone, loss_names=[], temperature=cfg.model.temperature, gass_layers=cfg.gass.num_layers,
                 gass_scales=tuple(cfg.gass.scales), gass_attn_norm=cfg.gass.attn_norm,
                 gass_normalize=cfg.gass.normalize, scoring=cfg.gass.scoring)
