"""Gradient accumulation with exact whole-batch contrastive losses (train.accum_steps, gradient caching).

Contracts: the samplers deal the same global batch to any (processes x micro-batches)
of equal product; one gradient-cache step equals the full-graph gradient of
SDM over all micro-batches plus the mean of the per-micro-batch ID/MLM losses; one
process with K micro-batches trains exactly as K processes (gloo, DDP) with one
each; a stop request mid-accumulation ends after the step and resume equals the
uninterrupted run.
"""

from __future__ import annotations

import copy
import os
import signal
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from datasets.sampler import DistributedRandomSampler, IdentitySampler
from model import objectives
from model.build import build_model
from processor.loop import TrainLoop
from tests.conftest import REPO
from utils.config import load_config

PRETRAIN = REPO / "configs" / "demo" / "tiny_pretrain.yaml"
TINY = ["model.clip.arch=tiny", "model.clip.pretrained=", "model.clip.image_size=[64, 32]", "gass.num_layers=2",
        "model.cmt_depth=1", "model.temperature=0.07"]
SOT, EOT, MASK = 49406, 49407, 49405


def global_batches(make, processes, accum, micro, steps):
    """Per step, every micro-batch of every process in virtual-rank order (process-major)."""
    step = accum * micro
    local = [make(rank, processes, accum).local_indices() for rank in range(processes)]
    # Without accumulation the DataLoader drops the last partial batch.
    streams = [ix[:len(ix) // step * step].reshape(-1, accum, micro) for ix in local]
    return [np.concatenate([streams[p][s].reshape(-1) for p in range(processes)]) for s in range(steps)]


@pytest.mark.parametrize("kind", ["random", "identity"])
def test_samplers_deal_the_same_global_batches_whatever_processes_and_accumulation(kind):
    micro, pids = 4, np.repeat(np.arange(20), 5)

    def make(rank, processes, accum):
        if kind == "random":
            return DistributedRandomSampler(len(pids), seed=3, rank=rank, world_size=processes, drop_last=True,
                                            accum_steps=accum, batch_size=micro)
        return IdentitySampler(pids, micro * accum * processes, 2, seed=3, rank=rank, world_size=processes)

    layouts = [(1, 4), (2, 2), (4, 1)]
    dealt = [global_batches(make, p, k, micro, steps=3) for p, k in layouts]
    for other in dealt[1:]:
        for a, b in zip(dealt[0], other):
            np.testing.assert_array_equal(a, b)
    # Without accumulation nothing changed: rank r still takes positions r, r + W, ... of the epoch's order.
    if kind == "random":
        plain = DistributedRandomSampler(len(pids), seed=3, rank=1, world_size=4, drop_last=True)
        np.testing.assert_array_equal(plain.local_indices(), plain.global_order()[1::4])
    # Resume mid-epoch: position counts whole steps; the rest is the same stream.
    sampler = make(1, 2, 2)
    full = sampler.local_indices()
    sampler.load_state_dict(sampler.state_dict(consumed=2 * 2 * micro + 3))  # 2 steps and part of a third
    np.testing.assert_array_equal(sampler.local_indices(), full[2 * 2 * micro:])


def make_batch(size, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(size, 77, dtype=torch.long)
    for b in range(size):
        n = 4 + b
        ids[b, 0], ids[b, n + 1] = SOT, EOT
        ids[b, 1:n + 1] = torch.randint(1, MASK, (n,), generator=g)
    mlm_ids, labels = ids.clone(), torch.zeros_like(ids)
    labels[:, 1:3] = ids[:, 1:3]
    mlm_ids[:, 1:3] = MASK
    return {"images": torch.randn(size, 3, 64, 32, generator=g), "pids": torch.randint(0, 3, (size,), generator=g),
            "caption_ids": ids, "noise_ids": ids.clone(), "mlm_ids": mlm_ids, "mlm_labels": labels,
            "index": torch.arange(seed * size, (seed + 1) * size)}


def test_gradient_cache_step_equals_the_full_graph_gradient():
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["model.loss_names=sdm+itc+id+mlm", "model.loss_weights.mlm=0.5"])
    model = build_model(cfg, num_classes=3).train()
    reference = copy.deepcopy(model)
    micros = [make_batch(4, seed) for seed in range(3)]

    # Reference: one graph over all micro-batches, written from the definitions.
    img = torch.cat([reference.encode_image(m["images"]) for m in micros])
    txt = torch.cat([reference.encode_text(m["noise_ids"]) for m in micros])
    pids = torch.cat([m["pids"] for m in micros])
    sdm = objectives.sdm_loss(img, txt, pids, 1 / 0.07)
    itc = objectives.itc_loss(img, txt, 1 / 0.07)
    local = [reference(m).losses for m in micros]
    id_loss = sum(o["id_loss"] for o in local) / 3
    mlm = sum(o["mlm_loss"] for o in local) / 3
    (sdm + itc + id_loss + mlm).backward(retain_graph=True)
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}
    # Plain accumulation (each micro-batch's own SDM/ITC, averaged) is another objective: the test can fail.
    reference.zero_grad()
    (sum(sum(o.values()) for o in local) / 3).backward()
    plain = {n: p.grad for n, p in reference.named_parameters()}
    assert max(float((plain[n] - expected[n]).abs().max()) for n in plain) > 1e-2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    loop = TrainLoop(model, [], torch.optim.SGD(model.parameters(), lr=1.0), accum_steps=3)
    out = loop.accumulated_step(micros)
    torch.testing.assert_close(out.losses["sdm_loss"], sdm.detach())
    torch.testing.assert_close(out.losses["mlm_loss"], mlm.detach())
    torch.testing.assert_close(out.loss, (sdm + itc + id_loss + mlm).detach())
    # GASS ran per micro-batch (its min-max normalisation per micro-batch: every micro-batch reaches 1).
    scores = out.aux["gass_scores"]
    assert scores.shape == (12, 77) and set(out.aux) == {"gass_scores"}
    assert all(torch.isclose(scores[i:i + 4].max(), torch.tensor(1.0)) for i in (0, 4, 8))
    for name, param in model.named_parameters():  # SGD with lr 1: the step is minus the gradient
        grad = before[name] - param.detach()
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-5 * float(expected[name].abs().max()),
                                   msg=name)
    assert loop.global_step == 1 and all(p.grad is None for p in model.parameters())


