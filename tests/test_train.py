"""End-to-end training contracts: pretrain -> fine-tune -> test, resume = uninterrupted,
SIGTERM safety, non-finite guard, and 2-process DDP = 1 process on the whole batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from processor.engine import Trainer
from processor.loop import NonFiniteLossError
from processor.pretrain import PretrainTask
from tests.conftest import REPO, load_tool
from utils.config import load_config

PRETRAIN = str(REPO / "configs" / "demo" / "tiny_pretrain.yaml")
FINETUNE = str(REPO / "configs" / "demo" / "tiny_finetune.yaml")


def small(root, out, *extra):
    return [f"data.root={root}", f"output_dir={out}", "data.batch_size=16", "data.test_batch_size=64",
            "log_period=1", *extra]


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_pretrain_finetune_test_end_to_end(synthetic_root, tmp_path, capsys):
    train = load_tool("train")
    pre = tmp_path / "pre"
    assert train.main(["--config", PRETRAIN, *small(synthetic_root, pre, "solver.epochs=2", "train.max_steps=3")]) == 0
    for name in ("config.yaml", "train.log", "last.pth", "best_CUHK-PEDES.pth", "metrics.jsonl", "score_cache.npy"):
        assert (pre / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(pre / "tb"))
    records = read_jsonl(pre / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["type"] == "train"] == [0, 1]
    evals = [r for r in records if r["type"] == "eval"]
    assert {(r["epoch"], r["split"]) for r in evals} == {(0, "val"), (0, "test"), (1, "val"), (1, "test")}
    assert all(0 <= r["R1"] <= r["R5"] <= r["R10"] <= 100 for r in evals)
    # GASS wrote into the cache: the rows of trained captions left the 0.85 initial value.
    cache = np.load(pre / "score_cache.npy")
    assert (np.abs(cache - 0.85) > 1e-6).any(axis=1).sum() >= 3 * 16

    fine = tmp_path / "fine"
    assert train.main(["--config", FINETUNE, "--finetune", str(pre / "last.pth"),
                       *small(synthetic_root, fine, "solver.epochs=1", "solver.warmup_epochs=0",
                                   "train.max_steps=2")]) == 0
    log = (fine / "train.log").read_text()
    assert "missing (2): classifier.bias, classifier.weight" in log
    assert (fine / "best_CUHK-PEDES.pth").exists()

    test = load_tool("test")
    capsys.readouterr()
    assert test.main(["--config", str(fine / "config.yaml"), "--checkpoint", str(fine / "best_CUHK-PEDES.pth"),
                      "--record"]) == 0
    assert "CUHK-PEDES t2i" in capsys.readouterr().out
    assert read_jsonl(fine / "metrics.jsonl")[-1]["type"] == "test"


def run_trainer(cfg_overrides, task=None, until=None):
    cfg = load_config(PRETRAIN, cfg_overrides)
    trainer = Trainer(cfg, task or PretrainTask())
    trainer.train(until_epoch=until)
    return trainer


def final_state(run_dir):
    ckpt = torch.load(os.path.join(run_dir, "last.pth"), weights_only=True)
    return ckpt["model"], np.load(os.path.join(run_dir, "score_cache.npy"))


def assert_same_run(a, b):
    model_a, cache_a = final_state(a)
    model_b, cache_b = final_state(b)
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    np.testing.assert_array_equal(cache_a, cache_b)


@pytest.fixture(scope="module")
def straight_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    run_trainer(small(synthetic_root, out, "solver.epochs=2", "train.max_steps=3", "eval.period=0"))
    return out


def test_resume_at_epoch_boundary_equals_uninterrupted(synthetic_root, straight_run, tmp_path):
    overrides = small(synthetic_root, tmp_path, "solver.epochs=2", "train.max_steps=3", "eval.period=0")
    run_trainer(overrides, until=1)
    resumed = run_trainer(overrides)
    assert resumed.start_epoch == 1
    assert_same_run(straight_run, tmp_path)


class SigtermAt(PretrainTask):
    """Sends this process SIGTERM after a given optimisation step."""

    def __init__(self, step):
        self.step = step

    def after_step(self, trainer, batch, out):
        super().after_step(trainer, batch, out)
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_mid_epoch_saves_last_and_resume_equals_uninterrupted(synthetic_root, straight_run, tmp_path):
    overrides = small(synthetic_root, tmp_path, "solver.epochs=2", "train.max_steps=3", "eval.period=0")
    stopped = run_trainer(overrides, task=SigtermAt(step=4))  # epoch 1, after its first batch
    assert stopped.global_step == 4 and stopped.stopped
    ckpt = torch.load(tmp_path / "last.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["extra"]["batches_done"] == 1
    resumed = run_trainer(overrides)
    assert resumed.global_step == 6 and not resumed.stopped
    assert_same_run(straight_run, tmp_path)


def test_nonfinite_loss_is_skipped_and_counted(synthetic_root, tmp_path, monkeypatch):
    cfg = load_config(PRETRAIN, small(synthetic_root, tmp_path, "solver.epochs=1", "solver.warmup_epochs=0", "train.max_steps=3",
                                      "eval.period=0", "train.max_nonfinite=3"))
    trainer = Trainer(cfg, PretrainTask())
    forward = type(trainer.model).forward
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        out = forward(self, batch)
        if calls["n"] == 2:
            out.losses["sdm_loss"] = out.losses["sdm_loss"] * float("nan")
        return out

    monkeypatch.setattr(type(trainer.model), "forward", poisoned)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    batch = next(iter(trainer.loader))
    batch.pop("num_skipped")
    trainer.step(batch)                      # a normal step changes the weights
    after_first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_first[k]) for k in before)
    assert trainer.step(batch) is None       # NaN: skipped
    assert trainer.nonfinite_total == 1 and trainer.global_step == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, after_first[k]), k
    assert all(p.grad is None for p in trainer.model.parameters())
    calls["n"] = 1
    assert trainer.step(batch) is None       # 2 in a row
    calls["n"] = 1
    with pytest.raises(NonFiniteLossError):  # 3 in a row = train.max_nonfinite
        trainer.step(batch)


@pytest.mark.dist
def test_two_process_ddp_step_equals_one_process_on_concatenated_batch(synthetic_root, tmp_path):
    """One SGD step (lr 1, no momentum/decay): equal updates <=> equal gradients."""
    common = ["--config", FINETUNE, f"data.root={synthetic_root}", "model.loss_names=sdm+id", "masking.mlm=none",
              "solver.optimizer=SGD", "solver.momentum=0.0", "solver.weight_decay=0.0", "solver.lr=1.0",
              "solver.warmup_epochs=0", "solver.bias_lr_factor=1.0", "solver.lr_factor=1.0", "solver.epochs=1",
              "train.max_steps=1", "eval.period=0", "data.img_aug=false", "model.finetune="]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29617",
                    str(REPO / "tools" / "train.py"), *common, f"output_dir={two}", "data.batch_size=8"],
                   check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    one = tmp_path / "one"
    subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), *common, f"output_dir={one}",
                    "data.batch_size=16"], check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    a = torch.load(two / "last.pth", weights_only=True)["model"]
    b = torch.load(one / "last.pth", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)
    # The step did something: both runs took one step at lr 1 on a non-zero loss.
    for run in (one, two):
        record = [r for r in read_jsonl(run / "metrics.jsonl") if r["type"] == "train"][0]
        assert record["step"] == 1 and record["lr"] == 1.0 and record["sdm_loss"] > 0


def test_mask_rates_count_eligible_tokens():
    from datasets.masking import mask_rates

    ids = torch.tensor([[49406, 10, 11, 12, 13, 49407, 0, 0]])
    noise = ids.clone()
    noise[0, 2] = 49405
    labels = torch.zeros_like(ids)
    labels[0, 1] = 10
    labels[0, 3] = 12
    rates = mask_rates({"caption_ids": ids, "noise_ids": noise, "mlm_labels": labels})
    assert rates["noise_mask_rate"].item() == pytest.approx(1 / 4)
    assert rates["mlm_mask_rate"].item() == pytest.approx(2 / 4)
