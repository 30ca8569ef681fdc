"""Checkpoints move both ways between this framework, the GA-DMS authors' code and IRRA.

The key lists in tests/fixtures/reference_keys/ were taken from the reference
code itself (every state-dict key with its shape and dtype, as their own code
saves it at ViT-B/16, 384x128), not written from memory. Reference files are
rebuilt from them with random tensors of those shapes and dtypes, inside the
reference checkpointer's wrapper.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model
from model.clip import build_clip, build_clip_from_config
from processor.inference import load_for_evaluation
from tests.conftest import REPO, load_tool
from utils.checkpoint import Checkpointer
from utils.config import load_config

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference_keys"
KINDS = ("gadms_pretrain", "gadms_finetune", "irra")
PRETRAIN_CONFIG = str(REPO / "configs" / "pretrain" / "webperson_5m.yaml")
FINETUNE_CONFIG = str(REPO / "configs" / "finetune" / "cuhkpedes.yaml")
REFERENCE_CLASSES = 11003  # CUHK-PEDES training identities in the fine-tuning key lists
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def reference(kind: str) -> tuple[dict[str, tuple[list[int], str]], list[str]]:
    """(key -> (shape, dtype), wrapper keys) of a reference checkpoint file."""
    data = json.loads((FIXTURES / f"{kind}.json").read_text())
    wrapper = data["describes"].split("file wrapper keys:")[1]
    return {k: (shape, dtype) for k, (shape, dtype) in data["keys"].items()}, [w.strip() for w in wrapper.split(",")]


def without_module_prefix(keys):
    return {k.removeprefix("module."): v for k, v in keys.items()}


def write_reference_checkpoint(kind: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A file shaped like the reference checkpointer's output; returns its state dict."""
    keys, wrapper = reference(kind)
    gen = torch.Generator().manual_seed(seed)
    # Small weights keep a randomly filled ViT-B/16 finite through a training step.
    state = {k: (torch.randn(shape, generator=gen) * 0.02).to(DTYPES[dtype]) for k, (shape, dtype) in keys.items()}
    payload = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0]}]},
               "scheduler": {"last_epoch": 3}, "num_epoch": 3, "iteration": 1200, "epoch": 3}
    assert sorted(payload) == sorted(wrapper)
    torch.save(payload, path)
    return state


def shapes(state) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def reference_shapes(kind: str, num_classes: int = REFERENCE_CLASSES) -> dict[str, list[int]]:
    out = {k: shape for k, (shape, _) in without_module_prefix(reference(kind)[0]).items()}
    if "classifier.weight" in out:
        out["classifier.weight"] = [num_classes, out["classifier.weight"][1]]
        out["classifier.bias"] = [num_classes]
    return out


