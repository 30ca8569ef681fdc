"""A training run from a config: the objects it needs, assembled into a `processor.loop.TrainLoop`.

`Trainer(cfg, task)` checks the config and the run folder, builds the data, the
model (through the task), the optimiser and schedule, the evaluator and the
checkpointer, and hands them to the loop with its hooks, in this order:
metric logging, evaluation and model selection, the task (e.g. pretraining's token-score
cache, fine-tuning's nothing), periodic checkpoints. `Task` (processor/pretrain.py,
processor/finetune.py) is the one place a method customises a run; this module names
no method.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets import build_dataset, dataset_class
from datasets.bases import TrainIndex
from datasets.build import build_train_dataset, build_train_loader, position_loader
from model import build_model
from model.clip import check_image_grid, clip_preset
from model.objectives import parse_loss_names
from model.tokenizer import Tokenizer
from model.weights import load_checkpoint_weights
from processor.evaluate import build_evaluator
from processor.hooks import CheckpointHook, EvalHook, MetricsHook
from processor.loop import HookBase, StepOutput, TrainLoop
from solver.lr_scheduler import build_lr_scheduler, schedule_mode
from solver.optim import build_optimizer, optimizer_class
from utils import comm
from utils.checkpoint import Checkpointer, check_resume_config, find_resume, read_checkpoint
from utils.config import Config, ConfigError, save_config
from utils.device import autocast_context, resolve_device
from utils.logger import setup_logging
from utils.metrics_log import supersede_metrics
from utils.run_lock import RunDirBusyError, RunDirLock
from utils.threads import apply_threads

logger = logging.getLogger(__name__)

__all__ = ["Trainer", "Task", "check_components", "EVAL_SPLITS"]

#: Evaluation splits a benchmark may have (`eval.select_split`, `eval.fallback_split`).
EVAL_SPLITS = ("val", "test")


def check_components(cfg: Config) -> None:
    """Look up every name the config gives a registry (datasets, CLIP preset, losses, optimizer,
    scheduler) and fit the image size to the preset's patch, before any data or weights are read.

    `load_config` checks value ranges and fixed sets of modes; names and sizes that only the
    components know are checked by the components, all at once here.

    Raises:
        ConfigError: the first unknown name or unusable size, with its key and what is valid.
    """
    dataset_class(cfg.data.name, "data.name")
    for name in cfg.eval.datasets:
        dataset_class(name, "eval.datasets")
    preset = clip_preset(cfg.model.clip.arch)
    check_image_grid(tuple(cfg.model.clip.image_size), preset["vision_patch_size"],
                     f"model.clip.arch={cfg.model.clip.arch!r}")
    parse_loss_names(cfg.model.loss_names)
    optimizer_class(cfg.solver.optimizer)
    schedule_mode(cfg.solver.scheduler)


class Task(HookBase):
    """What differs between pretraining and fine-tuning: the model's initial weights, what the
    training data needs from the task, the task's own checkpointed state and its hooks.

    A task is also a hook of the loop (`processor.loop.HookBase`): it runs after evaluation and
    before the periodic checkpoint. `setup` gives it the assembled trainer.
    """

    name = "train"
    #: Kinds of metrics.jsonl record the task writes per epoch, besides "train" and "eval":
    #: a resumed run drops those of the epochs it redoes.
    epoch_records: tuple[str, ...] = ()

    def build_model(self, cfg: Config, num_classes: int) -> nn.Module:
        """The model with its initial weights (called before the optimizer is built)."""
        return build_model(cfg, num_classes=num_classes)

    def loader_inputs(self, cfg: Config, index: TrainIndex, run_dir: str) -> dict[str, Any]:
        """Keyword arguments the task adds to `datasets.build.build_train_loader` (e.g. a score cache)."""
        return {}

    def checkpointables(self) -> dict[str, Any]:
        """The task's own state saved in checkpoints, by name (objects with state_dict/load_state_dict)."""
        return {}

    def setup(self, trainer: Trainer) -> None:
        """Called once the trainer is assembled, before resuming."""
        self.trainer = trainer


#: Steps between the loop's host reads of its device flags (and, under DDP, the ranks' stop agreement) at
#: most: a stop request (e.g. SLURM's SIGTERM before the kill) waits at most this many steps.
STOP_CHECK_STEPS = 10


