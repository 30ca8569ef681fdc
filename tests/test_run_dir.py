"""A run folder has one owner, a resume never changes what a run learns, one history per run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, load_tool
from utils.run_lock import RunDirLock

PRETRAIN = str(REPO / "configs" / "demo" / "tiny_pretrain.yaml")


@pytest.fixture(autouse=True)
def _free_disk(tmp_path):
    """Each run leaves ~250 MB of checkpoints; pytest keeps three sessions' folders."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def overrides(root, out, *extra):
    return [f"data.root={root}", f"output_dir={out}", "data.batch_size=16", "data.test_batch_size=64",
            "train.max_steps=2", "solver.warmup_epochs=0", *extra]


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def train_subprocess(*args: str) -> subprocess.CompletedProcess:
    """tools/train.py as a user runs it (a fresh process: no log handler of an earlier run)."""
    return subprocess.run([sys.executable, str(REPO / "tools" / "train.py"), "--config", PRETRAIN, *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_second_run_into_a_held_folder_is_refused(synthetic_root, tmp_path):
    run = tmp_path / "run"
    holder = RunDirLock(run)
    holder.acquire()  # this test process plays the first run
    try:
        before = folder_digest(run)
        proc = train_subprocess(*overrides(synthetic_root, run, "solver.epochs=1"))
    finally:
        holder.release()
    error = one_error_line(proc)
    assert "in use by another run" in error and f"pid {os.getpid()}" in error
    assert folder_digest(run) == before


def test_resume_with_changed_model_setting_is_refused_before_any_write(synthetic_root, tmp_path):
    train = load_tool("train")
    run = tmp_path / "run"
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=1")]) == 0
    before = folder_digest(run)
    proc = train_subprocess(*overrides(synthetic_root, run, "solver.epochs=2", "model.temperature=0.05"))
    assert "model.temperature: 0.07 in the checkpoint, 0.05 now" in one_error_line(proc)
    assert folder_digest(run) == before  # config.yaml, score cache, logs, metrics: untouched

    # A safe change (more epochs) resumes, and the change is logged.
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=2")]) == 0
    assert "solver.epochs: 1 -> 2" in (run / "train.log").read_text()
    assert [r["epoch"] for r in records(run) if r["type"] == "train"] == [0, 1]


def test_fresh_start_over_a_finished_run_is_refused(synthetic_root, tmp_path):
    train = load_tool("train")
    run = tmp_path / "run"
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=1")]) == 0
    before = folder_digest(run)
    proc = train_subprocess(*overrides(synthetic_root, run, "solver.epochs=1", "train.resume="))
    assert "already holds another run's checkpoints (best_CUHK-PEDES.pth, last.pth)" in one_error_line(proc)
    assert folder_digest(run) == before


def test_metrics_after_a_redone_epoch_hold_one_record_per_epoch(synthetic_root, tmp_path):
    """A crash after an epoch's records were written but before its checkpoint: the epoch is
    redone on resume and its new records replace the old ones."""
    train = load_tool("train")
    run = tmp_path / "run"
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=1")]) == 0
    shutil.copy(run / "last.pth", tmp_path / "epoch0.pth")
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=2")]) == 0
    os.replace(tmp_path / "epoch0.pth", run / "last.pth")  # as if the run died before saving epoch 1
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "epo')  # and tore the line it was writing
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=2")]) == 0
    history = records(run)
    assert [r["epoch"] for r in history if r["type"] == "train"] == [0, 1]
    evals = [(r["epoch"], r["split"], r["task"]) for r in history if r["type"] == "eval"]
    assert len(evals) == len(set(evals)) and {e for e, _, _ in evals} == {0, 1}


def test_restart_of_a_run_killed_before_its_first_checkpoint_keeps_one_history(synthetic_root, tmp_path):
    train = load_tool("train")
    run = tmp_path / "run"
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=1")]) == 0
    (run / "last.pth").unlink()  # as if killed while writing its first `last`
    assert train.main(["--config", PRETRAIN, *overrides(synthetic_root, run, "solver.epochs=1")]) == 0
    history = records(run)
    assert [r["epoch"] for r in history if r["type"] == "train"] == [0]
    evals = [(r["epoch"], r["split"], r["task"]) for r in history if r["type"] == "eval"]
    assert len(evals) == len(set(evals)) == 2


def test_resume_config_check_allows_keys_added_by_a_newer_code_version():
    from utils.checkpoint import ResumeConfigError, check_resume_config

    saved = {"model": {"temperature": 0.02}, "solver": {"epochs": 5}}
    current = {"model": {"temperature": 0.02}, "solver": {"epochs": 8}, "data": {"cache_dir": ""}}
    check_resume_config(saved, current, "last.pth")  # more epochs: safe; data.cache_dir: new key
    current["model"]["temperature"] = 0.05
    with pytest.raises(ResumeConfigError, match=r"model.temperature: 0.02 in the checkpoint, 0.05 now"):
        check_resume_config(saved, current, "last.pth")