def test_a_non_finite_micro_batch_skips_the_whole_step():
    torch.manual_seed(0)
    model = build_model(load_config(None, TINY + ["model.loss_names=sdm+mlm"]), num_classes=0).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forward, calls = type(model).forward, [0]

    def poisoned(self, batch, **kwargs):  # the second micro-batch's MLM loss is NaN
        out = forward(self, batch, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            out.losses["mlm_loss"] = out.losses["mlm_loss"] * float("nan")
        return out

    model.forward = poisoned.__get__(model)
    loop = TrainLoop(model, [], torch.optim.SGD(model.parameters(), lr=1.0), accum_steps=2)
    assert loop.accumulated_step([make_batch(4, 0), make_batch(4, 1)]) is None
    assert (loop.global_step, loop.nonfinite_total) == (0, 1)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    # The whole-batch loss alone non-finite: skipped too.
    model.forward = forward.__get__(model)
    nan_batch = make_batch(4, 2)
    nan_batch["images"] = nan_batch["images"] * float("nan")
    assert loop.accumulated_step([make_batch(4, 0), nan_batch]) is None
    assert (loop.global_step, loop.nonfinite_total) == (0, 2)


def run_overrides(root, out, *extra):
    return [f"data.root={root}", f"output_dir={out}", "eval.period=0", "solver.epochs=1", "solver.warmup_epochs=0",
            "train.max_steps=3", "solver.optimizer=SGD", "solver.momentum=0", "solver.lr=0.05", "log_period=1",
            "device=cpu", "precision=fp32", "num_threads=1", *extra]


FINETUNE = REPO / "configs" / "demo" / "tiny_finetune.yaml"
#: The two loss sets of the acceptance: GA-DMS pretraining (sdm+mlm, GASS, noise masks) and the IRRA recipe
#: (sdm+id+mlm, identity sampler, random MLM).
RECIPES = {"sdm+mlm": (PRETRAIN, []),
           "sdm+id+mlm": (FINETUNE, ["model.finetune=", "data.sampler=identity", "data.num_instances=4"])}


def _process(rank, world_size, port, config, overrides):
    from processor.engine import Trainer
    from processor.finetune import FinetuneTask
    from processor.pretrain import PretrainTask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    cfg = load_config(config, overrides)
    Trainer(cfg, PretrainTask() if cfg.task == "pretrain" else FinetuneTask()).train()


def train_layout(config, overrides, processes):
    """Train in `processes` processes (gloo) or, for 1, in this one; returns the run folder's final state."""
    if processes == 1:
        from processor.engine import Trainer
        from processor.finetune import FinetuneTask
        from processor.pretrain import PretrainTask

        cfg = load_config(config, overrides)
        Trainer(cfg, PretrainTask() if cfg.task == "pretrain" else FinetuneTask()).train()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_process, args=(processes, port, config, overrides), nprocs=processes, join=True)
    out = load_config(config, overrides).output_dir
    cache = os.path.join(out, "score_cache.npy")
    return final_weights(out), np.load(cache) if os.path.exists(cache) else None


