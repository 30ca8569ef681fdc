"""GASS: gradient-attention similarity scores for caption tokens (docs/method.md §4).

For every caption token, a score in [0, 1] saying how much the token supports
the match between the caption and its own image. The last `num_layers` text
layers are re-run with single-head attention over the full width (the
Grad-ECLIP convention); the gradient of the matched-pair cosine similarity with
respect to each layer's attention output, its values, a smoothed query/key
cosine and the EOT attention row are combined into a per-token importance.

Differences from the reference implementation, all exact in value:
* one `torch.autograd.grad` call yields the gradients of all scored layers (the
  reference calls autograd once per layer, re-traversing the later layers each
  time; `single_backward=False` reproduces that, for benchmarks and tests);
* only the EOT row of each layer is differentiated: the full-sequence re-run
  is a no-grad forward, and the gradient pass re-computes the EOT rows with the
  earlier positions' keys and values as constants (under the causal mask nothing
  else reaches the target), so the backward costs B rows, not B x L positions;
* the computation is detached from the training graph: no parameter `.grad` is
  touched and the main backward is unaffected.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.clip import CLIP, ResidualAttentionBlock

__all__ = ["gass_scores", "css_scores", "multiscale_smooth", "valid_token_mask", "minmax_normalize",
           "PRECISIONS"]

ATTN_NORMS = ("importance", "attention")
NORMALIZATIONS = ("batch", "sample")
#: Precision of GASS's matrix work (the text-layer re-run and its gradient); the combination,
#: the normalisations and the min-max are float32 in every case.
PRECISIONS = ("fp32", "tf32", "bf16")


def valid_token_mask(ids: Tensor) -> Tensor:
    """Boolean [B, L]: word positions strictly between SOT (0) and EOT (`argmax(ids)`)."""
    eot = ids.argmax(dim=-1, keepdim=True)
    positions = torch.arange(ids.shape[-1], device=ids.device).unsqueeze(0)
    return (positions > 0) & (positions < eot)


def multiscale_smooth(x: Tensor, scales: Sequence[int]) -> Tensor:
    """Average of window-smoothed copies of `x` [B, L, D] along the sequence.

    For each scale s, non-overlapping windows of s positions are averaged (a
    shorter tail window is averaged over its own length), then linearly
    re-sampled back to L (align_corners=False).
    """
    batch, length, dim = x.shape
    out = torch.zeros_like(x)
    for s in scales:
        if s < 1:
            raise ValueError(f"smoothing scales must be >= 1, got {s}")
        windows = math.ceil(length / s)
        pad = windows * s - length
        padded = F.pad(x, (0, 0, 0, pad))
        sums = padded.view(batch, windows, s, dim).sum(dim=2)
        counts = torch.full((windows,), float(s), dtype=x.dtype, device=x.device)
        counts[-1] = s - pad
        pooled = sums / counts.view(1, windows, 1)
        resampled = F.interpolate(pooled.transpose(1, 2), size=length, mode="linear", align_corners=False)
        out = out + resampled.transpose(1, 2)
    return out / len(scales)


def minmax_normalize(scores: Tensor, mode: str = "batch") -> Tensor:
    """Min-max scale to [0, 1] over the whole batch tensor or per sample; zeros if constant."""
    if mode == "batch":
        lo, hi = scores.min(), scores.max()
    elif mode == "sample":
        lo = scores.min(dim=-1, keepdim=True).values
        hi = scores.max(dim=-1, keepdim=True).values
    else:
        raise ValueError(f"unknown GASS normalisation {mode!r}; valid: {', '.join(NORMALIZATIONS)}")
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (scores - lo) / safe, torch.zeros_like(scores))


def _single_head_layer(block: ResidualAttentionBlock, x: Tensor, causal: Tensor) -> tuple[Tensor, dict]:
    """One text block with single-head attention over the full width.

    Returns the block output and the pieces GASS needs; `o` (the attention
    output before `out_proj`) stays in the graph so gradients can reach it.
    """
    width = x.shape[-1]
    q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
    logits = q @ k.transpose(1, 2) / math.sqrt(width) + causal
    attn = logits.softmax(dim=-1)
    o = attn @ v
    x = x + block.attn.out_proj(o)
    x = x + block.mlp(block.ln_2(x))
    return x, {"q": q.detach(), "k": k.detach(), "v": v.detach(), "attn": attn.detach(), "o": o}


def _causal_mask(length: int, device: torch.device) -> Tensor:
    return torch.full((length, length), float("-inf"), device=device).triu_(1)


@torch.no_grad()
def _image_features(clip: CLIP, images_or_feats: Tensor) -> Tensor:
    if images_or_feats.dim() == 4:
        return clip.encode_image(images_or_feats)[:, 0]
    if images_or_feats.dim() == 2:
        return images_or_feats
    raise ValueError(f"expected images [B, 3, H, W] or image features [B, D], got shape {tuple(images_or_feats.shape)}")


def gass_scores(
    clip: CLIP,
    images_or_image_feats: Tensor,
    ids: Tensor,
    num_layers: int = 8,
    *,
    scales: Sequence[int] = (1, 2),
    attn_norm: str = "importance",
    normalize: str = "batch",
    single_backward: bool = True,
    precision: str = "fp32",
) -> Tensor:
    """GASS score of every caption token, [B, L] in [0, 1], zero outside `0 < j < eot`.

    Args:
        clip: The backbone (its text tower is re-run; its weights are not changed).
        images_or_image_feats: Images [B, 3, H, W] or projected image features [B, D]
            (the class token of `encode_image`); detached internally.
        ids: Clean caption token ids [B, L].
        num_layers: How many of the last text layers are scored.
        scales: Window sizes of the multi-scale q/k smoothing.
        attn_norm: "importance" divides the EOT attention row by the sum of the raw
            importances (released code); "attention" by the row's own masked sum (paper).
        normalize: "batch" min-max over the whole batch tensor (released code) or "sample".
        single_backward: One autograd call over the EOT rows for all layers (default);
            False builds the full-sequence graph and re-traverses it once per layer,
            as the reference does (same values; for benchmarks and tests).
        precision: "fp32" (default), "tf32" (float32 tensors, TF32 matrix products on CUDA;
            as fp32 elsewhere) or "bf16" (the layer re-run and its backward under bfloat16
            autocast). Whatever it is, the combination, normalisations and min-max run in
            float32.

    Returns:
        Scores [B, L], float32, no gradient.
    """
    if attn_norm not in ATTN_NORMS:
        raise ValueError(f"unknown gass attn_norm {attn_norm!r}; valid: {', '.join(ATTN_NORMS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown GASS normalisation {normalize!r}; valid: {', '.join(NORMALIZATIONS)}")
    blocks = clip.transformer.resblocks
    if not 1 <= num_layers <= len(blocks):
        raise ValueError(f"gass num_layers must be in 1..{len(blocks)}, got {num_layers}")
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown gass precision {precision!r}; valid: {', '.join(PRECISIONS)}")

    # The combination runs in float32 even inside a mixed-precision step: the min-max
    # normalisations and the 1e-8 guards are not meaningful in half precision.
    device = ids.device.type
    with torch.autocast(device_type=device, enabled=False):
        image_feats = _image_features(clip, images_or_image_feats).detach().float()
    with _matrix_precision(device, precision):
        saved, grads = _scored_layers(clip, image_feats, ids, num_layers, single_backward)
    with torch.autocast(device_type=device, enabled=False):
        saved = [{name: t.float() for name, t in pieces.items()} for pieces in saved]
        return _combine(saved, [g.float() for g in grads], ids, scales, attn_norm, normalize)


@contextlib.contextmanager
def _matrix_precision(device: str, precision: str) -> Iterator[None]:
    """Autocast and TF32 settings for GASS's matrix work (see `gass_scores`)."""
    if precision == "bf16":
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            yield
        return
    if precision != "tf32" or device != "cuda":
        with torch.autocast(device_type=device, enabled=False):
            yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        with torch.autocast(device_type=device, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _scored_layers(clip: CLIP, image_feats: Tensor, ids: Tensor, num_layers: int,
                   single_backward: bool) -> tuple[list[dict], Sequence[Tensor]]:
    """Single-head re-run of the last layers and d(sum_b S_bb)/d(o_l[e_b]) for each of them."""
    if not single_backward:
        return _scored_layers_per_layer(clip, image_feats, ids, num_layers)
    blocks = clip.transformer.resblocks
    batch, length = ids.shape
    rows = torch.arange(batch, device=ids.device)
    eot = ids.argmax(dim=-1)
    first = len(blocks) - num_layers
    saved: list[dict] = []
    with torch.no_grad():
        x = clip.text_layers_forward(clip.embed_text(ids).float(), 0, first)
        start = x[rows, eot]
        for block in blocks[first:]:
            q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), is_causal=True)
            x = x + block.attn.out_proj(o.squeeze(1))
            x = x + block.mlp(block.ln_2(x))
            saved.append({"q": q, "k": k, "v": v})
    # Only the EOT rows need gradients. The target reads the last layer at e_b,
    # and under the causal mask o_l[e_b] reaches it only through the later
    # layers' rows at e_b, where positions < e_b enter as constant keys and
    # values. So the backward runs over B rows instead of B x L positions.
    later = torch.arange(length, device=ids.device).unsqueeze(0) > eot.unsqueeze(1)       # [B, L]
    at_eot = F.one_hot(eot, length).bool().unsqueeze(-1)                                     # [B, L, 1]
    with torch.enable_grad():
        x_row = start
        outputs = []
        for block, pieces in zip(blocks[first:], saved, strict=True):
            q_row, k_row, v_row = F.linear(block.ln_1(x_row), block.attn.in_proj_weight,
                                           block.attn.in_proj_bias).chunk(3, dim=-1)
            keys = torch.where(at_eot, k_row.unsqueeze(1), pieces["k"])
            values = torch.where(at_eot, v_row.unsqueeze(1), pieces["v"])
            logits = torch.einsum("bd,bjd->bj", q_row, keys) / math.sqrt(q_row.shape[-1])
            attn = logits.masked_fill(later, float("-inf")).softmax(dim=-1)
            o_row = torch.einsum("bj,bjd->bd", attn, values)
            pieces["attn_row"] = attn.detach()
            outputs.append(o_row)
            x_row = x_row + block.attn.out_proj(o_row)
            x_row = x_row + block.mlp(block.ln_2(x_row))
        text = F.normalize(clip.project_text(x_row).float(), dim=-1)
        image = F.normalize(image_feats, dim=-1)
        target = (text * image).sum()  # trace of S = V U^T: each sample's own pair
        grads = torch.autograd.grad(target, outputs)
    return saved, grads


