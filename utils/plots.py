"""Training-curve figures drawn with matplotlib.

`curves_figure` lays out the curves of one or more runs as panels that share
the x axis (epoch or step): one panel per loss term, each with its y axis
fitted to that term's values (a change from 28.8 to 26.9 fills the panel
instead of a sliver of a 0-40 axis), retrieval R1 and mAP on axes from 0, and
the learning rate with every tick in scientific notation. Several runs are
overlaid in one column or sit side by side in one column each.
`save_figure` writes PDF or SVG (vector) or PNG, atomically. `collect_curves` reads
the curves of a run from its metrics.jsonl records, and `plot_run_curves` draws the
runs of several run directories into one file (tools/plot_curves.py, tools/demo.py).

The figures are `matplotlib.figure.Figure` objects on an Agg canvas: pyplot is
never imported, so no figure outlives its caller and no display is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib import ticker
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.checkpoint import atomic_write
from utils.errors import UserInputError
from utils.metrics_log import is_number, read_metrics
from utils.output_paths import OutputPathError, unwritable_reason

logger = logging.getLogger(__name__)

__all__ = ["FORMATS", "LAYOUTS", "RETRIEVAL_METRICS", "X_KEYS", "CurvesInputError", "RunCurves", "SciFormatter",
           "collect_curves", "curves_figure", "describe_curves", "panel_keys", "plot_run_curves", "run_names",
           "save_figure"]

#: Output formats `save_figure` writes; pdf and svg are vector formats.
FORMATS = ("pdf", "svg", "png")
#: How several runs are arranged: in the same panels, or one column of panels per run.
LAYOUTS = ("overlay", "columns")
#: Retrieval metrics drawn, one panel each (percentages, axes from 0).
RETRIEVAL_METRICS = ("R1", "mAP")
#: What the x axis can count: both are in every train and eval record.
X_KEYS = ("epoch", "step")
#: Line styles that tell the series of one run apart when runs are overlaid (colour is the run).
_STYLES = ("-", "--", ":", "-.")
#: Height of one panel, and width of the panels of a single column or of one of several, in inches.
_PANEL_HEIGHT = 1.7
_COLUMN_WIDTH = 6.0
_NARROW_COLUMN_WIDTH = 4.0
#: Room for the legends right of the axes, in inches.
_LEGEND_WIDTH = 2.2
#: Panels whose y axis is the same in every column: rates and percentages compare across runs.
_COMMON_SCALE = (*RETRIEVAL_METRICS, "lr")
_PANEL_TITLES = {**{m: f"text-to-image {m} per evaluated set (axis from 0)" for m in RETRIEVAL_METRICS},
                 "lr": "learning rate"}
# No creation dates, and fixed SVG element ids: the same curves give byte-identical files.
_METADATA = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}
_SVG_HASH_SALT = "gadms-curves"


@dataclasses.dataclass
class RunCurves:
    """The curves of one run, each a {x: value} mapping (x = epoch or step).

    Attributes:
        name: shown in legends (overlay) or column titles (columns).
        losses: loss term -> values, drawn in this order.
        retrieval: metric ("R1", "mAP") -> evaluated set (e.g. "CUHK-PEDES test") -> values, in percent.
        lr: learning rate per x.
    """

    name: str
    losses: dict[str, dict[int, float]] = dataclasses.field(default_factory=dict)
    retrieval: dict[str, dict[str, dict[int, float]]] = dataclasses.field(default_factory=dict)
    lr: dict[int, float] = dataclasses.field(default_factory=dict)

    def series(self, panel: str) -> dict[str, dict[int, float]]:
        """The series of this run drawn in `panel` (a loss term, a retrieval metric or "lr")."""
        if panel == "lr":
            return {"lr": self.lr} if self.lr else {}
        if panel in RETRIEVAL_METRICS:
            return {name: points for name, points in self.retrieval.get(panel, {}).items() if points}
        points = self.losses.get(panel)
        return {panel: points} if points else {}


class SciFormatter(ticker.Formatter):
    """Every tick label in scientific notation with the same number of mantissa digits: 0.0e+00, 5.0e-04, 1.0e-03.

    The digits are the fewest (at least one decimal) that give every tick of the axis exactly,
    so neighbouring ticks never print alike.
    """

    def __init__(self) -> None:
        self.decimals = 1
        self.zero_below = 0.0

    def set_locs(self, locs: Sequence[float]) -> None:
        super().set_locs(locs)
        finite = [abs(float(v)) for v in locs if math.isfinite(v)]
        # Tick arithmetic can leave 1e-20 where 0 is meant; it must print as 0, not as its own exponent.
        self.zero_below = 1e-9 * max(finite, default=0.0)
        self.decimals = next((d for d in range(1, 7) if all(
            math.isclose(float(f"{v:.{d}e}"), v, rel_tol=1e-9) for v in finite if v > self.zero_below)), 6)

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{0.0 if abs(x) <= self.zero_below else x:.{self.decimals}e}"


def panel_keys(runs: Sequence[RunCurves]) -> list[str]:
    """The panels of the figure, top to bottom: the loss terms of all runs (the total `loss` first, then
    the terms alphabetically), the retrieval metrics, then "lr"."""
    terms = sorted({t for run in runs for t in run.losses}, key=lambda t: (t != "loss", t))
    return [*terms, *RETRIEVAL_METRICS, "lr"]


def curves_figure(runs: Sequence[RunCurves], *, layout: str = "overlay", xlabel: str = "epoch",
                  figsize: tuple[float, float] | None = None, title: str | None = None) -> Figure:
    """The curves of `runs` as one figure of panels sharing the x axis.

    Args:
        runs: one or more runs; with `layout="overlay"` each run has its own colour.
        layout: "overlay" (all runs in one column of panels) or "columns" (one column per run; the
            retrieval and learning-rate panels of a row share their y axis, each loss panel is fitted
            to its own run).
        xlabel: name of the x values ("epoch" or "step").
        figsize: (width, height) in inches; by default from the number of panels and columns.
        title: figure title (default: the run names).
    """
    if not runs:
        raise ValueError("curves_figure needs at least one run")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    panels = panel_keys(runs)
    columns = [list(runs)] if layout == "overlay" else [[run] for run in runs]
    if figsize is None:
        width = _COLUMN_WIDTH if len(columns) == 1 else _NARROW_COLUMN_WIDTH
        figsize = ((width + _LEGEND_WIDTH) * len(columns), _PANEL_HEIGHT * len(panels) + 0.9)
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), len(columns), sharex=True, squeeze=False)
    for row, panel in enumerate(panels):
        if panel in _COMMON_SCALE:
            for ax in axes[row, 1:]:
                ax.sharey(axes[row, 0])
        # All lines of a row first: where the row's axes share y, its limits come from all of them.
        drawn = [_draw_lines(axes[row, col], panel, col_runs) for col, col_runs in enumerate(columns)]
        for col in range(len(columns)):
            scale_with = range(len(columns)) if panel in _COMMON_SCALE else [col]
            tops = [axes[row, c].dataLim.y1 for c in scale_with if drawn[c]]
            _set_y_axis(axes[row, col], panel, max(tops) if tops else None)
        axes[row, 0].set_ylabel(f"{panel} (%)" if panel in RETRIEVAL_METRICS else panel)
        for col, lines in enumerate(drawn):
            ax = axes[row, col]
            ax.grid(True, color="0.9")
            ax.set_title(_PANEL_TITLES.get(panel, "{} (axis fitted to the values, not from 0)").format(panel),
                         loc="left", fontsize="medium")
            if lines:
                ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
            else:
                what = "evaluation records" if panel in RETRIEVAL_METRICS else f"{panel} records"
                ax.text(0.5, 0.5, f"no {what}", transform=ax.transAxes, ha="center", va="center", color="0.5")
                if panel not in _COMMON_SCALE:
                    ax.set_yticks([])  # an unshared empty axis has no values to mark
    for col, col_runs in enumerate(columns):
        if len(columns) > 1:
            axes[0, col].annotate(col_runs[0].name, (0.5, 1.0), xytext=(0, 22), xycoords="axes fraction",
                                  textcoords="offset points", ha="center", va="bottom", fontweight="bold")
        axes[-1, col].set_xlabel(xlabel)
        axes[-1, col].xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    fig.suptitle(title or "training curves: " + ", ".join(run.name for run in runs))
    return fig


def _draw_lines(ax: Axes, panel: str, runs: Sequence[RunCurves]) -> int:
    """The lines of `panel` for `runs`; returns how many. Colour per run when several runs share
    the panel (line style per series), else colour per series."""
    drawn = 0
    for r, run in enumerate(runs):
        for s, (name, points) in enumerate(run.series(panel).items()):
            xs = sorted(points)
            if len(runs) > 1:
                label = run.name if name == panel else f"{run.name}: {name}"
                colour, style = f"C{r % 10}", _STYLES[s % len(_STYLES)]
            else:
                label, colour, style = name, f"C{s % 10}", "-"
            ax.plot(xs, [points[x] for x in xs], style, color=colour, marker="o", markersize=3, linewidth=1.5,
                    label=label)
            drawn += 1
    return drawn


def _set_y_axis(ax: Axes, panel: str, top: float | None) -> None:
    """Range and tick labels of a panel's y axis; `top` is the largest value it shows (None: no lines)."""
    if panel in RETRIEVAL_METRICS:
        # From 0, so a change is seen in proportion to the score (an axis from 24 turns noise into
        # a climb), to a little above the best value, at most 100%.
        ax.set_ylim(0.0, min(100.0, max(1.1 * top, 1.0)) if top is not None else 100.0)
    elif panel == "lr":
        ax.set_ylim(bottom=0.0)
        ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
        ax.yaxis.set_major_formatter(SciFormatter())
    else:
        # Fitted to the data, not from 0: the change is what a loss curve shows. No offset text
        # ("+2.8e1"): the ticks carry the values themselves.
        ax.ticklabel_format(axis="y", useOffset=False)


