"""A small training loop that takes finished objects, and the hooks it calls.

`TrainLoop(model, loader, optimizer, scheduler, hooks)` knows no config, no
dataset and no method: it iterates epochs and batches, runs one optimisation step
per batch and calls its hooks at fixed points. Everything else — metric logging,
evaluation and model selection, checkpoints, a method's own state (pretraining's
token-score cache) — is a `HookBase` (processor/hooks.py, processor/pretrain.py).

What it expects of its inputs:

* the model's training forward returns ``(losses, metrics, aux)``
  (`model.TrainOutput`): the loop optimises the sum of ``losses``, hooks receive
  all three;
* a batch is a mapping of tensors; the key ``num_skipped`` (samples the collate
  function dropped) is removed and counted, and a batch left with no tensor is
  consumed without a step;
* ``seek(epoch, batches_done)``, when given, positions the loader for an epoch
  (and skips what a resumed epoch already consumed); afterwards ``len(loader)``
  counts the batches still to come.

A stop request (SIGTERM/SIGINT, `utils.checkpoint.GracefulExit`) ends the epoch
after the current step on every rank together; the hooks' `on_stop` then runs
instead of `after_epoch`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from utils import comm
from utils.checkpoint import GracefulExit

logger = logging.getLogger(__name__)

__all__ = ["HookBase", "NonFiniteLossError", "StepOutput", "TrainLoop", "to_device"]


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


@dataclass
class StepOutput:
    """One optimisation step as the hooks see it (tensors detached).

    Attributes:
        loss: The optimised total, the sum of `losses`.
        losses: The model's loss terms.
        metrics: The model's scalar diagnostics.
        aux: The model's other tensors (e.g. token scores).
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]

    def scalars(self) -> dict[str, torch.Tensor]:
        """Loss terms, metrics and the total as ``loss``: what is logged per step."""
        return {**self.losses, **self.metrics, "loss": self.loss}


