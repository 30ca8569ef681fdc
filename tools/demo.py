#!/usr/bin/env python
"""The whole method on a laptop CPU: synthetic data -> GA-DMS pretraining -> fine-tuning.

    make demo                       # = python tools/demo.py
    python tools/demo.py --small    # a faster, smaller run (what the tests use)

Steps: (1) generate the synthetic corpus (pedestrian renders, captions with
MLLM-style noise) unless it is already there; (2) make (or reuse) the pretrained
tiny CLIP backbone (tools/pretrain_backbone.py: CLIP's own contrastive recipe on a
generic synthetic corpus, cached in --backbone-cache) and score it zero-shot;
(3) score a randomly initialised model (chance level); (4) GA-DMS pretraining of
that backbone on the synthetic WebPerson corpus, evaluating direct transfer on the
synthetic benchmark each epoch; (5) fine-tune with the IRRA recipe; (6) evaluate
and print the final table; (7) draw figures (GASS token scores, retrieval results,
training curves).
Everything lands in one folder (default runs/demo), which is replaced on each run.
The console shows these steps, the final table and the figure paths; the details
(per-epoch logs, evaluation tables, the figure tools' output) go to each run's
train.log and to figures/figures.log.

Nothing of yours is lost: the demo replaces only folders it made. --out must be new,
empty or an earlier demo's output (it holds .gadms-demo); --data must hold matching
synthetic data (reused), or be new, empty or made by the generator (.gadms-synthetic).
Any other non-empty folder is refused before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from datasets import build_dataset  # noqa: E402
from datasets.synthetic import SyntheticConfig, check_claimable, claim_folder, generate  # noqa: E402
from model import build_model  # noqa: E402
from processor.backbone import DEFAULT_CACHE, make_backbone, settings_for, zero_shot  # noqa: E402
from processor.engine import Trainer  # noqa: E402
from processor.evaluate import build_evaluator  # noqa: E402
from processor.finetune import FinetuneTask  # noqa: E402
from processor.gass_figure import describe_view, draw_gass_figure  # noqa: E402
from processor.pretrain import PretrainTask  # noqa: E402
from processor.retrieval_figure import describe_result, draw_retrieval_figure, selected_checkpoint  # noqa: E402
from utils.cli import ToolError, one_line, run_tool  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.errors import UserInputError  # noqa: E402
from utils.logger import setup_logging  # noqa: E402
from utils.metrics import format_table  # noqa: E402
from utils.plots import describe_curves, plot_run_curves  # noqa: E402
from utils.threads import apply_threads  # noqa: E402

PRETRAIN = REPO / "configs" / "demo" / "tiny_pretrain.yaml"
FINETUNE = REPO / "configs" / "demo" / "tiny_finetune.yaml"
METRICS = ("R1", "R5", "R10", "mAP", "mINP")
#: Marks an output folder as the demo's: only such a folder (or an empty one) is replaced.
DEMO_MARKER = ".gadms-demo"


@dataclass(frozen=True)
class DemoSize:
    """Synthetic data sizes, epochs of both stages, config overrides and backbone settings of one demo size."""

    data: dict
    pretrain_epochs: int
    finetune_epochs: int
    overrides: tuple[str, ...] = ()
    backbone: dict = field(default_factory=dict)


SIZES = {
    "full": DemoSize(dict(identities=100, images_per_id=4, val_ids=25, test_ids=25, webperson_images=600), 6, 3),
    # A few steps of CLIP training end in its early collapse (every feature alike, cosine 0.9999), from
    # which the small demo's fine-tuning does not learn; 64 steps at lr 1e-3 get past it (8 s).
    "small": DemoSize(dict(identities=24, images_per_id=3, val_ids=8, test_ids=8, webperson_images=96), 2, 8,
                      ("data.batch_size=16",), dict(images=256, batch_size=32, epochs=8, warmup_steps=10, lr=1e-3)),
}
STEPS = 7


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo",
                        help=f"demo output folder, replaced on each run (new, empty or holding {DEMO_MARKER})")
    parser.add_argument("--data", default="data/synthetic",
                        help="synthetic data folder: reused if it matches, else generated into "
                             "(new, empty or made by the generator)")
    parser.add_argument("--small", action="store_true", help="smaller data and fewer epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--no-figures", action="store_true", help="skip drawing the PNG figures")
    parser.add_argument("--backbone-cache", default=str(DEFAULT_CACHE),
                        help="where the pretrained tiny CLIP is kept (made on the first demo, reused after)")
    return parser.parse_args(argv)


def data_matches(root: Path, config: SyntheticConfig) -> bool:
    """Whether `root` already holds a synthetic corpus made with `config` (read only)."""
    meta = root / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("config") == config.to_dict()
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def ensure_data(root: Path, config: SyntheticConfig) -> None:
    """Generate the synthetic corpus unless `root` already holds one made with `config`.

    Raises:
        datasets.synthetic.OutputExistsError: `root` holds files the generator did not make.
    """
    if data_matches(root, config):
        print(f"[1/{STEPS}] synthetic data: reusing {root}")
        return
    print(f"[1/{STEPS}] synthetic data: generating into {root} ...", flush=True)
    start = time.time()
    counts = generate(root, config, workers=2, overwrite=True)
    bench, web = counts["benchmark"], counts["webperson"]
    print(f"      benchmark: {sum(s['ids'] for s in bench.values())} identities, "
          f"{sum(s['images'] for s in bench.values())} images (train/val/test); WebPerson: {web['images']} images, "
          f"{web['noisy_captions']} of {web['captions']} captions noisy; {time.time() - start:.0f}s")


def random_baseline(cfg, device: torch.device) -> dict[str, float]:
    """Test metrics of a randomly initialised model: the chance level to beat."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, num_classes=0).to(device)
    split = build_dataset("CUHK-PEDES", cfg.data.root).test
    return build_evaluator(cfg, {"random": split}, device).evaluate(model)["random"]["t2i"]


