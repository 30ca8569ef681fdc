"""Pretraining task (GA-DMS on WebPerson): GASS and its score cache live here.

`GassScores` is the hook that owns the score cache: it creates it when the config
scores tokens or masks by score, hands it to the training loader, saves it in
checkpoints (`score_cache`), publishes each epoch's snapshot, and after each
optimisation step writes the batch's GASS scores into the cache rows of its captions
(on every rank: the update is a collective that gathers all ranks' rows, so no
update is lost) and logs their statistics (`gass/mean`, `gass/q10|50|90`). Masks
drawn by the data workers read the cache as `gass.refresh` says (epoch snapshot, or
the latest rows).

When the corpus says which words are corrupted (the synthetic generator's
`noise_report.json`), the task also measures noise detection
(`processor.noise_detection`): the per-caption AUC of GASS, CSS and random scores
for clean over corrupted words, per corruption kind, for the initial model (the
backbone before GA-DMS pretraining, recorded as epoch -1) and after every epoch
that evaluates direct transfer (`eval.period`). Records go to `metrics.jsonl`
(`type: noise_auc`) and TensorBoard (`noise_auc/<scorer>/<kind>`, x = step).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from datasets.bases import TrainIndex
from datasets.build import masking_spec_from_config
from datasets.score_cache import ScoreCache
from processor.engine import Task, Trainer
from processor.loop import StepOutput, TrainLoop
from processor.noise_detection import load_noise_report, noise_detection_auc, summarize_aucs
from utils import comm
from utils.config import Config
from utils.host_sync import HostCopy
from utils.metrics_log import append_metrics

logger = logging.getLogger(__name__)

__all__ = ["GassScores", "GassTask", "NOISE_SCORERS", "PretrainTask", "measure_noise_detection"]

#: Scorers compared in the noise-detection records.
NOISE_SCORERS = ("gass", "css", "random")
NOISE_RECORD = "noise_auc"
_QUANTILES = (0.1, 0.5, 0.9)  # of the step's token scores, logged as gass/q10|50|90


def measure_noise_detection(model: torch.nn.Module, cfg: Config, device: torch.device | str = "cpu"
                            ) -> dict[str, dict[str, float]]:
    """Scorer -> {all, <kind>..., captions}: noise-detection AUCs of `model` on `cfg.data.root`."""
    aucs = noise_detection_auc(model, cfg.data.root, image_size=cfg.model.clip.image_size,
                               annotation=cfg.data.annotation or "", text_length=cfg.data.text_length,
                               batch_size=cfg.data.batch_size, device=device, scorers=NOISE_SCORERS, seed=cfg.seed)
    return {name: summarize_aucs(per_kind) for name, per_kind in aucs.items()}


class GassScores:
    """The GASS score cache of a run and what is done with it each epoch and step.

    Args:
        cfg: The resolved config (reads `gass.*`, `masking.*`, `data.text_length`).
        num_captions: Training captions (rows of the cache).
        run_dir: Where the cache files live.
    """

    def __init__(self, cfg: Config, num_captions: int, run_dir: str) -> None:
        self.cache = ScoreCache(run_dir, num_captions, cfg.data.text_length, init_value=cfg.gass.init_score,
                                refresh=cfg.gass.refresh)
        self._stats: tuple[int, HostCopy] | None = None  # the last step's statistics, on their way to the host

    @staticmethod
    def wanted(cfg: Config) -> bool:
        """Whether the config computes GASS scores or draws masks from them."""
        return bool(cfg.gass.enabled) or masking_spec_from_config(cfg).needs_scores

    def before_epoch(self, epoch: int) -> None:
        self.cache.begin_epoch(epoch)

    def after_step(self, loop: TrainLoop, batch: Mapping[str, Any], output: StepOutput, writer: Any) -> None:
        """Store the step's scores and log their statistics, without waiting for the device: both reach
        the host in the background and are written at the next step (or `flush`)."""
        scores = output.aux.get("gass_scores")
        if scores is None:
            return
        self.cache.update(batch["index"], scores, applied=output.applied, wait=False)
        if writer is not None and comm.is_main_process():
            self.flush(writer)
            valid = torch.where(scores > 0, scores.float(), torch.nan).flatten()  # scored tokens only
            stats = torch.stack([valid.nanmean(), *(valid.nanquantile(q) for q in _QUANTILES)])
            applied = output.applied if output.applied is not None else torch.ones((), device=stats.device)
            self._stats = (loop.global_step, HostCopy({"stats": stats, "applied": applied.reshape(1)}))

    def flush(self, writer: Any) -> None:
        """Write the statistics still on their way to the host (the cache stores its rows itself)."""
        if self._stats is None:
            return
        (step, copy), self._stats = self._stats, None
        got = copy.get()
        mean, *quantiles = got["stats"].tolist()
        if not got["applied"].all() or mean != mean:  # skipped on the device, or no scored token
            return
        writer.add_scalar("gass/mean", mean, step)
        for q, value in zip(_QUANTILES, quantiles):
            writer.add_scalar(f"gass/q{int(q * 100)}", value, step)


class GassTask(Task):
    """A task whose run has a GASS score cache when its config asks for one (`GassScores.wanted`).

    Pretraining always does; fine-tuning does when its config turns GASS scoring or
    score-driven masks on (the IRRA recipe does not).
    """

    def __init__(self) -> None:
        self.gass: GassScores | None = None

    def loader_inputs(self, cfg: Config, index: TrainIndex, run_dir: str) -> dict[str, Any]:
        self.gass = GassScores(cfg, len(index), run_dir) if GassScores.wanted(cfg) else None
        return {"score_cache": self.gass.cache} if self.gass is not None else {}

    def checkpointables(self) -> dict[str, Any]:
        return {"score_cache": self.gass.cache} if self.gass is not None else {}

    def before_epoch(self, loop: TrainLoop, epoch: int) -> None:
        if self.gass is not None:
            self.gass.before_epoch(epoch)

    def after_step(self, loop: TrainLoop, batch: Mapping[str, Any], output: StepOutput) -> None:
        if self.gass is not None:
            self.gass.after_step(loop, batch, output, self.trainer.writer)

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        self._flush()

    def on_stop(self, loop: TrainLoop, epoch: int, batches_done: int) -> None:
        self._flush()

    def after_train(self, loop: TrainLoop) -> None:
        self._flush()

    def _flush(self) -> None:
        if self.gass is not None:
            self.gass.cache.flush()
            if self.trainer.writer is not None and comm.is_main_process():
                self.gass.flush(self.trainer.writer)


class PretrainTask(GassTask):
    """GA-DMS pretraining: SDM on noise-masked captions + informative MLM, GASS every step."""

    name = "pretrain"

    epoch_records = (NOISE_RECORD,)

    def __init__(self) -> None:
        super().__init__()
        self._measures_noise = False

    def build_model(self, cfg: Config, num_classes: int) -> torch.nn.Module:
        # The backbone comes from model.clip.pretrained (OpenAI CLIP); the heads start fresh.
        if cfg.model.finetune:
            raise ValueError("model.finetune is set in a pretraining config; use task=finetune "
                             "(or clear model.finetune) — pretraining starts from model.clip.pretrained")
        self._measures_noise = (cfg.data.name == "WebPerson" and cfg.eval.period > 0
                                and load_noise_report(cfg.data.root) is not None)
        return super().build_model(cfg, num_classes)

    def before_train(self, loop: TrainLoop) -> None:
        if self._measures_noise and comm.is_main_process():
            # The initial weights: the backbone before GA-DMS.
            trainer = self.trainer
            self._log_noise(trainer, -1, 0, measure_noise_detection(trainer.model, trainer.cfg, trainer.device))

    def after_epoch(self, loop: TrainLoop, epoch: int) -> None:
        super().after_epoch(loop, epoch)
        trainer = self.trainer
        if self._measures_noise and comm.is_main_process() and (epoch + 1) % trainer.cfg.eval.period == 0:
            self._log_noise(trainer, epoch, loop.global_step,
                            measure_noise_detection(trainer.model, trainer.cfg, trainer.device))

    @staticmethod
    def _log_noise(trainer: Trainer, epoch: int, step: int, results: dict[str, dict[str, float]]) -> None:
        for scorer, row in results.items():
            append_metrics(trainer.run_dir, {"type": NOISE_RECORD, "epoch": epoch, "step": step, "scorer": scorer,
                                             **{k: v for k, v in row.items() if k != "captions"},
                                             "captions": int(row["captions"])})
            if trainer.writer is not None:
                for kind, value in row.items():
                    if kind != "captions":
                        trainer.writer.add_scalar(f"noise_auc/{scorer}/{kind}", value, step)
        logger.info("noise detection AUC (clean over corrupted words; 0.5 = chance) %s: %s",
                    "before pretraining" if epoch < 0 else f"after epoch {epoch}",
                    "; ".join(f"{s} {r['all']:.3f} (" + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                                               if k not in ("all", "captions")) + ")"
                              for s, r in results.items()))
