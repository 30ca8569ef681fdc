"""Optimiser parameter groups and epoch-level LR schedules with warm-up.

``build_optimizer(cfg, model)`` and ``build_lr_scheduler(cfg, optimizer)`` read the
config's ``solver`` node; ``create_optimizer`` and ``LRSchedulerWithWarmup`` take
plain keyword arguments.
"""

from solver.lr_scheduler import LRSchedulerWithWarmup, build_lr_scheduler
from solver.optim import build_optimizer, build_param_groups, create_optimizer

__all__ = ["LRSchedulerWithWarmup", "build_lr_scheduler", "build_optimizer", "build_param_groups",
           "create_optimizer"]
