#!/usr/bin/env python
"""Retrieval under noisy queries: evaluate checkpoints with their test captions corrupted at controlled rates.

    python tools/robustness.py --config RUN/config.yaml --checkpoint RUN/best_CUHK-PEDES.pth [--checkpoint B.pth ...]
        [--rates 0 0.1 0.2 0.3 0.5] [--kinds drop swap clause typo mix] [--seed 0] [--out DIR]
        [--format png|pdf|svg] [key=value ...]

The captions (queries) of each benchmark in `eval.datasets` are corrupted with
`datasets/text_noise.py` -- `drop` (word deletion), `swap` (attribute
substitution), `clause` (irrelevant sentences), `typo` (character typos), `mix`
-- at each rate (the fraction of the words corrupted); the gallery is never
touched. The corrupted queries depend only on --seed (the same for every
checkpoint); each checkpoint embeds its gallery once and its queries once per
(kind, rate). The clean queries are always evaluated (the `none | 0.00` row,
what tools/test.py reports).

Prints a `task | noise | rate | R1 | R5 | R10 | mAP | mINP` table per checkpoint,
appends `type: robustness` records to `<out>/metrics.jsonl` (default out:
`<output_dir>/robustness`) and draws text-to-image R1 against the rate, one panel
per kind and one line per checkpoint, to `<out>/robustness_<dataset>_<split>.<format>`.
See docs/robustness.md.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from datasets.text_noise import DEFAULT_VOCABULARY, NOISE_KINDS, NoisyCaption, load_vocabulary  # noqa: E402
from processor.evaluate import build_evaluator, eval_splits  # noqa: E402
from processor.inference import load_for_evaluation  # noqa: E402
from processor.robustness import CLEAN, evaluate_under_noise, noisy_queries  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.device import resolve_device  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.metrics import TABLE_COLUMNS  # noqa: E402
from utils.metrics_log import append_metrics  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402
from utils.threads import apply_threads  # noqa: E402

logger = logging.getLogger("tools.robustness")

DEFAULT_RATES = (0.0, 0.1, 0.2, 0.3, 0.5)
FORMATS = ("png", "pdf", "svg")
#: Marks an --out folder as this tool's: only then does it replace a chart it finds there.
MARKER = ".gadms-robustness"
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.yaml or any experiment YAML")
    parser.add_argument("--checkpoint", required=True, action="append", dest="checkpoints",
                        help="checkpoint to evaluate; repeat for several (the same noisy queries for each)")
    parser.add_argument("--rates", nargs="+", default=None, metavar="RATE",
                        help="fractions of the words to corrupt, in [0, 1] (default: "
                             f"{' '.join(str(r) for r in DEFAULT_RATES)})")
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                        help=f"noise kinds among {', '.join(NOISE_KINDS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="folder for metrics.jsonl and the chart (default: <output_dir>/robustness)")
    parser.add_argument("--format", default="png", choices=FORMATS, help="chart format (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=["test", "val"], help="split to evaluate")
    parser.add_argument("--words", default=None,
                        help="word list of the corruptions (default: datasets/text_noise_words.json)")
    parser.add_argument("--trust", action="store_true", help="allow checkpoints that need full unpickling")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. eval.datasets=[RSTPReid]")
    args = parser.parse_args(argv)
    # `--rates 0 0.1 data.root=x` must not read the override as a rate: key=value items are overrides.
    for name in ("rates", "kinds"):
        values = getattr(args, name)
        if values is not None:
            args.overrides += [v for v in values if "=" in v]
            setattr(args, name, [v for v in values if "=" not in v])
    try:
        args.rates = parse_rates(args.rates)
        args.kinds = parse_kinds(args.kinds)
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_rates(values: Sequence[str] | None) -> list[float]:
    """Sorted distinct rates from the command line (default :data:`DEFAULT_RATES`).

    Raises:
        ValueError: a value that is not a number in [0, 1].
    """
    if values is None:
        return list(DEFAULT_RATES)
    if not values:
        raise ValueError("--rates: give at least one rate, e.g. --rates 0 0.1 0.3")
    rates = set()
    for value in values:
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"--rates: {value!r} is not a fraction of the words in [0, 1] "
                             "(e.g. --rates 0 0.1 0.3 for 0%, 10%, 30% of the words)")
        rates.add(rate)
    return sorted(rates)


def parse_kinds(values: Sequence[str] | None) -> list[str]:
    """Distinct noise kinds in the order given (default: all of :data:`NOISE_KINDS`).

    Raises:
        ValueError: an unknown kind (the message lists the valid ones).
    """
    if values is None:
        return list(NOISE_KINDS)
    if not values:
        raise ValueError(f"--kinds: give at least one of {', '.join(NOISE_KINDS)}")
    bad = [v for v in values if v not in NOISE_KINDS]
    if bad:
        raise ValueError(f"--kinds: unknown kind {bad[0]!r}; valid kinds: {', '.join(NOISE_KINDS)}")
    return list(dict.fromkeys(values))


def model_labels(paths: Sequence[str]) -> list[str]:
    """Short distinct names for checkpoints: the file stems, with as many parent folders as it takes.

    A file given twice gets ``#2``, ``#3`` ... on its repeats.
    """
    resolved = [Path(p).resolve() for p in paths]
    distinct = list(dict.fromkeys(resolved))
    parts = {p: p.with_suffix("").parts[1:] or (p.name,) for p in distinct}  # [1:]: not the root "/"
    for depth in range(1, max(len(v) for v in parts.values()) + 1):
        names = {p: "/".join(v[-depth:]) for p, v in parts.items()}
        if len(set(names.values())) == len(names):
            break
    labels, seen = [], {}
    for p in resolved:
        seen[p] = seen.get(p, 0) + 1
        labels.append(names[p] if seen[p] == 1 else f"{names[p]}#{seen[p]}")
    return labels


def format_noise_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render rows as a ``task | noise | rate | R1 | R5 | R10 | mAP | mINP`` table."""
    table = PrettyTable(["task", "noise", "rate", *TABLE_COLUMNS])
    for row in rows:
        table.add_row([f"{row['dataset']} {row['task']}", row["noise"], f"{row['rate']:.2f}",
                       *(f"{row[k]:.2f}" for k in TABLE_COLUMNS)])
    return table.get_string()


