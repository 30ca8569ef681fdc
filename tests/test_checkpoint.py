"""utils.checkpoint (atomic writes, exact resume, RNG, GracefulExit) and tools/export.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from model.weights import IncompatibleWeightsError, load_checkpoint_weights, load_pretrained
from utils import comm
from utils.checkpoint import (
    FORMAT_VERSION,
    Checkpointer,
    GracefulExit,
    atomic_save,
    atomic_write,
    capture_rng_state,
    find_resume,
    restore_rng_state,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- atomic save


def _fail_mid_write(exc: BaseException):
    def fake_save(obj, f):
        f.write(b"\x80partial checkpoint bytes" * 1000)
        raise exc

    return fake_save


@pytest.mark.parametrize("failure", ["save-oserror", "save-keyboardinterrupt", "replace-oserror"])
def test_atomic_save_failure_keeps_previous_file(tmp_path, monkeypatch, failure):
    target = tmp_path / "last.pth"
    atomic_save({"value": torch.tensor([1.0, 2.0])}, target)
    if failure == "save-oserror":
        monkeypatch.setattr(torch, "save", _fail_mid_write(OSError("No space left on device")))
        expected: type[BaseException] = OSError
    elif failure == "save-keyboardinterrupt":
        monkeypatch.setattr(torch, "save", _fail_mid_write(KeyboardInterrupt()))
        expected = KeyboardInterrupt
    else:
        def failing_replace(src, dst):
            raise OSError("rename failed")

        monkeypatch.setattr(os, "replace", failing_replace)
        expected = OSError
    with pytest.raises(expected):
        atomic_save({"value": torch.tensor([3.0])}, target)
    monkeypatch.undo()
    assert torch.equal(_load(target)["value"], torch.tensor([1.0, 2.0]))
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


_KILL_SCRIPT = """
import sys
import torch
from utils.checkpoint import atomic_save
tensor = torch.empty(1_000_000)
for i in range(100_000):
    tensor.fill_(i)
    print(i, flush=True)
    atomic_save({"i": i, "tensor": tensor}, sys.argv[1])
