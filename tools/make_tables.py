#!/usr/bin/env python
"""Reproduction tables: our runs' test metrics beside the paper's published numbers.

    python tools/make_tables.py --runs runs/ft_cuhk runs/ft_icfg runs/pre_1m [--format markdown|text] [--out FILE]

(a) Fine-tuned retrieval (paper Table 1): R1 / R5 / R10 / mAP (and our mINP)
    per benchmark, one row per fine-tuning run.
(b) Direct transfer after pretraining (paper Table 2): R1 / mAP per benchmark,
    one row per pretraining run (`task: pretrain` in the run's config.yaml).

A run's number for a benchmark is the test metric at its best checkpoint: the
`type: eval` record on split=test at the epoch whose selection-split R1 was
best (`selection_split` in the records says which split selects; the first
epoch wins ties, as the trainer keeps the first best). A run without eval
records for a benchmark uses its latest `type: test` record (tools/test.py --record).
Missing benchmarks show "–". Paper rows carry "paper" in the source column.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml  # noqa: E402
from prettytable import PrettyTable  # noqa: E402

from utils.cli import ToolError, read_records, run_tool  # noqa: E402
from utils.metrics_log import is_number  # noqa: E402
from utils.output_paths import check_output_path  # noqa: E402

BENCHMARKS = ("CUHK-PEDES", "ICFG-PEDES", "RSTPReid")
FINETUNE_METRICS = ("R1", "R5", "R10", "mAP", "mINP")
TRANSFER_METRICS = ("R1", "mAP")
MISSING = "–"
TASKS = ("auto", "finetune", "pretrain")

#: Paper Table 1 (docs/method.md §10): fine-tuned R1 / R5 / R10 / mAP; the paper reports no mINP.
PAPER_FINETUNED: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "IRRA (no pretraining)": {"CUHK-PEDES": (73.38, 89.93, 93.71, 66.10), "ICFG-PEDES": (63.46, 80.25, 85.82, 38.06),
                              "RSTPReid": (60.20, 81.30, 88.20, 47.17)},
    "NAM (MLLM4Text-ReID)": {"CUHK-PEDES": (76.82, 91.16, 94.46, 69.55), "ICFG-PEDES": (67.05, 82.16, 87.33, 41.51),
                             "RSTPReid": (68.50, 87.15, 92.10, 53.02)},
    "GA-DMS, WebPerson 1M": {"CUHK-PEDES": (77.02, 91.28, 94.58, 69.65), "ICFG-PEDES": (69.07, 83.26, 87.64, 41.91),
                             "RSTPReid": (70.30, 88.00, 92.85, 54.89)},
    "GA-DMS, WebPerson 5M": {"CUHK-PEDES": (77.60, 91.40, 94.78, 69.82), "ICFG-PEDES": (69.51, 83.47, 87.67, 42.30),
                             "RSTPReid": (71.25, 87.25, 92.90, 55.43)},
}
#: Paper Table 2 (docs/method.md §10): direct transfer R1 / mAP.
PAPER_TRANSFER: dict[str, dict[str, tuple[float, float]]] = {
    "none (plain CLIP)": {"CUHK-PEDES": (12.65, 11.15), "ICFG-PEDES": (6.67, 2.51), "RSTPReid": (13.45, 10.31)},
    "GA-DMS 0.1M": {"CUHK-PEDES": (58.95, 52.77), "ICFG-PEDES": (38.18, 19.70), "RSTPReid": (47.10, 36.68)},
    "GA-DMS 1M": {"CUHK-PEDES": (66.26, 58.54), "ICFG-PEDES": (51.99, 28.81), "RSTPReid": (55.35, 40.57)},
    "GA-DMS 5M": {"CUHK-PEDES": (68.34, 60.22), "ICFG-PEDES": (54.64, 30.68), "RSTPReid": (57.60, 42.00)},
}


@dataclass
class Selected:
    """The test metrics reported for one benchmark of one run, and where they came from."""

    metrics: dict[str, float]
    note: str


@dataclass
class RunResult:
    """One run directory's task and per-benchmark selected test metrics."""

    name: str
    task: str
    results: dict[str, Selected] = field(default_factory=dict)


