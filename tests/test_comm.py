"""utils.comm: single-process no-ops and a 2-process gloo run of every collective."""

from __future__ import annotations

import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from utils import comm

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_env(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )


def test_single_process_helpers_are_noops(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not comm.is_dist_initialized()
    assert comm.init_distributed() is False
    assert (comm.get_world_size(), comm.get_rank(), comm.get_local_rank(), comm.get_local_size()) == (1, 0, 0, 1)
    assert comm.is_main_process()
    comm.synchronize()
    comm.cleanup()

    x = torch.arange(6.0).reshape(3, 2).requires_grad_()
    assert comm.all_gather_with_grad(x) is x
    gathered = comm.all_gather_tensor(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    assert comm.all_gather_object({"a": 1}) == [{"a": 1}]
    obj = ["payload"]
    assert comm.broadcast_object(obj) is obj
    reduced = comm.reduce_dict({"loss": torch.tensor(2.5), "acc": 0.5})
    assert set(reduced) == {"loss", "acc"}
    assert reduced["loss"].item() == 2.5 and reduced["acc"].item() == 0.5
    assert reduced["loss"].dim() == 0


def test_init_distributed_reports_missing_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match=r"\['MASTER_ADDR', 'MASTER_PORT'\]"):
        comm.init_distributed("gloo")
    assert not comm.is_dist_initialized()


def test_seed_everything_seeds_all_generators():
    assert comm.seed_everything(123) == 123  # rank 0 without distributed
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    comm.seed_everything(123, rank_offset=False)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
    comm.seed_everything(124)
    assert torch.rand(1).item() != first[2]


def _worker(rank: int, port: int, out_dir: str) -> None:
    _torchrun_env(rank, port)
    assert comm.init_distributed("gloo") is True
    res: dict[str, object] = {
        "world": comm.get_world_size(),
        "rank": comm.get_rank(),
        "local_rank": comm.get_local_rank(),
        "local_size": comm.get_local_size(),
        "main": comm.is_main_process(),
        "seed": comm.seed_everything(10),
    }
    # Unequal first dimensions (2 and 3 rows), and one empty rank.
    local = torch.arange(2 + rank, dtype=torch.float32).unsqueeze(1).repeat(1, 3) + 100 * rank
    res["gathered"] = comm.all_gather_tensor(local)
    empty_or_not = torch.ones(0 if rank == 0 else 2, 4, dtype=torch.long) * (rank + 1)
    res["gathered_empty"] = comm.all_gather_tensor(empty_or_not)
    res["gathered_all_empty"] = comm.all_gather_tensor(torch.zeros(0, 3))

    # Local slice keeps its graph: d(sum(w * gathered)) / d x == w[slice of this rank].
    x = (torch.arange(3 * (rank + 1), dtype=torch.float32).reshape(-1, 1) + 10 * rank).requires_grad_()
    gathered = comm.all_gather_with_grad(x)
    weights = torch.arange(1, gathered.numel() + 1, dtype=torch.float32).reshape(gathered.shape)
    (gathered * weights).sum().backward()
    res["with_grad_values"] = gathered.detach()
    res["with_grad_grad"] = x.grad

    try:
        comm.all_gather_tensor(torch.tensor(1.0))
        res["scalar_error"] = None
    except ValueError as err:
        res["scalar_error"] = str(err)

    res["objects"] = comm.all_gather_object({"rank": rank, "name": f"r{rank}"})
    res["broadcast"] = comm.broadcast_object(f"from{rank}", src=1)
    res["reduce_avg"] = comm.reduce_dict({"b": torch.tensor(2.0 * rank), "a": float(rank + 1)})
    res["reduce_sum"] = comm.reduce_dict({"a": float(rank + 1)}, average=False)
    comm.synchronize()
    comm.cleanup()
    res["after_cleanup"] = (comm.is_dist_initialized(), comm.get_world_size())
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.dist
def test_collectives_two_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    expected_gather = torch.cat(
        [torch.arange(2 + r, dtype=torch.float32).unsqueeze(1).repeat(1, 3) + 100 * r for r in range(WORLD_SIZE)]
    )
    expected_values = torch.cat(
        [torch.arange(3 * (r + 1), dtype=torch.float32).reshape(-1, 1) + 10 * r for r in range(WORLD_SIZE)]
    )
    weights = torch.arange(1, expected_values.numel() + 1, dtype=torch.float32).reshape(expected_values.shape)
    for rank, res in enumerate(results):
        assert (res["world"], res["rank"], res["local_rank"], res["local_size"]) == (2, rank, rank, 2)
        assert res["main"] is (rank == 0)
        assert res["seed"] == 10 + rank
        assert torch.equal(res["gathered"], expected_gather)
        assert torch.equal(res["gathered_empty"], torch.full((2, 4), 2, dtype=torch.long))
        assert res["gathered_all_empty"].shape == (0, 3)
        assert torch.equal(res["with_grad_values"], expected_values)
        own = slice(0, 3) if rank == 0 else slice(3, 9)
        assert torch.equal(res["with_grad_grad"], weights[own])
        assert "at least one dimension" in res["scalar_error"]
        assert res["objects"] == [{"rank": 0, "name": "r0"}, {"rank": 1, "name": "r1"}]
        assert res["broadcast"] == "from1"
        assert res["reduce_avg"]["a"].item() == pytest.approx(1.5)
        assert res["reduce_avg"]["b"].item() == pytest.approx(1.0)
        assert res["reduce_sum"]["a"].item() == pytest.approx(3.0)
        assert res["after_cleanup"] == (False, 1)
