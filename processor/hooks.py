"""The hooks every training run has: metric logging, evaluation with model selection, checkpoints.

Each is a `processor.loop.HookBase` built from finished objects; `processor/engine.py`
assembles them from the config. A method's own state lives in its task's hooks
(processor/pretrain.py).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from datasets.masking import mask_rates
from processor.loop import HookBase, StepOutput, TrainLoop
from utils import comm
from utils.checkpoint import Checkpointer
from utils.meters import MeterDict
from utils.metrics_log import append_metrics

logger = logging.getLogger(__name__)

__all__ = ["CheckpointHook", "EvalHook", "MetricsHook", "METRIC_KEYS"]

#: The retrieval metrics of a table row, in order.
METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


class MetricsHook(HookBase):
    """Per-step scalars to TensorBoard, a log line every `log_period` batches, one `train` record per epoch.

    Logged per step: the loss terms, their total `loss`, the model's metrics, the mask
    rates of the batch's captions (`datasets.masking.mask_rates`) and the learning
    rate. Only rank 0 writes; every rank keeps its meters. The values stay on the
    device until a log line is due: then those of all the steps since the last one are
    read in one go (one host wait per `log_period`, none in between) and written to
    TensorBoard at their own steps. Steps the loop skipped on the device
    (`StepOutput.applied` False) are left out, as skipped steps always were.

    Args:
        run_dir: Where `metrics.jsonl` is.
        writer: A TensorBoard `SummaryWriter` (or None); closed after training.
        log_period: Batches between log lines (and the epoch's last batch).
        progress: Show a progress bar on rank 0 when stderr is a terminal.
    """

    def __init__(self, run_dir: str | os.PathLike, writer: Any = None, *, log_period: int = 50,
                 progress: bool = True) -> None:
        self.run_dir, self.writer, self.log_period = run_dir, writer, log_period
        self.progress = progress and comm.is_main_process() and sys.stderr.isatty()
        self.meters = MeterDict()
        self._bar: Any = None
        self._start = 0.0
        self._lr = 0.0
        # (step, lr, scalar names, their values and the applied flag as one device vector)
        self._pending: list[tuple[int, float, list[str], torch.Tensor]] = []

    def before_epoch(self, loop: TrainLoop, epoch: int) -> None:
        self.meters = MeterDict()
        self._start = time.time()
        self._lr = loop.optimizer.param_groups[0]["lr"]  # the scheduler steps after the epoch

    def after_step(self, loop: TrainLoop, batch: Mapping[str, Any], output: StepOutput) -> None:
        scalars = {k: v for k, v in {**output.scalars(), **mask_rates(batch)}.items() if v.numel() == 1}
        applied = output.applied if output.applied is not None else torch.ones((), device=output.loss.device)
        values = torch.stack([v.detach().float().reshape(()) for v in (*scalars.values(), applied)])
        self._pending.append((loop.global_step, loop.optimizer.param_groups[0]["lr"], list(scalars), values))
        if comm.is_main_process():
            self._advance(loop)
        if loop.batches_done % self.log_period == 0 or loop.batches_done == loop.epoch_length:
            self.flush()
            if comm.is_main_process():
                logger.info("epoch %d [%d/%d] step %d lr %.2e %s", loop.epoch, loop.batches_done,
                            loop.epoch_length, loop.global_step, loop.optimizer.param_groups[0]["lr"],
                            " ".join(f"{k} {v:.4f}" for k, v in self.meters.averages().items()))

    def flush(self) -> None:
        """Read the values of the steps since the last flush (one host wait) into the meters and TensorBoard."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flat = torch.cat([values for *_, values in pending]).tolist()
        start = 0
        for step, lr, names, values in pending:
            row, start = flat[start:start + len(values)], start + len(values)
            if not row[-1]:  # skipped on the device
                continue
            self.meters.update(dict(zip(names, row)))
            if self.writer is not None and comm.is_main_process():
                # The step's number when it ran (global_step after it), as before the values were batched.
                for name, value in zip(names, row):
                    self.writer.add_scalar(f"train/{name}", value, step)
                self.writer.add_scalar("train/lr", lr, step)

    def _advance(self, loop: TrainLoop) -> None:
        if not self.progress:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=loop.epoch_length, desc=f"epoch {loop.epoch}", dynamic_ncols=True, leave=False)
        self._bar.update(loop.batches_done - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        self.flush()
        self._close_bar()
        if not comm.is_main_process():
            return
        averages = self.meters.averages()
        record = {"type": "train", "epoch": epoch, "step": loop.global_step, "time": time.time() - self._start,
                  "lr": self._lr, "skipped_images": loop.skipped_samples, "nonfinite_steps": loop.nonfinite_total,
                  **averages}
        append_metrics(self.run_dir, record)
        logger.info("epoch %d done in %.1fs: %s", epoch, record["time"],
                    ", ".join(f"{k} {v:.4f}" for k, v in averages.items()))

    def on_stop(self, loop: TrainLoop, epoch: int, batches_done: int) -> None:
        self.flush()
        self._close_bar()

    def after_train(self, loop: TrainLoop) -> None:
        if self.writer is not None:
            self.writer.close()


class CheckpointHook(HookBase):
    """`last.pth` every `period` epochs and after the final one; on a stop request, `last.pth` with the
    position in the epoch (resume continues from the next batch).

    Args:
        checkpointer: Saves the run's state.
        period: Epochs between saves.
        final_epoch: The run's last epoch (always saved).
        best_metrics: Returns the model-selection record stored with each checkpoint.
    """

    def __init__(self, checkpointer: Checkpointer, *, period: int, final_epoch: int,
                 best_metrics: Callable[[], Mapping[str, Any]] = dict) -> None:
        self.checkpointer, self.period, self.final_epoch = checkpointer, period, final_epoch
        self.best_metrics = best_metrics

    def save(self, loop: TrainLoop, name: str, epoch: int, extra: Mapping[str, Any] | None = None) -> None:
        self.checkpointer.save(name, epoch=epoch, step=loop.global_step, best_metrics=self.best_metrics(),
                               extra=extra)

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        if (epoch + 1) % self.period == 0 or epoch == self.final_epoch:
            self.save(loop, "last", epoch)

    def on_stop(self, loop: TrainLoop, epoch: int, batches_done: int) -> None:
        self.save(loop, "last", epoch, extra={"batches_done": batches_done})
        logger.warning("stop requested: saved %s after %d batches of epoch %d; exiting",
                       self.checkpointer.path("last"), batches_done, epoch)


class EvalHook(HookBase):
    """Evaluate every `period` epochs; keep `best_<benchmark>.pth` by t2i R1 on its selection split.

    Model selection never looks at a test split unless the plan says so (a benchmark
    without a validation split, `eval.fallback_split`); the test metrics of the selected
    epoch are stored beside the selection record.

    Args:
        evaluator: ``evaluate(model) -> {"<benchmark>/<split>": {task: metrics}}``.
        plan: ``{benchmark: {"select": split name or None, "splits": [...]}}``.
        run_dir: Where `metrics.jsonl` is.
        writer: TensorBoard writer (or None).
        period: Epochs between evaluations.
        save: ``save(loop, name, epoch)`` writes a checkpoint (collective).
    """

    def __init__(self, evaluator: Any, plan: Mapping[str, Mapping[str, Any]], run_dir: str | os.PathLike,
                 writer: Any = None, *, period: int,
                 save: Callable[[TrainLoop, str, int], None] | None = None) -> None:
        self.evaluator, self.plan, self.run_dir, self.writer = evaluator, plan, run_dir, writer
        self.period, self.save = period, save
        self.best: dict[str, dict[str, Any]] = {}

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        if (epoch + 1) % self.period == 0:
            self.evaluate_and_select(loop, epoch)

    def evaluate_and_select(self, loop: TrainLoop, epoch: int) -> dict[str, dict]:
        results = self.evaluator.evaluate(loop.forward_model)
        improved: list[str] = []
        if comm.is_main_process():
            for key, metrics in results.items():
                self._record(loop, epoch, key, metrics)
                name, split = key.split("/")
                if split == self.plan[name]["select"] and \
                        metrics["t2i"]["R1"] > self.best.get(name, {}).get("R1", -math.inf):
                    self.best[name] = {"epoch": epoch, "split": split, **{k: metrics["t2i"][k] for k in METRIC_KEYS}}
                    improved.append(name)
            for name in improved:
                test = results.get(f"{name}/test", {}).get("t2i")
                if test is not None:
                    self.best[name]["test"] = {k: test[k] for k in METRIC_KEYS}
        improved = comm.broadcast_object(improved)
        self.best = comm.broadcast_object(self.best)
        for name in improved:
            logger.info("new best on %s (%s R1 %.2f) at epoch %d", name, self.best[name]["split"],
                        self.best[name]["R1"], epoch)
            if self.save is not None:
                self.save(loop, f"best_{name}", epoch)
        return results

    def _record(self, loop: TrainLoop, epoch: int, key: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
        name, split = key.split("/")
        for task, values in metrics.items():
            append_metrics(self.run_dir, {"type": "eval", "epoch": epoch, "step": loop.global_step, "dataset": name,
                                          "split": split, "task": task, "selection_split": self.plan[name]["select"],
                                          **{k: values[k] for k in METRIC_KEYS}})
            if self.writer is not None:
                for k in METRIC_KEYS:
                    self.writer.add_scalar(f"{name}/{split}_{task}_{k}", values[k], epoch)
