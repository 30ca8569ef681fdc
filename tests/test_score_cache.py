"""datasets.score_cache: values, refresh policies, workers, pickling, checkpoints, 2 ranks."""

from __future__ import annotations

import fcntl
import os
import pickle
import socket
import threading

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from datasets.score_cache import ScoreCache

N, L = 10, 7
INIT = np.float32(0.85)


def _rows(values: list[float]) -> torch.Tensor:
    """One constant row per value, [len(values), L]."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1).repeat(1, L)


def _full(value) -> torch.Tensor:
    return torch.full((N, L), float(np.float32(value)))


def test_initial_state_and_files(tmp_path):
    run = tmp_path / "run"
    cache = ScoreCache(run, N, L)
    assert len(cache) == N and cache.shape == (N, L) and cache.epoch is None
    assert cache.live_path == run / "score_cache.npy"
    on_disk = np.load(run / "score_cache.npy")
    assert on_disk.dtype == np.float32 and on_disk.shape == (N, L)
    assert np.all(on_disk == INIT)
    assert np.array_equal(np.load(cache.snapshot_path), on_disk)
    one = cache.get(3)
    assert one.shape == (L,) and one.dtype == torch.float32 and torch.all(one == torch.tensor(INIT))
    assert torch.equal(cache.get([0, 9, 4]), _full(INIT)[:3])
    assert torch.equal(cache.get(torch.arange(N)), _full(INIT))
    assert cache.get([]).shape == (0, L)
    assert ScoreCache(tmp_path / "c", 4, 5, init_value=0.25).get(2).tolist() == [0.25] * 5


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"refresh='batch'; expected one of \['epoch', 'step'\]"):
        ScoreCache(tmp_path, N, L, refresh="batch")
    with pytest.raises(ValueError, match="positive"):
        ScoreCache(tmp_path, 0, L)
    cache = ScoreCache(tmp_path, N, L, refresh="step")
    with pytest.raises(IndexError, match=r"out of range \[0, 10\)"):
        cache.get([2, 10])
    with pytest.raises(IndexError, match="out of range"):
        cache.get(-1)
    with pytest.raises(TypeError, match="integers"):
        cache.get(np.array([1.0]))
    with pytest.raises(ValueError, match=r"expected scores \[2, 7\]"):
        cache.update(torch.tensor([0, 1]), torch.zeros(2, L + 1))
    with pytest.raises(TypeError, match="integers"):
        cache.update(torch.tensor([0.0]), torch.zeros(1, L))
    with pytest.raises(IndexError, match="out of range"):
        cache.update(torch.tensor([0, 12]), torch.zeros(2, L))
    assert torch.equal(cache.get(torch.arange(N)), _full(INIT))  # failed updates wrote nothing


def test_epoch_policy_reads_the_snapshot_until_the_next_epoch(tmp_path):
    cache = ScoreCache(tmp_path, N, L)  # refresh="epoch"
    cache.begin_epoch(0)
    cache.update(torch.tensor([1, 4]), _rows([0.1, 0.4]))
    assert torch.equal(cache.get(torch.arange(N)), _full(INIT))  # the epoch-0 snapshot
    live = np.load(cache.live_path)
    assert live[1, 0] == np.float32(0.1) and live[4, 0] == np.float32(0.4)
    cache.begin_epoch(0)  # same epoch again: snapshot kept
    assert torch.equal(cache.get(1), _full(INIT)[0])
    cache.begin_epoch(1)
    assert cache.epoch == 1
    expected = _full(INIT)
    expected[1], expected[4] = 0.1, 0.4
    assert torch.equal(cache.get(torch.arange(N)), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "score_cache.lock",
        "score_cache.npy",
        "score_cache.snapshot.npy",
    ]


def test_step_policy_reads_latest_and_last_duplicate_wins(tmp_path):
    cache = ScoreCache(tmp_path, N, L, refresh="step")
    cache.update(torch.tensor([2, 5, 2]), _rows([0.2, 0.5, 0.7]))
    assert torch.equal(cache.get([2, 5]), _rows([0.7, 0.5]))
    cache.update(torch.tensor([], dtype=torch.long), torch.zeros(0, L))  # an empty batch is fine
    cache.update(torch.tensor([5]), torch.linspace(0, 1, L, dtype=torch.float64).unsqueeze(0))
    assert torch.equal(cache.get(5), torch.linspace(0, 1, L, dtype=torch.float64).float())


def test_step_policy_rows_are_written_and_read_under_the_file_lock(tmp_path):
    cache = ScoreCache(tmp_path, N, L, refresh="step")
    fd = os.open(cache.lock_path, os.O_RDWR)
    try:
        # A reader holds the shared lock: the writer must wait before touching any row.
        fcntl.flock(fd, fcntl.LOCK_SH)
        writer = threading.Thread(target=cache.update, args=(torch.tensor([4]), _rows([0.4])))
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive()
        assert np.all(np.load(cache.live_path)[4] == INIT)
        fcntl.flock(fd, fcntl.LOCK_UN)
        writer.join()
        assert np.all(np.load(cache.live_path)[4] == np.float32(0.4))

        # A writer holds the exclusive lock: readers wait instead of copying a half-written row.
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = []
        reader = threading.Thread(target=lambda: result.append(cache.get(4)))
        reader.start()
        reader.join(timeout=0.5)
        assert reader.is_alive() and not result
        fcntl.flock(fd, fcntl.LOCK_UN)
        reader.join()
        assert torch.equal(result[0], _rows([0.4])[0])
    finally:
        os.close(fd)


class _CacheRows(Dataset):
    """Returns (index, scores) per sample, like the training dataset does."""

    def __init__(self, cache: ScoreCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int):
        return i, self.cache.get(i)


def _read_all(loader: DataLoader) -> torch.Tensor:
    out = torch.empty(N, L)
    for idx, scores in loader:
        out[idx] = scores
    return out


def test_dataloader_workers_follow_the_refresh_policy(tmp_path):
    epoch_cache = ScoreCache(tmp_path / "epoch", N, L, refresh="epoch")
    step_cache = ScoreCache(tmp_path / "step", N, L, refresh="step")
    # Persistent workers outlive begin_epoch, so they must notice the new snapshot themselves.
    loaders = {
        name: DataLoader(_CacheRows(c), batch_size=3, num_workers=2, persistent_workers=True)
        for name, c in (("epoch", epoch_cache), ("step", step_cache))
    }
    epoch_cache.begin_epoch(0)
    assert torch.equal(_read_all(loaders["epoch"]), _full(INIT))
    assert torch.equal(_read_all(loaders["step"]), _full(INIT))

    new = _rows([float(i) / 10 for i in range(N)])
    for c in (epoch_cache, step_cache):
        c.update(torch.arange(N), new)
    assert torch.equal(_read_all(loaders["epoch"]), _full(INIT))  # still epoch 0's snapshot
    assert torch.equal(_read_all(loaders["step"]), new)
    epoch_cache.begin_epoch(1)
    assert torch.equal(_read_all(loaders["epoch"]), new)
    # A fresh (non-persistent) worker pool reads the same snapshot.
    assert torch.equal(_read_all(DataLoader(_CacheRows(epoch_cache), batch_size=4, num_workers=2)), new)


def test_pickled_copy_is_a_lazy_read_only_view(tmp_path):
    cache = ScoreCache(tmp_path, N, L, refresh="epoch")
    cache.get(0)  # the original holds open maps; they must not be pickled
    blob = pickle.dumps(cache)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert torch.equal(clone.get(torch.arange(N)), _full(INIT))
    with pytest.raises(RuntimeError, match="read-only copy"):
        clone.update(torch.tensor([0]), torch.zeros(1, L))
    with pytest.raises(RuntimeError, match="read-only copy"):
        clone.begin_epoch(1)
    cache.update(torch.tensor([3]), _rows([0.3]))
    cache.begin_epoch(1)
    assert torch.equal(clone.get(3), _rows([0.3])[0])


def _filled_cache(path, refresh="epoch") -> ScoreCache:
    """A cache mid-epoch 1: snapshot = state at the start of epoch 1, live moved on since."""
    g = torch.Generator().manual_seed(0)
    cache = ScoreCache(path, N, L, refresh=refresh)
    cache.begin_epoch(0)
    cache.update(torch.arange(N), torch.rand(N, L, generator=g))
    cache.begin_epoch(1)
    cache.update(torch.tensor([0, 6]), torch.rand(2, L, generator=g))
    return cache


def test_save_and_load_restore_exactly(tmp_path):
    cache = _filled_cache(tmp_path / "a")
    cache.save(tmp_path / "cache.pt")
    restored = ScoreCache(tmp_path / "b", N, L)
    restored.load(tmp_path / "cache.pt")
    assert restored.epoch == 1
    assert np.array_equal(np.load(restored.live_path), np.load(cache.live_path))
    assert torch.equal(restored.get(torch.arange(N)), cache.get(torch.arange(N)))  # the mid-epoch snapshot
    # Resuming calls begin_epoch for the interrupted epoch: the restored snapshot stays.
    restored.begin_epoch(1)
    assert torch.equal(restored.get(torch.arange(N)), cache.get(torch.arange(N)))
    restored.begin_epoch(2)
    cache.begin_epoch(2)
    assert torch.equal(restored.get(torch.arange(N)), cache.get(torch.arange(N)))
    assert not (tmp_path / "cache.pt.tmp").exists()


def test_state_dict_round_trip_and_validation(tmp_path):
    cache = _filled_cache(tmp_path / "a", refresh="step")
    state = cache.state_dict()
    assert state["snapshot"] is None and state["refresh"] == "step" and state["epoch"] == 1
    assert state["scores"].dtype == torch.float32 and state["scores"].shape == (N, L)
    other = ScoreCache(tmp_path / "b", N, L, refresh="step")
    other.load_state_dict(state)
    again = other.state_dict()
    assert torch.equal(again["scores"], state["scores"]) and again["epoch"] == 1
    assert torch.equal(other.get(torch.arange(N)), state["scores"])

    # Without the snapshot an "epoch" cache publishes the restored live scores.
    epoch_cache = _filled_cache(tmp_path / "c")
    slim = epoch_cache.state_dict(include_snapshot=False)
    assert slim["snapshot"] is None
    target = ScoreCache(tmp_path / "d", N, L)
    target.load_state_dict(slim)
    assert torch.equal(target.get(torch.arange(N)), slim["scores"])

    with pytest.raises(ValueError, match=r"scores has shape \(10, 7\), expected \(11, 7\)"):
        ScoreCache(tmp_path / "e", N + 1, L).load_state_dict(state)
    with pytest.raises(ValueError, match="not a score-cache state"):
        other.load_state_dict({"scores": state["scores"]})


# -------------------------------------------------------------- two ranks
def _worker(rank: int, port: int, run_dir: str) -> None:
    from utils import comm

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
    )
    comm.init_distributed("gloo")
    step = ScoreCache(os.path.join(run_dir, "step"), N, L, refresh="step")
    epoch = ScoreCache(os.path.join(run_dir, "epoch"), N, L, refresh="epoch")
    epoch.begin_epoch(0)
    # Rank 0: rows 0, 1, 2, 5; rank 1: rows 3, 4, 5 (unequal sizes, row 5 on both).
    if rank == 0:
        idx, val = torch.tensor([0, 1, 2, 5]), _rows([0.0, 0.1, 0.2, 0.55])
    else:
        idx, val = torch.tensor([3, 4, 5]), _rows([0.3, 0.4, 0.5])
    for c in (step, epoch):
        c.update(idx, val)
    # A step where rank 0 has nothing to contribute.
    for c in (step, epoch):
        if rank == 0:
            c.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, L))
        else:
            c.update(torch.tensor([9]), _rows([0.9]))
    comm.synchronize()  # the writer (rank 0) stores rows after the gather returns
    res = {
        "step": step.get(torch.arange(N)),
        "epoch_before": epoch.get(torch.arange(N)),
        "state": step.state_dict()["scores"],
    }
    # Every rank has read epoch 0's scores before the writer publishes epoch 1's (in training the
    # last step's collectives order this; here a slow rank 1 would otherwise read the new snapshot).
    comm.synchronize()
    epoch.begin_epoch(1)
    res["epoch_after"] = epoch.get(torch.arange(N))
    comm.cleanup()
    torch.save(res, os.path.join(run_dir, f"rank{rank}.pt"))


@pytest.mark.dist
def test_updates_from_two_ranks_all_land(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    expected = _full(INIT)
    expected[[0, 1, 2, 3, 4, 5, 9]] = _rows([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.9])  # row 5: rank 1 wins
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(res["step"], expected), f"rank {rank}"
        assert torch.equal(res["state"], expected), f"rank {rank}"
        assert torch.equal(res["epoch_before"], _full(INIT)), f"rank {rank}"
        assert torch.equal(res["epoch_after"], expected), f"rank {rank}"