"""


def test_atomic_save_survives_sigkill_and_cleans_up_after_dead_writer(tmp_path):
    target = tmp_path / "last.pth"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        # "3" is printed right before the 4th save starts: kill during (or just around) a write.
        for line in proc.stdout:
            if line.strip() == "3":
                break
        else:
            pytest.fail(f"child exited early with code {proc.wait()}")
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    state = _load(target)
    assert state["i"] >= 2
    assert torch.equal(state["tensor"], torch.full((1_000_000,), float(state["i"])))
    # The killed writer's temp file (if it died mid-write) is removed by the next save.
    atomic_save({"i": -1}, target)
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    assert _load(target) == {"i": -1}


def test_stale_temp_files_only_of_dead_local_writers_are_removed(tmp_path):
    target = tmp_path / "last.pth"
    finished = subprocess.Popen([sys.executable, "-c", ""])
    finished.wait()  # its pid now belongs to no process
    host = socket.gethostname()
    names = {
        "dead": f".last.pth.{finished.pid}@{host}.abc_12.tmp",
        "alive": f".last.pth.{os.getppid()}@{host}.xyz.tmp",
        "other_host": f".last.pth.{finished.pid}@not-{host}.xyz.tmp",
        "other_target": f".best.pth.{finished.pid}@{host}.xyz.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"junk")
    atomic_save({"ok": True}, target)
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left
    assert {names["alive"], names["other_host"], names["other_target"], "last.pth"} == left


# --------------------------------------------------------------------------- RNG


def _draw() -> tuple:
    return (random.random(), random.gauss(0.0, 1.0), np.random.rand(3).tolist(),
            float(np.random.standard_normal()), torch.rand(3).tolist(), torch.randn(2).tolist())


def test_rng_round_trip_through_weights_only_file(tmp_path):
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    # Leave a cached Gaussian in python's and numpy's generators: part of the state too.
    random.gauss(0.0, 1.0)
    np.random.standard_normal()
    state = capture_rng_state()
    expected = _draw()
    torch.save(state, tmp_path / "rng.pth")
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert _draw() != expected
    restore_rng_state(_load(tmp_path / "rng.pth"))
    assert _draw() == expected


def test_restore_rng_state_rejects_incomplete_state():
    with pytest.raises(ValueError, match=r"lacks \['numpy'\]"):
        restore_rng_state({"python": {}, "torch": torch.get_rng_state(), "cuda": []})


# --------------------------------------------------------------------------- checkpointer


class _Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.drop = nn.Dropout(0.3)
        self.norm = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


class _FakeScoreCache:
    def __init__(self) -> None:
        self.scores = torch.full((5, 7), 0.85)

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].clone()


def _training_state(seed: int, run_dir: Path, config: dict | None = None):
    torch.manual_seed(seed)
    model = _Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=4e-5)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=2),
         torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)],
        milestones=[2],
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=float(2 ** (seed % 7)))
    cache = _FakeScoreCache()
    ck = Checkpointer(run_dir, model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                      checkpointables={"score_cache": cache},
                      config=config or {"seed": 1, "solver": {"lr": 1e-2}}, num_classes=4)
    return model, opt, sched, scaler, cache, ck


def _train_step(model, opt, sched, cache) -> None:
    # Uses every RNG: torch (data, dropout), python and numpy ("augmentation").
    x = torch.randn(6, 8) * (1 + random.random()) + float(np.random.rand())
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    cache.scores[random.randrange(5)] = torch.rand(7)


def test_resume_is_bit_identical_to_uninterrupted(tmp_path):
    model, opt, sched, scaler, cache, ck = _training_state(0, tmp_path)
    for _ in range(3):
        _train_step(model, opt, sched, cache)
    path = ck.save("last", epoch=1, step=3, best_metrics={"CUHK-PEDES": {"R1": 12.5}}, extra={"nonfinite": 0})
    assert path == tmp_path / "last.pth"
    for _ in range(2):
        _train_step(model, opt, sched, cache)
    ref_params = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = opt.state_dict()
    ref_lr = sched.get_last_lr()
    ref_cache = cache.scores.clone()
    ref_scaler = scaler.state_dict()

    model2, opt2, sched2, scaler2, cache2, ck2 = _training_state(7, tmp_path)
    assert not torch.equal(model2.fc1.weight, ref_params["fc1.weight"])
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    meta = ck2.load(tmp_path / "last.pth")
    assert meta["epoch"] == 1 and meta["step"] == 3
    assert meta["best_metrics"] == {"CUHK-PEDES": {"R1": 12.5}}
    assert meta["extra"] == {"nonfinite": 0}
    assert meta["num_classes"] == 4
    assert scaler2.state_dict() == ref_scaler
    for _ in range(2):
        _train_step(model2, opt2, sched2, cache2)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, ref_params[key]), key
    for pid, state in opt2.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, ref_opt["state"][pid][name]), (pid, name)
    assert sched2.get_last_lr() == ref_lr
    assert torch.equal(cache2.scores, ref_cache)


def test_checkpoint_contents_load_weights_only(tmp_path):
    model, opt, sched, scaler, cache, ck = _training_state(0, tmp_path)
    _train_step(model, opt, sched, cache)
    wrapped = nn.DataParallel(model)
    ck.model = wrapped
    ck.save("best_CUHK-PEDES", epoch=2, step=9, best_metrics={"R1": np.float64(40.25), "epoch": np.int64(2)},
            extra={"order": np.arange(3)})
    state = torch.load(tmp_path / "best_CUHK-PEDES.pth", weights_only=True)
    assert set(state) == {"format_version", "model", "optimizer", "scheduler", "scaler", "score_cache", "epoch",
                          "step", "rng", "best_metrics", "config", "num_classes", "extra"}
    assert state["format_version"] == FORMAT_VERSION
    assert set(state["model"]) == set(model.state_dict())  # no "module." prefix
    assert state["model"]._metadata[""] == model.state_dict()._metadata[""]
    assert state["best_metrics"] == {"R1": 40.25, "epoch": 2}
    assert type(state["best_metrics"]["R1"]) is float
    assert torch.equal(state["extra"]["order"], torch.arange(3))
    assert state["config"] == {"seed": 1, "solver": {"lr": 1e-2}}
    assert (state["epoch"], state["step"], state["num_classes"]) == (2, 9, 4)
    assert len(state["rng"]) == 1 and set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert torch.equal(state["score_cache"]["scores"], cache.scores)
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-3


def test_unloadable_objects_are_refused_when_saving(tmp_path):
    model, opt, sched, scaler, cache, ck = _training_state(0, tmp_path)

    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"extra\.hooks\[1\]: .*Opaque cannot be stored"):
        ck.save("last", epoch=0, step=0, extra={"hooks": [1, Opaque()]})
    assert os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="score_cache .* needs state_dict"):
        Checkpointer(tmp_path, model=model, checkpointables={"score_cache": object()})
    with pytest.raises(ValueError, match="checkpointable name.* step .*keys of the checkpoint format"):
        Checkpointer(tmp_path, model=model, checkpointables={"step": cache})
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        ck.save("../escape", epoch=0, step=0)


def test_load_errors_are_explicit(tmp_path):
    model, opt, sched, scaler, cache, ck = _training_state(0, tmp_path)
    ck.save("last", epoch=1, step=1)

    # The model's owner decides what fits (the engine passes model.weights' strict, readable loader);
    # by default torch's strict load_state_dict decides.
    other = Checkpointer(tmp_path, model=_Net(hidden=32), load_weights=load_checkpoint_weights)
    with pytest.raises(IncompatibleWeightsError, match=r"fc1\.weight"):
        other.load(tmp_path / "last.pth")
    with pytest.raises(RuntimeError, match=r"size mismatch for fc1\.weight"):
        Checkpointer(tmp_path, model=_Net(hidden=32)).load(tmp_path / "last.pth")

    weights_only = tmp_path / "release.pth"
    torch.save({"model": model.state_dict(), "config": {}, "num_classes": 4, "format_version": FORMAT_VERSION},
               weights_only)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        ck.load(weights_only)
    fresh = _Net()
    meta = Checkpointer(tmp_path, model=fresh).load(weights_only, resume=False)
    assert meta["epoch"] is None and meta["num_classes"] == 4
    assert torch.equal(fresh.fc2.weight, model.fc2.weight)

    future = tmp_path / "future.pth"
    torch.save(dict(_load(tmp_path / "last.pth"), format_version=FORMAT_VERSION + 1), future)
    with pytest.raises(ValueError, match="newer than this code"):
        ck.load(future)

    no_opt = tmp_path / "no_opt.pth"
    Checkpointer(tmp_path, model=model).save("no_opt", epoch=0, step=0)
    with pytest.raises(ValueError, match="no optimizer state"):
        ck.load(no_opt)


def test_config_changes_are_logged_on_resume(tmp_path, caplog):
    _, _, _, _, _, ck = _training_state(0, tmp_path, config={"seed": 1, "solver": {"lr": 1e-2, "eps": 1e-3}})
    ck.save("last", epoch=0, step=0)
    *_, ck2 = _training_state(0, tmp_path, config={"seed": 1, "solver": {"lr": 2e-2, "eps": 1e-3}})
    with caplog.at_level(logging.WARNING, logger="utils.checkpoint"):
        ck2.load(tmp_path / "last.pth")
    assert "1 config change(s): solver.lr: 0.01 -> 0.02" in caplog.text


def test_changed_world_size_reseeds_deterministically(tmp_path, monkeypatch, caplog):
    model, opt, sched, scaler, cache, ck = _training_state(0, tmp_path)
    # Pretend two ranks saved: the gather returns two states.
    monkeypatch.setattr(comm, "all_gather_object", lambda obj: [obj, obj])
    ck.save("last", epoch=0, step=5)
    monkeypatch.undo()
    assert len(_load(tmp_path / "last.pth")["rng"]) == 2
    draws = []
    for scramble in (11, 22):
        random.seed(scramble)
        np.random.seed(scramble)
        torch.manual_seed(scramble)
        with caplog.at_level(logging.WARNING, logger="utils.checkpoint"):
            ck.load(tmp_path / "last.pth")
        draws.append(_draw())
    assert draws[0] == draws[1]
    assert "saved by 2 rank(s) but this run has 1" in caplog.text


def test_find_resume(tmp_path):
    assert find_resume(tmp_path, "") is None
    assert find_resume(tmp_path, "auto") is None
    (tmp_path / "last.pth").write_bytes(b"x")
    assert find_resume(tmp_path, "auto") == str(tmp_path / "last.pth")
    other = tmp_path / "epoch3.pth"
    other.write_bytes(b"x")
    assert find_resume(tmp_path / "elsewhere", str(other)) == str(other)
    with pytest.raises(FileNotFoundError, match=r"train.resume='.*missing.pth': no such checkpoint file"):
        find_resume(tmp_path, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="is a directory.*did you mean .*last.pth"):
        find_resume(tmp_path, str(tmp_path))


# --------------------------------------------------------------------------- graceful exit


def test_graceful_exit_sets_flag_and_restores_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with GracefulExit() as stop:
        assert not stop.requested and not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.should_stop()
        assert stop.signal_name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM: still just the request
        assert stop.requested
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_sigint_forces_keyboard_interrupt():
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with GracefulExit() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.requested and stop.signal_name == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second SIGINT should have raised KeyboardInterrupt")
    assert signal.getsignal(signal.SIGINT) == before


def test_graceful_exit_outside_main_thread_is_a_noop():
    before = signal.getsignal(signal.SIGTERM)
    seen: dict = {}

    def run() -> None:
        with GracefulExit() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["requested"] = stop.should_stop()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"handler": before, "requested": False}


# --------------------------------------------------------------------------- export tool


def test_export_tool_writes_weights_only_release_and_safetensors(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from model.build import build_model
    from utils.config import load_config

    cfg = load_config(None, ["model.clip.arch=tiny", "model.clip.pretrained=", "model.clip.image_size=[64, 32]",
                             "gass.num_layers=2", "model.cmt_depth=1"])
    model = build_model(cfg, num_classes=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    Checkpointer(tmp_path / "run", model=model, optimizer=opt, config=cfg).save("last", epoch=3, step=30)

    out = tmp_path / "release.pth"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "export.py"), "--checkpoint", str(tmp_path / "run" / "last.pth"),
         "--out", str(out), "--safetensors"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"wrote {out} (" in result.stdout and "MB" in result.stdout
    assert f"wrote {tmp_path / 'release.safetensors'} (" in result.stdout

    release = torch.load(out, weights_only=True)
    assert set(release) >= {"model", "config", "num_classes", "format_version"}
    assert "optimizer" not in release and "rng" not in release
    assert release["config"] == cfg.to_dict()
    assert release["num_classes"] == 0
    assert release["format_version"] == FORMAT_VERSION
    expected = model.state_dict()
    assert set(release["model"]) == set(expected)

    tensors = load_file(tmp_path / "release.safetensors")
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        assert torch.equal(release["model"][key], value), key
        assert torch.equal(tensors[key], value), key
    with safe_open(tmp_path / "release.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["config"]) == cfg.to_dict()
    assert metadata["num_classes"] == "0" and metadata["format_version"] == str(FORMAT_VERSION)

    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    report = load_pretrained(model, out)
    assert not report.missing and not report.unexpected
    for key, value in model.state_dict().items():
        assert torch.equal(value, release["model"][key]), key


def test_export_tool_refuses_bad_arguments(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_tool", REPO_ROOT / "tools" / "export.py")
    export_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_tool)
    ckpt = tmp_path / "last.pth"
    Checkpointer(tmp_path, model=_Net()).save("last", epoch=0, step=0)
    assert export_tool.main(["--checkpoint", str(ckpt), "--out", str(ckpt)]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err
    assert export_tool.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "r.safetensors"),
                             "--safetensors"]) == 2
    assert "name the .pth release" in capsys.readouterr().err
    assert export_tool.main(["--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "r.pth")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]


# --------------------------------------------------------------------------- two ranks (gloo)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, port: int, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    assert comm.init_distributed("gloo")
    try:
        torch.manual_seed(0)  # same weights on both ranks, as DDP guarantees
        model = nn.Linear(3, 2)
        # Then distinct streams per rank (seed offset by rank, as in training).
        random.seed(rank)
        np.random.seed(rank)
        torch.manual_seed(100 + rank)
        ck = Checkpointer(run_dir, model=model, config={"seed": 1})
        path = ck.save("last", epoch=1, step=7)
        assert path.is_file()  # save returns only after rank 0 has written
        expected = _draw()
        random.seed(999)
        np.random.seed(999)
        torch.manual_seed(999)
        meta = ck.load(path)
        assert meta["step"] == 7
        assert _draw() == expected  # each rank continues its own streams

        stop = GracefulExit()
        stop.requested = rank == 1
        assert stop.should_stop()  # rank 1's request stops rank 0 too
        assert stop.requested
    finally:
        comm.cleanup()


@pytest.mark.dist
def test_two_ranks_save_and_restore_their_own_rng(tmp_path):
    # fork: the children inherit the imported modules instead of importing torch again.
    mp.start_processes(_dist_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    assert sorted(os.listdir(tmp_path)) == ["last.pth"]
    state = _load(tmp_path / "last.pth")
    assert len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_atomic_write_gives_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp's owner-only mode must not make checkpoints in a shared folder unreadable."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.pth", lambda f: f.write(b"x"))
        with open(tmp_path / "b.pth", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.pth").stat().st_mode & 0o777 == (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- layering, utils/device.py


def test_utils_import_nothing_from_model_or_processor():
    """utils/ is the bottom layer: checkpoint files, devices and the metrics log know no model."""
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "utils").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ("model", "processor", "tools")]
    assert offenders == []


def test_generic_layers_name_no_method():
    """The loop, its common hooks, the engine and utils/ know no method: GASS belongs to processor/pretrain.py."""
    files = [*sorted((REPO_ROOT / "utils").glob("*.py")),
             *(REPO_ROOT / "processor" / f"{name}.py" for name in ("engine", "loop", "hooks"))]
    named = [f"{p.relative_to(REPO_ROOT)}:{i}" for p in files
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "gass" in line.lower()]
    assert named == []


def test_unwrap_model_and_autocast_choice():
    from utils.device import autocast_context, autocast_dtype, unwrap_model

    model = _Net()
    assert unwrap_model(model) is model
    assert unwrap_model(nn.DataParallel(nn.DataParallel(model))) is model
    compiled = torch.compile(nn.DataParallel(model))  # wrapping only: nothing is compiled before a call
    assert unwrap_model(compiled) is model
    assert [autocast_dtype(p) for p in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="unknown precision 'fp8'; valid: fp32, bf16, fp16"):
        autocast_dtype("fp8")
    # The CPU always runs float32: no autocast region, whatever the precision.
    with autocast_context(torch.device("cpu"), "bf16"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
