"""The pretrained tiny CLIP backbone: OpenAI CLIP's own contrastive recipe on a generic synthetic corpus.

GA-DMS starts from OpenAI's pretrained ViT-B/16, whose image-text alignment is what
GASS reads; the demo's tiny model has no such starting point unless one is made.
:func:`make_backbone` makes it: symmetric InfoNCE with a learned temperature
(logit_scale initialised to ln(1/0.07) and clamped at ln(100)) on
`datasets.synthetic.generic_corpus` (its own identities, none of them within one
attribute of a benchmark or WebPerson identity of the data to leave out), written as an
OpenAI-keyed state dict with `logit_scale`, so `model.clip.pretrained=<file>` loads it
exactly as it loads ViT-B-16.pt. Files are cached by the hash of their settings; writes
are atomic and concurrent makers wait on a lock instead of training twice.
:func:`zero_shot` and :func:`backbone_noise_auc` evaluate a backbone file on the
synthetic benchmark. Used by tools/pretrain_backbone.py, tools/demo.py and tools/ablate.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datasets import build_dataset
from datasets.synthetic import PersonAttributes, generic_corpus
from datasets.transforms import build_transforms
from model.clip import CLIP, clip_preset
from model.objectives import itc_loss
from model.tokenizer import Tokenizer
from processor.evaluate import build_evaluator
from processor.inference import load_for_evaluation
from processor.noise_detection import clean_preference, noise_detection_auc, summarize_aucs
from utils.checkpoint import atomic_save, atomic_write
from utils.config import Config, load_config
from utils.errors import UserInputError
from utils.output_paths import check_output_path

logger = logging.getLogger(__name__)

__all__ = ["BackboneError", "BackboneSettings", "CONFIG", "DEFAULT_CACHE", "RECIPE_VERSION", "backbone_noise_auc",
           "corpus_tensors", "eval_config", "excluded_digest", "excluded_identities", "make_backbone",
           "openai_state_dict", "settings_for", "train_backbone", "zero_shot"]

#: The GA-DMS config the backbone is made for (image size, text length) and evaluated with.
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo" / "tiny_pretrain.yaml"
DEFAULT_CACHE = Path("~/.cache/gadms/backbones")
#: Bumped whenever the recipe or the corpus changes what a given set of settings produces.
RECIPE_VERSION = 2
#: OpenAI CLIP's initial temperature 0.07 and its cap: logit_scale = ln(1 / T) <= ln(100).
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


class BackboneError(UserInputError, ValueError):
    """Settings or data the backbone cannot be made from (unreadable identities, bad batch size or epochs)."""


@dataclass(frozen=True)
class BackboneSettings:
    """Everything that decides the backbone's weights (hashed into its file name).

    Attributes:
        arch: CLIP preset (`model.clip.arch`).
        image_size: model input (H, W); the positional grid is trained at this size.
        render_size: size the generic images are drawn at before the resize to
            `image_size` (the synthetic benchmark's images are drawn at 128 x 64 too).
        images: generic identities, one image each.
        captions_per_image: clean captions per image (one is drawn per epoch).
        epochs: passes over the images.
        batch_size: image-text pairs per step (the negatives of InfoNCE).
        lr: peak learning rate (AdamW, linear warm-up then cosine to 0).
        weight_decay: AdamW decay of matrices (not of gains, biases, embeddings, temperature).
        warmup_steps: linear warm-up steps.
        seed: corpus and training seed.
        text_length: token context (`data.text_length`).
        threads: torch CPU threads while training: the float reductions, and so the weights,
            depend on it (1 and 2 threads end at zero-shot R1 39.0 and 25.5 on the demo's data).
        excluded: SHA-256 of the identities left out of the corpus ("" = none).
        version: :data:`RECIPE_VERSION`.
    """

    arch: str = "tiny"
    image_size: tuple[int, int] = (64, 32)
    render_size: tuple[int, int] = (128, 64)
    images: int = 4096
    captions_per_image: int = 3
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    seed: int = 0
    text_length: int = 77
    threads: int = 1
    excluded: str = ""
    version: int = RECIPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_size"], out["render_size"] = list(self.image_size), list(self.render_size)
        return out

    def digest(self) -> str:
        """First 16 hex digits of the SHA-256 of the settings."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def file_name(self) -> str:
        return f"clip-{self.arch}-{self.digest()}.pt"


# --------------------------------------------------------------------------- the corpus and the recipe


def excluded_identities(data: str | os.PathLike | None) -> list[tuple[str | None, ...]]:
    """Described-attribute keys of every benchmark and WebPerson identity of a synthetic root (sorted).

    A root without `attributes.json` (real data) excludes nothing.
    """
    if data is None:
        return []
    path = Path(data) / "attributes.json"
    if not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        people = [PersonAttributes.from_dict(a) for section in ("benchmark", "webperson")
                  for a in (doc.get(section) or {}).values()]
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise BackboneError(f"cannot read the identities of {path}: {err}") from err
    return sorted({p.key() for p in people}, key=lambda key: json.dumps(key))


def excluded_digest(keys: Sequence[tuple[str | None, ...]]) -> str:
    """SHA-256 of a sorted key list ("" for none): part of the settings, so other data -> another file."""
    if not keys:
        return ""
    return hashlib.sha256(json.dumps([list(k) for k in keys]).encode("utf-8")).hexdigest()


def corpus_tensors(settings: BackboneSettings, exclude: Iterable[tuple[str | None, ...]], tokenizer: Tokenizer,
                   workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as uint8 [N, 3, H, W] at the model's input size, and caption ids [N, K, text_length]."""
    _, rendered, captions = generic_corpus(settings.images, settings.seed, captions_per_image=settings.captions_per_image,
                                           image_size=settings.render_size, exclude=exclude, workers=workers)
    # The evaluation transform's resize, so the backbone sees what the benchmark loader gives it.
    resize = build_transforms(settings.image_size, is_train=False, uint8=True)
    images = torch.stack([resize(Image.fromarray(array)) for array in rendered])
    ids = tokenizer.tokenize([c for caps in captions for c in caps], settings.text_length)
    return images, ids.view(settings.images, settings.captions_per_image, -1)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # As CLIP: decay the weight matrices only (not gains, biases, embeddings, the temperature).
    decay, rest = [], []
    for name, param in model.named_parameters():
        matrix = param.ndim >= 2 and "embedding" not in name
        (decay if matrix else rest).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _text_features(model: CLIP, ids: torch.Tensor) -> torch.Tensor:
    eot = ids.argmax(dim=-1)
    tokens = model.encode_text(ids[:, : int(eot.max()) + 1])  # causal: the padding after the last EOT is inert
    return tokens[torch.arange(ids.shape[0]), eot]


def train_backbone(settings: BackboneSettings, images: torch.Tensor, ids: torch.Tensor
                   ) -> tuple[CLIP, torch.Tensor, list[dict[str, float]]]:
    """CLIP's contrastive recipe on the corpus tensors.

    Returns:
        (model, logit_scale parameter, per-epoch history of loss / logit scale / in-batch accuracy).
    """
    if settings.batch_size < 2 or settings.batch_size > settings.images:
        raise BackboneError(f"batch_size must be in 2..{settings.images} (the corpus size), "
                            f"got {settings.batch_size}")
    if settings.epochs < 1:
        raise BackboneError(f"epochs must be >= 1, got {settings.epochs}")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        return _train(settings, images, ids)
    finally:
        torch.set_num_threads(threads)


def _train(settings: BackboneSettings, images: torch.Tensor, ids: torch.Tensor
           ) -> tuple[CLIP, torch.Tensor, list[dict[str, float]]]:
    torch.manual_seed(settings.seed)
    model = CLIP(**clip_preset(settings.arch), image_size=settings.image_size, stride_size=16)
    logit_scale = torch.nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
    groups = _param_groups(model, settings.weight_decay)
    groups[1]["params"].append(logit_scale)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = settings.images // settings.batch_size
    total = steps_per_epoch * settings.epochs
    warmup = min(settings.warmup_steps, max(total - 1, 0))

    def lr_at(step: int) -> float:
        if step < warmup:
            return settings.lr * (step + 1) / warmup
        return 0.5 * settings.lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(settings.images, generator=generator)
        caption_pick = torch.randint(settings.captions_per_image, (settings.images,), generator=generator)
        losses, correct = [], 0
        for b in range(steps_per_epoch):
            rows = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            image_feats = model.encode_image(images[rows])[:, 0]
            text_feats = _text_features(model, ids[rows, caption_pick[rows]])
            loss = itc_loss(image_feats, text_feats, logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            with torch.no_grad():
                logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
                sims = F.normalize(image_feats, dim=-1) @ F.normalize(text_feats, dim=-1).t()
                correct += int((sims.argmax(dim=1) == torch.arange(len(rows))).sum())
            losses.append(float(loss.detach()))
            step += 1
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "logit_scale": float(logit_scale.detach().exp()),
                        "batch_i2t_acc": correct / (steps_per_epoch * settings.batch_size)})
        logger.info("backbone epoch %d: loss %.4f, logit scale %.1f, in-batch image->text accuracy %.3f", epoch,
                    history[-1]["loss"], history[-1]["logit_scale"], history[-1]["batch_i2t_acc"])
    return model.eval(), logit_scale.detach(), history


def openai_state_dict(model: CLIP, logit_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weights with OpenAI's keys, including `logit_scale` and the archive's size entries."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["logit_scale"] = logit_scale.detach().clone().float()
    # OpenAI's ViT-B-16.pt carries these three sizes next to the weights (loaders drop them).
    state["input_resolution"] = torch.tensor(int(model.visual.conv1.kernel_size[0] * model.visual.grid_size[0]))
    state["context_length"] = torch.tensor(model.context_length)
    state["vocab_size"] = torch.tensor(model.vocab_size)
    return state


# --------------------------------------------------------------------------- the cache


def make_backbone(settings: BackboneSettings, cache_dir: str | os.PathLike, *,
                  exclude: Sequence[tuple[str | None, ...]] = (), workers: int = 1) -> tuple[Path, dict[str, Any]]:
    """The cached backbone file of `settings`, trained first when there is none.

    `settings.excluded` must be :func:`excluded_digest` of `exclude`. Concurrent
    callers serialise on `<file>.lock`: the first trains, the others wait and reuse
    its file. The weights and their record (`<file>.json`: settings, history, time)
    are written atomically, the record last, so a file without its record is never
    taken for a finished backbone.

    Returns:
        (path, record) with `record["trained"]` True when this call trained it.
    """
    if settings.excluded != excluded_digest(exclude):
        raise ValueError("settings.excluded does not match the excluded identities")
    cache = Path(cache_dir).expanduser()
    check_output_path(cache, "--cache-dir", folder=True)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / settings.file_name()
    record_path = path.with_suffix(".json")
    with open(cache / (settings.file_name() + ".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if path.is_file() and record_path.is_file():
                record = json.loads(record_path.read_text(encoding="utf-8"))
                logger.info("backbone cache hit: %s", path)
                return path, {**record, "trained": False}
            start = time.time()
            tokenizer = Tokenizer()
            images, ids = corpus_tensors(settings, exclude, tokenizer, workers=workers)
            corpus_s = time.time() - start
            model, logit_scale, history = train_backbone(settings, images, ids)
            atomic_save(openai_state_dict(model, logit_scale), path)
            record = {"settings": settings.to_dict(), "history": history, "corpus_seconds": round(corpus_s, 1),
                      "seconds": round(time.time() - start, 1), "excluded_identities": len(exclude)}
            data = json.dumps(record, indent=2).encode("utf-8")
            atomic_write(record_path, lambda f: f.write(data))
            logger.info("backbone trained in %.0fs: %s", record["seconds"], path)
            return path, {**record, "trained": True}
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def settings_for(data: str | os.PathLike | None, **overrides: Any) -> tuple[BackboneSettings,
                                                                             list[tuple[str | None, ...]]]:
    """Settings (with the digest of `data`'s identities) and the keys to exclude."""
    exclude = excluded_identities(data)
    return BackboneSettings(excluded=excluded_digest(exclude), **overrides), exclude


# --------------------------------------------------------------------------- evaluation


def eval_config(data: str, overrides: Sequence[str] = ()) -> Config:
    """The demo's GA-DMS pretraining config on `data` (its image size, text length and GASS settings)."""
    return load_config(str(CONFIG), [f"data.root={data}", "eval.root=", *overrides])


def zero_shot(path: str | os.PathLike, data: str, device: torch.device | str = "cpu",
              overrides: Sequence[str] = ()) -> dict[str, float]:
    """Text-to-image metrics of the backbone file on the synthetic benchmark's test split (loaded as
    `tools/test.py` loads a CLIP file)."""
    cfg = eval_config(data, overrides)
    model = load_for_evaluation(cfg, path).to(device).eval()
    split = build_dataset("CUHK-PEDES", data).test
    with torch.inference_mode():
        return build_evaluator(cfg, {"test": split}, device).evaluate(model)["test"]["t2i"]


def backbone_noise_auc(path: str | os.PathLike, data: str, device: torch.device | str = "cpu",
                       overrides: Sequence[str] = ()) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Noise detection by the backbone file with the evaluation config's GASS settings.

    Returns:
        (scorer -> AUC summary for GASS, CSS, occlusion and random scores; per kind, the
        share of corrupted captions whose clean version matches the image better).
    """
    cfg = eval_config(data, overrides)
    model = load_for_evaluation(cfg, path).to(device)
    kwargs = dict(image_size=cfg.model.clip.image_size, annotation=cfg.data.annotation,
                  text_length=cfg.data.text_length, batch_size=cfg.data.batch_size, device=device)
    aucs = noise_detection_auc(model, data, scorers=("gass", "css", "occlusion", "random"), seed=cfg.seed, **kwargs)
    return {name: summarize_aucs(per_kind) for name, per_kind in aucs.items()}, clean_preference(model, data, **kwargs)
