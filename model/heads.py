"""Heads of the retrieval model: cross-modal MLM branch and ID classifier (docs/method.md §6).

Module names match the reference checkpoints (`cross_attn`, `cross_modal_transformer`,
`ln_pre_t`, `ln_pre_i`, `ln_post`, `mlm_head`, `classifier`), so the builders here
return modules that the retrieval model registers at its top level.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from model.clip import QuickGELU, Transformer

__all__ = ["CrossModalMLM", "build_mlm_modules", "build_classifier"]


def build_mlm_modules(embed_dim: int, depth: int, vocab_size: int) -> dict[str, nn.Module]:
    """The MLM branch's modules, initialised as IRRA does.

    Args:
        embed_dim: Joint embedding width (512 for ViT-B/16); heads = embed_dim // 64.
        depth: Layers of the cross-modal transformer (4 in the reference).
        vocab_size: Output classes of the token predictor.

    Returns:
        Modules keyed by their reference names.
    """
    heads = max(1, embed_dim // 64)
    cross_attn = nn.MultiheadAttention(embed_dim, heads, batch_first=True)
    transformer = Transformer(embed_dim, depth, heads, causal=False)
    mlm_head = nn.Sequential(OrderedDict(
        dense=nn.Linear(embed_dim, embed_dim),
        gelu=QuickGELU(),
        ln=nn.LayerNorm(embed_dim),
        fc=nn.Linear(embed_dim, vocab_size),
    ))
    # IRRA's init: std from the width and depth of the cross-modal transformer.
    scale = embed_dim ** -0.5
    proj_std = scale * ((2 * depth) ** -0.5)
    attn_std = scale
    fc_std = (2 * embed_dim) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    nn.init.normal_(cross_attn.in_proj_weight, std=attn_std)
    nn.init.normal_(cross_attn.out_proj.weight, std=proj_std)
    nn.init.normal_(mlm_head.dense.weight, std=fc_std)
    nn.init.normal_(mlm_head.fc.weight, std=proj_std)
    return {
        "cross_attn": cross_attn,
        "cross_modal_transformer": transformer,
        "ln_pre_t": nn.LayerNorm(embed_dim),
        "ln_pre_i": nn.LayerNorm(embed_dim),
        "ln_post": nn.LayerNorm(embed_dim),
        "mlm_head": mlm_head,
    }


def build_classifier(embed_dim: int, num_classes: int) -> nn.Linear:
    """ID classifier on image and text features (IRRA init: N(0, 0.001), zero bias)."""
    if num_classes < 1:
        raise ValueError(f"the ID loss needs the number of training identities, got num_classes={num_classes}")
    classifier = nn.Linear(embed_dim, num_classes)
    nn.init.normal_(classifier.weight, std=0.001)
    nn.init.zeros_(classifier.bias)
    return classifier


class CrossModalMLM:
    """Mixin: the cross-modal token predictor over modules registered on the model."""

    cross_attn: nn.MultiheadAttention
    cross_modal_transformer: Transformer
    ln_pre_t: nn.LayerNorm
    ln_pre_i: nn.LayerNorm
    ln_post: nn.LayerNorm
    mlm_head: nn.Sequential

    def cross_former(self, text_tokens: Tensor, image_tokens: Tensor) -> Tensor:
        """Text tokens attend to image tokens, then the cross-modal transformer; [B, L, D]."""
        kv = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), kv, kv, need_weights=False)[0]
        return self.ln_post(self.cross_modal_transformer(x))

    def predict_tokens(self, text_tokens: Tensor, image_tokens: Tensor, positions: Tensor | None = None) -> Tensor:
        """Vocabulary logits of the masked caption: [B, L, V], or [N, V] at `positions`.

        `positions` (int64 indices into the flattened [B * L] tokens, e.g. those of
        `labels.flatten() != 0`) restricts the vocabulary projection to the labelled
        tokens: the loss over them is the same as IRRA's full-sequence one, at a
        fraction of the cost (V = 49,408).
        """
        hidden = self.cross_former(text_tokens, image_tokens)
        if positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, positions)
        return self.mlm_head(hidden).float()

