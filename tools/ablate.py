#!/usr/bin/env python
"""Ablation of GA-DMS on the synthetic data (the design of the paper's Table 4).

Each variant pretrains the tiny CLIP, from the pretrained tiny backbone
(`processor.backbone`, made once and cached) or from random weights, on the
synthetic WebPerson corpus (whose captions carry MLLM-style noise), selects the
epoch on the synthetic benchmark's val split and reports direct-transfer retrieval
on its test split, clean and with 30% of the query words corrupted (`mix`). It
also measures whether the token scores find the noise: for every corrupted
WebPerson caption, the share of (clean word token, corrupted word token) pairs
that the final model's scores order correctly (clean higher), averaged over
captions -- a per-caption ROC AUC, 0.5 = chance. The table gives mean ± std over
the seeds, 95% intervals and each variant's difference to SDM paired by seed.

    python tools/ablate.py                                   # every variant x 5 seeds, 10 epochs (~3 h, 2 cores)
    python tools/ablate.py --seeds 0 1 --variants sdm gadms --epochs 4
    python tools/ablate.py --out runs/ablation --table ablation_table.md
    python tools/ablate.py --backbone random --out runs/ablation_random   # from random weights

Runs land in <out>/<variant>/seed<k>/ (resolved config, log, metrics.jsonl,
checkpoints); running the same command again resumes unfinished runs and
reuses finished ones, so an interrupted ablation loses at most one epoch. A
run is reused or resumed only when its resolved config is the one asked for
(paths, logging, workers, threads and device aside); otherwise the tool stops
and names the differing keys. `--epochs` shorter than the config's warm-up
shortens the warm-up to `--epochs` - 1 (printed, and logged in the run's train.log).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from datasets.synthetic import SyntheticConfig, generate  # noqa: E402
from model import build_model  # noqa: E402
from model.weights import load_model_weights, unwrap_state_dict  # noqa: E402
from processor.backbone import DEFAULT_CACHE, make_backbone, settings_for  # noqa: E402
from processor.engine import Trainer  # noqa: E402
from processor.noise_detection import NOISE_KINDS, noise_detection_auc, summarize_aucs  # noqa: E402
from processor.pretrain import PretrainTask  # noqa: E402
from processor.robustness import noisy_retrieval  # noqa: E402
from utils.checkpoint import atomic_write, read_checkpoint  # noqa: E402
from utils.cli import ToolError, one_line  # noqa: E402
from utils.config import Config, apply_overrides, load_config  # noqa: E402
from utils.errors import UserInputError  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.threads import apply_threads  # noqa: E402

logger = logging.getLogger(__name__)

CONFIG = REPO / "configs" / "demo" / "tiny_pretrain.yaml"
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
BENCHMARK = "CUHK-PEDES"
#: Query noise of the robustness columns: this kind at this rate (fraction of the words), noise seed 0.
ROBUST_KIND, ROBUST_RATE = "mix", 0.3
ROBUST_FIELD = f"R1_{ROBUST_KIND}{round(ROBUST_RATE * 100)}"
#: Config keys that do not change a run's results: ignored when deciding whether a run is the one asked for.
RESULT_NEUTRAL_KEYS = ("output_dir", "log_period", "num_threads", "device", "data.num_workers",
                       "data.test_batch_size", "eval.chunk_size", "train.resume", "train.trust_checkpoints",
                       "model.clip.cache_dir")

#: name -> (label, config overrides). Masking without GASS would read the constant initial scores.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "sdm": ("SDM", ["model.loss_names=sdm", "gass.enabled=false", "masking.noise=false", "masking.mlm=none"]),
    "sdm_mlm": ("SDM + random MLM (IRRA-style)",
                ["model.loss_names=sdm+mlm", "gass.enabled=false", "masking.noise=false", "masking.mlm=random"]),
    "sdm_noise": ("SDM + GASS noise masking",
                  ["model.loss_names=sdm", "gass.enabled=true", "masking.noise=true", "masking.mlm=none"]),
    "gadms": ("SDM + GASS noise masking + informative MTP (GA-DMS)",
              ["model.loss_names=sdm+mlm", "gass.enabled=true", "masking.noise=true", "masking.mlm=informative"]),
    "gadms_css": ("GA-DMS with CSS scores instead of GASS",
                  ["model.loss_names=sdm+mlm", "gass.enabled=true", "gass.scoring=css", "masking.noise=true",
                   "masking.mlm=informative"]),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="training seeds (data fixed)")
    parser.add_argument("--epochs", type=int, default=10, help="pretraining epochs")
    parser.add_argument("--config", default=str(CONFIG), help="base pretraining config")
    parser.add_argument("--data", default="data/synthetic", help="synthetic data (generated with defaults if absent)")
    parser.add_argument("--out", default="runs/ablation", help="folder of the runs")
    parser.add_argument("--table", default=None, help="also write the markdown table to this file")
    parser.add_argument("--backbone", choices=("random", "pretrained"), default="pretrained",
                        help="start every run from the tiny CLIP pretrained by tools/pretrain_backbone.py (made once, "
                             "then reused; the default) or from the config's backbone (the demo config's: random "
                             "weights)")
    parser.add_argument("--backbone-cache", default=str(DEFAULT_CACHE), help="where pretrained backbones are kept")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every run, key=value")
    return parser.parse_args(argv)


def pretrained_backbone(data: str, cache: str) -> str:
    """The pretrained tiny CLIP for `data` (its identities left out), made on the first call."""
    settings, exclude = settings_for(data)
    print(f"pretrained backbone: {settings.file_name()} in {cache} (made once, ~2-5 min on 2 cores) ...", flush=True)
    path, record = make_backbone(settings, cache, exclude=exclude, workers=2)
    print(f"         {'trained' if record['trained'] else 'reused'} {path}", flush=True)
    return str(path)


# --------------------------------------------------------------------------- runs


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT (its `last` checkpoint is saved)."""


