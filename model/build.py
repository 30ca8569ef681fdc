"""The GA-DMS retrieval model: CLIP backbone + heads + losses (docs/method.md §2, §6).

State-dict layout is the reference's (`base_model.<OpenAI keys>`, `cross_attn.*`,
`cross_modal_transformer.*`, `ln_pre_t`, `ln_pre_i`, `ln_post`, `mlm_head.*`,
`classifier.*`), so checkpoints released by the GA-DMS authors and by IRRA load.

The training forward takes a batch dict and returns a `TrainOutput`: the weighted
`*_loss` terms (the loop sums them), scalar metrics (accuracies) and auxiliary
tensors — with GASS on, the batch's token scores, which pretraining writes into the
score cache — each in its own mapping.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from model import objectives
from model.clip import CLIP, build_clip_from_config
from model.gass import ATTN_NORMS, NORMALIZATIONS, css_scores, gass_scores
from model.gass import PRECISIONS as GASS_PRECISIONS
from model.heads import CrossModalMLM, build_classifier, build_mlm_modules
from utils import comm
from utils.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["GADMS", "TrainOutput", "build_model", "check_gass_depth"]

SCORINGS = ("gass", "css")


class TrainOutput(NamedTuple):
    """What a training forward returns: three mappings, so no consumer tells them apart by name.

    Attributes:
        losses: Weighted loss terms (`sdm_loss`, ...), scalars with gradients; the loop
            optimises their sum.
        metrics: Scalar diagnostics without gradients (`img_acc`, ...), logged as they are.
        aux: Other tensors for the task's hooks, e.g. `gass_scores` [B, L].
    """

    losses: dict[str, Tensor]
    metrics: dict[str, Tensor]
    aux: dict[str, Tensor]


class GADMS(CrossModalMLM, nn.Module):
    """Retrieval model with SDM/ITC/ID/MLM objectives and GASS token scoring.

    Args:
        base_model: The CLIP backbone.
        loss_names: Objectives to compute, any of sdm, itc, id, mlm.
        loss_weights: Weight per objective name (missing names weigh 1.0).
        temperature: Fixed similarity temperature (logit scale = 1 / temperature).
        num_classes: Training identities (needed by the ID loss only).
        cmt_depth: Layers of the cross-modal transformer of the MLM branch.
        gass: Compute token scores during training.
        gass_layers: Scored text layers (the last N).
        gass_scales: Smoothing windows of the q/k cosine.
        gass_attn_norm: "importance" (released code) or "attention" (paper).
        gass_normalize: "batch" (released code) or "sample".
        gass_precision: Precision of GASS's matrix work: "fp32", "tf32" or "bf16" (`model.gass`).
        scoring: "gass", or "css" for the plain cosine-similarity ablation.
        gather_features: Compute contrastive losses over all DDP ranks' samples.
    """

    def __init__(
        self,
        base_model: CLIP,
        *,
        loss_names: list[str],
        loss_weights: Mapping[str, float] | None = None,
        temperature: float = 0.02,
        num_classes: int = 0,
        cmt_depth: int = 4,
        gass: bool = False,
        gass_layers: int = 8,
        gass_scales: tuple[int, ...] = (1, 2),
        gass_attn_norm: str = "importance",
        gass_normalize: str = "batch",
        gass_precision: str = "fp32",
        scoring: str = "gass",
        gather_features: bool = False,
    ) -> None:
        super().__init__()
        # Checked here, not at the first GASS step (a config's values are checked when it loads).
        for what, value, valid in (("scoring", scoring, SCORINGS), ("gass_attn_norm", gass_attn_norm, ATTN_NORMS),
                                   ("gass_normalize", gass_normalize, NORMALIZATIONS),
                                   ("gass_precision", gass_precision, GASS_PRECISIONS)):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if "sdm" not in loss_names and "itc" not in loss_names and gass:
            logger.warning("GASS is on but no contrastive loss (sdm/itc) uses the noise-masked captions")
        self.base_model = base_model
        self.loss_names = list(loss_names)
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in self.loss_names}
        self.temperature = float(temperature)
        self.logit_scale = 1.0 / self.temperature
        self.num_classes = int(num_classes)
        self.embed_dim = base_model.embed_dim
        self.vocab_size = base_model.vocab_size
        self.gass = gass
        self.gass_layers = gass_layers
        self.gass_scales = tuple(gass_scales)
        self.gass_attn_norm = gass_attn_norm
        self.gass_normalize = gass_normalize
        self.gass_precision = gass_precision
        self.scoring = scoring
        self.gather_features = gather_features
        if "id" in self.loss_names:
            self.classifier = build_classifier(self.embed_dim, self.num_classes)
        if "mlm" in self.loss_names:
            for name, module in build_mlm_modules(self.embed_dim, cmt_depth, self.vocab_size).items():
                self.add_module(name, module)

    # ------------------------------------------------------------ inference
    def encode_image(self, images: Tensor) -> Tensor:
        """Image features [B, D] (not normalised), float32."""
        return self.base_model.encode_image(images)[:, 0].float()

    def encode_text(self, ids: Tensor, length: int | None = None) -> Tensor:
        """Text features [B, D] at the EOT position (not normalised), float32.

        `length`: the batch's longest caption, EOT included (`datasets.build.add_host_facts`
        computes it on the host); without it, it is read from `ids`, which makes the host
        wait for the device.
        """
        eot = ids.argmax(dim=-1)
        # The text tower is causal, so the padding after the batch's last EOT
        # cannot change any feature up to it: dropping it is exact and saves
        # most of the compute on short captions.
        if length is None:
            length = int(eot.max()) + 1
        tokens = self.base_model.encode_text(ids[:, :length])
        return tokens[torch.arange(ids.shape[0], device=ids.device), eot].float()

    def token_scores(self, image_feats: Tensor, ids: Tensor) -> Tensor:
        """Per-token scores [B, L] of the clean captions (GASS or the CSS ablation)."""
        if self.scoring == "css":
            return css_scores(self.base_model, image_feats, ids, normalize=self.gass_normalize)
        return gass_scores(
            self.base_model, image_feats, ids, self.gass_layers,
            scales=self.gass_scales, attn_norm=self.gass_attn_norm, normalize=self.gass_normalize,
            precision=self.gass_precision,
        )

    # ------------------------------------------------------------- training
    def forward(self, batch: Mapping[str, Tensor], *, batch_losses: bool = True) -> TrainOutput:
        """Weighted losses (`*_loss`), accuracies and, with GASS on in training, `aux["gass_scores"]`.

        Batch keys: `images` [B,3,H,W], `pids` [B], `caption_ids` [B,L] (clean);
        optional `noise_ids` (contrastive caption; default the clean one);
        `mlm_ids` and `mlm_labels` when the MLM loss is on. Optional facts computed on
        the host (`datasets.build.add_host_facts`), which spare the host a wait for the
        device: `text_length` (int) and `mlm_positions` (the labelled positions of the
        flattened [B*L] labels).

        With ``batch_losses=False`` the losses over the whole batch (SDM, ITC) are left
        out and ``aux["image_feats"]``, ``aux["text_feats"]`` carry their input features,
        with their graphs: the gradient-cache step (`processor.loop`) computes those
        losses once over all micro-batches (`contrastive_losses`) and back-propagates
        their feature gradients through this forward.
        """
        image_tokens, image_feats, text_feats = self.contrastive_features(batch)
        losses = self.contrastive_losses(image_feats, text_feats, batch["pids"]) if batch_losses else {}
        local, metrics, aux = self.sample_losses(batch, image_tokens, image_feats, text_feats)
        if not batch_losses:
            aux.update(image_feats=image_feats, text_feats=text_feats)
        return TrainOutput({**losses, **local}, metrics, aux)

    def contrastive_features(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(image tokens [B, N, D], image features [B, D], text features of the contrastive captions [B, D])."""
        image_tokens = self.base_model.encode_image(batch["images"])
        contrast_ids = batch.get("noise_ids", batch["caption_ids"])
        return image_tokens, image_tokens[:, 0].float(), self.encode_text(contrast_ids, batch.get("text_length"))

    def cache_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What the whole-batch losses read from one micro-batch (gradient-cache protocol, `processor.loop`)."""
        _, image_feats, text_feats = self.contrastive_features(batch)
        return {"image_feats": image_feats, "text_feats": text_feats, "pids": batch["pids"]}

    def batch_losses(self, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The whole-batch losses of `cache_features` outputs concatenated over micro-batches."""
        return self.contrastive_losses(inputs["image_feats"], inputs["text_feats"], inputs["pids"])

    def contrastive_losses(self, image_feats: Tensor, text_feats: Tensor, pids: Tensor) -> dict[str, Tensor]:
        """The weighted losses over the whole batch (SDM, ITC): functions of the features and pids only
        (no parameter enters them), gathered over the processes when `gather_features`."""
        losses: dict[str, Tensor] = {}
        if "sdm" in self.loss_names:
            losses["sdm_loss"] = self.loss_weights["sdm"] * objectives.sdm_loss(
                image_feats, text_feats, pids, self.logit_scale, gather=self.gather_features)
        if "itc" in self.loss_names:
            losses["itc_loss"] = self.loss_weights["itc"] * objectives.itc_loss(
                image_feats, text_feats, self.logit_scale, gather=self.gather_features)
        return losses

    def sample_losses(self, batch: Mapping[str, Tensor], image_tokens: Tensor, image_feats: Tensor,
                      text_feats: Tensor) -> TrainOutput:
        """The per-sample losses (ID, MLM: means over this batch), their accuracies and the token scores."""
        losses: dict[str, Tensor] = {}
        metrics: dict[str, Tensor] = {}
        aux: dict[str, Tensor] = {}
        pids = batch["pids"]
        if "id" in self.loss_names:
            image_logits = self.classifier(image_feats)
            text_logits = self.classifier(text_feats)
            losses["id_loss"] = self.loss_weights["id"] * objectives.id_loss(image_logits, text_logits, pids)
            metrics["img_acc"] = objectives.classification_accuracy(image_logits, pids)
            metrics["txt_acc"] = objectives.classification_accuracy(text_logits, pids)
        if "mlm" in self.loss_names:
            if "mlm_ids" not in batch or "mlm_labels" not in batch:
                raise KeyError("the mlm loss needs batch['mlm_ids'] and batch['mlm_labels']")
            positions = batch.get("mlm_positions")
            if positions is None:  # read from the labels: the host waits for the device
                positions = batch["mlm_labels"].flatten().nonzero().squeeze(1)
            logits = self.predict_tokens(self.base_model.encode_text(batch["mlm_ids"]), image_tokens, positions)
            labels = batch["mlm_labels"].flatten().index_select(0, positions)
            losses["mlm_loss"] = self.loss_weights["mlm"] * objectives.mlm_loss(logits, labels)
            metrics["mlm_acc"] = objectives.masked_accuracy(logits, labels)
        if self.gass and self.training:
            aux["gass_scores"] = self.token_scores(image_feats.detach(), batch["caption_ids"])
        return TrainOutput(losses, metrics, aux)


