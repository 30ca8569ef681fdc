"""Optimiser parameter groups and epoch-level LR schedules with warm-up."""

from solver.lr_scheduler import LRSchedulerWithWarmup, build_lr_scheduler
from solver.optim import build_optimizer, build_param_groups

__all__ = ["LRSchedulerWithWarmup", "build_lr_scheduler", "build_optimizer", "build_param_groups"]
