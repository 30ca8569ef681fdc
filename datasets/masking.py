"""Token masking for GA-DMS dual masking and IRRA-style MLM (docs/method.md §5).

All functions take ``ids`` of shape ``[B, L]`` or ``[L]``, never modify it in
place, and only touch ordinary ids (``vocab_low <= id <= vocab_high``, by
default 1..49404): padding 0, SOT, EOT and the mask token are never changed
and never labelled. Randomness comes only from the explicit ``generator``;
full ``[B, L]`` tensors are drawn in a fixed order whatever the eligibility
pattern, so the same seed always gives the same masks. ``generator`` may also
be one generator per row: row ``b`` is then drawn from ``generator[b]`` alone,
so a batch masked at once equals its rows masked one by one (the training
loader masks per batch, each sample with its own seeded generator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

MASK_ID = 49405
FIRST_ORDINARY_ID = 1
LAST_ORDINARY_ID = 49404


def _check_scores(scores: torch.Tensor) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores!r:.80}")
    return scores.float()


def noise_probability(
    scores: torch.Tensor, *, max_prob: float = 0.2, slope: float = 20.0, center: float = 0.9
) -> torch.Tensor:
    """Per-token probability of noise masking: ``max_prob / (1 + exp(-slope * ((1 - s) - center)))``.

    Low scores (likely noise) get masked in the contrastive branch.
    """
    scores = _check_scores(scores)
    # sigmoid(x) == 1 / (1 + exp(-x)) without overflow for large |x|.
    return max_prob * torch.sigmoid(slope * ((1.0 - scores) - center))


def informative_probability(
    scores: torch.Tensor, *, max_prob: float = 0.3, slope: float = 20.0, center: float = 0.1
) -> torch.Tensor:
    """Per-token probability of informative masking: ``max_prob / (1 + exp(-slope * (s - center)))``.

    High scores (informative words) get masked for masked-token prediction.
    """
    scores = _check_scores(scores)
    return max_prob * torch.sigmoid(slope * (scores - center))


Generators = torch.Generator | Sequence[torch.Generator]


def _check_generators(generator: Generators, rows: int) -> None:
    if isinstance(generator, torch.Generator):
        return
    if not (isinstance(generator, Sequence) and all(isinstance(g, torch.Generator) for g in generator)):
        raise TypeError(f"generator must be a torch.Generator or a sequence of them, got {type(generator).__name__}")
    if len(generator) != rows:
        raise ValueError(f"got {len(generator)} generators for {rows} rows of ids")


def _draw(generator: Generators, shape: torch.Size, vocab_low: int, vocab_high: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection draws, action draws and replacement ids, ``[B, L]`` each, on ``device``.

    One generator draws the three full tensors in turn; per-row generators draw
    the same three tensors of their row (one row = what that generator alone would draw).
    """
    if isinstance(generator, torch.Generator):
        select = torch.rand(shape, generator=generator, device=generator.device)
        action = torch.rand(shape, generator=generator, device=generator.device)
        random_ids = torch.randint(vocab_low, vocab_high + 1, shape, generator=generator, device=generator.device)
        return select.to(device), action.to(device), random_ids.to(device)
    gen_device = generator[0].device if len(generator) else device
    select, action = torch.empty(shape, device=gen_device), torch.empty(shape, device=gen_device)
    random_ids = torch.empty(shape, dtype=torch.long, device=gen_device)
    for row, g in enumerate(generator):
        torch.rand(shape[1], generator=g, out=select[row])
        torch.rand(shape[1], generator=g, out=action[row])
        torch.randint(vocab_low, vocab_high + 1, (shape[1],), generator=g, out=random_ids[row])
    return select.to(device), action.to(device), random_ids.to(device)