def save_result(path: Path, result: dict[str, float]) -> None:
    """Write a run's ablation.json atomically (a crash never leaves a torn file)."""
    data = json.dumps(result, indent=2).encode("utf-8")
    atomic_write(path, lambda f: f.write(data))


def auc_fields(model: torch.nn.Module, cfg: Any, data: str, device: torch.device) -> dict[str, float]:
    """noise_auc (all corrupted captions), noise_auc_<kind> per corruption kind, noise_captions.

    The model's own scoring (GASS, or CSS for that variant) of every corrupted WebPerson
    caption with its image, in training-size batches (`processor.noise_detection`).
    """
    per_kind = noise_detection_auc(model, data, image_size=cfg.model.clip.image_size,
                                   annotation=cfg.data.annotation or "", text_length=cfg.data.text_length,
                                   batch_size=cfg.data.batch_size, device=device, scorers=("model",))["model"]
    summary = summarize_aucs(per_kind)
    fields: dict[str, float] = {"noise_auc": summary["all"], "noise_captions": int(summary["captions"])}
    for kind in NOISE_KINDS:
        fields[f"noise_auc_{kind}"] = summary[kind]
    return fields


def robustness_fields(cfg: Any, run_dir: Path) -> dict[str, float]:
    """R1_mix30 / mAP_mix30: text-to-image retrieval of the selected checkpoint (`best_<benchmark>.pth`) on the
    benchmark's test split with 30% of the query words corrupted (`mix`, noise seed 0; gallery untouched)."""
    rows = noisy_retrieval(cfg, str(run_dir / f"best_{BENCHMARK}.pth"), ROBUST_KIND, ROBUST_RATE)[BENCHMARK]
    noisy = next(r for r in rows if r["task"] == "t2i" and r["noise"] == ROBUST_KIND)
    suffix = f"{ROBUST_KIND}{round(ROBUST_RATE * 100)}"
    return {f"R1_{suffix}": noisy["R1"], f"mAP_{suffix}": noisy["mAP"], "words_changed_" + suffix: noisy["changed"]}


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Mapping[str, Any], asked: Mapping[str, Any]) -> list[str]:
    """`key: run value, asked value` for every setting that differs, result-neutral keys aside.

    Keys only one side has are skipped: a key added to the schema after the run was
    made has the default that reproduces the older behaviour.
    """
    old, new = _flatten(saved), _flatten(asked)
    return [f"{key}: {old[key]!r} in the run, {new[key]!r} asked" for key in sorted(old.keys() & new.keys())
            if key not in RESULT_NEUTRAL_KEYS and old[key] != new[key]]


