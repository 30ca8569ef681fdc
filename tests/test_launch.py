"""pretrain.sh / finetune.sh through scripts/launch.sh: the torchrun command, plain and inside SLURM."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import REPO


def launch(tmp_path, script, *args, env=None):
    """Run `script` with a stand-in Python (and `scontrol`) that record their arguments."""
    record = tmp_path / "argv"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"
    python.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{record}"\n')
    scontrol = bin_dir / "scontrol"
    # `scontrol show hostnames LIST` prints one host per line; this stand-in knows one list.
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-a[07-08]" ] && printf "gpu-a07\\ngpu-a08\\n"\n')
    for f in (python, scontrol):
        f.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "CONFIG", "DATASET")}
    run_env = {**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(python), **(env or {})}
    done = subprocess.run(["sh", str(REPO / script), *args], env=run_env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return record.read_text().splitlines(), done.stderr


def test_plain_launch_is_one_node_on_localhost(tmp_path):
    argv, _ = launch(tmp_path, "pretrain.sh", "solver.epochs=1", env={"NPROC": "2"})
    assert argv == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--node_rank=0",
                    "--master_addr=127.0.0.1", "--master_port=29500", "tools/train.py", "--config",
                    "configs/pretrain/webperson_5m.yaml", "solver.epochs=1"]


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu-a[07-08]",
         "SLURM_GPUS_ON_NODE": "4"}


@pytest.mark.parametrize("script, config", [("pretrain.sh", "configs/pretrain/webperson_5m.yaml"),
                                            ("finetune.sh", "configs/finetune/cuhkpedes.yaml")])
def test_slurm_allocation_gives_the_rendezvous(tmp_path, script, config):
    argv, err = launch(tmp_path, script, "--finetune", "ckpt.pth", env=SLURM)
    assert argv == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--nnodes=2", "--node_rank=1",
                    "--master_addr=gpu-a07", "--master_port=24242", "tools/train.py", "--config", config,
                    "--finetune", "ckpt.pth"]
    assert "SLURM job 4242: node 1 of 2, rendezvous gpu-a07:24242" in err


def test_explicit_settings_win_over_slurm(tmp_path):
    env = {**SLURM, "NPROC": "8", "MASTER_ADDR": "head", "MASTER_PORT": "31000", "NNODES": "1", "NODE_RANK": "0"}
    argv, _ = launch(tmp_path, "pretrain.sh", env=env)
    assert argv[2:7] == ["--nproc_per_node=8", "--nnodes=1", "--node_rank=0", "--master_addr=head",
                         "--master_port=31000"]


def test_launcher_needs_a_config(tmp_path):
    done = subprocess.run(["sh", str(REPO / "scripts" / "launch.sh")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: sh scripts/launch.sh CONFIG" in done.stderr
