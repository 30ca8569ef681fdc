"""Loading any checkpoint (and the data it is shown on) for evaluation, search and figures."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from PIL import Image

from datasets import TextReIDDataset, build_dataset
from datasets.bases import ImageReadError, open_image
from model.build import GADMS
from model.clip import build_clip
from utils.config import Config, ConfigError, load_config
from utils.device import resolve_device
from utils.errors import UserInputError
from utils.visualize import GREY, RGB, fit_thumbnail

logger = logging.getLogger(__name__)

__all__ = ["InferenceInputError", "image_size_of", "image_thumbnail", "load_for_evaluation", "load_run_model", "open_dataset",
           "resolve_config_path"]


class InferenceInputError(UserInputError):
    """A checkpoint, config or dataset that cannot be opened for inference (missing, unreadable, not fitting)."""


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


def resolve_config_path(checkpoint: str, config: str | None) -> str:
    """`config`, or the `config.yaml` beside the checkpoint (a run directory's layout).

    Raises:
        InferenceInputError: `config` is not a file, or none is given and the checkpoint has none beside it.
    """
    if config:
        if not os.path.isfile(config):
            raise InferenceInputError(f"config file {config} not found")
        return config
    candidate = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "config.yaml")
    if not os.path.isfile(candidate):
        raise InferenceInputError(f"no config.yaml next to checkpoint {checkpoint}; pass --config "
                                  "<run dir>/config.yaml (or the experiment YAML the checkpoint was trained with)")
    return candidate


def load_run_model(checkpoint: str, config: str | None, overrides: list[str] | None = None, *,
                   trust: bool = False) -> tuple[Config, torch.nn.Module, torch.device]:
    """Config, evaluation-mode model holding the checkpoint's weights, and the device it sits on.

    The config is `config`, else the `config.yaml` beside the checkpoint, with `overrides`.

    Raises:
        InferenceInputError: the checkpoint or config is missing, or the weights do not fit the config.
    """
    if not os.path.isfile(checkpoint):
        raise InferenceInputError(f"checkpoint {checkpoint} not found")
    config_path = resolve_config_path(checkpoint, config)
    try:
        # An empty model.clip.pretrained keeps build_model from loading OpenAI weights that the
        # checkpoint overwrites anyway.
        cfg = load_config(config_path, list(overrides or []) + ["model.clip.pretrained="])
    except ConfigError as err:
        raise InferenceInputError(str(err)) from err
    try:
        model = load_for_evaluation(cfg, checkpoint, trust=trust)
    except (KeyError, ValueError, RuntimeError, OSError) as err:
        raise InferenceInputError(f"cannot load checkpoint {checkpoint} with config {config_path}: {err}") from err
    device = resolve_device(cfg.device)
    return cfg, model.to(device).eval(), device


def image_size_of(cfg: Config) -> tuple[int, int]:
    """Model input (height, width) from the config."""
    return int(cfg.model.clip.image_size[0]), int(cfg.model.clip.image_size[1])


def open_dataset(name: str, root: str, annotation: str | None = None) -> TextReIDDataset:
    """`build_dataset`, passing the WebPerson annotation choice.

    Raises:
        InferenceInputError: the dataset cannot be read (unknown name, missing or bad annotation).
    """
    try:
        if name == "WebPerson":
            return build_dataset(name, root, annotation=annotation or None)
        return build_dataset(name, root)
    except (ValueError, OSError) as err:
        raise InferenceInputError(str(err)) from err


def image_thumbnail(path: str | os.PathLike, size: tuple[int, int], missing: RGB = GREY) -> Image.Image:
    """The image at `path` fitted into `size` (width, height) for a figure; a plain `missing`-coloured
    tile when it cannot be read (a figure shows the gap instead of failing)."""
    try:
        return fit_thumbnail(open_image(path), size)
    except ImageReadError:
        return Image.new("RGB", size, missing)
