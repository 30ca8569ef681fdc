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

With ``accum_steps=K > 1`` every optimisation step consumes K loader batches
(micro-batches) and the losses over the whole batch (contrastive ones) are
computed *exactly* over all K of them, by gradient caching (Gao et al. 2021): a
no-grad pass collects ``model.cache_features(micro)`` of every micro-batch; the
whole-batch losses ``model.batch_losses(concatenated features)`` and their
gradients with respect to those features are computed once; then each
micro-batch runs again with gradients (``forward(micro, batch_losses=False)``,
which returns the same features in ``aux`` with their graphs, plus the
per-sample losses) and back-propagates ``sum(per-sample losses) / K +
<features, cached feature gradients>``. The whole-batch losses must not read a
parameter (only their features). Per-sample losses are means over their
micro-batch, so K micro-batches on P processes train exactly as K x P processes
of one micro-batch each would. Peak memory is one micro-batch's plus the cached
features. A stop request is honoured between optimisation steps only.

A stop request (SIGTERM/SIGINT, `utils.checkpoint.GracefulExit`) ends the epoch
after the current step on every rank together; the hooks' `on_stop` then runs
instead of `after_epoch`. Under several processes the ranks agree on it every
`sync_period` steps and at the end of each epoch.

Host-device syncs. A step whose loss is not finite is skipped. With an optimiser that
can skip its own update on the device (a fused kernel: `solver.fused`; torch marks it
`_step_supports_amp_scaling`) and no fp16 loss scaling, the loop never reads the
loss on the host: it always back-propagates, hands the optimiser the "not finite" flag
(`optimizer.found_inf`, as `torch.amp.GradScaler` does; the fused kernel then leaves
parameters and moments untouched), calls the hooks with `StepOutput.applied` (a device
boolean) and reads the flags of the past steps in one go every `sync_period` steps
(warnings, `nonfinite_total`, `NonFiniteLossError`). `global_step` then counts the
skipped steps too. Otherwise the flag is read after each forward (one host wait per
step), a skipped step is not back-propagated, not counted, and the hooks do not see it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.build import TrainOutput
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
        applied: Whether the optimiser applied this step (a boolean on the device) when the
            loop skips non-finite steps on the device; None when it was applied for sure.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    metrics: dict[str, torch.Tensor]
    aux: dict[str, torch.Tensor]
    applied: torch.Tensor | None = None

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
        """After each optimisation step; `batch` is on the device. A step skipped for a non-finite
        loss comes here only when the skip happened on the device (`output.applied` is False then)."""

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        """After a finished epoch and the scheduler's step."""

    def on_stop(self, loop: TrainLoop, epoch: int, batches_done: int) -> None:
        """A stop request ended `epoch` after `batches_done` of its batches (instead of `after_epoch`)."""

    def after_train(self, loop: TrainLoop) -> None:
        """After the last epoch, or after a stop request."""


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _concat(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Micro-batches as one batch (tensors concatenated along the first dimension), for the hooks."""
    return {k: torch.cat([b[k] for b in batches]) for k, v in batches[0].items() if torch.is_tensor(v)}


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
        max_batches: Optimisation steps per epoch at most; 0 = the whole loader.
        seek: ``seek(epoch, batches_done)`` positions the loader (see the module doc).
        accum_steps: Loader batches per optimisation step (gradient caching when > 1).
        sync_period: Steps between the loop's host reads of device state (non-finite flags of
            skipped-on-device steps; the ranks' stop agreement). 1 = every step.

    Attributes:
        step_context: Called once per optimisation step; the context manager it returns wraps
            the step and its `after_step` hooks (default: none; `bench/host_syncs.py` counts
            host reads per step with it).
    """

    def __init__(self, model: nn.Module, loader: Iterable[Mapping[str, Any]], optimizer: torch.optim.Optimizer,
                 scheduler: Any = None, hooks: Sequence[HookBase] = (), *, forward_model: nn.Module | None = None,
                 device: torch.device | str = "cpu",
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0, max_nonfinite: int = 5,
                 max_batches: int = 0, seek: Callable[[int, int], None] | None = None,
                 accum_steps: int = 1, sync_period: int = 1) -> None:
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
        if sync_period < 1:
            raise ValueError(f"sync_period must be >= 1, got {sync_period}")
        self.model, self.loader, self.optimizer, self.scheduler = model, loader, optimizer, scheduler
        self.hooks = list(hooks)
        self.forward_model = forward_model if forward_model is not None else model
        self.device = torch.device(device)
        self.autocast = autocast
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.grad_clip, self.max_nonfinite, self.max_batches = grad_clip, max_nonfinite, max_batches
        self.seek, self.accum_steps, self.sync_period = seek, accum_steps, sync_period
        # Skip non-finite steps on the device: the optimiser honours `found_inf` and no fp16 scaler does.
        self.skips_on_device = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) \
            and not self.scaler.is_enabled()
        self._pending_flags: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []
        self.step_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
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
                if stop.should_stop():  # collective: the ranks agree whatever the sync period
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
        k = self.accum_steps
        total = skip + len(self.loader)
        limit = min(total, self.max_batches * k) if self.max_batches > 0 else total
        self.epoch_length = limit - limit % k  # whole optimisation steps only
        self.batches_done, self.skipped_samples = skip, 0
        pending: list[dict[str, Any]] = []
        for batch in self.loader:
            if self.batches_done >= self.epoch_length:
                break
            batch = dict(batch)
            self.skipped_samples += int(batch.pop("num_skipped", 0))
            self.batches_done += 1
            if any(torch.is_tensor(v) for v in batch.values()):
                pending.append(to_device(batch, self.device))
            elif comm.get_world_size() > 1 or k > 1:
                # The other ranks (or micro-batches) are inside a step this batch cannot join.
                raise RuntimeError("every image of a batch was unreadable (data.skip_bad_images); "
                                   "run tools/check_data.py and fix or remove the files")
            if self.batches_done % k:
                continue  # mid-accumulation
            if pending:
                with self.step_context():
                    output = self.step(pending[0]) if k == 1 else self.accumulated_step(pending)
                    if output is not None:
                        self._call("after_step", pending[0] if k == 1 else _concat(pending), output)
                pending = []
            # Collective under DDP (every rank stops after the same step): every sync_period steps.
            if (comm.get_world_size() == 1 or (self.batches_done // k) % self.sync_period == 0) \
                    and stop.should_stop():
                break
        self.resolve_nonfinite()
        if self.skipped_samples:
            logger.warning("epoch %d: skipped %d unreadable image(s) (data.skip_bad_images)", epoch,
                           self.skipped_samples)
        return self.batches_done

    def step(self, batch: Mapping[str, Any]) -> StepOutput | None:
        """One optimisation step on a batch already on the device; None if the loss was not finite."""
        with self.autocast():
            losses, metrics, aux = self.forward_model(batch)
        loss = sum(losses.values())
        finite = self._finite_everywhere(torch.isfinite(loss.detach()))
        losses = {k: v.detach() for k, v in losses.items()}
        if not self.skips_on_device and not self._read_finite(finite, losses):
            return None
        self.scaler.scale(loss).backward()
        return self._finish_step(finite, loss.detach(), losses, {k: v.detach() for k, v in metrics.items()},
                                 {k: v.detach() for k, v in aux.items()})

    def accumulated_step(self, micro_batches: Sequence[Mapping[str, Any]]) -> StepOutput | None:
        """One optimisation step over K micro-batches by gradient caching (see the module doc)."""
        k = len(micro_batches)
        model = self.model
        rng_states, cached = [], []
        with torch.no_grad():
            for micro in micro_batches:
                rng_states.append(_rng_state(self.device))
                with self.autocast():
                    cached.append(model.cache_features(micro))
        inputs = {name: torch.cat([c[name] for c in cached]) for name in cached[0]}
        leaves = {name: t.detach().requires_grad_() for name, t in inputs.items() if t.is_floating_point()}
        with self.autocast():
            batch_losses = model.batch_losses({**inputs, **leaves})
        grads: dict[str, Any] = {}
        if batch_losses:
            batch_total = sum(batch_losses.values())
            found = torch.autograd.grad(batch_total, list(leaves.values()), allow_unused=True)
            sizes = [len(next(iter(c.values()))) for c in cached]
            grads = {name: g.split(sizes) for name, g in zip(leaves, found) if g is not None}
        else:
            batch_total = torch.zeros((), device=self.device)
        del cached, inputs, leaves
        finite = torch.isfinite(batch_total.detach())
        parts: list[TrainOutput] = []
        for i, micro in enumerate(micro_batches):
            _set_rng_state(self.device, rng_states[i])
            sync = self.forward_model.no_sync() if i < k - 1 and hasattr(self.forward_model, "no_sync") \
                else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    losses, metrics, aux = self.forward_model(micro, batch_losses=False)
                surrogate = sum(losses.values()) / k
                for name, g in grads.items():
                    surrogate = surrogate + (aux.pop(name).float() * g[i]).sum()
                self.scaler.scale(surrogate).backward()
            if losses:
                finite = finite & torch.isfinite(sum(losses.values()).detach())
            parts.append(TrainOutput({n: v.detach() for n, v in losses.items()},
                                     {n: v.detach() for n, v in metrics.items()},
                                     {n: v.detach() for n, v in aux.items() if n not in grads}))
        losses = {n: v.detach() for n, v in batch_losses.items()}
        losses.update({n: sum(p.losses[n] for p in parts) / k for n in parts[0].losses})
        loss = sum(losses.values())
        finite = self._finite_everywhere(finite)
        if not self.skips_on_device and not self._read_finite(finite, losses):
            return None
        return self._finish_step(finite, loss, losses,
                                 {n: sum(p.metrics[n] for p in parts) / k for n in parts[0].metrics},
                                 {n: torch.cat([p.aux[n] for p in parts]) for n in parts[0].aux})

    def _finish_step(self, finite: torch.Tensor, loss: torch.Tensor, losses: dict[str, torch.Tensor],
                     metrics: dict[str, torch.Tensor], aux: dict[str, torch.Tensor]) -> StepOutput:
        """The optimiser's step once the gradients are in (skipped on the device unless `finite`)."""
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.skips_on_device:
            self.optimizer.found_inf = (~finite).float()  # read by the fused kernel, as GradScaler sets it
            try:
                self.scaler.step(self.optimizer)
            finally:
                del self.optimizer.found_inf
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if not self.skips_on_device:
            return StepOutput(loss, losses, metrics, aux)
        self._pending_flags.append((self.global_step - 1, finite, losses))
        if len(self._pending_flags) >= self.sync_period:
            self.resolve_nonfinite()
        return StepOutput(loss, losses, metrics, aux, applied=finite)

    @staticmethod
    def _finite_everywhere(finite: torch.Tensor) -> torch.Tensor:
        """This step's "losses finite" boolean, the same on every rank (no host read)."""
        if comm.get_world_size() > 1:
            # Every rank must skip together, or DDP's gradient all-reduce would hang.
            finite = finite.float()
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            finite = finite > 0
        return finite

    def _read_finite(self, finite: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> bool:
        """Read `finite` on the host (one wait for the device); count and report a skipped step."""
        if bool(finite):
            self.nonfinite_in_row = 0
            return True
        self.optimizer.zero_grad(set_to_none=True)
        self._count_nonfinite(self.global_step, {k: float(v) for k, v in losses.items()})
        return False

    def resolve_nonfinite(self) -> None:
        """Read the flags of the steps skipped on the device since the last call (one host wait)."""
        if not self._pending_flags:
            return
        pending, self._pending_flags = self._pending_flags, []
        flags = torch.stack([finite for _, finite, _ in pending]).tolist()
        for (step, _, losses), finite in zip(pending, flags):
            if finite:
                self.nonfinite_in_row = 0
            else:
                self._count_nonfinite(step, {k: float(v) for k, v in losses.items()})

    def _count_nonfinite(self, step: int, losses: Mapping[str, float]) -> None:
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        logger.warning("non-finite loss at step %d, step skipped (%d in a row): %s", step,
                       self.nonfinite_in_row, losses)
        if self.nonfinite_in_row >= self.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite); "
                                     "lower the learning rate or try precision=bf16/fp32")