def save_figure(fig: Figure, path: str | os.PathLike, fmt: str, *, dpi: int = 150) -> str:
    """Write `fig` to `path` as `fmt` (pdf, svg or png; `dpi` applies to png), atomically; returns the path.

    Raises:
        OutputPathError: naming the path and why it cannot be written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = os.fspath(path)
    try:
        with matplotlib.rc_context({"svg.hashsalt": _SVG_HASH_SALT}):  # restored on exit: no global change
            atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, metadata=_METADATA[fmt]))
    except OSError as err:
        reason = unwritable_reason(path) or err.strerror or str(err)
        raise OutputPathError(f"cannot write {path}: {reason}; choose another path") from err
    logger.info("wrote %s (%s)", path, fmt)
    return path


# --------------------------------------------------------------------------- runs


class CurvesInputError(UserInputError, ValueError):
    """A run directory that is missing, or whose metrics.jsonl cannot be read or holds nothing to plot."""


def collect_curves(records: list[dict[str, Any]], name: str, x: str = "epoch") -> RunCurves:
    """The curves of one run's records, keyed by the records' `x` ("epoch" or "step").

    Train records give every `*_loss` and the total `loss`, and `lr`; text-to-image eval
    records give R1 and mAP per "<dataset> <split>". Records without a numeric `x` are skipped.
    """
    curves = RunCurves(name)
    for record in records:
        at = record.get(x)
        if not is_number(at):
            continue
        at = int(at)
        if record.get("type") == "train":
            for key, value in record.items():
                if (key == "loss" or key.endswith("_loss")) and is_number(value):
                    curves.losses.setdefault(key, {})[at] = float(value)
            if is_number(record.get("lr")):
                curves.lr[at] = float(record["lr"])
        elif record.get("type") == "eval" and record.get("task", "t2i") == "t2i":
            evaluated = f"{record.get('dataset', '?')} {record.get('split', '?')}"
            for metric in RETRIEVAL_METRICS:
                if is_number(record.get(metric)):
                    curves.retrieval.setdefault(metric, {}).setdefault(evaluated, {})[at] = float(record[metric])
    # The total first, then the terms and sets alphabetically, so colours are stable across runs.
    curves.losses = dict(sorted(curves.losses.items(), key=lambda kv: (kv[0] != "loss", kv[0])))
    curves.retrieval = {m: dict(sorted(sets.items())) for m, sets in curves.retrieval.items()}
    return curves


def run_names(paths: Sequence[str]) -> list[str]:
    """Legend names of the runs: their folder names, or the paths as given where two folder names are alike."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [n if names.count(n) == 1 else os.path.normpath(p) for n, p in zip(names, paths)]