def config_for(kind: str, *overrides: str):
    path = PRETRAIN_CONFIG if kind == "gadms_pretrain" else FINETUNE_CONFIG
    return load_config(path, ["model.clip.pretrained=", *overrides])


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """Full-size checkpoints weigh GBs (pytest keeps three sessions' folders): drop a test's files."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    files = {}
    for seed, kind in enumerate(KINDS):
        path = folder / f"{kind}.pth"
        files[kind] = (path, write_reference_checkpoint(kind, path, seed))
    yield files
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    """A CUHK-PEDES-format benchmark small enough for ViT-B/16 on a CPU."""
    from datasets.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("mini")
    generate(root, SyntheticConfig(identities=6, images_per_id=2, val_ids=2, test_ids=2,
                                   webperson_images=4, shard_size=4, seed=5), workers=1)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_our_model_state_dict_is_the_reference_layout(kind):
    num_classes = 0 if kind == "gadms_pretrain" else REFERENCE_CLASSES
    with torch.device("meta"):
        model = build_model(config_for(kind), num_classes=num_classes)
    assert shapes(model.state_dict()) == reference_shapes(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_checkpoint_evaluates_with_any_config(kind, reference_files, mini_root, tmp_path, capsys):
    path, state = reference_files[kind]
    # A fine-tuning config (it has an ID loss) evaluates every kind, the pretraining one included.
    cfg = config_for("irra", f"data.root={mini_root}", "device=cpu", f"output_dir={tmp_path}")
    model = load_for_evaluation(cfg, str(path))
    prefix = "module." if kind == "gadms_pretrain" else ""
    ours = model.state_dict()
    backbone = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix + "base_model.")}
    assert set(ours) == set(backbone)  # the backbone only: no classifier sized from the config
    for key, value in backbone.items():
        assert torch.equal(ours[key], value.float()), key

    test = load_tool("test")
    capsys.readouterr()
    assert test.main(["--config", FINETUNE_CONFIG, "--checkpoint", str(path),
                      f"data.root={mini_root}", "device=cpu", "data.test_batch_size=8", "data.num_workers=0"]) == 0
    out = capsys.readouterr().out
    assert "CUHK-PEDES t2i" in out and "R1" in out and "mINP" in out


@pytest.mark.parametrize("kind", KINDS)
def test_reference_checkpoint_is_a_clip_pretrained_file(kind, reference_files):
    path, state = reference_files[kind]
    clip = build_clip(str(path), image_size=(384, 128), stride_size=16)
    prefix = "module.base_model." if kind == "gadms_pretrain" else "base_model."
    expected = {k.removeprefix(prefix): v.float() for k, v in state.items() if k.startswith(prefix)}
    ours = clip.state_dict()
    assert set(ours) == set(expected)
    assert all(torch.equal(ours[k], v) for k, v in expected.items())


@pytest.mark.parametrize("kind", ["gadms_finetune", "irra"])
def test_finetune_init_from_reference_checkpoint_offline(kind, reference_files, mini_root, tmp_path, monkeypatch):
    from processor.finetune import FinetuneTask

    path, state = reference_files[kind]
    monkeypatch.setenv("GADMS_CLIP_CACHE", str(tmp_path / "empty-cache"))
    cfg = config_for(kind, f"model.finetune={path}", "model.clip.pretrained=ViT-B/16")
    model = FinetuneTask().build_model(cfg, num_classes=REFERENCE_CLASSES)
    ours = model.state_dict()
    assert set(ours) == set(state)
    assert all(torch.equal(ours[k], v.float()) for k, v in state.items())


def test_finetune_sh_from_authors_pretraining_checkpoint_offline(reference_files, mini_root, tmp_path):
    """The paper's headline command, with no OpenAI file anywhere; then our files in their layout."""
    path, state = reference_files["gadms_pretrain"]
    run = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable, "NPROC": "1", "MASTER_PORT": "29517",
           "GADMS_CLIP_CACHE": str(tmp_path / "empty-cache"), "OMP_NUM_THREADS": "1"}
    cmd = ["sh", str(REPO / "finetune.sh"), "--finetune", str(path), f"data.root={mini_root}",
           f"output_dir={run}", "device=cpu", "data.batch_size=4", "data.num_workers=0", "solver.epochs=1",
           "solver.warmup_epochs=0", "train.max_steps=1", "eval.period=0", "log_period=1",
           f"model.clip.pretrained={tmp_path / 'absent' / 'ViT-B-16.pt'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "missing (2): classifier.bias, classifier.weight" in log
    assert "backbone from" in log

    ckpt = torch.load(run / "last.pth", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1
    num_classes = ckpt["num_classes"]
    assert shapes(ckpt["model"]) == reference_shapes("gadms_finetune", num_classes)
    trained = ckpt["model"]["base_model.visual.conv1.weight"]
    assert not torch.equal(trained, state["module.base_model.visual.conv1.weight"].float())  # it trained

    export = load_tool("export")
    release = tmp_path / "release.pth"
    assert export.main(["--checkpoint", str(run / "last.pth"), "--out", str(release)]) == 0
    released = torch.load(release, map_location="cpu", weights_only=True)["model"]
    assert shapes(released) == reference_shapes("gadms_finetune", num_classes)


def test_our_pretraining_checkpoint_is_the_authors_layout(tmp_path):
    model = build_model(config_for("gadms_pretrain"), num_classes=0)
    Checkpointer(tmp_path, model=model).save("last", epoch=0, step=0)
    saved = torch.load(tmp_path / "last.pth", map_location="cpu", weights_only=True)["model"]
    assert shapes(saved) == reference_shapes("gadms_pretrain")
    export = load_tool("export")
    assert export.main(["--checkpoint", str(tmp_path / "last.pth"), "--out", str(tmp_path / "release.pth")]) == 0
    released = torch.load(tmp_path / "release.pth", map_location="cpu", weights_only=True)["model"]
    assert shapes(released) == reference_shapes("gadms_pretrain")


def test_openai_clip_file_evaluates_with_a_finetune_config(tmp_path):
    """Zero-shot CLIP through tools/test.py: OpenAI's extras (logit_scale, sizes) are dropped."""
    cfg = load_config(str(REPO / "configs" / "demo" / "tiny_finetune.yaml"), [])
    clip = build_clip_from_config(cfg.model.clip)
    state = {k: v.half() for k, v in clip.state_dict().items()}
    state.update(logit_scale=torch.tensor(4.6052), input_resolution=torch.tensor(224),
                 context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "ViT-tiny.pt")
    model = load_for_evaluation(cfg, str(tmp_path / "ViT-tiny.pt"))
    ours = model.state_dict()
    assert set(ours) == {"base_model." + k for k in clip.state_dict()}
    assert all(torch.equal(ours["base_model." + k], v.half().float()) for k, v in clip.state_dict().items())


def test_older_checkpoint_with_logit_scale_still_loads(tmp_path):
    """Checkpoints written before the layout fix carry base_model.logit_scale: dropped, with a log line."""
    from model.weights import load_pretrained

    cfg = load_config(str(REPO / "configs" / "demo" / "tiny_finetune.yaml"), [])
    old = build_model(cfg, num_classes=3)
    state = {**old.state_dict(), "base_model.logit_scale": torch.tensor(4.6052)}
    torch.save({"model": state}, tmp_path / "old.pth")
    new = build_model(cfg, num_classes=3)
    report = load_pretrained(new, tmp_path / "old.pth")
    assert report.unexpected == ["base_model.logit_scale"] and report.missing == []
    assert all(torch.equal(new.state_dict()[k], v) for k, v in old.state_dict().items())