def check_run_config(run_dir: Path, saved: Mapping[str, Any] | None, cfg: Config, state: str) -> None:
    """Refuse to reuse or resume the run in `run_dir` unless it was made with `cfg`'s settings.

    Raises:
        ToolError: the run's config is unknown or differs; naming the keys and the folder.
    """
    advice = f"choose another --out, or delete {run_dir} to run it again with these settings"
    if saved is None:
        raise ToolError(f"{run_dir} holds a {state} run whose config is unknown (no config.yaml); {advice}")
    differences = config_differences(saved, cfg.to_dict())
    if differences:
        raise ToolError(f"{run_dir} holds a {state} run made with other settings than asked "
                        f"({'; '.join(differences)}); it is not reused: {advice}")


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """The resolved config a run saved (`config.yaml`), or None when there is none."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ToolError(f"cannot read {path}: {err}") from err
    return saved if isinstance(saved, dict) else None


def requested_config(args: argparse.Namespace) -> Config:
    """`--config` with the extra overrides and `--epochs`, before the per-run keys and range checks."""
    return apply_overrides(load_config(args.config), [*args.overrides, f"solver.epochs={args.epochs}"])


def run_variant(args: argparse.Namespace, name: str, seed: int, warmup: int | None = None) -> dict[str, float]:
    """Train (or resume, or reuse) one run; returns its test metrics at the best val epoch and noise AUC.

    Args:
        warmup: `solver.warmup_epochs` for this run, when `--epochs` shortened it.

    Raises:
        ToolError: the run folder holds a run made with other settings.
    """
    run_dir = Path(args.out) / name / f"seed{seed}"
    result_file = run_dir / "ablation.json"
    overrides = [f"data.root={args.data}", "eval.root=", f"eval.datasets=[{BENCHMARK}]", f"output_dir={run_dir}",
                 f"seed={seed}", "train.resume=auto", *VARIANTS[name][1], *args.overrides,
                 f"solver.epochs={args.epochs}"]
    if warmup is not None:
        overrides.append(f"solver.warmup_epochs={warmup}")
    cfg = load_config(args.config, overrides)
    if result_file.exists():
        result = json.loads(result_file.read_text())
        # Results recorded before the config was stored with them: the run's config.yaml.
        saved = result.pop("config", None) or read_run_config(run_dir)
        check_run_config(run_dir, saved, cfg, "finished")
        if not all(f"noise_auc_{kind}" in result for kind in NOISE_KINDS):
            # Recorded before the per-kind split: score the finished run's final weights.
            model = build_model(cfg)
            state = unwrap_state_dict(read_checkpoint(str(run_dir / "last.pth")), source=str(run_dir / "last.pth"))
            load_model_weights(model, state, source=str(run_dir / "last.pth"))
            result.update(auc_fields(model, cfg, args.data, torch.device("cpu")))
            save_result(result_file, {**result, "config": saved})
        if ROBUST_FIELD not in result:  # recorded before the robustness columns
            result.update(robustness_fields(cfg, run_dir))
            save_result(result_file, {**result, "config": saved})
        return result
    if (run_dir / "last.pth").exists():
        check_run_config(run_dir, read_run_config(run_dir), cfg, "started")
    trainer = Trainer(cfg, PretrainTask())
    if warmup is not None:
        logger.info("warm-up shortened to %d epoch(s) (solver.warmup_epochs) for --epochs %d: training "
                    "continues for at least one epoch after it", warmup, args.epochs)
    best = trainer.train()
    if trainer.stopped:
        raise Interrupted(f"{run_dir}: stopped by a signal; run the same command again to resume")
    entry = best.get(BENCHMARK) or {}
    test = entry.get("test")
    if not test:
        raise ToolError(f"{run_dir}: no test metrics for {BENCHMARK} at the best val epoch (see its train.log)")
    result = {k: float(test[k]) for k in METRICS}
    result["best_epoch"] = int(entry.get("epoch", -1))
    result.update(auc_fields(trainer.model, cfg, args.data, trainer.device))
    result.update(robustness_fields(cfg, run_dir))
    save_result(result_file, {**result, "config": cfg.to_dict()})
    return result


#: Two-sided 95% quantiles of Student's t by degrees of freedom (more: the normal 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The 95% two-sided t quantile for `df` degrees of freedom (the next smaller tabulated df: conservative)."""
    return T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96


