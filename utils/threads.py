"""How many intra-op threads torch uses: the cores this process may use, shared out.

torch's default is one thread per core of the machine, whoever else runs on it.
On a shared machine, or with DataLoader workers and several ranks per node, that
oversubscribes the cores: spinning OpenMP threads then wait for each other and a
step takes many times longer (one demo epoch: 14 s idle, 175-350 s beside two
busy processes with the default, 10-11 s with one thread).

`choose_threads` is the decision, a pure function of what it is given;
`apply_threads` reads the machine (cores, cgroup quota, and how many other
processes are running right now), decides, calls `torch.set_num_threads` and
logs the choice with its reason. Cores that other processes keep busy are not
counted: beside two busy processes on two cores, one thread runs an epoch 3-5x
faster than two (docs/benchmarks.md, "Intra-op threads").
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["ThreadChoice", "available_cores", "cgroup_cpu_quota", "choose_threads", "apply_threads",
           "other_running"]

logger = logging.getLogger(__name__)

#: cgroup v2 CPU limit of this process's container: "<quota> <period>" or "max <period>".
CPU_MAX = "/sys/fs/cgroup/cpu.max"
#: Linux's load figures; the 4th field is "<runnable now>/<total>" scheduling entities.
LOADAVG = "/proc/loadavg"


@dataclass(frozen=True)
class ThreadChoice:
    """The number of torch intra-op threads and why, e.g. "8 cores available, 1 rank, 4 data workers"."""

    threads: int
    reason: str

    def __str__(self) -> str:
        return f"torch threads: {self.threads} ({self.reason})"


def cgroup_cpu_quota(path: str = CPU_MAX) -> float | None:
    """The cgroup's CPU limit in cores (e.g. 2.5), or None when there is none or it cannot be read."""
    try:
        with open(path, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        value = int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def other_running(path: str = LOADAVG, samples: int = 5, interval_s: float = 0.02) -> int | None:
    """Processes (threads) other than this one that are runnable now: the median of a few
    readings of the kernel's instantaneous count, less the reader itself; None where unknown.

    An instantaneous count, not the 1-minute load average, which still holds the work of
    whatever ran just before (an install, a previous stage) for minutes after it ended.
    """
    counts = []
    for i in range(samples):
        try:
            with open(path, encoding="ascii") as f:
                counts.append(int(f.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, sorted(counts)[len(counts) // 2] - 1)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def choose_threads(*, cores: int, quota: float | None = None, local_ranks: int = 1, data_workers: int = 0,
                   busy: int | None = None, configured: int = 0,
                   env: Mapping[str, str] | None = None) -> ThreadChoice:
    """Intra-op threads for one process, and the reason.

    An explicit `configured` count (config key `num_threads`) wins, then a valid
    `OMP_NUM_THREADS` in `env`; otherwise the usable cores (`cores`, capped by a
    cgroup `quota` rounded down, less the cores that `busy` other processes occupy)
    are split among the `local_ranks` processes of this machine, and each of a
    process's `data_workers` takes one core of its share. At least one thread.

    Args:
        cores: CPUs in this process's affinity mask.
        quota: cgroup CPU limit in cores, or None.
        local_ranks: Processes of this run on this machine (LOCAL_WORLD_SIZE).
        data_workers: DataLoader worker processes per rank that will run beside the compute.
        busy: Other processes running now (`other_running`); the run's own other ranks,
            which start at the same time, are not counted against it. None = unknown.
        configured: Threads asked for explicitly; 0 = decide.
        env: The environment (`os.environ` by default).
    """
    if configured > 0:
        return ThreadChoice(configured, "set by num_threads")
    env = os.environ if env is None else env
    ignored = ""
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if omp.isdigit() and int(omp) > 0:
            return ThreadChoice(int(omp), f"OMP_NUM_THREADS={omp}")
        ignored = f"; OMP_NUM_THREADS={omp!r} ignored, not a positive integer"
    usable = max(1, cores)
    limit = ""
    if quota is not None and math.floor(quota) < usable:
        usable = max(1, math.floor(quota))
        limit = f" (cgroup CPU quota {quota:g} of {_plural(cores, 'core')})"
    ranks, workers = max(1, local_ranks), max(0, data_workers)
    others = max(0, (busy or 0) - (ranks - 1))
    if others and usable > 1:
        free = max(1, usable - others)
        limit += f" ({usable - free} of {_plural(usable, 'core')} kept busy by other processes)"
        usable = free
    threads = max(1, usable // ranks - workers)
    reason = (f"{_plural(usable, 'core')} available{limit}, {_plural(ranks, 'rank')}, "
              f"{_plural(workers, 'data worker')}{ignored}")
    return ThreadChoice(threads, reason)


def apply_threads(configured: int = 0, *, data_workers: int = 0, local_ranks: int | None = None) -> ThreadChoice:
    """Choose the intra-op threads for this machine, set them and log the choice.

    Args:
        configured: The config's `num_threads` (0 = decide).
        data_workers: DataLoader workers per rank (the config's `data.num_workers`).
        local_ranks: Processes on this machine; default torchrun's LOCAL_WORLD_SIZE (1 without it).
    """
    if local_ranks is None:
        try:
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        except ValueError:
            local_ranks = 1
    busy = other_running() if configured <= 0 else None
    choice = choose_threads(cores=available_cores(), quota=cgroup_cpu_quota(), local_ranks=local_ranks,
                            data_workers=data_workers, busy=busy, configured=configured)
    torch.set_num_threads(choice.threads)
    logger.info("%s", choice)
    return choice