class Trainer:
    """A training run described by a resolved config.

    Args:
        cfg: The resolved config (saved as `<output_dir>/config.yaml`).
        task: Pretraining or fine-tuning.
    """

    def __init__(self, cfg: Config, task: Task) -> None:
        self.cfg, self.task, self.run_dir = cfg, task, cfg.output_dir
        comm.init_distributed()
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        check_components(cfg)
        # Nothing in the run folder is written before the resume checks pass and the folder is ours.
        self._resume_path, self._resume_ckpt = self._check_resume(cfg)
        self.lock = self._lock_run_dir()
        setup_logging(self.run_dir, rank=self.rank)
        self.device = self._start_run(cfg)
        self.tokenizer = Tokenizer()
        self.train_index = build_train_dataset(cfg)
        self.num_classes = self.train_index.num_classes
        self.loader = self._build_loader(cfg)
        self.model = task.build_model(cfg, self.num_classes).to(self.device)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.device.type == "cuda" and cfg.precision == "fp16")
        self.ddp_model = self._distributed(self.model)
        self.checkpointer = Checkpointer(self.run_dir, model=self.model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler,
                                         checkpointables=task.checkpointables(), config=cfg,
                                         num_classes=self.num_classes, load_weights=load_checkpoint_weights)
        self.writer = self._tensorboard()
        self.loop = self._build_loop(cfg)
        task.setup(self)
        self.start_epoch, self.skip_batches, self._best = 0, 0, {}
        self._resume()

    # ------------------------------------------------------- the run's state
    @property
    def best(self) -> dict[str, dict[str, Any]]:
        """The selection record per benchmark: epoch, split and metrics of the best epoch so far."""
        return self.evaluation.best if self.evaluation is not None else self._best

    @best.setter
    def best(self, value: dict[str, dict[str, Any]]) -> None:
        if self.evaluation is not None:
            self.evaluation.best = value
        else:
            self._best = value

    @property
    def global_step(self) -> int:
        return self.loop.global_step

    @property
    def stopped(self) -> bool:
        """True when a SIGTERM/SIGINT ended `train()` early (callers must not go on)."""
        return self.loop.stopped

    @property
    def nonfinite_total(self) -> int:
        return self.loop.nonfinite_total

    # ----------------------------------------------------------------- setup
    def _distributed(self, model: nn.Module) -> nn.Module:
        """The model the step calls: DDP over the processes, or the model itself for one process."""
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _start_run(self, cfg: Config) -> torch.device:
        """Device, seeds, determinism, the saved config and the thread count; returns the device."""
        device = resolve_device(cfg.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.seed = comm.seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if comm.is_main_process():
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        logger.info("run directory %s; %d process(es) on %s; precision %s", os.path.abspath(self.run_dir),
                    self.world_size, device, cfg.precision if device.type == "cuda" else "fp32 (CPU)")
        apply_threads(cfg.num_threads, data_workers=cfg.data.num_workers, local_ranks=comm.get_local_size())
        return device

    def _build_loader(self, cfg: Config) -> Any:
        loader = build_train_loader(cfg, self.train_index, self.tokenizer, rank=self.rank,
                                    world_size=self.world_size,
                                    **self.task.loader_inputs(cfg, self.train_index, self.run_dir))
        accum, effective = cfg.train.accum_steps, cfg.data.batch_size * cfg.train.accum_steps * self.world_size
        if len(loader) < accum:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size}: {cfg.data.name}'s {len(self.train_index)} "
                              f"training samples give no full batch of {cfg.data.batch_size} x {accum} micro-batch(es)"
                              f" x {self.world_size} process(es); lower data.batch_size or train.accum_steps")
        logger.info("effective batch %d = data.batch_size %d x train.accum_steps %d x %d process(es)%s", effective,
                    cfg.data.batch_size, accum, self.world_size,
                    "; whole-batch losses by gradient caching" if accum > 1 else "")
        return loader

    def _build_loop(self, cfg: Config) -> TrainLoop:
        """The loop with its hooks: metrics, evaluation and selection, the task, periodic checkpoints."""
        evaluator, plan = self._build_evaluator()
        checkpoints = CheckpointHook(self.checkpointer, period=cfg.train.checkpoint_period,
                                     final_epoch=cfg.solver.epochs - 1, best_metrics=lambda: self.best)
        self.evaluation = None if evaluator is None else EvalHook(evaluator, plan, self.run_dir, self.writer,
                                                                  period=cfg.eval.period, save=checkpoints.save)
        hooks = [MetricsHook(self.run_dir, self.writer, log_period=cfg.log_period),
                 *([self.evaluation] if self.evaluation is not None else []), self.task, checkpoints]
        return TrainLoop(self.model, self.loader, self.optimizer, self.scheduler, hooks,
                         forward_model=self.ddp_model, device=self.device,
                         autocast=functools.partial(autocast_context, self.device, cfg.precision), scaler=self.scaler,
                         grad_clip=cfg.solver.grad_clip, max_nonfinite=cfg.train.max_nonfinite,
                         max_batches=cfg.train.max_steps, accum_steps=cfg.train.accum_steps,
                         sync_period=min(cfg.log_period, STOP_CHECK_STEPS),
                         seek=functools.partial(position_loader, self.loader, world_size=self.world_size))

    @staticmethod
    def _check_resume(cfg: Config) -> tuple[str | None, Any]:
        """The checkpoint to resume and its contents, after checking it fits this config."""
        path = find_resume(cfg.output_dir, cfg.train.resume)
        if path is None:
            if cfg.train.resume == "":
                taken = sorted(p.name for p in Path(cfg.output_dir).glob("*.pth")) if os.path.isdir(
                    cfg.output_dir) else []
                if taken:
                    raise RunDirBusyError(
                        f"output_dir {cfg.output_dir} already holds another run's checkpoints ({', '.join(taken)}) "
                        "and train.resume='' would start over them; resume it (train.resume=auto) or choose "
                        "another output_dir")
            return None, None
        ckpt = read_checkpoint(path, trust=cfg.train.trust_checkpoints)
        saved = ckpt.get("config") if isinstance(ckpt, Mapping) else None
        check_resume_config(saved, cfg.to_dict(), path)
        return path, ckpt

    def _lock_run_dir(self) -> RunDirLock:
        """Take the run folder (rank 0 holds the lock; every rank fails together)."""
        lock = RunDirLock(self.run_dir)
        error = None
        if comm.is_main_process():
            try:
                lock.acquire()
            except RunDirBusyError as err:
                error = str(err)
        error = comm.broadcast_object(error)
        if error is not None:
            raise RunDirBusyError(error)
        return lock

    def _build_evaluator(self) -> tuple[Any, dict[str, dict[str, Any]]]:
        """Evaluation sets: {benchmark: {"select": split name or None, "splits": {name: EvalSplit}}}."""
        cfg = self.cfg
        if cfg.eval.period <= 0 or not cfg.eval.datasets:
            return None, {}
        root = cfg.eval.root or cfg.data.root
        plan: dict[str, dict[str, Any]] = {}
        flat = {}
        for name in cfg.eval.datasets:
            data = build_dataset(name, root, key="eval.datasets")
            splits = {s: getattr(data, s) for s in EVAL_SPLITS if getattr(data, s, None) is not None}
            select = cfg.eval.select_split if cfg.eval.select_split in splits else None
            if select is None and cfg.eval.fallback_split in splits:
                select = cfg.eval.fallback_split
                logger.warning("%s has no %s split: model selection on %s (eval.fallback_split)", name,
                               cfg.eval.select_split, select)
            plan[name] = {"select": select, "splits": list(splits)}
            flat.update({f"{name}/{s}": split for s, split in splits.items()})
        return build_evaluator(cfg, flat, self.device, self.tokenizer), plan

    def _tensorboard(self) -> Any:
        if not comm.is_main_process():
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(os.path.join(self.run_dir, "tb"))

    def _resume(self) -> None:
        path, ckpt = self._resume_path, self._resume_ckpt
        self._resume_ckpt = None  # the checkpoint's tensors are not needed once loaded
        if path is not None:
            meta = self.checkpointer.load(path, resume=True, trust=self.cfg.train.trust_checkpoints, ckpt=ckpt)
            extra = meta.get("extra") or {}
            self.loop.global_step = int(meta.get("step", 0))
            self.best = dict(meta.get("best_metrics") or {})
            if extra.get("batches_done"):
                # Stopped mid-epoch: finish that epoch, skipping what was consumed.
                self.start_epoch = int(meta["epoch"])
                self.skip_batches = int(extra["batches_done"])
            else:
                self.start_epoch = int(meta["epoch"]) + 1
            logger.info("resumed from %s: epoch %d, step %d%s", path, self.start_epoch, self.global_step,
                        f", skipping {self.skip_batches} consumed batches" if self.skip_batches else "")
        if comm.is_main_process():
            # Epochs about to be (re)done write new records: drop the old ones, whether this run
            # resumes or restarts after dying before its first checkpoint (one history per run).
            # A fresh run also redoes what a task records before its first epoch (epoch -1).
            dropped = supersede_metrics(self.run_dir, self.start_epoch if self.global_step else -1,
                                        kinds=("train", "eval", *self.task.epoch_records))
            if dropped:
                logger.info("metrics.jsonl: %d record(s) of epoch >= %d superseded", dropped, self.start_epoch)


    # -------------------------------------------------------------- training
    def train(self, until_epoch: int | None = None) -> dict[str, dict[str, Any]]:
        """Run the remaining epochs (or those before `until_epoch`); returns the best metrics per set.

        A SIGTERM/SIGINT finishes the current step, saves `last` (with the
        position in the epoch), sets `self.stopped` and returns;
        `train.resume=auto` continues from it.
        """
        end = self.cfg.solver.epochs if until_epoch is None else min(until_epoch, self.cfg.solver.epochs)
        try:
            self.loop.train(self.start_epoch, end, self.skip_batches)
        finally:
            self.lock.release()
        self.skip_batches = 0
        return self.best

    def step(self, batch: Mapping[str, Any]) -> StepOutput | None:
        """One optimisation step on a batch (no hooks); None if the loss was not finite."""
        return self.loop.step(batch)