def best_test(best: dict, name: str = "CUHK-PEDES") -> dict[str, float]:
    entry = best.get(name, {})
    return entry.get("test") or {k: entry[k] for k in METRICS if k in entry}


def _gass_figure(path: Path, data: Path, pretrain_dir: Path, log: TextIO) -> None:
    views = draw_gass_figure(str(pretrain_dir / "last.pth"), "WebPerson", str(path), root=str(data),
                             annotation="shards", captions_from="noise_report", num=8)
    for view in views:
        print(describe_view(view), file=log)
    print(f"saved {path}", file=log)


def _retrieval_figure(path: Path, data: Path, finetune_dir: Path, log: TextIO) -> None:
    checkpoint, why = selected_checkpoint(str(finetune_dir), "CUHK-PEDES")
    print(f"checkpoint: {checkpoint} ({why})", file=log, flush=True)
    for result in draw_retrieval_figure(checkpoint, "CUHK-PEDES", str(path), root=str(data), num_queries=4):
        print(describe_result(result), file=log)
    print(f"saved {path}", file=log)


def _curves_figure(path: Path, run_dir: Path, log: TextIO) -> None:
    for curves in plot_run_curves([str(run_dir)], path, "png"):
        print(describe_curves(curves), file=log)
    print(f"saved {path} (png)", file=log)


def draw_figures(out: Path, data: Path, pretrain_dir: Path, finetune_dir: Path) -> list[Path]:
    """GASS token scores (pretrained model on noisy WebPerson captions), retrieval rows
    (the fine-tuning run's selected checkpoint: best_CUHK-PEDES.pth, else last.pth), and
    training curves of both runs; returns the PNG paths.

    Each figure is drawn as its tool draws it with these arguments (tools/visualize_gass.py,
    visualize_retrieval.py, plot_curves.py), through the same library functions; what the
    tool would print (token scores, which checkpoint drew the retrieval rows, ranked
    queries) goes to `<out>/figures/figures.log`, its error to stderr, and the other
    figures are still drawn.
    """
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, Path, Callable[[Path, TextIO], None]]] = [
        ("visualize_gass", figures / "gass_tokens.png", lambda path, log: _gass_figure(path, data, pretrain_dir, log)),
        ("visualize_retrieval", figures / "retrieval.png",
         lambda path, log: _retrieval_figure(path, data, finetune_dir, log)),
        ("plot_curves", figures / "curves_pretrain.png", lambda path, log: _curves_figure(path, pretrain_dir, log)),
        ("plot_curves", figures / "curves_finetune.png", lambda path, log: _curves_figure(path, finetune_dir, log)),
    ]
    written = []
    with open(figures / "figures.log", "w", encoding="utf-8") as details:
        for tool, path, draw in jobs:
            try:
                draw(path, details)
            except UserInputError as err:
                print(f"error: {one_line(str(err)) or type(err).__name__}", file=sys.stderr)
                print(f"      {tool} failed; see the messages above", file=sys.stderr)
            else:
                written.append(path)
            details.flush()
    return written


