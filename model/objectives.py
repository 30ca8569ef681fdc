"""Training objectives: pure functions of tensors (IRRA's ``objectives.py`` semantics).

Cross-rank convention for ``gather=True`` (SDM, ITC)
----------------------------------------------------
Under DDP the image/text features (and pids) of all ranks are gathered and
every rank computes the loss over the *whole* gathered batch, so the returned
value equals the single-process loss on the concatenated batch, on every rank.
Other ranks' features enter as constants; this rank's own features keep their
graph, and their gradient is multiplied by the world size ``W`` on the way
back. Consequently:

* per rank, ``d loss / d local_features == W * (single-process gradient slice)``;
* after DDP averages parameter gradients over the ``W`` ranks, every parameter
  gradient equals the single-process gradient on the concatenated batch.
  Parameters used directly by the loss (e.g. a learnable ``logit_scale``) get
  the full gradient on every rank and are therefore also exact after averaging.

This keeps loss weights meaningful next to local-mean losses such as MLM or
ID, whose DDP-averaged gradients already equal the global-batch gradients
(for equal per-rank batch sizes). At world size 1 ``gather`` changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from utils import comm
from utils.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "LOSSES",
    "classification_accuracy",
    "id_loss",
    "itc_loss",
    "masked_accuracy",
    "mlm_loss",
    "parse_loss_names",
    "sdm_loss",
]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``factor``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _gather_features(features: torch.Tensor) -> torch.Tensor:
    """Gather over ranks with the local slice's gradient pre-scaled by the world size.

    The factor compensates DDP's gradient averaging (see the module docstring).
    """
    world_size = comm.get_world_size()
    if world_size == 1:
        return features
    return comm.all_gather_with_grad(_ScaleGrad.apply(features, float(world_size)))


def _check_pair(image_feats: torch.Tensor, text_feats: torch.Tensor, name: str) -> None:
    if image_feats.dim() != 2 or text_feats.dim() != 2 or image_feats.shape != text_feats.shape:
        raise ValueError(
            f"{name}: expected image_feats and text_feats of the same shape [B, D], got "
            f"{tuple(image_feats.shape)} and {tuple(text_feats.shape)}"
        )


def sdm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    logit_scale: torch.Tensor | float,
    epsilon: float = 1e-8,
    *,
    gather: bool = False,
) -> torch.Tensor:
    """Similarity Distribution Matching (IRRA ``compute_sdm``).

    With y_ij = [pid_i == pid_j] and q = y / rowsum(y):
    ``L = mean_i KL(p_i2t_i || q_i) + mean_i KL(p_t2i_i || q_i)`` where
    ``KL(p || q) = sum_j p_j (log_softmax_j - log(q_j + epsilon))`` and
    ``p = softmax(logit_scale * cosine)``.

    IRRA divides by ``labels.sum(dim=1)`` without ``keepdim`` (column-wise
    broadcast); since y is symmetric and its non-zero entries share their row
    and column counts, that equals the row normalisation used here, bit for bit.

    Args:
        image_feats: [B, D] image embeddings (normalised inside).
        text_feats: [B, D] text embeddings of the same pairs.
        pids: [B] identity labels; equal pids are positives.
        logit_scale: inverse temperature (50 in the reference).
        epsilon: added to q inside the log.
        gather: under DDP, compute the loss over all ranks' samples (module docstring).

    Returns:
        Scalar loss (float32).
    """
    _check_pair(image_feats, text_feats, "sdm_loss")
    if pids.reshape(-1).shape[0] != image_feats.shape[0]:
        raise ValueError(f"sdm_loss: expected {image_feats.shape[0]} pids, got shape {tuple(pids.shape)}")
    image_feats = image_feats.float()
    text_feats = text_feats.float()
    pids = pids.reshape(-1).to(image_feats.device)
    if gather:
        image_feats = _gather_features(image_feats)
        text_feats = _gather_features(text_feats)
        pids = comm.all_gather_tensor(pids)

    labels = (pids.reshape(-1, 1) == pids.reshape(1, -1)).float()
    image_norm = F.normalize(image_feats, dim=1)
    text_norm = F.normalize(text_feats, dim=1)
    t2i_logits = logit_scale * (text_norm @ image_norm.t())
    i2t_logits = t2i_logits.t()
    log_q = torch.log(labels / labels.sum(dim=1, keepdim=True) + epsilon)

    i2t = F.softmax(i2t_logits, dim=1) * (F.log_softmax(i2t_logits, dim=1) - log_q)
    t2i = F.softmax(t2i_logits, dim=1) * (F.log_softmax(t2i_logits, dim=1) - log_q)
    return i2t.sum(dim=1).mean() + t2i.sum(dim=1).mean()


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    gather: bool = False,
) -> torch.Tensor:
    """CLIP InfoNCE (IRRA ``compute_itc``): mean of image->text and text->image CE.

    Pair i is the only positive of row i. ``gather`` as in :func:`sdm_loss`.
    """
    _check_pair(image_feats, text_feats, "itc_loss")
    image_feats = image_feats.float()
    text_feats = text_feats.float()
    if gather:
        image_feats = _gather_features(image_feats)
        text_feats = _gather_features(text_feats)
    targets = torch.arange(image_feats.shape[0], device=image_feats.device)
    logits_per_image = logit_scale * (F.normalize(image_feats, dim=1) @ F.normalize(text_feats, dim=1).t())
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Identity classification loss (IRRA ``compute_id``): (CE(image) + CE(text)) / 2.

    Args:
        image_logits: [B, C] classifier output on image features.
        text_logits: [B, C] classifier output on text features.
        pids: [B] class indices in [0, C).
    """
    if image_logits.shape != text_logits.shape or image_logits.dim() != 2:
        raise ValueError(
            f"id_loss: expected image_logits and text_logits of the same shape [B, C], got "
            f"{tuple(image_logits.shape)} and {tuple(text_logits.shape)}"
        )
    pids = pids.reshape(-1).to(image_logits.device)
    return (F.cross_entropy(image_logits.float(), pids) + F.cross_entropy(text_logits.float(), pids)) / 2