def plot_run_curves(run_dirs: Sequence[str], out: str | os.PathLike, fmt: str, *, layout: str = "overlay",
                    x: str = "epoch", figsize: tuple[float, float] | None = None, dpi: int = 150) -> list[RunCurves]:
    """Draw the curves of the runs in `run_dirs` (their metrics.jsonl) into `out` as `fmt`; returns the curves.

    Raises:
        CurvesInputError: a run directory is missing, its metrics.jsonl cannot be read or has no
            train or eval record.
        OutputPathError: `out` cannot be written.
    """
    runs = []
    for path, name in zip(run_dirs, run_names(run_dirs)):
        if not os.path.isdir(path):
            raise CurvesInputError(f"run directory {path} not found")
        metrics = os.path.join(path, "metrics.jsonl")
        try:
            records = read_metrics(metrics)
        except (FileNotFoundError, ValueError) as err:
            raise CurvesInputError(str(err)) from err
        curves = collect_curves(records, name, x)
        if not (curves.losses or curves.retrieval or curves.lr):
            raise CurvesInputError(f"{metrics} has no train or eval records to plot")
        runs.append(curves)
    save_figure(curves_figure(runs, layout=layout, xlabel=x, figsize=figsize), out, fmt, dpi=dpi)
    return runs


def describe_curves(curves: RunCurves, x: str = "epoch") -> str:
    """One line: how many training `x` values and evaluated sets a run's curves hold."""
    points = {at for values in curves.losses.values() for at in values}
    evaluated = {s for sets in curves.retrieval.values() for s in sets}
    return f"{curves.name}: {len(points)} training {x}(s), {len(evaluated)} evaluated set(s)"