def final_weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)["model"]


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.dist
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_micro_batch_layouts_of_one_global_batch_train_identically(recipe, synthetic_root, tmp_path):
    """(1 process, K=4), (2 processes, K=2), (4 processes, K=1), micro-batch 8: the same weights and score
    cache after 3 optimiser steps (the unit of work is the micro-batch: docs/method.md)."""
    config, extra = RECIPES[recipe]
    runs = {}
    for processes, accum in ((1, 4), (2, 2), (4, 1)):
        runs[processes] = train_layout(config, run_overrides(
            synthetic_root, tmp_path / f"p{processes}", "data.batch_size=8", f"train.accum_steps={accum}", *extra),
            processes)
    for processes in runs:
        assert torch.load(tmp_path / f"p{processes}" / "last.pth", weights_only=True)["step"] == 3
    for processes in (2, 4):
        assert max_diff(runs[processes][0], runs[1][0]) <= 1e-5, processes
        if runs[1][1] is not None:
            assert np.abs(runs[processes][1] - runs[1][1]).max() <= 1e-5, processes
    assert (runs[1][1] is not None) == (recipe == "sdm+mlm")  # GASS only in pretraining


def test_sdm_alone_over_micro_batches_equals_one_batch(synthetic_root, tmp_path):
    """With SDM alone nothing is per micro-batch: K=4 x 8 equals one batch of 32 (and GASS-free)."""
    common = ["model.loss_names=sdm", "gass.enabled=false", "masking.noise=false", "masking.mlm=none"]
    whole, _ = train_layout(PRETRAIN, run_overrides(synthetic_root, tmp_path / "whole", "data.batch_size=32",
                                                    *common), 1)
    micro, _ = train_layout(PRETRAIN, run_overrides(synthetic_root, tmp_path / "micro", "data.batch_size=8",
                                                    "train.accum_steps=4", *common), 1)
    assert max_diff(micro, whole) <= 1e-5


def kill_on_forward(model_class, n):
    """A `forward` that sends SIGTERM from inside its n-th call (mid-accumulation)."""
    forward, calls = model_class.forward, [0]

    def wrapped(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    return wrapped


def test_stop_mid_accumulation_finishes_the_step_and_resume_equals_uninterrupted(synthetic_root, tmp_path,
                                                                                   monkeypatch):
    from processor.engine import Trainer
    from processor.pretrain import PretrainTask

    def run(out, kill_at=None):
        cfg = load_config(PRETRAIN, run_overrides(synthetic_root, out, "data.batch_size=8", "train.accum_steps=2",
                                                  "train.max_steps=3"))
        trainer = Trainer(cfg, PretrainTask())
        if kill_at is not None:
            monkeypatch.setattr(type(trainer.model), "forward", kill_on_forward(type(trainer.model), kill_at))
        trainer.train()
        monkeypatch.undo()
        return trainer

    straight = run(tmp_path / "straight")
    # Forward calls per step: 2 re-runs with gradients (the no-grad pass does not call forward).
    stopped = run(tmp_path / "resumed", kill_at=3)  # inside step 2, first micro-batch
    assert stopped.stopped and stopped.global_step == 2
    assert torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["extra"]["batches_done"] == 4
    resumed = run(tmp_path / "resumed")
    assert resumed.global_step == straight.global_step == 3
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key
