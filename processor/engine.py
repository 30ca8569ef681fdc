"""The training engine shared by pretraining and fine-tuning.

`Trainer` owns the run: device, precision, data, model, solver, evaluator,
checkpoints, TensorBoard and `metrics.jsonl`. The step itself is short
(batch -> device -> forward -> sum of `*_loss` -> backward -> step -> log); a
`Task` (processor/pretrain.py, processor/finetune.py) customises what differs:
how the model is initialised and what happens after each step.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from datasets import build_dataset, dataset_class
from datasets.build import build_train_dataset, build_train_loader, set_loader_epoch
from datasets.masking import FIRST_ORDINARY_ID, LAST_ORDINARY_ID
from datasets.score_cache import ScoreCache
from model import build_model
from model.clip import check_image_grid, clip_preset
from model.objectives import parse_loss_names
from model.tokenizer import Tokenizer
from model.weights import load_checkpoint_weights
from processor.evaluate import build_evaluator
from solver.lr_scheduler import build_lr_scheduler, schedule_mode
from solver.optim import build_optimizer, optimizer_class
from utils import comm
from utils.checkpoint import Checkpointer, GracefulExit, check_resume_config, find_resume, read_checkpoint
from utils.config import Config, ConfigError, save_config
from utils.device import PRECISIONS, autocast_context, resolve_device
from utils.logger import setup_logging
from utils.meters import MeterDict
from utils.metrics_log import append_metrics, supersede_metrics
from utils.run_lock import RunDirBusyError, RunDirLock
from utils.threads import apply_threads

logger = logging.getLogger(__name__)

# PRECISIONS, autocast_context and resolve_device live in utils/device.py; named here for their
# importers (tools/test.py, tools/search.py, tools/robustness.py, tests/test_config*.py).
__all__ = ["Trainer", "Task", "NonFiniteLossError", "check_components", "resolve_device", "autocast_context",
           "PRECISIONS"]

#: Evaluation splits a benchmark may have (`eval.select_split`, `eval.fallback_split`).
EVAL_SPLITS = ("val", "test")


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row."""


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


