"""Host-device syncs: the counter, a real training step without any, and skipping a non-finite step on the
device (fused optimiser) = skipping it on the host.

Contracts: `HostSyncCounter` sees the value reads of our code and not torch's own; a pretraining step
(GASS on) and a fine-tuning step with `solver.fused=true` make no host read between log lines (the default
kernel: exactly one, the finite check); a loop that skips a NaN step on the device ends with the same
weights and optimiser state as one that reads the flag on the host, reports the same skipped steps, and
raises `NonFiniteLossError` alike; the score cache's deferred update stores what an immediate one does.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from datasets.score_cache import ScoreCache
from model import TrainOutput
from processor.engine import Trainer
from processor.finetune import FinetuneTask
from processor.loop import HookBase, NonFiniteLossError, TrainLoop
from processor.pretrain import PretrainTask
from tests.conftest import REPO
from utils.config import load_config
from utils.host_sync import HostCopy, HostSyncCounter, PerStep


def test_counter_sees_our_value_reads_not_torchs_own():
    x = torch.arange(6.0)
    with HostSyncCounter() as syncs:
        x.sum().item()
        float(x.max())
        bool(x.min() < 1)
        x.tolist()
        x[x > 2]  # boolean-mask indexing: its size is data
        x.nonzero()
        x.to("meta")  # a blocking copy to another device
        f"{x.sum():.2f}"  # formatting goes through torch's Python wrapper, still our read
    assert syncs.counts == {"item": 1, "__float__": 1, "__bool__": 1, "tolist": 1, "__getitem__": 1, "nonzero": 1,
                            "to": 1, "__format__": 1}
    assert all(site.startswith("tests/test_host_sync.py:") for site in syncs.sites), syncs.sites
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)  # reads its CPU step counters itself
    with HostSyncCounter() as syncs:
        model(x[:3]).sum().backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        x[torch.tensor([0, 2])]  # integer indexing: no read
        x.to("meta", non_blocking=True)
        HostCopy({"x": x.sum()}).get()
    assert syncs.total == 0, syncs.by_site()


def small_run(root, out, config, *extra):
    return load_config(str(REPO / "configs" / "demo" / config),
                       [f"data.root={root}", f"output_dir={out}", "data.batch_size=8", "log_period=3",
                        "train.max_steps=6", "solver.epochs=2", "solver.warmup_epochs=0", "eval.period=0",
                        "data.num_workers=0", "model.finetune=", *extra])


def count_step_syncs(trainer, steps_per_epoch=6):
    """Host reads per optimisation step (the step and its after-step hooks) by call site: steps without a
    log line, steps with one."""
    per_step = PerStep(root=REPO)
    trainer.loop.step_context = per_step
    trainer.train()
    plain, logged = [], []
    for i, counter in enumerate(per_step.steps):
        position = i % steps_per_epoch + 1
        logs = position % trainer.cfg.log_period == 0 or position == steps_per_epoch
        (logged if logs else plain).append(counter.by_site())
    return plain, logged


@pytest.mark.parametrize("config,task", [("tiny_pretrain.yaml", PretrainTask), ("tiny_finetune.yaml", FinetuneTask)])
def test_a_real_training_step_reads_nothing_back_from_the_device(synthetic_root, tmp_path, config, task):
    """With the fused kernel: no host read in a step, one value read per log line (meters + the loop's flags)."""
    plain, logged = count_step_syncs(Trainer(small_run(synthetic_root, tmp_path / "fused", config,
                                                       "solver.fused=true"), task()))
    assert len(plain) == 8 and len(logged) == 4
    assert all(sites == {} for sites in plain), plain
    assert all(sum(sites.values()) == 2 for sites in logged), logged
    # The default (foreach) kernel cannot skip on the device: the loop reads the finite flag, once per step.
    plain, _ = count_step_syncs(Trainer(small_run(synthetic_root, tmp_path / "foreach", config), task()))
    assert all(list(sites.values()) == [1] and "processor/loop.py" in next(iter(sites)) for sites in plain), plain


class Toy(nn.Module):
    def __init__(self, poison=()):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)
        self.poison, self.calls = set(poison), 0

    def forward(self, batch):
        self.calls += 1
        err = self.fc(batch["x"]) - batch["y"]
        scale = float("nan") if self.calls in self.poison else 1.0
        return TrainOutput({"mse_loss": err.pow(2).mean() * scale}, {}, {})


class Seen(HookBase):
    def __init__(self):
        self.applied = []

    def after_step(self, loop, batch, output):
        self.applied.append(True if output.applied is None else bool(output.applied))


BATCHES = [{"x": torch.randn(4, 3, generator=torch.Generator().manual_seed(i)), "y": torch.full((4, 2), float(i))}
           for i in range(6)]


def run(on_device, poison, epochs=2, sync_period=3, max_nonfinite=5):
    model = Toy(poison)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, fused=True)
    seen = Seen()
    loop = TrainLoop(model, BATCHES, opt, None, [seen], grad_clip=1.0, sync_period=sync_period,
                     max_nonfinite=max_nonfinite)
    assert loop.skips_on_device
    loop.skips_on_device = on_device
    loop.train(0, epochs)
    return loop, seen


