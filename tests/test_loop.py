"""The training loop alone: a toy model, an in-memory loader, recording hooks (milliseconds)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn

from model import TrainOutput
from processor.loop import HookBase, NonFiniteLossError, TrainLoop

EPOCH = [{"x": torch.full((2, 3), float(i + 1)), "y": torch.full((2, 1), float(i))} for i in range(4)]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 1)
        self.poison_at: int | None = None
        self.calls = 0

    def forward(self, batch):
        self.calls += 1
        err = self.fc(batch["x"]) - batch["y"]
        loss = err.pow(2).mean() * (float("nan") if self.calls == self.poison_at else 1.0)
        return TrainOutput({"mse_loss": loss, "l1_loss": 0.1 * err.abs().mean()}, {"err": err.mean().detach()},
                           {"pred": err.detach()})


class Recorder(HookBase):
    def __init__(self, log, name="h"):
        self.log, self.name = log, name

    def before_train(self, loop):
        self.log.append((self.name, "before_train"))

    def before_epoch(self, loop, epoch):
        self.log.append((self.name, "before_epoch", epoch))

    def after_step(self, loop, batch, output):
        self.log.append((self.name, "after_step", loop.global_step, loop.batches_done))
        assert torch.equal(output.loss, output.losses["mse_loss"] + output.losses["l1_loss"])
        assert set(output.scalars()) == {"mse_loss", "l1_loss", "err", "loss"} and set(output.aux) == {"pred"}
        assert not output.loss.requires_grad

    def after_epoch(self, loop, epoch):
        self.log.append((self.name, "after_epoch", epoch, loop.scheduler.last_epoch))

    def on_stop(self, loop, epoch, batches_done):
        self.log.append((self.name, "on_stop", epoch, batches_done))

    def after_train(self, loop):
        self.log.append((self.name, "after_train"))


class SliceLoader:
    """A list of batches that `seek` can start part-way (as the real sampler does)."""

    def __init__(self, batches):
        self.batches, self.start = batches, 0

    def seek(self, epoch, done):
        self.start = done

    def __iter__(self):
        return iter(self.batches[self.start:])

    def __len__(self):
        return len(self.batches) - self.start


def make_loop(hooks=(), batches=EPOCH, **kwargs):
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loader = SliceLoader(batches)
    return TrainLoop(model, loader, opt, sched, hooks, seek=loader.seek, **kwargs)


def test_hooks_run_in_order_at_their_points():
    log = []
    loop = make_loop([Recorder(log, "a"), Recorder(log, "b")])
    loop.train(0, 2)
    assert loop.global_step == 8 and not loop.stopped
    expected = [("a", "before_train"), ("b", "before_train")]
    for epoch in range(2):
        expected += [("a", "before_epoch", epoch), ("b", "before_epoch", epoch)]
        for i in range(1, 5):
            expected += [(h, "after_step", 4 * epoch + i, i) for h in "ab"]
        # The scheduler has stepped once per finished epoch when after_epoch runs.
        expected += [("a", "after_epoch", epoch, epoch + 1), ("b", "after_epoch", epoch, epoch + 1)]
    expected += [("a", "after_train"), ("b", "after_train")]
    assert log == expected


def test_resumed_run_skips_before_train_and_consumed_batches():
    log = []
    loop = make_loop([Recorder(log)])
    loop.global_step = 6
    loop.train(1, 2, skip_batches=2)
    assert log[0] == ("h", "before_epoch", 1)  # no before_train
    assert [e[2:] for e in log if e[1] == "after_step"] == [(7, 3), (8, 4)]


class StopAt(HookBase):
    def __init__(self, step):
        self.step = step

    def after_step(self, loop, batch, output):
        if loop.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_stop_request_then_resume_equals_uninterrupted():
    straight = make_loop()
    straight.train(0, 3)

    log = []
    first = make_loop([StopAt(6), Recorder(log)])
    first.train(0, 3)
    assert first.stopped and first.global_step == 6
    assert log[-2:] == [("h", "on_stop", 1, 2), ("h", "after_train")]
    assert ("h", "after_epoch", 1, 2) not in log  # the interrupted epoch is not finished
    # Resume from the state a checkpoint would hold: weights, optimiser, scheduler, counters.
    second = make_loop()
    second.model.load_state_dict(first.model.state_dict())
    second.optimizer.load_state_dict(first.optimizer.state_dict())
    second.scheduler.load_state_dict(first.scheduler.state_dict())
    second.global_step = first.global_step
    second.train(1, 3, skip_batches=2)
    assert second.global_step == straight.global_step == 12
    for name, value in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], value), name


def test_nonfinite_losses_are_skipped_then_raise():
    loop = make_loop(max_nonfinite=2)
    loop.model.poison_at = 2
    loop.train(0, 1)
    assert (loop.global_step, loop.nonfinite_total, loop.nonfinite_in_row) == (3, 1, 0)
    loop = make_loop(max_nonfinite=2)
    poisoned = type(loop.model).forward

    def always_nan(self, batch):
        out = poisoned(self, batch)
        return TrainOutput({k: v * float("nan") for k, v in out.losses.items()}, out.metrics, out.aux)

    loop.model.forward = always_nan.__get__(loop.model)
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        loop.train(0, 1)
    assert loop.global_step == 0 and all(p.grad is None for p in loop.model.parameters())


def test_emptied_batches_are_consumed_without_a_step_and_max_batches_caps_an_epoch():
    batches = [EPOCH[0], {"num_skipped": torch.tensor(2)}, {**EPOCH[1], "num_skipped": torch.tensor(1)}, EPOCH[2]]
    log = []
    loop = make_loop([Recorder(log)], batches=batches, max_batches=3)
    loop.train(0, 1)
    assert [e[2:] for e in log if e[1] == "after_step"] == [(1, 1), (2, 3)]
    assert (loop.skipped_samples, loop.epoch_length, loop.batches_done) == (3, 3, 3)