def format_changed_table(queries: Mapping[str, Mapping[tuple[str, float], Sequence[NoisyCaption]]]) -> str:
    """Per dataset, kind and rate: the fraction of the query words actually corrupted."""
    table = PrettyTable(["dataset", "noise", "rate", "words changed"])
    for name, conditions in queries.items():
        for (kind, rate), noisy in conditions.items():
            changed = sum(q.changed for q in noisy) / max(1, sum(q.words for q in noisy))
            table.add_row([name, kind, f"{rate:.2f}", f"{changed:.3f}"])
    return table.get_string()


def chart_path(out: Path, dataset: str, split: str, fmt: str) -> Path:
    return out / f"robustness_{dataset}_{split}.{fmt}"


def draw_chart(curves: Mapping[str, Mapping[str, Mapping[float, float]]], kinds: Sequence[str], title: str,
               fmt: str) -> bytes:
    """A figure of R1 against the noise rate, a panel per kind and a line per model, as `fmt` bytes.

    Args:
        curves: {model: {kind: {rate: R1}}} (rate 0 = the clean queries, shared by the kinds).
    """
    from matplotlib.figure import Figure  # Agg through Figure: no display, no global pyplot state

    columns = min(3, len(kinds))
    rows = math.ceil(len(kinds) / columns)
    fig = Figure(figsize=(3.3 * columns + 0.6, 2.9 * rows + 0.7), layout="constrained")
    grid = fig.subplots(rows, columns, sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[len(kinds):]:
        ax.set_visible(False)
    for ax, kind in zip(axes, kinds):
        for i, (label, per_kind) in enumerate(curves.items()):
            points = sorted(per_kind[kind].items())
            ax.plot([r for r, _ in points], [v for _, v in points], marker="o", markersize=4,
                    color=f"C{i % 10}", label=label)
        ax.set_title(kind)
        ax.set_xlabel("noise rate (fraction of words)")
        ax.grid(True, alpha=0.3)
    for row in grid:
        row[0].set_ylabel("text-to-image R1 (%)")
    axes[0].legend(fontsize="small", loc="best")
    fig.suptitle(title)
    buffer = io.BytesIO()
    # No creation date in the file: the same results give the same bytes.
    fig.savefig(buffer, format=fmt, dpi=120, metadata=_METADATA[fmt])
    return buffer.getvalue()


def _check_outputs(out: Path, datasets: Sequence[str], split: str, fmt: str) -> dict[str, Path]:
    """The chart path of each dataset, once `out` is known to be writable and to hold no chart of someone else's."""
    check_output_path(out, "--out", folder=True)
    check_output_path(out / "metrics.jsonl", "--out")
    charts = {name: chart_path(out, name, split, fmt) for name in datasets}
    for path in charts.values():
        check_output_path(path, "--out")
        if path.exists() and not (out / MARKER).is_file():
            raise ToolError(f"--out {out} holds {path.name}, which this tool did not make (no {MARKER} there); "
                            "choose another --out")
    return charts


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, list(args.overrides) + ["model.clip.pretrained="])
    missing = [p for p in args.checkpoints if not Path(p).is_file()]
    if missing:
        raise ToolError(f"--checkpoint {missing[0]}: no such file")
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ToolError("the chart needs matplotlib: .venv/bin/pip install matplotlib") from err
    words = Path(args.words) if args.words else DEFAULT_VOCABULARY
    try:
        vocabulary = load_vocabulary(words)
    except (OSError, ValueError) as err:
        raise ToolError(f"--words: {err}") from err
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "robustness"
    setup_logging(None, console_level=logging.INFO)
    apply_threads(cfg.num_threads, data_workers=cfg.data.num_workers)
    charts = _check_outputs(out, list(cfg.eval.datasets), args.split, args.format)
    splits = eval_splits(cfg, args.split)

    start = time.time()
    queries = noisy_queries(splits, args.kinds, args.rates, args.seed, vocabulary)
    logger.info("corrupted the queries in %.1fs (seed %d)", time.time() - start, args.seed)
    top = max(args.rates)
    for name, conditions in queries.items():
        for kind in args.kinds:
            if (kind, top) in conditions:
                logger.info("%s, %s at %.2f, query 0: %s", name, kind, top, conditions[kind, top][0].text)
    print(format_changed_table(queries))

    device = resolve_device(cfg.device)
    evaluator = build_evaluator(cfg, splits, device)
    labels = model_labels(args.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    common = {"type": "robustness", "split": args.split, "seed": args.seed, "words": _file_digest(words)}
    curves: dict[str, dict[str, dict[str, dict[float, float]]]] = {name: {} for name in splits}
    for checkpoint, label in zip(args.checkpoints, labels):
        start = time.time()
        model = load_for_evaluation(cfg, checkpoint, trust=args.trust)
        model.to(device).eval()
        rows = []
        with torch.inference_mode():
            for name, split in splits.items():
                rows += [{"dataset": name, "queries": len(split.captions), **row}
                         for row in evaluate_under_noise(model, evaluator, split, queries[name])]
        print(f"{label} ({checkpoint}):")
        print(format_noise_table(rows))
        logger.info("evaluated %s in %.1fs", checkpoint, time.time() - start)
        for row in rows:
            append_metrics(out, {**common, "checkpoint": str(checkpoint), "model": label, **row})
            if row["task"] == "t2i":
                per_kind = curves[row["dataset"]].setdefault(label, {k: {} for k in args.kinds})
                for kind in args.kinds if row["noise"] == CLEAN else [row["noise"]]:
                    per_kind[kind][row["rate"]] = row["R1"]
    for name, per_model in curves.items():
        data = draw_chart(per_model, args.kinds, f"{name} {args.split}: R1 under query noise (seed {args.seed})",
                          args.format)
        atomic_write(charts[name], lambda f, data=data: f.write(data))
        print(f"chart: {charts[name]}")
    print(f"records appended to {out / 'metrics.jsonl'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
