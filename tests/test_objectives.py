"""model.objectives against naive references, and the 2-process gather convention."""

from __future__ import annotations

import copy
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from model.objectives import (
    LOSSES,
    classification_accuracy,
    id_loss,
    itc_loss,
    masked_accuracy,
    mlm_loss,
    parse_loss_names,
    sdm_loss,
)

WORLD_SIZE = 2


# ------------------------------------------------------------------ references
def naive_sdm(img, txt, pids, scale, eps=1e-8):
    """Loop-based SDM in float64: explicit cosines, softmax and label distribution."""
    img, txt = img.double(), txt.double()
    n = img.shape[0]
    cos = [[(img[i] @ txt[j]) / (img[i].norm() * txt[j].norm()) for j in range(n)] for i in range(n)]

    def direction(sim):  # sim[i][j]: row i's similarity to candidate j
        total = 0.0
        for i in range(n):
            exps = [torch.exp(scale * sim[i][j]) for j in range(n)]
            z = sum(exps)
            positives = sum(1 for k in range(n) if pids[i] == pids[k])
            for j in range(n):
                p = exps[j] / z
                q = (1.0 if pids[i] == pids[j] else 0.0) / positives
                total = total + p * (torch.log(p) - math.log(q + eps))
        return total / n

    i2t = direction(cos)
    t2i = direction([[cos[j][i] for j in range(n)] for i in range(n)])
    return i2t + t2i


def irra_compute_sdm(image_fetures, text_fetures, pid, logit_scale, epsilon=1e-8):
    """IRRA's compute_sdm as released (no image_id), for a bit-level comparison."""
    batch_size = image_fetures.shape[0]
    pid = pid.reshape((batch_size, 1))
    labels = ((pid - pid.t()) == 0).float()
    image_norm = image_fetures / image_fetures.norm(dim=1, keepdim=True)
    text_norm = text_fetures / text_fetures.norm(dim=1, keepdim=True)
    t2i_cosine_theta = text_norm @ image_norm.t()
    i2t_cosine_theta = t2i_cosine_theta.t()
    text_proj_image = logit_scale * t2i_cosine_theta
    image_proj_text = logit_scale * i2t_cosine_theta
    labels_distribute = labels / labels.sum(dim=1)
    i2t_pred = F.softmax(image_proj_text, dim=1)
    i2t_loss = i2t_pred * (F.log_softmax(image_proj_text, dim=1) - torch.log(labels_distribute + epsilon))
    t2i_pred = F.softmax(text_proj_image, dim=1)
    t2i_loss = t2i_pred * (F.log_softmax(text_proj_image, dim=1) - torch.log(labels_distribute + epsilon))
    return torch.mean(torch.sum(i2t_loss, dim=1)) + torch.mean(torch.sum(t2i_loss, dim=1))


def naive_ce(logits_row, target):
    logits_row = logits_row.double()
    return -(logits_row[target] - torch.log(torch.exp(logits_row).sum()))


def naive_itc(img, txt, scale):
    img = img.double() / img.double().norm(dim=1, keepdim=True)
    txt = txt.double() / txt.double().norm(dim=1, keepdim=True)
    n = img.shape[0]
    sim = torch.stack([torch.stack([scale * (img[i] @ txt[j]) for j in range(n)]) for i in range(n)])
    loss_i = sum(naive_ce(sim[i], i) for i in range(n)) / n
    loss_t = sum(naive_ce(sim[:, i], i) for i in range(n)) / n
    return (loss_i + loss_t) / 2


PIDS = torch.tensor([3, 3, 7, 1, 7, 7, 2, 3])  # several positives per row, one singleton