def _flatten_scores(scores: torch.Tensor, labels: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten [B, L, V] / [B, L] (or [N, V] / [N]) to [N, V] / [N]."""
    if scores.dim() not in (2, 3) or scores.shape[:-1] != labels.shape:
        raise ValueError(
            f"{name}: expected scores [N, V] with labels [N] or scores [B, L, V] with labels [B, L], got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    return scores.reshape(-1, scores.shape[-1]), labels.reshape(-1)


def mlm_loss(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int = 0) -> torch.Tensor:
    """Masked-token cross entropy averaged over labelled positions (IRRA ``compute_mlm``).

    Positions whose label equals ``ignore_index`` are skipped. If no position
    is labelled the result is 0 with a (zero) gradient path to ``scores``, so
    backward and DDP stay valid where plain ``cross_entropy`` would give NaN.
    Sum / count is used instead of a data-dependent branch to avoid a
    host-device synchronisation.

    Args:
        scores: [N, V] or [B, L, V] vocabulary logits.
        labels: [N] or [B, L] target ids; ``ignore_index`` marks unlabelled positions.
        ignore_index: label value meaning "no target".
    """
    scores, labels = _flatten_scores(scores, labels, "mlm_loss")
    per_position = F.cross_entropy(scores.float(), labels, ignore_index=ignore_index, reduction="none")
    count = (labels != ignore_index).sum().clamp(min=1)
    return per_position.sum() / count


@torch.no_grad()
def masked_accuracy(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int = 0) -> torch.Tensor:
    """Top-1 accuracy over labelled positions (0 when nothing is labelled).

    Args:
        scores: [N, V] or [B, L, V] logits.
        labels: [N] or [B, L]; positions equal to ``ignore_index`` are skipped.
    """
    scores, labels = _flatten_scores(scores, labels, "masked_accuracy")
    labelled = labels != ignore_index
    correct = (scores.argmax(dim=-1) == labels) & labelled
    return correct.sum().float() / labelled.sum().clamp(min=1).float()


@torch.no_grad()
def classification_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy of [B, C] logits against [B] targets."""
    if logits.dim() != 2 or logits.shape[0] != targets.reshape(-1).shape[0]:
        raise ValueError(
            f"classification_accuracy: expected logits [B, C] and targets [B], got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    return (logits.argmax(dim=1) == targets.reshape(-1)).float().mean()


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sdm": sdm_loss,
    "itc": itc_loss,
    "id": id_loss,
    "mlm": mlm_loss,
}


def parse_loss_names(spec: str) -> list[str]:
    """Split a ``"sdm+id+mlm"`` spec (``model.loss_names``) into validated, ordered loss names.

    Raises:
        ConfigError: empty spec, unknown name (the message lists the valid
            names) or a name given twice.
    """
    where = f"model.loss_names={spec!r}"
    names = [part.strip() for part in spec.split("+")]
    if not spec.strip() or any(not name for name in names):
        raise ConfigError(f"{where}: expected names joined by '+', e.g. 'sdm+id+mlm'")
    unknown = [name for name in names if name not in LOSSES]
    if unknown:
        raise ConfigError(f"{where}: unknown {unknown}; valid names are {sorted(LOSSES)}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{where}: {duplicates} given more than once")
    return names