def mean_std(values: Sequence[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def mean_ci(values: Sequence[float], digits: int = 1, signed: bool = False) -> str:
    """`mean [low, high]`: the 95% t-interval of the mean (the mean alone for one value; – for none)."""
    sign = "+" if signed else ""
    if len(values) < 2:
        return f"{values[0]:{sign}.{digits}f}" if values else "–"
    mean = statistics.mean(values)
    half = t975(len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{mean:{sign}.{digits}f} [{mean - half:{sign}.{digits}f}, {mean + half:{sign}.{digits}f}]"


def paired_differences(runs: Sequence[Mapping[str, Any]], base: Sequence[Mapping[str, Any]], key: str,
                       seeds: Sequence[int]) -> list[float]:
    """`key` of each run minus the base variant's run of the same seed (runs listed in `seeds` order)."""
    by_seed = dict(zip(seeds, base))
    return [r[key] - by_seed[s][key] for s, r in zip(seeds, runs) if s in by_seed and key in r and key in by_seed[s]]


def markdown_table(results: dict[str, list[dict[str, float]]], seeds: Sequence[int]) -> str:
    """Mean ± std (sample std over seeds) per variant; 95% intervals; differences to SDM paired by seed."""
    robust = f"R1, {round(ROBUST_RATE * 100)}% {ROBUST_KIND} noise"
    head = ("| variant | " + " | ".join(METRICS) + f" | {robust} | noise AUC | wrong attribute | irrelevant phrase |")
    lines = [f"Direct transfer to the synthetic benchmark's test split (text -> image), mean ± std over "
             f"seeds {', '.join(map(str, seeds))}; {robust}: the same queries with {round(ROBUST_RATE * 100)}% of "
             f"their words corrupted (`{ROBUST_KIND}`, noise seed 0, gallery untouched); noise AUC: clean vs "
             "corrupted words of noisy WebPerson captions (0.5 = chance), all and per corruption kind.", "", head,
             "|" + "---|" * (len(METRICS) + 5)]
    for name, runs in results.items():
        cells = [mean_std([r[m] for r in runs]) for m in METRICS]
        for key, digits in ((ROBUST_FIELD, 1), ("noise_auc", 3), *((f"noise_auc_{k}", 3) for k in NOISE_KINDS)):
            cells.append(mean_std([r[key] for r in runs], digits) if all(key in r for r in runs) else "–")
        lines.append(f"| {VARIANTS[name][0]} | " + " | ".join(cells) + " |")
    base = results.get("sdm")
    if base is None or len(seeds) < 2:
        return "\n".join(lines) + "\n"
    lines += ["", "Mean and 95% interval (t, over seeds) of each variant's R1, and of its difference to SDM "
                  "paired by seed (an interval that excludes 0: a difference larger than the seed spread).", "",
              f"| variant | R1 | R1 − SDM | mAP − SDM | {robust} | its − SDM | noise AUC − SDM |",
              "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        def versus_sdm(key: str, digits: int, runs: Sequence[Mapping[str, Any]] = runs, name: str = name) -> str:
            return mean_ci(paired_differences(runs, base, key, seeds), digits, signed=True) if name != "sdm" else "–"

        cells = [mean_ci([r["R1"] for r in runs]), versus_sdm("R1", 1), versus_sdm("mAP", 1),
                 mean_ci([r[ROBUST_FIELD] for r in runs if ROBUST_FIELD in r]), versus_sdm(ROBUST_FIELD, 1),
                 versus_sdm("noise_auc", 3)]
        lines.append(f"| {VARIANTS[name][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data = Path(args.data)
    setup_logging(None, console_level=logging.WARNING)
    results: dict[str, list[dict[str, float]]] = {}
    start = time.time()
    try:
        if args.epochs < 1:
            raise ToolError(f"--epochs must be >= 1, got {args.epochs}")
        # Hours of training must not end in a file that cannot be written.
        check_output_path(args.out, "--out", folder=True)
        if args.table:
            check_output_path(args.table, "--table")
        asked = requested_config(args)
        apply_threads(asked.num_threads, data_workers=asked.data.num_workers)
        warmup = None
        if asked.solver.warmup_epochs >= args.epochs:
            # The schedule needs an epoch after the warm-up; a short ablation keeps what fits.
            warmup = args.epochs - 1
            print(f"--epochs {args.epochs}: warm-up shortened from {asked.solver.warmup_epochs} to {warmup} "
                  "epoch(s) (solver.warmup_epochs)", flush=True)
        if not (data / "meta.json").exists():
            print(f"generating the synthetic data into {data} ...", flush=True)
            generate(data, SyntheticConfig(), workers=2)
        if args.backbone == "pretrained":
            args.overrides = [*args.overrides, f"model.clip.pretrained={pretrained_backbone(args.data, args.backbone_cache)}"]
        for name in args.variants:
            for seed in args.seeds:
                print(f"[{time.time() - start:6.0f}s] {name} seed {seed} ...", flush=True)
                result = run_variant(args, name, seed, warmup)
                results.setdefault(name, []).append(result)
                print(f"         R1 {result['R1']:.1f}  mAP {result['mAP']:.1f}  noise AUC "
                      f"{result['noise_auc']:.3f}  (best epoch {result['best_epoch']})", flush=True)
    except UserInputError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return 1
    table = markdown_table(results, args.seeds)
    print(table, end="")
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table, encoding="utf-8")
        print(f"table written to {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