def _feats(n=8, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


# ----------------------------------------------------------------------- SDM
def test_sdm_matches_naive_loops_and_gradients():
    img, txt = _feats()
    img.requires_grad_()
    txt.requires_grad_()
    loss = sdm_loss(img, txt, PIDS, logit_scale=5.0)
    ref_img = img.detach().double().requires_grad_()
    ref_txt = txt.detach().double().requires_grad_()
    ref = naive_sdm(ref_img, ref_txt, PIDS.tolist(), 5.0)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(img.grad.double(), ref_img.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(txt.grad.double(), ref_txt.grad, rtol=1e-4, atol=1e-6)


def test_sdm_equals_irra_compute_sdm():
    img, txt = _feats(seed=1)
    ours = sdm_loss(img, txt, PIDS, logit_scale=50.0)
    theirs = irra_compute_sdm(img, txt, PIDS, 50.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_sdm_epsilon_and_scale_enter_the_formula():
    img, txt = _feats(seed=2)
    base = sdm_loss(img, txt, PIDS, 5.0).item()
    assert sdm_loss(img, txt, PIDS, 5.0, epsilon=1e-2).item() == pytest.approx(
        naive_sdm(img, txt, PIDS.tolist(), 5.0, eps=1e-2).item(), rel=1e-5
    )
    assert sdm_loss(img, txt, PIDS, 5.0, epsilon=1e-2).item() != pytest.approx(base, rel=1e-3)
    assert sdm_loss(img, txt, PIDS, torch.tensor(9.0)).item() == pytest.approx(
        naive_sdm(img, txt, PIDS.tolist(), 9.0).item(), rel=1e-5
    )


def test_sdm_input_validation_and_gather_noop_at_world_size_one():
    img, txt = _feats()
    with pytest.raises(ValueError, match="same shape"):
        sdm_loss(img, txt[:5], PIDS, 50.0)
    with pytest.raises(ValueError, match="expected 8 pids"):
        sdm_loss(img, txt, PIDS[:4], 50.0)
    assert torch.equal(sdm_loss(img, txt, PIDS, 50.0, gather=True), sdm_loss(img, txt, PIDS, 50.0))
    assert torch.equal(itc_loss(img, txt, 50.0, gather=True), itc_loss(img, txt, 50.0))


# ----------------------------------------------------------- ITC, ID, MLM
def test_itc_matches_naive():
    img, txt = _feats(seed=3)
    assert itc_loss(img, txt, 7.0).item() == pytest.approx(naive_itc(img, txt, 7.0).item(), rel=1e-5)


def test_id_loss_matches_naive():
    g = torch.Generator().manual_seed(4)
    img_logits, txt_logits = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    pids = torch.tensor([0, 3, 1, 1, 2])
    ref = (sum(naive_ce(img_logits[i], pids[i]) for i in range(5)) / 5 + sum(
        naive_ce(txt_logits[i], pids[i]) for i in range(5)
    ) / 5) / 2
    assert id_loss(img_logits, txt_logits, pids).item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        id_loss(img_logits, txt_logits[:, :3], pids)


def test_mlm_loss_matches_naive_for_both_layouts():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 4, 11, generator=g)
    labels = torch.tensor([[0, 5, 0, 9], [2, 0, 0, 0]])
    labelled = [(b, t) for b in range(2) for t in range(4) if labels[b, t] != 0]
    ref = sum(naive_ce(scores[b, t], labels[b, t]) for b, t in labelled) / len(labelled)
    assert mlm_loss(scores, labels).item() == pytest.approx(ref.item(), rel=1e-6)
    assert mlm_loss(scores.reshape(-1, 11), labels.reshape(-1)).item() == pytest.approx(ref.item(), rel=1e-6)
    # A different ignore value: now label 0 is a real target and -1 is skipped.
    labels_m1 = torch.where(labels == 0, torch.full_like(labels, -1), labels)
    labels_m1[0, 0] = 0
    kept = [(b, t) for b in range(2) for t in range(4) if labels_m1[b, t] != -1]
    ref_m1 = sum(naive_ce(scores[b, t], labels_m1[b, t]) for b, t in kept) / len(kept)
    assert mlm_loss(scores, labels_m1, ignore_index=-1).item() == pytest.approx(ref_m1.item(), rel=1e-6)
    with pytest.raises(ValueError, match="scores"):
        mlm_loss(scores, labels.reshape(-1))


def test_mlm_loss_without_labels_is_zero_with_valid_backward():
    scores = torch.randn(3, 4, 7, requires_grad=True)
    loss = mlm_loss(scores, torch.zeros(3, 4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert scores.grad is not None
    assert torch.equal(scores.grad, torch.zeros_like(scores))


def test_accuracy_helpers():
    scores = torch.zeros(5, 4)
    scores[torch.arange(5), torch.tensor([1, 2, 3, 0, 1])] = 1.0
    labels = torch.tensor([1, 0, 3, 2, 0])  # positions 0, 2, 3 labelled; 0 and 2 correct
    assert masked_accuracy(scores, labels).item() == pytest.approx(2 / 3)
    assert masked_accuracy(scores, torch.zeros(5, dtype=torch.long)).item() == 0.0
    assert masked_accuracy(scores.reshape(1, 5, 4), labels.reshape(1, 5)).item() == pytest.approx(2 / 3)
    assert classification_accuracy(scores, torch.tensor([1, 2, 0, 0, 0])).item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="targets"):
        classification_accuracy(scores, torch.tensor([1, 2]))


# ------------------------------------------------------------------ registry
def test_loss_registry_and_parse_loss_names():
    assert set(LOSSES) == {"sdm", "itc", "id", "mlm"}
    assert LOSSES["sdm"] is sdm_loss and LOSSES["mlm"] is mlm_loss
    assert parse_loss_names("sdm+id+mlm") == ["sdm", "id", "mlm"]
    assert parse_loss_names(" itc + mlm ") == ["itc", "mlm"]
    with pytest.raises(ValueError, match=r"unknown \['cmpm'\]; valid names are \['id', 'itc', 'mlm', 'sdm'\]"):
        parse_loss_names("sdm+cmpm")
    with pytest.raises(ValueError, match="joined by"):
        parse_loss_names("")
    with pytest.raises(ValueError, match="joined by"):
        parse_loss_names("sdm++mlm")
    with pytest.raises(ValueError, match="more than once"):
        parse_loss_names("sdm+mlm+sdm")


# -------------------------------------------------- two processes (gloo, DDP)
class _TinyRetrieval(nn.Module):
    """Two linear "encoders", an ID classifier and a learnable logit scale."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(5, 4)
        self.text = nn.Linear(5, 4)
        self.classifier = nn.Linear(4, 4)
        self.logit_scale = nn.Parameter(torch.tensor(6.0))

    def forward(self, x_img, x_txt):
        img, txt = self.image(x_img), self.text(x_txt)
        return img, txt, self.classifier(img), self.classifier(txt), self.logit_scale


def _global_batch():
    g = torch.Generator().manual_seed(11)
    x_img, x_txt = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    pids = torch.tensor([0, 2, 1, 0, 2, 3, 1, 2])  # positives span both ranks' halves
    return x_img, x_txt, pids


def _contrastive(name, img, txt, pids, scale, gather):
    if name == "sdm":
        return sdm_loss(img, txt, pids, scale, gather=gather)
    return itc_loss(img, txt, scale, gather=gather)


def _run_model(model, x_img, x_txt, pids, name, gather):
    """Forward + backward of contrastive + ID loss; returns values and gradients."""
    x_img = x_img.clone().requires_grad_()
    x_txt = x_txt.clone().requires_grad_()
    img, txt, img_logits, txt_logits, scale = model(x_img, x_txt)
    contrastive = _contrastive(name, img, txt, pids, scale, gather)
    (contrastive + id_loss(img_logits, txt_logits, pids)).backward()
    # DDP prefixes names with "module."; compare under the plain module's names.
    params = {k: p.grad.clone() for k, p in getattr(model, "module", model).named_parameters()}
    model.zero_grad()
    return contrastive.detach(), x_img.grad, x_txt.grad, params


def _worker(rank, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    from utils import comm

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )
    comm.init_distributed("gloo")
    x_img, x_txt, pids = _global_batch()
    torch.manual_seed(0)
    model = _TinyRetrieval()
    ddp = DistributedDataParallel(copy.deepcopy(model))
    local = slice(4 * rank, 4 * rank + 4)
    res = {}
    for name in ("sdm", "itc"):
        res[name] = _run_model(ddp, x_img[local], x_txt[local], pids[local], name, gather=True)

    # Unequal per-rank batches (3 and 5 rows), plain tensors, SDM only.
    uneven = slice(0, 3) if rank == 0 else slice(3, 8)
    img = x_img[uneven].clone().requires_grad_()
    txt = x_txt[uneven].clone().requires_grad_()
    loss = sdm_loss(img, txt, pids[uneven], 6.0, gather=True)
    loss.backward()
    res["uneven"] = (loss.detach(), img.grad, txt.grad)
    comm.cleanup()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.dist
def test_gathered_losses_match_single_process_on_concatenated_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]

    x_img, x_txt, pids = _global_batch()
    torch.manual_seed(0)
    model = _TinyRetrieval()
    for name in ("sdm", "itc"):
        loss, g_img, g_txt, params = _run_model(model, x_img, x_txt, pids, name, gather=False)
        for rank, res in enumerate(results):
            r_loss, r_img, r_txt, r_params = res[name]
            local = slice(4 * rank, 4 * rank + 4)
            # Same loss value on every rank as one process on the whole batch.
            torch.testing.assert_close(r_loss, loss, rtol=1e-5, atol=1e-6)
            # Convention: per-rank input gradient == world_size * single-process slice ...
            torch.testing.assert_close(r_img, WORLD_SIZE * g_img[local], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(r_txt, WORLD_SIZE * g_txt[local], rtol=1e-4, atol=1e-6)
            # ... so that DDP's averaged parameter gradients equal the single-process ones
            # (including the logit scale, which the loss uses directly).
            assert set(r_params) == set(params)
            for key in params:
                torch.testing.assert_close(r_params[key], params[key], rtol=1e-4, atol=1e-6, msg=f"{name} {key}")

    img = x_img.clone().requires_grad_()
    txt = x_txt.clone().requires_grad_()
    loss = sdm_loss(img, txt, pids, 6.0)
    loss.backward()
    for rank, res in enumerate(results):
        r_loss, r_img, r_txt = res["uneven"]
        own = slice(0, 3) if rank == 0 else slice(3, 8)
        torch.testing.assert_close(r_loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r_img, WORLD_SIZE * img.grad[own], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r_txt, WORLD_SIZE * txt.grad[own], rtol=1e-4, atol=1e-6)