def apply_mask(
    ids: torch.Tensor,
    prob: torch.Tensor | float,
    generator: Generators,
    *,
    mask_id: int = MASK_ID,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    vocab_low: int = FIRST_ORDINARY_ID,
    vocab_high: int = LAST_ORDINARY_ID,
    force_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select eligible tokens with per-token probability ``prob`` and corrupt them BERT-style.

    A selected token gets its original id as label; it is replaced by
    ``mask_id`` with probability ``mask_ratio``, by a uniform random ordinary
    id in ``[vocab_low, vocab_high]`` with probability ``random_ratio``, and
    kept otherwise. Unselected tokens get label 0 (ignored by the loss).

    Args:
        ids: token ids, ``[B, L]`` or ``[L]`` (integer dtype).
        prob: selection probability per token (same shape as ``ids``) or one
            float for all tokens.
        generator: source of all randomness; its device is where the random
            tensors are drawn (they are moved to ``ids.device`` afterwards).
            Or one generator per row of ``[B, L]`` ids (module docstring).
        mask_id: id written for masked tokens.
        mask_ratio: share of selected tokens replaced by ``mask_id``.
        random_ratio: share of selected tokens replaced by a random ordinary id.
        vocab_low: smallest ordinary id (eligible and drawn for replacement).
        vocab_high: largest ordinary id.
        force_one: if a caption ends with no label, label position 1 and
            replace it by the mask (only if position 1 is eligible), as IRRA
            does so every caption contributes to the MLM loss.

    Returns:
        ``(new_ids, labels)``, both shaped and typed like ``ids``.
    """
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise TypeError(f"ids must be an integer tensor, got {ids!r:.80}")
    if ids.dim() not in (1, 2):
        raise ValueError(f"ids must have shape [B, L] or [L], got {tuple(ids.shape)}")
    if not (mask_ratio >= 0 and random_ratio >= 0 and mask_ratio + random_ratio <= 1):
        raise ValueError(
            f"need mask_ratio >= 0, random_ratio >= 0 and their sum <= 1, "
            f"got mask_ratio={mask_ratio}, random_ratio={random_ratio}"
        )
    if not 1 <= vocab_low <= vocab_high:
        # Label 0 means "not selected", so ordinary ids must be >= 1.
        raise ValueError(f"need 1 <= vocab_low <= vocab_high, got {vocab_low}, {vocab_high}")
    if vocab_low <= mask_id <= vocab_high:
        # Otherwise masked tokens would count as ordinary and could be masked again.
        raise ValueError(f"mask_id={mask_id} must lie outside [vocab_low, vocab_high]")

    squeeze = ids.dim() == 1
    tokens = ids.unsqueeze(0) if squeeze else ids
    _check_generators(generator, tokens.shape[0])
    if isinstance(prob, torch.Tensor):
        if prob.shape != ids.shape:
            raise ValueError(f"prob shape {tuple(prob.shape)} must equal ids shape {tuple(ids.shape)}")
        prob = prob.to(device=ids.device, dtype=torch.float32).reshape(tokens.shape)
    else:
        prob = torch.full(tokens.shape, float(prob), device=ids.device)
    if bool(((prob < 0) | (prob > 1) | prob.isnan()).any()):
        raise ValueError("prob must lie in [0, 1]")

    # Always draw the same full tensors in the same order, so results depend
    # only on the seed and the shape, never on which positions are eligible.
    select_draw, action_draw, random_ids = _draw(generator, tokens.shape, vocab_low, vocab_high, ids.device)
    random_ids = random_ids.to(ids.dtype)

    eligible = (tokens >= vocab_low) & (tokens <= vocab_high)
    selected = eligible & (select_draw < prob)
    to_mask = selected & (action_draw < mask_ratio)
    to_random = selected & (action_draw >= mask_ratio) & (action_draw < mask_ratio + random_ratio)

    labels = torch.where(selected, tokens, torch.zeros_like(tokens))
    new_ids = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    new_ids = torch.where(to_random, random_ids, new_ids)

    if force_one and tokens.shape[1] > 1:
        force = ~selected.any(dim=1) & eligible[:, 1]
        labels[:, 1] = torch.where(force, tokens[:, 1], labels[:, 1])
        new_ids[:, 1] = torch.where(force, torch.full_like(tokens[:, 1], mask_id), new_ids[:, 1])

    if squeeze:
        return new_ids.squeeze(0), labels.squeeze(0)
    return new_ids, labels


def noise_mask(
    ids: torch.Tensor,
    scores: torch.Tensor,
    generator: Generators,
    *,
    max_prob: float = 0.2,
    slope: float = 20.0,
    center: float = 0.9,
    mask_id: int = MASK_ID,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    vocab_low: int = FIRST_ORDINARY_ID,
    vocab_high: int = LAST_ORDINARY_ID,
    force_one: bool = False,
) -> torch.Tensor:
    """Noise masking for the contrastive branch: corrupt likely-noise (low-score) tokens.

    Uses :func:`noise_probability` and :func:`apply_mask`; labels are dropped.
    ``force_one`` is off by default: this caption feeds the contrastive
    losses, not the MLM loss, so no caption needs a label; and the cache
    starts at 0.85 where p_noise ~ 0 precisely so that the contrastive branch
    sees clean captions at initialisation, which forcing one mask into every
    caption would undo.

    Returns:
        the noise-masked ids, shaped like ``ids``.
    """
    prob = noise_probability(scores, max_prob=max_prob, slope=slope, center=center)
    new_ids, _ = apply_mask(
        ids,
        prob,
        generator,
        mask_id=mask_id,
        mask_ratio=mask_ratio,
        random_ratio=random_ratio,
        vocab_low=vocab_low,
        vocab_high=vocab_high,
        force_one=force_one,
    )
    return new_ids


def informative_mask(
    ids: torch.Tensor,
    scores: torch.Tensor,
    generator: Generators,
    *,
    max_prob: float = 0.3,
    slope: float = 20.0,
    center: float = 0.1,
    mask_id: int = MASK_ID,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    vocab_low: int = FIRST_ORDINARY_ID,
    vocab_high: int = LAST_ORDINARY_ID,
    force_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Informative masking for masked-token prediction: mask high-score tokens more often.

    Uses :func:`informative_probability` and :func:`apply_mask`.

    Returns:
        ``(masked_ids, labels)``; labels hold the original id where selected, else 0.
    """
    prob = informative_probability(scores, max_prob=max_prob, slope=slope, center=center)
    return apply_mask(
        ids,
        prob,
        generator,
        mask_id=mask_id,
        mask_ratio=mask_ratio,
        random_ratio=random_ratio,
        vocab_low=vocab_low,
        vocab_high=vocab_high,
        force_one=force_one,
    )


def random_mask(
    ids: torch.Tensor,
    generator: Generators,
    *,
    prob: float = 0.15,
    mask_id: int = MASK_ID,
    mask_ratio: float = 0.8,
    random_ratio: float = 0.1,
    vocab_low: int = FIRST_ORDINARY_ID,
    vocab_high: int = LAST_ORDINARY_ID,
    force_one: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain IRRA MLM masking (fine-tuning): every eligible token selected with ``prob``.

    Returns:
        ``(masked_ids, labels)``; labels hold the original id where selected, else 0.
    """
    return apply_mask(
        ids,
        prob,
        generator,
        mask_id=mask_id,
        mask_ratio=mask_ratio,
        random_ratio=random_ratio,
        vocab_low=vocab_low,
        vocab_high=vocab_high,
        force_one=force_one,
    )


def mask_rates(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Share of a batch's ordinary caption tokens selected by each mask the batch carries (for the logs).

    `mlm_mask_rate`: tokens with an MLM label. `noise_mask_rate`: tokens whose id the noise
    mask changed (the 10% of selected tokens kept as they were cannot be seen, so this is
    ~0.9 x the selection rate).
    """
    ids = batch["caption_ids"]
    eligible = ((ids >= FIRST_ORDINARY_ID) & (ids <= LAST_ORDINARY_ID)).sum().clamp(min=1)
    rates = {}
    if "noise_ids" in batch:
        rates["noise_mask_rate"] = (batch["noise_ids"] != ids).sum() / eligible
    if "mlm_labels" in batch:
        rates["mlm_mask_rate"] = (batch["mlm_labels"] != 0).sum() / eligible
    return rates