def test_skipping_on_the_device_equals_skipping_on_the_host(caplog):
    host, host_seen = run(on_device=False, poison={2, 9, 10})
    caplog.clear()
    with caplog.at_level("WARNING", logger="processor.loop"):
        device, device_seen = run(on_device=True, poison={2, 9, 10})
    for name, value in host.model.state_dict().items():
        assert torch.equal(device.model.state_dict()[name], value), name
    host_state, device_state = host.optimizer.state_dict()["state"], device.optimizer.state_dict()["state"]
    for key, state in host_state.items():
        for name, value in state.items():
            assert torch.equal(device_state[key][name], value), (key, name)
    # The same steps were skipped and reported; the device loop counts them as steps, the hooks see the flag.
    assert host.nonfinite_total == device.nonfinite_total == 3 and device.nonfinite_in_row == 0
    assert (host.global_step, device.global_step) == (9, 12)
    assert host_seen.applied == [True] * 9
    assert device_seen.applied == [i not in (2, 9, 10) for i in range(1, 13)]
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "non-finite loss at step 1", "non-finite loss at step 8", "non-finite loss at step 9"]


def test_too_many_nonfinite_steps_raise_when_the_flags_are_read():
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        run(on_device=True, poison={2, 3, 4}, max_nonfinite=3, sync_period=2)
    loop, _ = run(on_device=True, poison={2, 3, 5}, max_nonfinite=3)  # never three in a row
    assert loop.nonfinite_total == 3


def test_deferred_score_cache_update_stores_what_an_immediate_one_does(tmp_path):
    rows = torch.rand(3, 7)
    now = ScoreCache(tmp_path / "now", 10, 7, init_value=0.5, refresh="step")
    later = ScoreCache(tmp_path / "later", 10, 7, init_value=0.5, refresh="step")
    now.update(torch.tensor([1, 4, 8]), rows)
    later.update(torch.tensor([1, 4, 8]), rows, wait=False)
    assert np.all(np.load(tmp_path / "later" / "score_cache.npy") == 0.5)  # not stored yet
    assert torch.equal(later.get(torch.arange(10)), now.get(torch.arange(10)))  # a read stores it first
    later.update(torch.tensor([2]), rows[:1] + 1, applied=torch.tensor(False), wait=False)
    later.update(torch.tensor([3]), rows[:1] + 2, applied=torch.tensor(True), wait=False)
    state = later.state_dict()["scores"]
    assert torch.equal(state[2], torch.full((7,), 0.5)) and torch.equal(state[3], rows[0] + 2)
    later.update(torch.tensor([12]), rows[:1], wait=False)  # an out-of-range index is reported when stored
    with pytest.raises(IndexError, match="out of range"):
        later.flush()


def test_fused_run_logs_the_same_metrics_as_the_default_kernel(synthetic_root, tmp_path):
    """Deferred logging changes when values are read, not what is logged (up to the fused kernel's rounding)."""
    records = {}
    for fused in ("false", "true"):
        out = tmp_path / fused
        Trainer(small_run(synthetic_root, out, "tiny_pretrain.yaml", f"solver.fused={fused}"), PretrainTask()).train()
        records[fused] = [json.loads(line) for line in open(out / "metrics.jsonl") if '"train"' in line]
    assert [r["epoch"] for r in records["true"]] == [0, 1]
    for a, b in zip(records["false"], records["true"]):
        assert set(a) == set(b) and a["nonfinite_steps"] == b["nonfinite_steps"] == 0
        for key in ("loss", "sdm_loss", "mlm_loss", "mlm_mask_rate", "noise_mask_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), key


@pytest.mark.dist
def test_sync_free_steps_on_two_processes_equal_one(synthetic_root, tmp_path):
    """Fused optimiser (flags skipped on the device, all-reduced), deferred score-cache rows gathered from both
    ranks, the stop agreement every 2 steps: 2 gloo processes x 1 micro-batch = 1 process x 2 micro-batches."""
    from tests.test_accumulation import PRETRAIN, max_diff, run_overrides, train_layout

    runs = {processes: train_layout(PRETRAIN, run_overrides(
        synthetic_root, tmp_path / f"p{processes}", "data.batch_size=8", f"train.accum_steps={3 - processes}",
        "solver.fused=true", "log_period=2", "train.max_steps=4"), processes) for processes in (1, 2)}
    assert max_diff(runs[2][0], runs[1][0]) <= 1e-5
    assert np.abs(runs[2][1] - runs[1][1]).max() <= 1e-5
    assert (np.abs(runs[1][1] - 0.85) > 1e-6).any(axis=1).sum() >= 4 * 16  # every step's rows were stored


def _read_in_child(cache):
    cache.get(torch.arange(3))  # must not touch the owner's rows in flight


def test_a_forked_reader_never_stores_nor_waits_for_the_owners_rows_in_flight(tmp_path):
    """A DataLoader worker forked while an update is in flight (on a GPU: a CUDA event it cannot use) drops it."""
    import multiprocessing

    class InFlight:
        def get(self):
            raise RuntimeError("the rows in flight were read in a forked process")

    cache = ScoreCache(tmp_path, 4, 7, init_value=0.5, refresh="step")
    cache._pending = InFlight()
    child = multiprocessing.get_context("fork").Process(target=_read_in_child, args=(cache,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    cache._pending = None