def check_gass_depth(cfg: Any, text_layers: int) -> None:
    """Check `gass.num_layers` against the text depth of the backbone the model was built with.

    The depth depends on the CLIP preset or checkpoint, which `load_config` does not read,
    so the model builder calls this once it knows it. Only GASS scoring reads the layers:
    the check applies when `gass.enabled` and `gass.scoring` is ``gass``.

    Raises:
        ConfigError: `gass.num_layers` is not an integer in ``[1, text_layers]``.
    """
    gass = cfg["gass"]
    if not gass["enabled"] or gass["scoring"] != "gass":
        return
    layers = gass["num_layers"]
    if isinstance(layers, int) and not isinstance(layers, bool) and 1 <= layers <= text_layers:
        return
    raise ConfigError(f"gass.num_layers={layers!r}: must be an integer in [1, {text_layers}], the text depth of the "
                      f"model (model.clip.arch={cfg['model']['clip']['arch']!r})")


def build_model(cfg: Any, num_classes: int = 0, *, backbone: CLIP | None = None) -> GADMS:
    """The retrieval model described by a resolved config.

    Args:
        cfg: The full config (reads `model.*` and `gass.*`).
        num_classes: Training identities (for the ID classifier).
        backbone: A ready CLIP to use instead of building one from `model.clip`.
    """
    loss_names = objectives.parse_loss_names(cfg.model.loss_names)
    if backbone is None:
        backbone = build_clip_from_config(cfg.model.clip)
    check_gass_depth(cfg, backbone.transformer.layers)
    if cfg.train.compile:
        backbone.compile_towers()
    return GADMS(
        backbone,
        loss_names=loss_names,
        loss_weights=dict(cfg.model.loss_weights),
        temperature=cfg.model.temperature,
        num_classes=num_classes,
        cmt_depth=cfg.model.cmt_depth,
        gass=cfg.gass.enabled,
        gass_layers=cfg.gass.num_layers,
        gass_scales=tuple(cfg.gass.scales),
        gass_attn_norm=cfg.gass.attn_norm,
        gass_normalize=cfg.gass.normalize,
        gass_precision=cfg.gass.precision,
        scoring=cfg.gass.scoring,
        gather_features=comm.get_world_size() > 1,
    )