def select_test_metrics(records: list[dict[str, Any]], dataset: str) -> Selected | None:
    """Test metrics of `dataset` at the best checkpoint (see the module docstring), or None."""
    evals: dict[tuple[int, str], dict[str, Any]] = {}
    selection = None
    for r in records:
        if (r.get("type") == "eval" and r.get("dataset") == dataset and r.get("task", "t2i") == "t2i"
                and is_number(r.get("epoch")) and is_number(r.get("R1"))):
            evals[(int(r["epoch"]), str(r.get("split")))] = r  # a resumed run's re-logged epoch replaces the first
            selection = r.get("selection_split") or selection
    if evals:
        splits = {split for _, split in evals}
        select = selection or ("val" if "val" in splits else "test")
        tests = {epoch: r for (epoch, split), r in evals.items() if split == "test"}
        candidates = sorted((epoch, r) for (epoch, split), r in evals.items() if split == select)
        best = None
        for epoch, r in candidates:
            if best is None or r["R1"] > best[1]["R1"]:
                best = (epoch, r)
        if best is not None and best[0] in tests:
            note = f"test at epoch {best[0]} (best {select} R1 {best[1]['R1']:.2f})"
            return Selected(_metrics(tests[best[0]]), note)
        if best is None and tests:
            last = max(tests)
            return Selected(_metrics(tests[last]), f"test at the last epoch {last} (no {select} records to select on)")
    finals = [r for r in records if r.get("type") == "test" and r.get("dataset") == dataset
              and r.get("split", "test") == "test" and r.get("task", "t2i") == "t2i" and is_number(r.get("R1"))]
    if finals:
        checkpoint = os.path.basename(str(finals[-1].get("checkpoint", "?")))
        return Selected(_metrics(finals[-1]), f"tools/test.py record ({checkpoint})")
    return None


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(record[k]) for k in FINETUNE_METRICS if is_number(record.get(k))}


def run_task(run_dir: str, override: str) -> str:
    """`finetune` or `pretrain`: `override` unless auto, else the `task` of the run's config.yaml."""
    if override != "auto":
        return override
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ToolError(f"{path} not found: cannot tell a pretraining run from a fine-tuning one "
                        "(pass --task finetune or --task pretrain)")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ToolError(f"cannot read {path}: {err}") from err
    task = cfg.get("task") if isinstance(cfg, dict) else None
    if task not in ("finetune", "pretrain"):
        raise ToolError(f"{path}: task is {task!r}; expected 'finetune' or 'pretrain'")
    return task


def expand_runs(paths: list[str]) -> list[tuple[str, str]]:
    """(run directory, display name) of every run named by `paths`.

    A path is a run directory (it holds metrics.jsonl) or a folder of runs, such as
    `runs/demo` with its `pretrain/` and `finetune/`: then each subfolder holding a
    metrics.jsonl is a run, named `<folder>/<run>`. Anything else is kept as given,
    so `collect_run` says what is missing.
    """
    found: list[tuple[str, str]] = []
    for path in paths:
        name = os.path.basename(os.path.normpath(path))
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "metrics.jsonl")):
            inner = sorted(entry.name for entry in os.scandir(path)
                           if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "metrics.jsonl")))
            if inner:
                found += [(os.path.join(path, sub), f"{name}/{sub}") for sub in inner]
                continue
        found.append((path, name))
    return found


