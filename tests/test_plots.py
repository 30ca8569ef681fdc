"""Training-curve figures (utils/plots.py, tools/plot_curves.py) and the checkpoint the demo's retrieval
figure is drawn from (tools/visualize_retrieval.py --run, tools/demo.py draw_figures).

The figures are checked through their matplotlib objects (each line's data, the axes' limits,
sharing and tick labels), not through pixels; the written files by their formats' signatures.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from datasets import build_dataset
from model import build_model
from processor import retrieval_figure
from processor.evaluate import build_evaluator
from processor.inference import load_for_evaluation
from tests.conftest import REPO, load_tool
from utils.checkpoint import Checkpointer
from utils.cli import read_records
from utils.config import load_config, save_config
from utils.plots import RunCurves, SciFormatter, collect_curves, curves_figure, panel_keys, run_names, save_figure

plot_curves = load_tool("plot_curves")
visualize_retrieval = load_tool("visualize_retrieval")
demo = load_tool("demo")

SCI = re.compile(r"^-?\d\.(\d+)e[+-]\d\d$")


def _train(epoch, loss, sdm, mlm, lr, **extra):
    return {"type": "train", "epoch": epoch, "step": 9 * (epoch + 1), "time": 2.5, "lr": lr, "loss": loss,
            "sdm_loss": sdm, "mlm_loss": mlm, "mlm_acc": 0.1, "skipped_images": 0, "nonfinite_steps": 0, **extra}


def _eval(epoch, split, r1, m_ap, task="t2i"):
    return {"type": "eval", "epoch": epoch, "step": 9 * (epoch + 1), "dataset": "CUHK-PEDES", "split": split,
            "task": task, "selection_split": "val", "R1": r1, "R5": 60.0, "R10": 80.0, "mAP": m_ap, "mINP": 20.0}


#: A fine-tuning run's records as the Trainer writes them: the user's report (SDM 28.8 -> 26.9, lr from
#: 1e-3 down past 8e-4, R1 between 24 and 31), an i2t row (not drawn) and epoch 2 logged twice (a resume).
RECORDS = [
    _train(0, 40.1, 28.8, 8.9, 1e-4), _eval(0, "val", 24.0, 30.1), _eval(0, "test", 25.0, 29.0),
    _eval(0, "test", 99.0, 99.0, task="i2t"),
    _train(1, 39.0, 28.1, 8.5, 1e-3), _eval(1, "val", 27.5, 31.0), _eval(1, "test", 26.0, 30.5),
    _train(2, 50.0, 35.0, 9.0, 9e-4), _eval(2, "val", 10.0, 10.0), _eval(2, "test", 10.0, 10.0),
    _train(2, 38.2, 27.4, 8.4, 9.5e-4), _eval(2, "val", 31.0, 33.0), _eval(2, "test", 29.0, 31.0),
    _train(3, 37.6, 26.9, 8.3, 8e-4), _eval(3, "val", 30.0, 32.5), _eval(3, "test", 30.5, 31.5),
]


def write_run(folder, records):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def expected(records, kind, key, split=None):
    """Naive reference: (x, value) of the records of `kind`, the last record of an epoch winning."""
    points = {}
    for r in records:
        if r["type"] == kind and (kind == "train" or (r["task"] == "t2i" and r["split"] == split)):
            points[r["epoch"]] = r[key]
    return sorted(points.items())


def lines_of(ax):
    """{legend label: list of (x, y)} of the lines drawn in `ax`."""
    return {line.get_label(): list(zip(line.get_xdata().tolist(), line.get_ydata().tolist()))
            for line in ax.get_lines()}


@pytest.fixture
def figure(tmp_path):
    run = write_run(tmp_path / "finetune", RECORDS)
    fig = curves_figure([collect_curves(read_records(str(run / "metrics.jsonl")), "finetune")])
    fig.canvas.draw()  # tick labels exist once drawn
    return fig


def test_every_line_is_the_records_values(figure):
    axes = figure.axes
    assert [ax.get_ylabel() for ax in axes] == ["loss", "mlm_loss", "sdm_loss", "R1 (%)", "mAP (%)", "lr"]
    for ax, term in zip(axes, ["loss", "mlm_loss", "sdm_loss"]):
        assert lines_of(ax) == {term: expected(RECORDS, "train", term)}
    for ax, metric in zip(axes[3:5], ["R1", "mAP"]):
        assert lines_of(ax) == {f"CUHK-PEDES {split}": expected(RECORDS, "eval", metric, split)
                                for split in ("test", "val")}
    assert lines_of(axes[5]) == {"lr": expected(RECORDS, "train", "lr")}
    assert all(ax.get_legend() is not None for ax in axes)


def test_panels_share_the_x_axis(figure):
    first = figure.axes[0]
    for ax in figure.axes[1:]:
        assert ax.get_shared_x_axes().joined(first, ax)
        assert ax.get_xlim() == first.get_xlim()
    # Only the bottom panel labels its ticks (the others line up above it).
    assert [ax.get_xlabel() for ax in figure.axes] == [""] * 5 + ["epoch"]
    assert all(not any(t.get_visible() for t in ax.get_xticklabels()) for ax in figure.axes[:-1])


def test_loss_axes_fit_their_values_and_retrieval_axes_start_at_0(figure):
    for ax, term in zip(figure.axes[:3], ["loss", "mlm_loss", "sdm_loss"]):
        values = [v for _, v in expected(RECORDS, "train", term)]
        low, high = ax.get_ylim()
        assert low <= min(values) and high >= max(values)
        # Not 0-based: the change spans most of the panel (on a 0-40 axis SDM's 28.8 -> 26.9 was 5% of it).
        assert low > 0.5 * min(values)
        assert (max(values) - min(values)) / (high - low) > 0.75
    for ax, metric in zip(figure.axes[3:5], ["R1", "mAP"]):
        values = [v for split in ("val", "test") for _, v in expected(RECORDS, "eval", metric, split)]
        low, high = ax.get_ylim()
        assert low == 0 and max(values) <= high <= 100
    assert figure.axes[5].get_ylim()[0] == 0


def test_lr_ticks_all_in_one_scientific_format(figure):
    ax = figure.axes[5]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    ticks = ax.get_yticks()
    low, high = ax.get_ylim()
    assert len(labels) == len(ticks) and sum(low <= v <= high for v in ticks) >= 3
    matches = [SCI.match(label) for label in labels]
    assert all(matches), labels
    assert len({len(m.group(1)) for m in matches}) == 1, labels  # the same number of mantissa digits
    np.testing.assert_allclose([float(label) for label in labels], ticks, rtol=1e-9, atol=1e-15)


def test_sci_formatter_uses_the_fewest_digits_that_keep_ticks_apart():
    formatter = SciFormatter()
    assert formatter.format_ticks([1.25e-4, 1.5e-4, 1.75e-4]) == ["1.25e-04", "1.50e-04", "1.75e-04"]
    assert formatter.format_ticks([2e-20, 5e-4, 1e-3]) == ["0.0e+00", "5.0e-04", "1.0e-03"]  # arithmetic's "zero"
    assert formatter.format_ticks([-1e-3, 0.0, 1e-3]) == ["-1.0e-03", "0.0e+00", "1.0e-03"]


def test_several_runs_overlaid_or_in_columns(tmp_path):
    short = [{**r, "lr": 2 * r["lr"]} if r["type"] == "train" else r for r in RECORDS if r["epoch"] < 2]
    pretrain = collect_curves(short, "pretrain")
    finetune = collect_curves(RECORDS + [_train(4, 37.0, 26.5, 8.2, 5e-4, id_loss=2.5)], "finetune")
    overlay = curves_figure([pretrain, finetune])
    assert panel_keys([pretrain, finetune]) == ["loss", "id_loss", "mlm_loss", "sdm_loss", "R1", "mAP", "lr"]
    assert len(overlay.axes) == 7
    sdm = lines_of(overlay.axes[3])
    assert sdm == {"pretrain": expected(short, "train", "sdm_loss"),
                   "finetune": expected(RECORDS, "train", "sdm_loss") + [(4, 26.5)]}
    assert set(lines_of(overlay.axes[4])) == {f"{run}: CUHK-PEDES {split}" for run in ("pretrain", "finetune")
                                              for split in ("test", "val")}
    assert lines_of(overlay.axes[1]) == {"finetune": [(4, 2.5)]}  # a term only one run has

    columns = curves_figure([pretrain, finetune], layout="columns")
    grid = np.array(columns.axes).reshape(7, 2)  # row-major: one column per run
    assert all(grid[0, 0].get_shared_x_axes().joined(grid[0, 0], ax) for ax in grid.flat)
    assert lines_of(grid[3, 0]) == {"sdm_loss": sdm["pretrain"]} and lines_of(grid[3, 1]) == {
        "sdm_loss": sdm["finetune"]}
    assert lines_of(grid[1, 0]) == {}  # pretraining has no id_loss: an empty panel says so
    assert any(t.get_text() == "no id_loss records" for t in grid[1, 0].texts)
    # R1 and lr rows share one y axis (comparable across runs); each loss panel fits its own run.
    for row in (4, 5, 6):
        assert grid[row, 0].get_shared_y_axes().joined(grid[row, 0], grid[row, 1])
        assert grid[row, 0].get_ylim() == grid[row, 1].get_ylim() and grid[row, 0].get_ylim()[0] == 0
    assert grid[6, 0].get_ylim()[1] >= 2e-3  # the pretraining run's larger lr sets the row's top
    assert not grid[3, 0].get_shared_y_axes().joined(grid[3, 0], grid[3, 1])
    assert grid[3, 0].get_ylim() != grid[3, 1].get_ylim()

    assert run_names(["runs/a/finetune", "runs/b/finetune", "runs/pre"]) == [
        "runs/a/finetune", "runs/b/finetune", "pre"]


def test_pdf_svg_and_png_are_written_vector_where_asked(tmp_path, capsys):
    run = write_run(tmp_path / "finetune", RECORDS)
    for fmt in ("pdf", "svg", "png"):
        out = tmp_path / f"curves.{fmt}"
        assert plot_curves.main(["--run", str(run), "--out", str(out), "--dpi", "60"]) == 0
        assert f"saved {out} ({fmt})" in capsys.readouterr().out
        data = out.read_bytes()
        if fmt == "pdf":
            assert data.startswith(b"%PDF") and b"/Subtype /Image" not in data  # lines, not a bitmap
        elif fmt == "svg":
            root = ET.fromstring(data)
            assert root.tag == "{http://www.w3.org/2000/svg}svg"
            assert not root.findall(".//{http://www.w3.org/2000/svg}image")
            assert len(root.findall(".//{http://www.w3.org/2000/svg}path")) > 20
        else:
            assert data.startswith(b"\x89PNG\r\n\x1a\n")
        if fmt != "png":
            # The same records give the same vector file (no dates, fixed SVG ids); --format names
            # the format of a file without a suffix.
            again = tmp_path / f"again-{fmt}"
            assert plot_curves.main(["--run", str(run), "--out", str(again), "--format", fmt, "--dpi", "60"]) == 0
            assert again.read_bytes() == data, fmt
    assert collect_curves(RECORDS, "r", x="step").losses["sdm_loss"] == {
        9 * (e + 1): v for e, v in expected(RECORDS, "train", "sdm_loss")}


def test_bad_formats_and_runs_are_one_line_errors(tmp_path, capsys):
    run = write_run(tmp_path / "finetune", RECORDS)
    assert plot_curves.main(["--run", str(run), "--out", str(tmp_path / "c.png"), "--format", "pdf"]) == 2
    assert "error: --out {} ends in .png but --format is pdf: name the file c.pdf or drop --format".format(
        tmp_path / "c.png") in capsys.readouterr().err
    assert plot_curves.main(["--run", str(run), "--out", str(tmp_path / "c.jpg")]) == 2
    assert "cannot tell the figure format from --out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        plot_curves.main(["--run", str(run), "--out", str(tmp_path / "c.eps"), "--format", "eps"])
    assert exc.value.code == 2
    assert "invalid choice: 'eps'" in capsys.readouterr().err
    empty = write_run(tmp_path / "empty", [{"type": "test", "R1": 1.0}])
    assert plot_curves.main(["--run", str(empty), "--out", str(tmp_path / "c.png")]) == 2
    assert "has no train or eval records to plot" in capsys.readouterr().err
    assert plot_curves.main(["--run", str(run), "--out", str(tmp_path / "c.png"), "--dpi", "5"]) == 2
    assert "--dpi must be between" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "finetune"]  # nothing written
    with pytest.raises(ValueError, match="figure format must be one of pdf, svg, png"):
        save_figure(curves_figure([RunCurves("r", lr={0: 1e-3})]), tmp_path / "c.gif", "gif")


# --------------------------------------------------------------------------- the checkpoint a figure is drawn from


def test_selected_checkpoint_is_best_else_last(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(retrieval_figure.RetrievalFigureError, match="holds neither best_CUHK-PEDES.pth nor last.pth"):
        visualize_retrieval.selected_checkpoint(str(run), "CUHK-PEDES")
    (run / "last.pth").write_bytes(b"")
    assert visualize_retrieval.selected_checkpoint(str(run), "CUHK-PEDES") == (
        str(run / "last.pth"), "the run wrote no best_CUHK-PEDES.pth")
    (run / "best_CUHK-PEDES.pth").write_bytes(b"")
    assert visualize_retrieval.selected_checkpoint(str(run), "CUHK-PEDES") == (
        str(run / "best_CUHK-PEDES.pth"), "the run's selected checkpoint for CUHK-PEDES")
    # The best file of another dataset is not this dataset's selection.
    assert visualize_retrieval.selected_checkpoint(str(run), "RSTPReid")[0] == str(run / "last.pth")
    with pytest.raises(retrieval_figure.RetrievalFigureError, match="not found"):
        visualize_retrieval.selected_checkpoint(str(tmp_path / "nope"), "CUHK-PEDES")


def test_demo_draws_the_retrieval_figure_from_the_selected_checkpoint(tmp_path, monkeypatch):
    """draw_figures draws the real retrieval figure (processor.retrieval_figure); only the model loading is replaced."""
    finetune = tmp_path / "finetune"
    finetune.mkdir()
    loaded = []

    def load_run_model(checkpoint, config, overrides, trust=False):
        loaded.append(checkpoint)
        raise retrieval_figure.RetrievalFigureError("stop after choosing the checkpoint")

    monkeypatch.setattr(retrieval_figure, "load_run_model", load_run_model)
    for present, chosen in ((["last.pth"], "last.pth"), (["last.pth", "best_CUHK-PEDES.pth"], "best_CUHK-PEDES.pth")):
        for name in present:
            (finetune / name).write_bytes(b"")
        loaded.clear()
        demo.draw_figures(tmp_path / "out", tmp_path / "data", tmp_path / "pretrain", finetune)
        assert loaded == [str(finetune / chosen)]
        log = (tmp_path / "out" / "figures" / "figures.log").read_text()
        assert f"checkpoint: {finetune / chosen} (" in log


def _save_model(run, cfg, name, seed):
    torch.manual_seed(seed)
    Checkpointer(run, model=build_model(cfg, num_classes=8), config=cfg).save(name, epoch=0, step=0)


def test_visualize_retrieval_run_ranks_with_the_best_checkpoint(synthetic_root, tmp_path, capsys):
    """`--run` ranks exactly as the best checkpoint's model does, not as last.pth's (two different models)."""
    cfg = load_config(str(REPO / "configs" / "demo" / "tiny_finetune.yaml"),
                      [f"data.root={synthetic_root}", "model.clip.pretrained="])
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    _save_model(run, cfg, "best_CUHK-PEDES", seed=1)
    _save_model(run, cfg, "last", seed=2)
    split = build_dataset("CUHK-PEDES", str(synthetic_root)).test
    queries = [0, 5, 11]
    rankings = {}
    for name in ("best_CUHK-PEDES", "last"):
        model = load_for_evaluation(cfg, str(run / f"{name}.pth")).eval()
        feats = build_evaluator(cfg, {"CUHK-PEDES": split}, "cpu").extract(model, split)
        rankings[name] = [r.ranked for r in retrieval_figure.rank_queries(feats, split, queries, 5)]
    assert rankings["best_CUHK-PEDES"] != rankings["last"]  # else this test could not tell them apart

    out = tmp_path / "retrieval.png"
    results = visualize_retrieval.run(visualize_retrieval.parse_args(
        ["--run", str(run), "--dataset", "CUHK-PEDES", "--query-index", *map(str, queries), "--topk", "5",
         "--thumb-height", "48", "--out", str(out)]))
    assert [r.ranked for r in results] == rankings["best_CUHK-PEDES"]
    assert f"checkpoint: {run / 'best_CUHK-PEDES.pth'} (the run's selected checkpoint" in capsys.readouterr().out
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit):
        visualize_retrieval.parse_args(["--run", str(run), "--checkpoint", "x.pth", "--dataset", "CUHK-PEDES",
                                        "--out", str(out)])
