"""Epoch-stepped learning-rate schedules with warm-up (IRRA's ``LRSchedulerWithWarmup``).

With ``e = last_epoch`` (0 right after construction, +1 per ``step()``) and
``base_lr`` each param group's initial lr:

* warm-up, ``e < warmup_epochs``: ``base_lr * f`` with ``f = warmup_factor``
  (``constant``) or ``f = warmup_factor * (1 - a) + a``, ``a = e / warmup_epochs``
  (``linear``);
* afterwards, with ``r = (e - warmup_epochs) / (total_epochs - warmup_epochs)``:

  - ``step``:   ``base_lr * gamma ** bisect_right(milestones, e)``
  - ``exp``:    ``base_lr * power ** r``
  - ``linear``: ``base_lr * (1 - r)``
  - ``poly``:   ``target_lr + (base_lr - target_lr) * power ** (1 - r)``
  - ``cosine``: ``target_lr + (base_lr - target_lr) * 0.5 * (1 + cos(pi * r))``

These are IRRA's formulas verbatim, including its unusual ``exp`` and ``poly``
(which ignore / use ``target_lr`` as shown); nothing is clamped after
``total_epochs``.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from utils.config import ConfigError

__all__ = ["SCHEDULE_MODES", "WARMUP_METHODS", "LRSchedulerWithWarmup", "build_lr_scheduler", "schedule_mode"]


def _step(s: LRSchedulerWithWarmup, base_lr: float, ratio: float) -> float:
    return base_lr * s.gamma ** bisect_right(s.milestones, s.last_epoch)


def _exp(s: LRSchedulerWithWarmup, base_lr: float, ratio: float) -> float:
    return base_lr * s.power**ratio


def _linear(s: LRSchedulerWithWarmup, base_lr: float, ratio: float) -> float:
    return base_lr * (1 - ratio)


def _poly(s: LRSchedulerWithWarmup, base_lr: float, ratio: float) -> float:
    return s.target_lr + (base_lr - s.target_lr) * s.power ** (1 - ratio)


def _cosine(s: LRSchedulerWithWarmup, base_lr: float, ratio: float) -> float:
    return s.target_lr + (base_lr - s.target_lr) * 0.5 * (1 + math.cos(math.pi * ratio))


# mode -> lr after warm-up, given the scheduler, the group's base lr and the
# fraction of post-warm-up epochs elapsed.
SCHEDULE_MODES: dict[str, Callable[[LRSchedulerWithWarmup, float, float], float]] = {
    "step": _step,
    "exp": _exp,
    "poly": _poly,
    "cosine": _cosine,
    "linear": _linear,
}
WARMUP_METHODS = ("constant", "linear")


def schedule_mode(name: str) -> Callable[[LRSchedulerWithWarmup, float, float], float]:
    """The post-warm-up schedule registered as ``name`` in ``SCHEDULE_MODES`` (``solver.scheduler``).

    Raises:
        ConfigError: an unknown name, listing the valid ones.
    """
    if name not in SCHEDULE_MODES:
        raise ConfigError(f"solver.scheduler: unknown lr schedule mode {name!r}; valid modes: {list(SCHEDULE_MODES)}")
    return SCHEDULE_MODES[name]


class LRSchedulerWithWarmup(LRScheduler):
    """Warm-up followed by a step / exp / poly / cosine / linear decay, stepped once per epoch.

    Call ``step()`` after each epoch; the lr used during epoch ``e`` (0-based)
    is the one set after ``e`` steps. ``state_dict`` / ``load_state_dict`` come
    from torch's ``LRScheduler``.

    Args:
        optimizer: optimiser whose param groups' current lrs are the base lrs.
        milestones: epochs where ``step`` mode multiplies the lr by ``gamma``.
        gamma: ``step`` mode decay factor.
        warmup_factor: lr fraction at epoch 0.
        warmup_epochs: number of warm-up epochs (0 = none).
        warmup_method: ``linear`` or ``constant``.
        total_epochs: epochs of the whole run (the decay ends there).
        mode: ``step``, ``exp``, ``poly``, ``cosine`` or ``linear``.
        target_lr: final lr of ``cosine`` and ``poly``.
        power: base of ``exp`` and ``poly``.
        last_epoch: torch's resume index (-1 = start).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        milestones: Sequence[int] = (20, 50),
        gamma: float = 0.1,
        warmup_factor: float = 0.1,
        warmup_epochs: int = 5,
        warmup_method: str = "linear",
        total_epochs: int = 60,
        mode: str = "cosine",
        target_lr: float = 0.0,
        power: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        schedule_mode(mode)
        if warmup_method not in WARMUP_METHODS:
            raise ValueError(f"unknown warmup_method {warmup_method!r}; valid methods: {list(WARMUP_METHODS)}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"milestones must be increasing epochs, got {list(milestones)}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        if mode != "step" and total_epochs <= warmup_epochs:
            raise ValueError(
                f"total_epochs ({total_epochs}) must exceed warmup_epochs ({warmup_epochs}) for mode {mode!r}"
            )
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_factor = warmup_factor
        self.warmup_epochs = warmup_epochs
        self.warmup_method = warmup_method
        self.total_epochs = total_epochs
        self.mode = mode
        self.target_lr = target_lr
        self.power = power
        super().__init__(optimizer, last_epoch)

    def _lr_at(self, base_lr: float) -> float:
        epoch = self.last_epoch
        if epoch < self.warmup_epochs:
            if self.warmup_method == "constant":
                factor = self.warmup_factor
            else:
                alpha = epoch / self.warmup_epochs
                factor = self.warmup_factor * (1 - alpha) + alpha
            return base_lr * factor
        ratio = (epoch - self.warmup_epochs) / (self.total_epochs - self.warmup_epochs) if self.mode != "step" else 0.0
        return SCHEDULE_MODES[self.mode](self, base_lr, ratio)

    def get_lr(self) -> list[float]:
        """Learning rates of the current epoch (closed form, so resuming is exact)."""
        return [self._lr_at(base_lr) for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


def build_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> LRSchedulerWithWarmup:
    """The epoch schedule the config's ``solver`` node describes, over ``optimizer``'s current lrs.

    Reads ``solver.scheduler`` (the mode), ``warmup_method``, ``warmup_epochs``,
    ``warmup_factor``, ``milestones``, ``gamma``, ``target_lr``, ``power`` and
    ``epochs`` (the decay ends there); see :class:`LRSchedulerWithWarmup`.

    Raises:
        ConfigError: ``solver.scheduler`` names no schedule mode.
    """
    solver = cfg.solver
    return LRSchedulerWithWarmup(
        optimizer,
        mode=solver.scheduler,
        warmup_method=solver.warmup_method,
        warmup_epochs=solver.warmup_epochs,
        warmup_factor=solver.warmup_factor,
        milestones=tuple(solver.milestones),
        gamma=solver.gamma,
        target_lr=solver.target_lr,
        power=solver.power,
        total_epochs=solver.epochs,
    )