def mask_rates(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Share of eligible caption tokens selected by each mask (for the logs).

    MLM: tokens with a label. Noise: tokens whose id changed (the 10% of selected
    tokens that are kept as they were cannot be seen, so this is ~0.9 x the rate).
    """
    ids = batch["caption_ids"]
    eligible = ((ids >= FIRST_ORDINARY_ID) & (ids <= LAST_ORDINARY_ID)).sum().clamp(min=1)
    rates = {}
    if "noise_ids" in batch:
        rates["noise_mask_rate"] = (batch["noise_ids"] != ids).sum() / eligible
    if "mlm_labels" in batch:
        rates["mlm_mask_rate"] = (batch["mlm_labels"] != 0).sum() / eligible
    return rates


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Task:
    """What differs between pretraining and fine-tuning. Subclasses override the hooks."""

    name = "train"
    #: Kinds of metrics.jsonl record the task writes per epoch, besides "train" and "eval":
    #: a resumed run drops those of the epochs it redoes.
    epoch_records: tuple[str, ...] = ()

    def build_model(self, cfg: Config, num_classes: int) -> nn.Module:
        """The model with its initial weights (called before the optimizer is built)."""
        return build_model(cfg, num_classes=num_classes)

    def before_train(self, trainer: Trainer) -> None:
        """Called on every rank before the first step of a fresh run (not when resuming)."""

    def after_step(self, trainer: Trainer, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> None:
        """Called on every rank after each optimisation step."""

    def after_epoch(self, trainer: Trainer, epoch: int) -> None:
        """Called on every rank after each finished epoch: after the lr step and the evaluation,
        before `last` is saved (not for an epoch interrupted by a stop request)."""


class Trainer:
    """A training run described by a resolved config.

    Args:
        cfg: The resolved config (saved as `<output_dir>/config.yaml`).
        task: Pretraining or fine-tuning hooks.
    """

    def __init__(self, cfg: Config, task: Task) -> None:
        self.cfg = cfg
        self.task = task
        comm.init_distributed()
        self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.run_dir = cfg.output_dir
        check_components(cfg)
        # Nothing in the run folder is written before the resume checks pass and the folder is ours.
        self._resume_path, self._resume_ckpt = self._check_resume(cfg)
        self.lock = self._lock_run_dir()
        setup_logging(self.run_dir, rank=self.rank)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.seed = comm.seed_everything(cfg.seed)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        if comm.is_main_process():
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        logger.info("run directory %s; %d process(es) on %s; precision %s", os.path.abspath(self.run_dir),
                    self.world_size, self.device, cfg.precision if self.device.type == "cuda" else "fp32 (CPU)")
        apply_threads(cfg.num_threads, data_workers=cfg.data.num_workers, local_ranks=comm.get_local_size())

        self.tokenizer = Tokenizer()
        self.train_index = build_train_dataset(cfg)
        self.num_classes = self.train_index.num_classes
        self.score_cache = self._build_score_cache()
        self.loader = build_train_loader(cfg, self.train_index, self.tokenizer, score_cache=self.score_cache,
                                         rank=self.rank, world_size=self.world_size)
        if len(self.loader) == 0:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size}: {cfg.data.name}'s {len(self.train_index)} training "
                              f"samples give no full batch of {cfg.data.batch_size} x {self.world_size} process(es); "
                              "lower data.batch_size")

        model = self.task.build_model(cfg, self.num_classes).to(self.device)
        self.optimizer = build_optimizer(cfg, model)
        self.scheduler = build_lr_scheduler(cfg, self.optimizer)
        use_scaler = self.device.type == "cuda" and cfg.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.model = model
        self.ddp_model: nn.Module = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.world_size > 1 else model)

        self.evaluator, self.eval_splits = self._build_evaluator()
        self.checkpointer = Checkpointer(self.run_dir, model=model, optimizer=self.optimizer,
                                         scheduler=self.scheduler, scaler=self.scaler,
                                         score_cache=self.score_cache, config=cfg, num_classes=self.num_classes,
                                         load_weights=load_checkpoint_weights)
        self.writer = self._tensorboard()
        self.start_epoch, self.global_step, self.skip_batches = 0, 0, 0
        self.best: dict[str, dict[str, Any]] = {}
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.stopped = False  # set when a SIGTERM/SIGINT ended train() early (callers must not go on)
        self._resume()

    # ----------------------------------------------------------------- setup
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

    def _build_score_cache(self) -> ScoreCache | None:
        cfg = self.cfg
        needs = cfg.gass.enabled or cfg.masking.noise or cfg.masking.mlm == "informative"
        if not needs:
            return None
        return ScoreCache(self.run_dir, len(self.train_index), cfg.data.text_length,
                          init_value=cfg.gass.init_score, refresh=cfg.gass.refresh)

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
            self.global_step = int(meta.get("step", 0))
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
        try:
            return self._train(until_epoch)
        finally:
            self.lock.release()

    def _train(self, until_epoch: int | None) -> dict[str, dict[str, Any]]:
        cfg = self.cfg
        end = cfg.solver.epochs if until_epoch is None else min(until_epoch, cfg.solver.epochs)
        with GracefulExit() as stop:
            if self.global_step == 0 and self.start_epoch == 0 and self.skip_batches == 0:
                self.task.before_train(self)
            for epoch in range(self.start_epoch, end):
                if self.score_cache is not None:
                    self.score_cache.begin_epoch(epoch)
                set_loader_epoch(self.loader, epoch)
                skip, self.skip_batches = self.skip_batches, 0
                done = self.train_one_epoch(epoch, stop, skip)
                if stop.requested:
                    self.stopped = True
                    self.save("last", epoch, extra={"batches_done": done})
                    logger.warning("stop requested: saved %s after %d batches of epoch %d; exiting",
                                   os.path.join(self.run_dir, "last.pth"), done, epoch)
                    break
                self.scheduler.step()
                if self.evaluator is not None and (epoch + 1) % cfg.eval.period == 0:
                    self.evaluate_and_select(epoch)
                self.task.after_epoch(self, epoch)
                if (epoch + 1) % cfg.train.checkpoint_period == 0 or epoch + 1 == cfg.solver.epochs:
                    self.save("last", epoch)
        if self.writer is not None:
            self.writer.close()
        return self.best

    def train_one_epoch(self, epoch: int, stop: GracefulExit, skip: int = 0) -> int:
        """One pass over the loader; returns the number of batches consumed in this epoch."""
        cfg = self.cfg
        self.ddp_model.train()
        meters = MeterDict()
        if skip:
            # The sampler counts global indices: every rank consumed `skip` batches.
            self.loader.sampler.load_state_dict(
                {"epoch": epoch, "position": skip * cfg.data.batch_size * self.world_size})
        total = skip + len(self.loader)  # len() counts only the batches still to come
        limit = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
        start, done, skipped_images = time.time(), skip, 0
        progress = self._progress(limit, epoch, initial=skip)
        for batch in self.loader:
            if done >= limit:
                break
            skipped_images += int(batch.pop("num_skipped", 0))
            done += 1
            if "images" in batch:
                out = self.step(to_device(batch, self.device))
                if out is not None:
                    meters.update({k: v for k, v in out.items() if k != "gass_scores"})
                    self.log_step(epoch, done, limit, meters, out)
            elif self.world_size > 1:
                # Other ranks are inside a DDP step this rank cannot join.
                raise RuntimeError("every image of a batch was unreadable (data.skip_bad_images); "
                                   "run tools/check_data.py and fix or remove the files")
            if progress is not None:
                progress.update(1)
            if stop.should_stop():  # collective: every rank stops after the same step
                break
        if progress is not None:
            progress.close()
        if skipped_images:
            logger.warning("epoch %d: skipped %d unreadable image(s) (data.skip_bad_images)", epoch, skipped_images)
        if comm.is_main_process() and not stop.requested:
            record = {"type": "train", "epoch": epoch, "step": self.global_step, "time": time.time() - start,
                      "lr": self.optimizer.param_groups[0]["lr"], "skipped_images": skipped_images,
                      "nonfinite_steps": self.nonfinite_total, **meters.averages()}
            append_metrics(self.run_dir, record)
            logger.info("epoch %d done in %.1fs: %s", epoch, record["time"],
                        ", ".join(f"{k} {v:.4f}" for k, v in meters.averages().items()))
        return done

    def step(self, batch: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """One optimisation step; returns the model outputs, or None if the step was skipped."""
        with autocast_context(self.device, self.cfg.precision):
            out = self.ddp_model(batch)
        loss = sum(v for k, v in out.items() if k.endswith("_loss"))
        if not self._all_finite(loss):
            self._skip_nonfinite(out)
            return None
        self.nonfinite_in_row = 0
        self.scaler.scale(loss).backward()
        if self.cfg.solver.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.task.after_step(self, batch, out)
        out = {k: v.detach() for k, v in out.items()}
        out["loss"] = loss.detach()
        out.update(mask_rates(batch))
        return out

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float()
        if self.world_size > 1:
            # Every rank must skip together, or DDP's gradient all-reduce would hang.
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())

    def _skip_nonfinite(self, out: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        losses = {k: float(v.detach()) for k, v in out.items() if k.endswith("_loss")}
        logger.warning("non-finite loss at step %d, step skipped (%d in a row): %s", self.global_step,
                       self.nonfinite_in_row, losses)
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite:
            raise NonFiniteLossError(f"{self.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite); "
                                     "lower the learning rate or try precision=bf16/fp32")

    def _progress(self, total: int, epoch: int, initial: int = 0) -> Any:
        if not comm.is_main_process() or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def log_step(self, epoch: int, done: int, total: int, meters: MeterDict, out: Mapping[str, Any]) -> None:
        if not comm.is_main_process():
            return
        step = self.global_step
        if self.writer is not None:
            for name, value in out.items():
                if name == "gass_scores":
                    continue
                self.writer.add_scalar(f"train/{name}", float(value), step)
            self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
            if "gass_scores" in out:
                self._log_gass(out["gass_scores"], step)
        if done % self.cfg.log_period == 0 or done == total:
            averages = meters.averages()
            logger.info("epoch %d [%d/%d] step %d lr %.2e %s", epoch, done, total, step,
                        self.optimizer.param_groups[0]["lr"],
                        " ".join(f"{k} {v:.4f}" for k, v in averages.items()))

    def _log_gass(self, scores: torch.Tensor, step: int) -> None:
        valid = scores[scores > 0]
        if valid.numel() == 0:
            return
        self.writer.add_scalar("gass/mean", float(valid.mean()), step)
        for q in (0.1, 0.5, 0.9):
            self.writer.add_scalar(f"gass/q{int(q * 100)}", float(valid.float().quantile(q)), step)

    # ------------------------------------------------- evaluation, selection
    def evaluate_and_select(self, epoch: int) -> dict[str, dict]:
        """Evaluate every configured set; keep `best_<set>.pth` by R1 on the selection split."""
        results = self.evaluator.evaluate(self.ddp_model)
        improved: list[str] = []
        if comm.is_main_process():
            for key, metrics in results.items():
                name, split = key.split("/")
                select = self.eval_splits[name]["select"]
                for task, values in metrics.items():
                    row = {"type": "eval", "epoch": epoch, "step": self.global_step, "dataset": name,
                           "split": split, "task": task, "selection_split": select,
                           **{k: values[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}}
                    append_metrics(self.run_dir, row)
                    if self.writer is not None:
                        for k in ("R1", "R5", "R10", "mAP", "mINP"):
                            self.writer.add_scalar(f"{name}/{split}_{task}_{k}", values[k], epoch)
                if split == select and metrics["t2i"]["R1"] > self.best.get(name, {}).get("R1", -math.inf):
                    self.best[name] = {"epoch": epoch, "split": split, **{k: metrics["t2i"][k] for k in
                                                                         ("R1", "R5", "R10", "mAP", "mINP")}}
                    improved.append(name)
            for name in improved:
                test = results.get(f"{name}/test", {}).get("t2i")
                if test is not None:
                    self.best[name]["test"] = {k: test[k] for k in ("R1", "R5", "R10", "mAP", "mINP")}
        improved = comm.broadcast_object(improved)
        self.best = comm.broadcast_object(self.best)
        for name in improved:
            logger.info("new best on %s (%s R1 %.2f) at epoch %d", name, self.best[name]["split"],
                        self.best[name]["R1"], epoch)
            self.save(f"best_{name}", epoch)
        return results

    def save(self, name: str, epoch: int, extra: dict | None = None) -> None:
        self.checkpointer.save(name, epoch=epoch, step=self.global_step, best_metrics=self.best, extra=extra)
