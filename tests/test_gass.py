"""GASS equals a naive per-layer reference and leaves training untouched."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.clip import CLIP, clip_preset
from model.gass import css_scores, gass_scores, multiscale_smooth

SOT, EOT = 49406, 49407


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    model = CLIP(**clip_preset("tiny"), image_size=(64, 32), stride_size=16)
    return model.eval()


def caption_ids(lengths, context=77, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, 0] = SOT
        ids[b, 1:n + 1] = torch.randint(1, 49405, (n,), generator=g)
        ids[b, n + 1] = EOT
    return ids


# ---------------------------------------------------------------- reference
def ref_smooth(x, scales):
    """Window means then linear resampling (align_corners=False), with loops."""
    batch, length, dim = x.shape
    out = torch.zeros_like(x)
    for s in scales:
        starts = list(range(0, length, s))
        pooled = torch.stack([x[:, a:min(a + s, length)].mean(dim=1) for a in starts], dim=1)
        n = len(starts)
        for i in range(length):
            src = max((i + 0.5) * n / length - 0.5, 0.0)
            lo = min(int(math.floor(src)), n - 1)
            hi = min(lo + 1, n - 1)
            w = src - lo
            out[:, i] += (1 - w) * pooled[:, lo] + w * pooled[:, hi]
    return out / len(scales)


def ref_gass(clip, image_feats, ids, num_layers, scales=(1, 2), attn_norm="importance", normalize="batch"):
    batch, length = ids.shape
    blocks = clip.transformer.resblocks
    first = len(blocks) - num_layers
    eot = [int(ids[b].argmax()) for b in range(batch)]
    mask = torch.zeros(batch, length)
    for b in range(batch):
        mask[b, 1:eot[b]] = 1.0
    with torch.no_grad():
        x = clip.token_embedding(ids) + clip.positional_embedding
        for block in blocks[:first]:
            x = block(x, causal=True)
    causal = torch.triu(torch.full((length, length), float("-inf")), diagonal=1)
    store = []
    with torch.enable_grad():
        for block in blocks[first:]:
            h = block.ln_1(x)
            qkv = h @ block.attn.in_proj_weight.T + block.attn.in_proj_bias
            d = x.shape[-1]
            q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1)
            o = a @ v
            x = x + block.attn.out_proj(o)
            x = x + block.mlp(block.ln_2(x))
            store.append((q.detach(), k.detach(), v.detach(), a.detach(), o))
        feats = clip.ln_final(x) @ clip.text_projection
        u = F.normalize(torch.stack([feats[b, eot[b]] for b in range(batch)]), dim=-1)
        vv = F.normalize(image_feats, dim=-1)
        target = sum((vv @ u.T)[b, b] for b in range(batch))
        grads = [torch.autograd.grad(target, s[4], retain_graph=True)[0] for s in store]
    total = torch.zeros(batch, length)
    for (q, k, v, a, _), grad in zip(store, grads, strict=False):
        qs, ks = ref_smooth(q, scales), ref_smooth(k, scales)
        for b in range(batch):
            e = eot[b]
            c = torch.tensor([F.cosine_similarity(qs[b, e], ks[b, j], dim=0) for j in range(length)])
            c = (c - c.min()) / (c.max() - c.min())
            r = torch.tensor([float((grad[b, e] * v[b, j]).sum() * c[j]) for j in range(length)])
            if attn_norm == "importance":
                mod = a[b, e] * mask[b] / (r.sum() + 1e-8)
            else:
                mod = a[b, e] * mask[b] / ((a[b, e] * mask[b]).sum() + 1e-8)
            total[b] += r * mask[b] * mod
    e_score = torch.relu(total) * mask
    if normalize == "batch":
        return (e_score - e_score.min()) / (e_score.max() - e_score.min()) * mask
    lo = e_score.min(dim=1, keepdim=True).values
    hi = e_score.max(dim=1, keepdim=True).values
    out = torch.zeros_like(e_score)
    for b in range(batch):
        if hi[b] > lo[b]:   # a constant row scores all zeros
            out[b] = (e_score[b] - lo[b]) / (hi[b] - lo[b]) * mask[b]
    return out


# -------------------------------------------------------------------- tests
def test_smoothing_matches_loops():
    x = torch.randn(2, 77, 5)
    for scales in [(1,), (2,), (1, 2), (3,), (1, 2, 4)]:
        torch.testing.assert_close(multiscale_smooth(x, scales), ref_smooth(x, scales), atol=2e-5, rtol=0)
    assert torch.allclose(multiscale_smooth(x, (1,)), x, atol=1e-6)


@pytest.mark.parametrize("attn_norm, normalize", [("importance", "batch"), ("attention", "sample")])
def test_gass_equals_reference(attn_norm, normalize):
    clip = tiny_clip()
    ids = caption_ids([5, 12, 30, 75])
    image_feats = torch.randn(4, clip.embed_dim)
    ours = gass_scores(clip, image_feats, ids, num_layers=3, attn_norm=attn_norm, normalize=normalize)
    ref = ref_gass(clip, image_feats, ids, 3, attn_norm=attn_norm, normalize=normalize)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    per_layer = gass_scores(clip, image_feats, ids, num_layers=3, attn_norm=attn_norm, normalize=normalize,
                            single_backward=False)
    torch.testing.assert_close(ours, per_layer, atol=1e-5, rtol=0)


def test_gass_range_mask_and_determinism():
    clip = tiny_clip(1)
    ids = caption_ids([3, 20, 40])
    images = torch.randn(3, 3, 64, 32)
    a = gass_scores(clip, images, ids, num_layers=4)
    b = gass_scores(clip, images, ids, num_layers=4)
    assert torch.equal(a, b)
    assert a.shape == ids.shape and not a.requires_grad
    assert a.min() >= 0 and a.max() <= 1 and a.max() == 1.0
    positions = torch.arange(77)
    eot = ids.argmax(-1, keepdim=True)
    outside = (positions == 0) | (positions >= eot)
    assert torch.all(a[outside] == 0)
    assert torch.all(a[~outside] >= 0)


def test_constant_scores_give_zeros():
    clip = tiny_clip()
    ids = caption_ids([1, 1])   # one word each: single valid token
    scores = gass_scores(clip, torch.randn(2, clip.embed_dim), ids, num_layers=2, normalize="sample")
    assert torch.all(scores[:, 0] == 0) and torch.all(scores[:, 2:] == 0)


def test_gass_leaves_parameter_grads_and_main_backward_untouched():
    clip = tiny_clip(2).train()
    ids = caption_ids([6, 9])
    images = torch.randn(2, 3, 64, 32)

    def main_loss():
        img = clip.encode_image(images)[:, 0]
        txt = clip.encode_text(ids)[torch.arange(2), ids.argmax(-1)]
        return (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).logsumexp(dim=1).sum(), img

    loss, _ = main_loss()
    loss.backward()
    reference = {n: p.grad.clone() for n, p in clip.named_parameters() if p.grad is not None}
    clip.zero_grad(set_to_none=True)

    loss, img = main_loss()
    gass_scores(clip, img, ids, num_layers=2)   # shares the image features with the main graph
    assert all(p.grad is None for p in clip.parameters()), "GASS touched parameter .grad"
    loss.backward()
    for name, p in clip.named_parameters():
        if name in reference:
            assert torch.equal(p.grad, reference[name]), name


def test_gass_under_autocast_matches_fp32():
    clip = tiny_clip()
    ids = caption_ids([4, 10])
    feats = torch.randn(2, clip.embed_dim)
    expected = gass_scores(clip, feats, ids, num_layers=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gass_scores(clip, feats, ids, num_layers=2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)


def test_bad_arguments():
    clip = tiny_clip()
    ids = caption_ids([4])
    feats = torch.randn(1, clip.embed_dim)
    with pytest.raises(ValueError, match="num_layers"):
        gass_scores(clip, feats, ids, num_layers=9)
    with pytest.raises(ValueError, match="attn_norm"):
        gass_scores(clip, feats, ids, num_layers=2, attn_norm="x")
    with pytest.raises(ValueError, match="normalisation"):
        gass_scores(clip, feats, ids, num_layers=2, normalize="x")
    with pytest.raises(ValueError, match="image features"):
        gass_scores(clip, torch.randn(1, 2, 3), ids, num_layers=2)


def test_css_scores_formula():
    clip = tiny_clip()
    ids = caption_ids([5, 8])
    feats = torch.randn(2, clip.embed_dim)
    got = css_scores(clip, feats, ids)
    with torch.no_grad():
        tok = F.normalize(clip.encode_text(ids), dim=-1)
    mask = torch.zeros(2, 77)
    mask[0, 1:6] = 1
    mask[1, 1:9] = 1
    raw = torch.relu(torch.einsum("bd,bjd->bj", F.normalize(feats, dim=-1), tok)) * mask
    expected = (raw - raw.min()) / (raw.max() - raw.min()) * mask
    torch.testing.assert_close(got, expected)


def test_lower_precision_scores_stay_close_to_fp32():
    """gass.precision: bf16 matrix work (CPU autocast) changes the scores by little; tf32 is fp32 off CUDA."""
    clip = tiny_clip()
    ids = caption_ids([4, 10, 7, 15])
    feats = torch.randn(4, clip.embed_dim, generator=torch.Generator().manual_seed(1))
    exact = gass_scores(clip, feats, ids, num_layers=2)
    assert torch.equal(gass_scores(clip, feats, ids, num_layers=2, precision="tf32"), exact)
    low = gass_scores(clip, feats, ids, num_layers=2, precision="bf16")
    assert low.dtype == torch.float32 and low.shape == exact.shape
    assert not torch.equal(low, exact)  # the matrix work did run in bf16
    assert (low - exact).abs().max() < 0.1
    valid = exact > 0
    assert torch.corrcoef(torch.stack([low[valid], exact[valid]]))[0, 1] > 0.98
    with pytest.raises(ValueError, match="unknown gass precision 'fp16'"):
        gass_scores(clip, feats, ids, num_layers=2, precision="fp16")
