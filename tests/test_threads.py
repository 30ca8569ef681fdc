"""utils/threads.py: the intra-op thread decision, the cgroup quota reader, and apply_threads."""

from __future__ import annotations

import logging

import pytest
import torch

from utils import threads
from utils.threads import ThreadChoice, cgroup_cpu_quota, choose_threads

NO_ENV: dict[str, str] = {}


@pytest.fixture
def keep_threads():
    """Restore torch's thread count (process-wide) after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kwargs, env, threads, reason", [
    # cores alone
    (dict(cores=8), NO_ENV, 8, "8 cores available, 1 rank, 0 data workers"),
    (dict(cores=1), NO_ENV, 1, "1 core available, 1 rank, 0 data workers"),
    # each data worker takes a core of its rank's share
    (dict(cores=8, data_workers=4), NO_ENV, 4, "8 cores available, 1 rank, 4 data workers"),
    (dict(cores=8, data_workers=1), NO_ENV, 7, "8 cores available, 1 rank, 1 data worker"),
    (dict(cores=2, data_workers=8), NO_ENV, 1, "2 cores available, 1 rank, 8 data workers"),
    # ranks on this machine split the cores
    (dict(cores=16, local_ranks=4), NO_ENV, 4, "16 cores available, 4 ranks, 0 data workers"),
    (dict(cores=16, local_ranks=4, data_workers=2), NO_ENV, 2, "16 cores available, 4 ranks, 2 data workers"),
    (dict(cores=4, local_ranks=8), NO_ENV, 1, "4 cores available, 8 ranks, 0 data workers"),
    # a cgroup quota caps the cores (rounded down, at least one); a quota above the cores changes nothing
    (dict(cores=16, quota=2.5), NO_ENV, 2, "2 cores available (cgroup CPU quota 2.5 of 16 cores), 1 rank"),
    (dict(cores=16, quota=0.5), NO_ENV, 1, "1 core available (cgroup CPU quota 0.5 of 16 cores)"),
    (dict(cores=4, quota=8.0), NO_ENV, 4, "4 cores available, 1 rank, 0 data workers"),
    # cores that other processes keep busy are not counted (the run's own other ranks are not "other")
    (dict(cores=2, busy=2), NO_ENV, 1, "1 core available (1 of 2 cores kept busy by other processes), 1 rank"),
    (dict(cores=2, busy=1), NO_ENV, 1, "1 core available (1 of 2 cores kept busy by other processes)"),
    (dict(cores=2, busy=0), NO_ENV, 2, "2 cores available, 1 rank, 0 data workers"),
    (dict(cores=8, busy=3, data_workers=2), NO_ENV, 3, "5 cores available (3 of 8 cores kept busy"),
    (dict(cores=16, busy=3, local_ranks=4), NO_ENV, 4, "16 cores available, 4 ranks"),
    (dict(cores=16, busy=7, local_ranks=4), NO_ENV, 3, "12 cores available (4 of 16 cores kept busy"),
    (dict(cores=1, busy=5), NO_ENV, 1, "1 core available, 1 rank"),
    (dict(cores=16, quota=4.0, busy=2), NO_ENV, 2, "2 cores available (cgroup CPU quota 4 of 16 cores) (2 of 4"),
    (dict(cores=8, busy=8, configured=4), NO_ENV, 4, "set by num_threads"),
    (dict(cores=8, busy=8), {"OMP_NUM_THREADS": "2"}, 2, "OMP_NUM_THREADS=2"),
    # OMP_NUM_THREADS wins over the automatic choice; an unusable value is ignored and said so
    (dict(cores=8, data_workers=4), {"OMP_NUM_THREADS": "1"}, 1, "OMP_NUM_THREADS=1"),
    (dict(cores=8), {"OMP_NUM_THREADS": "0"}, 8, "OMP_NUM_THREADS='0' ignored"),
    (dict(cores=8), {"OMP_NUM_THREADS": "two"}, 8, "OMP_NUM_THREADS='two' ignored"),
    (dict(cores=8), {"OMP_NUM_THREADS": ""}, 8, "8 cores available, 1 rank, 0 data workers"),
    # an explicit num_threads wins over everything
    (dict(cores=8, configured=3), {"OMP_NUM_THREADS": "1"}, 3, "set by num_threads"),
    (dict(cores=1, configured=6, data_workers=4), NO_ENV, 6, "set by num_threads"),
])
def test_choose_threads_decision_table(kwargs, env, threads, reason):
    choice = choose_threads(env=env, **kwargs)
    assert choice.threads == threads
    assert reason in choice.reason


def test_choice_reads_as_one_log_line():
    choice = choose_threads(cores=8, data_workers=4, env=NO_ENV)
    assert str(choice) == "torch threads: 4 (8 cores available, 1 rank, 4 data workers)"


@pytest.mark.parametrize("text, quota", [
    ("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("0 100000", None),
    ("garbage", None), ("100000 0", None),
])
def test_cgroup_quota(tmp_path, text, quota):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    assert cgroup_cpu_quota(str(path)) == quota


def test_cgroup_quota_without_the_file(tmp_path):
    assert cgroup_cpu_quota(str(tmp_path / "absent")) is None


def test_apply_sets_torch_threads_and_logs_the_choice(monkeypatch, caplog, keep_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(threads, "other_running", lambda: 1)  # the run's other rank
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="utils.threads"):
        choice = threads.apply_threads(0, data_workers=1)
    assert choice == ThreadChoice(2, "6 cores available, 2 ranks, 1 data worker")
    assert torch.get_num_threads() == 2
    assert [r.getMessage() for r in caplog.records] == ["torch threads: 2 (6 cores available, 2 ranks, 1 data worker)"]

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.apply_threads(0, data_workers=1).threads == 1 and torch.get_num_threads() == 1
    assert threads.apply_threads(3).threads == 3 and torch.get_num_threads() == 3


def test_available_cores_is_this_process_affinity():
    assert 1 <= threads.available_cores()


def test_apply_leaves_the_cores_other_processes_keep_busy(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    monkeypatch.setattr(threads, "cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "other_running", lambda: 2)
    assert threads.apply_threads(0).threads == 1 and torch.get_num_threads() == 1
    monkeypatch.setattr(threads, "other_running", lambda: 0)
    assert threads.apply_threads(0).threads == 2 and torch.get_num_threads() == 2
    monkeypatch.setattr(threads, "other_running", lambda: None)  # not Linux: cores alone
    assert threads.apply_threads(0).threads == 2


@pytest.mark.parametrize("readings, others", [
    (["0.50 0.40 0.30 1/120 999"], 0),                       # only the reader runs
    (["2.9 2.0 1.0 3/140 999"], 2),                          # two others
    (["1 1 1 5/9 1", "1 1 1 1/9 1", "1 1 1 3/9 1"], 2),      # the median of the readings, less the reader
])
def test_other_running_reads_the_instantaneous_count(tmp_path, monkeypatch, readings, others):
    path = tmp_path / "loadavg"
    queue = list(readings)

    def next_reading(seconds):  # each pause moves to the next reading
        if len(queue) > 1:
            queue.pop(0)
            path.write_text(queue[0])

    path.write_text(queue[0])
    monkeypatch.setattr(threads.time, "sleep", next_reading)
    assert threads.other_running(str(path), samples=len(readings)) == others


@pytest.mark.parametrize("text", ["", "1 2 3", "1 2 3 x/y 5"])
def test_other_running_is_unknown_when_unreadable(tmp_path, text):
    path = tmp_path / "loadavg"
    path.write_text(text)
    assert threads.other_running(str(path)) is None
    assert threads.other_running(str(tmp_path / "absent")) is None