def _scored_layers_per_layer(clip: CLIP, image_feats: Tensor, ids: Tensor,
                             num_layers: int) -> tuple[list[dict], Sequence[Tensor]]:
    """The reference way: full-sequence graph, one autograd call per scored layer."""
    blocks = clip.transformer.resblocks
    batch, length = ids.shape
    rows = torch.arange(batch, device=ids.device)
    eot = ids.argmax(dim=-1)
    first = len(blocks) - num_layers
    with torch.no_grad():
        x = clip.text_layers_forward(clip.embed_text(ids).float(), 0, first)
    with torch.enable_grad():
        causal = _causal_mask(length, ids.device)
        saved = []
        for block in blocks[first:]:
            x, pieces = _single_head_layer(block, x, causal)
            saved.append(pieces)
        text = F.normalize(clip.project_text(x)[rows, eot].float(), dim=-1)
        image = F.normalize(image_feats, dim=-1)
        target = (text * image).sum()
        grads = [torch.autograd.grad(target, p["o"], retain_graph=True)[0][rows, eot] for p in saved]
    for pieces in saved:
        pieces["attn_row"] = pieces.pop("attn")[rows, eot]
    return saved, grads


def _combine(saved: list[dict], grads: Sequence[Tensor], ids: Tensor, scales: Sequence[int],
             attn_norm: str, normalize: str) -> Tensor:
    """Steps 5-9 of docs/method.md §4: smoothing, q/k cosine, importance, modulation, normalisation."""
    batch, length = ids.shape
    rows = torch.arange(batch, device=ids.device)
    eot = ids.argmax(dim=-1)
    valid = valid_token_mask(ids).float()
    total = torch.zeros(batch, length, device=ids.device)
    for pieces, grad in zip(saved, grads, strict=False):
        g = grad                                                         # [B, D] at e_b
        q = multiscale_smooth(pieces["q"], scales)
        k = multiscale_smooth(pieces["k"], scales)
        cos = F.cosine_similarity(q[rows, eot].unsqueeze(1), k, dim=-1)  # [B, L]
        cos = minmax_normalize(cos, "sample")
        raw = torch.einsum("bd,bjd->bj", g, pieces["v"]) * cos           # r_lbj
        row = pieces["attn_row"] * valid                                 # A_l[b, e_b, j] m_bj
        if attn_norm == "importance":
            modulation = row / (raw.sum(dim=-1, keepdim=True) + 1e-8)
        else:
            modulation = row / (row.sum(dim=-1, keepdim=True) + 1e-8)
        total = total + raw * valid * modulation
    scores = F.relu(total) * valid
    return (minmax_normalize(scores, normalize) * valid).detach()


@torch.no_grad()
def css_scores(clip: CLIP, images_or_image_feats: Tensor, ids: Tensor, *, normalize: str = "batch") -> Tensor:
    """Plain cosine-similarity scores (CSS ablation): cos(token feature, image feature).

    Same masking and normalisation as `gass_scores`, no gradients or attention.
    """
    with torch.autocast(device_type=ids.device.type, enabled=False):
        image = F.normalize(_image_features(clip, images_or_image_feats).float(), dim=-1)
        tokens = F.normalize(clip.encode_text(ids).float(), dim=-1)
        valid = valid_token_mask(ids).float()
        scores = F.relu(torch.einsum("bd,bjd->bj", image, tokens)) * valid
        return minmax_normalize(scores, normalize) * valid
