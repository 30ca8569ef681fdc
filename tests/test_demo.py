"""`make demo` runs the whole pipeline; this is its smaller version, end to end."""

import json
import logging

import numpy as np
import torch

from datasets import build_dataset
from datasets.bases import EvalSplit
from model import build_model
from processor.evaluate import build_evaluator
from processor.inference import load_for_evaluation
from tests.conftest import load_tool
from utils.config import load_config
from utils.logger import setup_logging


def train_split(root) -> EvalSplit:
    """The benchmark's training identities as a retrieval set: every image, every caption."""
    index = build_dataset("CUHK-PEDES", str(root)).train
    images: dict[str, int] = {}
    captions, caption_pids = [], []
    for i in range(len(index)):
        pid, _, path, caption = index[i]
        images.setdefault(path, int(pid))
        captions.append(caption)
        caption_pids.append(int(pid))
    return EvalSplit(list(images), np.array(list(images.values())), captions, np.array(caption_pids))


def test_small_demo_runs_end_to_end_and_learns(tmp_path, capsys):
    demo = load_tool("demo")
    out, data, cache = tmp_path / "demo", tmp_path / "data", tmp_path / "backbones"
    assert demo.main(["--small", "--out", str(out), "--data", str(data), "--backbone-cache", str(cache)]) == 0
    printed, logged = capsys.readouterr()
    assert "mINP" in printed and "random init (chance)" in printed and "+ fine-tuned" in printed
    assert "pretrained backbone (zero-shot)" in printed
    # The console holds the seven-step outline, one table and the paths; the details are in the run logs.
    assert all(f"[{step}/7]" in printed for step in range(1, 8)) and "/6]" not in printed
    assert printed.count("mINP") == 1 and len(printed.splitlines()) <= 30, printed
    assert " INFO " not in logged and "evaluated in" not in printed + logged, logged
    for run in ("pretrain", "finetune"):
        log = (out / run / "train.log").read_text()
        assert "epoch 0 done" in log and "evaluated in" in log and "torch threads: " in log
    figures_log = (out / "figures" / "figures.log").read_text()
    assert "saved" in figures_log
    assert f"checkpoint: {out / 'finetune' / 'best_CUHK-PEDES.pth'}" in figures_log  # the run's selected checkpoint
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"random init (chance)", "pretrained backbone (zero-shot)",
                            "GA-DMS pretrained, direct transfer", "+ fine-tuned (IRRA recipe)"}
    # GA-DMS pretraining started from the backbone the demo made (and cached).
    backbone = load_config(str(out / "pretrain" / "config.yaml")).model.clip.pretrained
    assert backbone and list(cache.glob("*.pt")) == [demo.Path(backbone)]
    assert "loaded CLIP weights from" in (out / "pretrain" / "train.log").read_text()
    for row in results.values():
        assert 0 <= row["R1"] <= row["R5"] <= row["R10"] <= 100
    for name in ("gass_tokens.png", "retrieval.png", "curves_pretrain.png", "curves_finetune.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
        assert str(out / "figures" / name) in printed
    for run in ("pretrain", "finetune"):
        assert (out / run / "last.pth").exists() and (out / run / "metrics.jsonl").exists()

    # It learns: on the identities it was fine-tuned on, the fine-tuned model retrieves far above
    # a randomly initialised one (the same images and captions, the same evaluator).
    cfg = load_config(str(out / "finetune" / "config.yaml"))
    split = train_split(data)
    evaluator = build_evaluator(cfg, {"train": split}, torch.device("cpu"))
    trained = load_for_evaluation(cfg, str(out / "finetune" / "last.pth"))
    torch.manual_seed(0)
    r1 = evaluator.evaluate(trained)["train"]["t2i"]["R1"]
    untrained = build_model(cfg, num_classes=split.num_ids)
    chance = evaluator.evaluate(untrained)["train"]["t2i"]["R1"]
    assert r1 >= max(3 * chance, chance + 20), (r1, chance)

    # A second run reuses the generated data instead of regenerating it.
    demo.ensure_data(data, demo.SyntheticConfig(**demo.SIZES["small"].data, seed=0))
    assert "reusing" in capsys.readouterr().out


def test_a_console_level_chosen_by_a_tool_survives_the_run_log_setup(tmp_path, capsys):
    """The demo's quiet console is kept when the Trainer sets up its train.log (at INFO)."""
    demo_log = logging.getLogger("tests.demo_console")
    try:
        setup_logging(None, console_level=logging.WARNING)
        setup_logging(str(tmp_path))  # what the Trainer calls
        demo_log.info("detail")
        demo_log.warning("problem")
        err = capsys.readouterr().err
        assert "problem" in err and "detail" not in err
        assert "detail" in (tmp_path / "train.log").read_text()
        setup_logging(None, console_level=logging.INFO)  # a tool choosing again
        setup_logging(str(tmp_path))
        demo_log.info("shown")
        assert "shown" in capsys.readouterr().err
    finally:
        setup_logging(None, console_level=logging.INFO)