class HookBase:
    """Called by `TrainLoop` at fixed points, on every rank. Subclasses override what they need.

    Hooks run in the order the loop was given them.
    """

    def before_train(self, loop: TrainLoop) -> None:
        """Before the first step of a fresh run (not when resuming)."""

    def before_epoch(self, loop: TrainLoop, epoch: int) -> None:
        """Before the loader is positioned for `epoch`."""

    def after_step(self, loop: TrainLoop, batch: Mapping[str, Any], output: StepOutput) -> None:
        """After each optimisation step (not after a skipped one); `batch` is on the device."""

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        """After a finished epoch and the scheduler's step."""

    def on_stop(self, loop: TrainLoop, epoch: int, batches_done: int) -> None:
        """A stop request ended `epoch` after `batches_done` of its batches (instead of `after_epoch`)."""

    def after_train(self, loop: TrainLoop) -> None:
        """After the last epoch, or after a stop request."""


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class TrainLoop:
    """Epochs of optimisation steps over `loader`, with hooks.

    Args:
        model: The model (gradient clipping reads its parameters).
        loader: Iterable of batches; `len()` counts the batches of an epoch.
        optimizer: The optimiser.
        scheduler: Stepped once after each finished epoch (or None).
        hooks: Called in this order.
        forward_model: What the step calls (e.g. the DDP wrapper of `model`); default `model`.
        device: Where batches go.
        autocast: Context manager factory around the forward (mixed precision).
        scaler: A `torch.amp.GradScaler` (fp16); default a disabled one.
        grad_clip: Max gradient norm; 0 = no clipping.
        max_nonfinite: Non-finite losses in a row before `NonFiniteLossError`.
        max_batches: Batches per epoch at most; 0 = the whole loader.
        seek: ``seek(epoch, batches_done)`` positions the loader (see the module doc).
    """

    def __init__(self, model: nn.Module, loader: Iterable[Mapping[str, Any]], optimizer: torch.optim.Optimizer,
                 scheduler: Any = None, hooks: Sequence[HookBase] = (), *, forward_model: nn.Module | None = None,
                 device: torch.device | str = "cpu",
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0, max_nonfinite: int = 5,
                 max_batches: int = 0, seek: Callable[[int, int], None] | None = None) -> None:
        self.model, self.loader, self.optimizer, self.scheduler = model, loader, optimizer, scheduler
        self.hooks = list(hooks)
        self.forward_model = forward_model if forward_model is not None else model
        self.device = torch.device(device)
        self.autocast = autocast
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.grad_clip, self.max_nonfinite, self.max_batches = grad_clip, max_nonfinite, max_batches
        self.seek = seek
        self.global_step = 0
        self.epoch = 0
        self.batches_done = 0  # batches consumed in the current epoch (skipped ones included)
        self.epoch_length = 0  # batches the current epoch will consume
        self.skipped_samples = 0  # samples the collate function dropped in the current epoch
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.stopped = False

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    def train(self, start_epoch: int, end_epoch: int, skip_batches: int = 0) -> None:
        """Run epochs `start_epoch` .. `end_epoch` - 1, the first one from batch `skip_batches` on."""
        with GracefulExit() as stop:
            if self.global_step == 0 and start_epoch == 0 and skip_batches == 0:
                self._call("before_train")
            for epoch in range(start_epoch, end_epoch):
                self.epoch = epoch
                self._call("before_epoch", epoch)
                done = self.train_one_epoch(epoch, stop, skip_batches)
                skip_batches = 0
                if stop.requested:
                    self.stopped = True
                    self._call("on_stop", epoch, done)
                    break
                if self.scheduler is not None:
                    self.scheduler.step()
                self._call("after_epoch", epoch)
        self._call("after_train")

    def train_one_epoch(self, epoch: int, stop: GracefulExit, skip: int = 0) -> int:
        """One pass over the loader; returns the number of batches consumed in this epoch."""
        self.forward_model.train()
        if self.seek is not None:
            self.seek(epoch, skip)
        total = skip + len(self.loader)
        self.epoch_length = min(total, self.max_batches) if self.max_batches > 0 else total
        self.batches_done, self.skipped_samples = skip, 0
        for batch in self.loader:
            if self.batches_done >= self.epoch_length:
                break
            batch = dict(batch)
            self.skipped_samples += int(batch.pop("num_skipped", 0))
            self.batches_done += 1
            if any(torch.is_tensor(v) for v in batch.values()):
                batch = to_device(batch, self.device)
                output = self.step(batch)
                if output is not None:
                    self._call("after_step", batch, output)
            elif comm.get_world_size() > 1:
                # The other ranks are inside a DDP step this rank cannot join.
                raise RuntimeError("every image of a batch was unreadable (data.skip_bad_images); "
                                   "run tools/check_data.py and fix or remove the files")
            if stop.should_stop():  # collective: every rank stops after the same step
                break
        if self.skipped_samples:
            logger.warning("epoch %d: skipped %d unreadable image(s) (data.skip_bad_images)", epoch,
                           self.skipped_samples)
        return self.batches_done

    def step(self, batch: Mapping[str, Any]) -> StepOutput | None:
        """One optimisation step on a batch already on the device; None if the loss was not finite."""
        with self.autocast():
            losses, metrics, aux = self.forward_model(batch)
        loss = sum(losses.values())
        if not self._all_finite(loss):
            self._skip_nonfinite(losses)
            return None
        self.nonfinite_in_row = 0
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return StepOutput(loss.detach(), {k: v.detach() for k, v in losses.items()},
                          {k: v.detach() for k, v in metrics.items()}, {k: v.detach() for k, v in aux.items()})

    @staticmethod
    def _all_finite(loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if comm.get_world_size() > 1:
            # Every rank must skip together, or DDP's gradient all-reduce would hang.
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_nonfinite(self, losses: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        logger.warning("non-finite loss at step %d, step skipped (%d in a row): %s", self.global_step,
                       self.nonfinite_in_row, {k: float(v.detach()) for k, v in losses.items()})
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite); "
                                     "lower the learning rate or try precision=bf16/fp32")