def collect_run(run_dir: str, task: str = "auto", name: str | None = None) -> RunResult:
    """A run directory's task and the selected test metrics of every benchmark it evaluated."""
    if not os.path.isdir(run_dir):
        raise ToolError(f"run directory {run_dir} not found")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise ToolError(f"{metrics} not found, and no subfolder of {run_dir} holds one (a run directory holds "
                        "metrics.jsonl once an epoch has finished)")
    records = read_records(metrics)
    result = RunResult(name=name or os.path.basename(os.path.normpath(run_dir)), task=run_task(run_dir, task))
    for dataset in BENCHMARKS:
        selected = select_test_metrics(records, dataset)
        if selected is not None:
            result.results[dataset] = selected
    return result


def _fmt(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def finetune_rows(runs: list[RunResult]) -> list[list[str]]:
    """Table (a) rows: method, source, then R1 R5 R10 mAP mINP per benchmark."""
    rows = []
    for method, per_set in PAPER_FINETUNED.items():
        row = [method, "paper"]
        for dataset in BENCHMARKS:
            row += [_fmt(v) for v in per_set[dataset]] + [MISSING]
        rows.append(row)
    for run in runs:
        if run.task != "finetune":
            continue
        row = [run.name, "ours"]
        for dataset in BENCHMARKS:
            m = run.results[dataset].metrics if dataset in run.results else {}
            row += [_fmt(m.get(k)) for k in FINETUNE_METRICS]
        rows.append(row)
    return rows


def transfer_rows(runs: list[RunResult]) -> list[list[str]]:
    """Table (b) rows: method, source, then R1 mAP per benchmark."""
    rows = []
    for method, per_set in PAPER_TRANSFER.items():
        rows.append([method, "paper"] + [_fmt(v) for dataset in BENCHMARKS for v in per_set[dataset]])
    for run in runs:
        if run.task != "pretrain":
            continue
        row = [run.name, "ours"]
        for dataset in BENCHMARKS:
            m = run.results[dataset].metrics if dataset in run.results else {}
            row += [_fmt(m.get(k)) for k in TRANSFER_METRICS]
        rows.append(row)
    return rows


def _header(metrics: tuple[str, ...]) -> list[str]:
    return ["Method", "Source"] + [f"{dataset} {m}" for dataset in BENCHMARKS for m in metrics]


def _table(header: list[str], rows: list[list[str]], fmt: str) -> str:
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    table = PrettyTable(header)
    table.align = "r"
    table.align["Method"] = "l"
    for row in rows:
        table.add_row(row)
    return table.get_string()


def render(runs: list[RunResult], fmt: str = "markdown") -> str:
    """Both tables with titles and a note per run saying which record each number comes from."""
    heading = "### " if fmt == "markdown" else ""
    parts = [f"{heading}(a) Fine-tuned text-to-image retrieval (paper Table 1), %",
             _table(_header(FINETUNE_METRICS), finetune_rows(runs), fmt),
             "The paper reports no mINP.",
             f"{heading}(b) Direct transfer after pretraining (paper Table 2), %",
             _table(_header(TRANSFER_METRICS), transfer_rows(runs), fmt)]
    notes = []
    for run in runs:
        for dataset in BENCHMARKS:
            source = run.results[dataset].note if dataset in run.results else "no records"
            notes.append(f"- {run.name} ({run.task}), {dataset}: {source}")
    if notes:
        parts += [f"{heading}Where our numbers come from", "\n".join(notes)]
    return "\n\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="run directories (each with metrics.jsonl), or folders of runs (e.g. runs/demo)")
    parser.add_argument("--format", default="markdown", choices=["markdown", "text"], help="table format")
    parser.add_argument("--task", default="auto", choices=TASKS,
                        help="treat every run as this task (default: the task in each run's config.yaml)")
    parser.add_argument("--out", default=None, help="write the tables to this file (default: print)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.out:
        check_output_path(args.out, "--out")
    runs = [collect_run(path, args.task, name) for path, name in expand_runs(args.runs)]
    text = render(runs, args.format)
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as err:
            raise ToolError(f"cannot write --out {args.out}: {err.strerror or err}") from err
        print(f"tables written to {args.out}")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