def prepare_folders(out: Path, data: Path, config: SyntheticConfig, small: bool) -> None:
    """Replace `out` with an empty, marked demo folder once both folders are known to be ours.

    Raises:
        datasets.synthetic.OutputExistsError: `out` or `data` holds files the demo did
            not make; then nothing has been written or removed.
        ToolError: `out` and `data` are one folder, or one holds the other.
    """
    out_abs, data_abs = out.resolve(), data.resolve()
    if out_abs == data_abs or out_abs in data_abs.parents or data_abs in out_abs.parents:
        # The demo replaces --out on every run, and the generator replaces what it made in --data.
        raise ToolError(f"--out {out} and --data {data} must be two separate folders, neither inside the other: "
                        "the demo replaces --out on each run")
    check_claimable(out, DEMO_MARKER, "tools/demo.py", what="--out")
    if not data_matches(data, config):
        check_claimable(data, what="--data")
    if out.exists():
        shutil.rmtree(out)
    claim_folder(out, DEMO_MARKER, {"tool": "tools/demo.py", "small": small, "seed": config.seed}, "tools/demo.py")


def run(args: argparse.Namespace) -> int:
    """The demo steps; returns the exit status."""
    size = SIZES["small" if args.small else "full"]
    pre_epochs, fine_epochs = size.pretrain_epochs, size.finetune_epochs
    out, data = Path(args.out), Path(args.data)
    data_config = SyntheticConfig(**size.data, seed=args.seed)
    prepare_folders(out, data, data_config, args.small)
    start = time.time()
    ensure_data(data, data_config)

    setup_logging(None, console_level=logging.WARNING)
    apply_threads(0)
    device = torch.device("cpu")
    settings, exclude = settings_for(data, **size.backbone)
    print(f"[2/{STEPS}] pretrained backbone (CLIP recipe on a generic synthetic corpus): "
          f"{Path(args.backbone_cache) / settings.file_name()} ...", flush=True)
    backbone, record = make_backbone(settings, args.backbone_cache, exclude=exclude, workers=2)
    zero = zero_shot(backbone, str(data), device)
    print(f"      {'made' if record['trained'] else 'reused'} at {time.time() - start:.0f}s; zero-shot R1 "
          f"{zero['R1']:.2f}")

    base = [f"data.root={data}", "eval.root=", "train.resume=", *size.overrides]
    common = [*base, f"model.clip.pretrained={backbone}"]
    pre_cfg = load_config(PRETRAIN, common + [f"output_dir={out / 'pretrain'}", f"solver.epochs={pre_epochs}"])
    apply_threads(pre_cfg.num_threads, data_workers=pre_cfg.data.num_workers)
    print(f"[3/{STEPS}] chance level: evaluating a randomly initialised model ...", flush=True)
    chance = random_baseline(load_config(PRETRAIN, base), device)

    print(f"[4/{STEPS}] GA-DMS pretraining of the backbone on synthetic WebPerson: {pre_epochs} epochs "
          f"(log: {out / 'pretrain' / 'train.log'}) ...", flush=True)
    pre = Trainer(pre_cfg, PretrainTask())
    pre_best = pre.train()
    if pre.stopped:
        print("interrupted during pretraining", file=sys.stderr)
        return 1
    print(f"      done at {time.time() - start:.0f}s; direct transfer R1 {best_test(pre_best).get('R1', 0):.2f}")

    fine_cfg = load_config(FINETUNE, base + [f"output_dir={out / 'finetune'}", f"solver.epochs={fine_epochs}",
                                               f"model.finetune={out / 'pretrain' / 'last.pth'}"])
    print(f"[5/{STEPS}] fine-tuning (IRRA recipe) on the synthetic benchmark: {fine_epochs} epochs "
          f"(log: {out / 'finetune' / 'train.log'}) ...", flush=True)
    fine = Trainer(fine_cfg, FinetuneTask())
    fine_best = fine.train()
    if fine.stopped:
        print("interrupted during fine-tuning", file=sys.stderr)
        return 1

    print(f"[6/{STEPS}] results on the synthetic CUHK-PEDES-format test split (text -> image):")
    rows = {"random init (chance)": chance,
            "pretrained backbone (zero-shot)": zero,
            "GA-DMS pretrained, direct transfer": best_test(pre_best),
            "+ fine-tuned (IRRA recipe)": best_test(fine_best)}
    print(format_table({k: v for k, v in rows.items() if v}))
    (out / "results.json").write_text(json.dumps(rows, indent=2))

    figures: list[Path] = []
    if not args.no_figures:
        print(f"[7/{STEPS}] figures (details: {out / 'figures' / 'figures.log'}) ...", flush=True)
        figures = draw_figures(out, data, out / "pretrain", out / "finetune")
    print(f"done in {time.time() - start:.0f}s. Outputs in {out}/:")
    print(f"  runs:        {out / 'pretrain'}  {out / 'finetune'}  (checkpoints, train.log, metrics.jsonl, tb/)")
    print(f"  TensorBoard: tensorboard --logdir {out}")
    for path in figures:
        print(f"  figure:      {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
