"""Training samplers: identity (PK) batches and plain shuffling, both DDP-sharded.

Both samplers first build one *global* index stream per epoch, the same on
every rank (it depends only on the seed and the epoch), then give each rank
its slice. Their state is ``{"epoch", "position"}`` where ``position`` counts
global indices already consumed in that epoch, so a mid-epoch resume skips
exactly what was trained on, even with a different number of ranks.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class _EpochSampler(Sampler[int], abc.ABC):
    """Shared epoch / position bookkeeping of the samplers below."""

    def __init__(self, seed: int, rank: int, world_size: int) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self._start = 0  # global indices of this epoch to skip (set by load_state_dict)
        self._yielded = 0  # local indices handed out by the current iterator
        self._cached: tuple[int, np.ndarray] | None = None

    # ---- implemented by subclasses

    @abc.abstractmethod
    def _build_global(self, epoch: int) -> np.ndarray:
        """The global index stream of ``epoch`` (identical on every rank)."""

    @abc.abstractmethod
    def _rank_slice(self, remaining: np.ndarray) -> np.ndarray:
        """This rank's part of the not-yet-consumed global stream."""

    @abc.abstractmethod
    def _to_global(self, local: int) -> int:
        """Global indices consumed when this rank consumed ``local`` of its own."""

    def _check_position(self, position: int, total: int) -> None:
        if not 0 <= position <= total:
            raise ValueError(f"sampler position {position} is outside [0, {total}] for epoch {self.epoch}")

    # ---- public API

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """The global stream of an epoch (default: the current one); cached for the current epoch."""
        epoch = self.epoch if epoch is None else epoch
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self._build_global(epoch))
        return self._cached[1]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order is produced; a new epoch starts at position 0.

        Calling it again with the current epoch keeps a position restored by
        ``load_state_dict`` (the usual resume sequence).
        """
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._start = 0
            self._yielded = 0

    def local_indices(self) -> np.ndarray:
        """The indices this rank will yield next (the rest of the current epoch)."""
        return self._rank_slice(self.global_order()[self._start:])

    def __iter__(self) -> Iterator[int]:
        indices = self.local_indices()
        self._yielded = 0
        for index in indices.tolist():
            self._yielded += 1
            yield index
        # A completed pass: iterating again without set_epoch replays the whole epoch.
        self._start = 0
        self._yielded = 0

    def __len__(self) -> int:
        return len(self.local_indices())

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """``{"epoch", "position"}`` for resuming.

        Args:
            consumed: indices of this rank actually trained on from the current
                iterator (batches done x per-rank batch size). Defaults to the
                number yielded so far, which runs ahead of training when the
                DataLoader prefetches, so pass it when workers are used.
        """
        local = self._yielded if consumed is None else int(consumed)
        return {"epoch": self.epoch, "position": self._start + self._to_global(local)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the epoch and skip its already consumed indices."""
        self.epoch = int(state["epoch"])
        position = int(state["position"])
        self._check_position(position, len(self.global_order()))
        self._start = position
        self._yielded = 0


class DistributedRandomSampler(_EpochSampler):
    """``torch.utils.data.DistributedSampler`` semantics over ``range(n)``, resumable.

    The permutation is ``torch.randperm(n)`` seeded with ``seed + epoch``; without
    ``drop_last`` the tail is padded with the first indices so every rank gets
    ``ceil(n / world_size)``; with it the tail is cut to ``floor(n / world_size)``.
    Rank ``r`` takes global positions ``r, r + world_size, ...``.

    With gradient accumulation (``accum_steps=K > 1``, batches of ``batch_size``)
    the stream is dealt to ``K x world_size`` *virtual* ranks the same way, rank
    ``r`` owning virtual ranks ``r*K .. r*K + K - 1`` and yielding, per optimisation
    step, one batch of each in that order. A step's global batch is therefore the
    same set of samples, split the same way, for every (processes, K) of equal
    product — and equals that of ``K x world_size`` processes without accumulation.
    Only whole steps are yielded.

    Args:
        n: dataset length.
        seed: base seed (same on every rank).
        rank: this process' rank.
        world_size: number of ranks.
        shuffle: permute (else ``0..n-1``).
        drop_last: cut instead of pad to a multiple of ``world_size``.
        accum_steps: micro-batches per optimisation step (K).
        batch_size: samples per micro-batch (needed when ``accum_steps > 1``).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = False, *, accum_steps: int = 1, batch_size: int = 0) -> None:
        if accum_steps < 1 or (accum_steps > 1 and batch_size < 1):
            raise ValueError(f"accum_steps ({accum_steps}) must be >= 1, with a positive batch_size "
                             f"({batch_size}) when > 1")
        self.accum_steps, self.batch_size = int(accum_steps), int(batch_size)
        virtual = world_size * accum_steps
        super().__init__(seed, rank, world_size)
        world_size = virtual
        if n < 1:
            raise ValueError(f"DistributedRandomSampler needs a non-empty dataset, got n={n}")
        if drop_last and n < world_size:
            raise ValueError(f"drop_last with {n} samples and {world_size} ranks leaves nothing to sample")
        self.n = int(n)
        self.shuffle = shuffle
        self.drop_last = drop_last
        if drop_last:
            self.num_samples = n // world_size
        else:
            self.num_samples = math.ceil(n / world_size)
        self.total_size = self.num_samples * world_size

    def _build_global(self, epoch: int) -> np.ndarray:
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + epoch)
            indices = torch.randperm(self.n, generator=generator).numpy()
        else:
            indices = np.arange(self.n, dtype=np.int64)
        return _fit(indices, self.total_size)

    def _rank_slice(self, remaining: np.ndarray) -> np.ndarray:
        # After a resume with another world size the rest may not split evenly: pad or cut it.
        k, virtual = self.accum_steps, self.world_size * self.accum_steps
        size = len(remaining)
        if size % virtual:
            size = (size // virtual if self.drop_last else -(-size // virtual)) * virtual
            remaining = _fit(remaining, size)
        if k == 1:
            return remaining[self.rank::self.world_size]
        steps = size // virtual // self.batch_size
        owned = [remaining[v::virtual][:steps * self.batch_size].reshape(steps, self.batch_size)
                 for v in range(self.rank * k, (self.rank + 1) * k)]
        return np.stack(owned, axis=1).reshape(-1)

    def _to_global(self, local: int) -> int:
        if self.accum_steps == 1:
            return local * self.world_size
        # Only whole optimisation steps can be skipped; a partial one is replayed.
        step = self.accum_steps * self.batch_size
        return (local // step) * step * self.world_size


class IdentitySampler(_EpochSampler):
    """PK sampling (IRRA's ``RandomIdentitySampler``), sharded across DDP ranks.

    Per epoch every identity's samples are shuffled and cut into groups of
    ``num_instances`` (the remainder dropped; an identity with fewer samples
    gets one group drawn with replacement). Global batches are then formed as
    in IRRA: repeatedly pick ``batch_size // num_instances`` distinct identities
    at random among those with groups left, and take the next group of each.
    Each global batch of ``batch_size`` indices is split into ``world_size``
    contiguous, equal parts, one per rank.

    Args:
        pids: per-sample identity labels.
        batch_size: *global* batch size (per-rank batch = batch_size // world_size).
        num_instances: samples per identity in a batch (K).
        seed: base seed (same on every rank).
        rank: this process' rank.
        world_size: number of ranks.
        drop_last: drop the identity groups left over when fewer than
            ``batch_size // num_instances`` identities remain (IRRA); otherwise they
            form extra batches, the last padded with the epoch's first indices.
    """

    def __init__(self, pids: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int, num_instances: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        super().__init__(seed, rank, world_size)
        if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
            raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of num_instances "
                             f"({num_instances})")
        if batch_size % world_size:
            raise ValueError(f"global batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        pids = np.asarray(pids.cpu() if isinstance(pids, torch.Tensor) else pids).astype(np.int64).ravel()
        self.batch_size = int(batch_size)
        self.num_instances = int(num_instances)
        self.ids_per_batch = batch_size // num_instances
        self.local_batch_size = batch_size // world_size
        self.drop_last = drop_last
        _, self._group, self._counts = np.unique(pids, return_inverse=True, return_counts=True)
        self._group = self._group.ravel()
        if len(self._counts) < self.ids_per_batch:
            raise ValueError(f"a batch needs {self.ids_per_batch} distinct identities "
                             f"(batch_size {batch_size} / num_instances {num_instances}) but pids hold "
                             f"only {len(self._counts)}")
        if self.local_batch_size % num_instances:
            logger.warning("per-rank batch %d is not a multiple of num_instances %d: some identities are split "
                           "across ranks", self.local_batch_size, num_instances)

    def _identity_groups(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All groups of K sample indices, plus each identity's first group and group count."""
        k = self.num_instances
        counts = self._counts
        members = np.lexsort((rng.random(len(self._group)), self._group))  # by identity, shuffled within
        first_member = np.concatenate([[0], np.cumsum(counts)[:-1]])
        num_groups = np.where(counts >= k, counts // k, 1)
        first_group = np.concatenate([[0], np.cumsum(num_groups)[:-1]])
        owner = np.repeat(np.arange(len(counts)), num_groups)
        rank_in_owner = np.arange(int(num_groups.sum())) - first_group[owner]
        positions = (first_member[owner] + rank_in_owner * k)[:, None] + np.arange(k)[None, :]
        small = counts[owner] < k
        if small.any():
            # Too few samples: K draws with replacement (IRRA's np.random.choice(..., replace=True)).
            draws = np.floor(rng.random((int(small.sum()), k)) * counts[owner[small]][:, None]).astype(np.int64)
            positions[small] = first_member[owner[small]][:, None] + draws
        return members[positions], first_group, num_groups

    def _build_global(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        groups, first_group, num_groups = self._identity_groups(rng)
        p = self.ids_per_batch
        available = list(range(len(num_groups)))
        next_group = first_group.tolist()
        end_group = (first_group + num_groups).tolist()
        order: list[int] = []
        while len(available) >= p:
            m = len(available)
            draws = rng.random(p).tolist()
            # Partial Fisher-Yates: available[:p] becomes a uniform random ordered sample (random.sample).
            for j in range(p):
                k = j + int(draws[j] * (m - j))
                available[j], available[k] = available[k], available[j]
            for j in range(p):
                identity = available[j]
                order.append(next_group[identity])
                next_group[identity] += 1
            for j in range(p - 1, -1, -1):
                if next_group[available[j]] == end_group[available[j]]:
                    last = available.pop()
                    if j < len(available):
                        available[j] = last
        if not self.drop_last and available:
            leftover = [g for identity in available for g in range(next_group[identity], end_group[identity])]
            order.extend(np.asarray(leftover)[rng.permutation(len(leftover))].tolist())
        stream = groups[np.asarray(order, dtype=np.int64)].ravel() if order else np.zeros(0, np.int64)
        return _fit(stream, -(-len(stream) // self.batch_size) * self.batch_size)

    def _rank_slice(self, remaining: np.ndarray) -> np.ndarray:
        part = self.local_batch_size
        batches = remaining.reshape(-1, self.batch_size)
        return batches[:, self.rank * part:(self.rank + 1) * part].reshape(-1)

    def _to_global(self, local: int) -> int:
        # Only whole global batches can be skipped; a partial one is replayed.
        return (local // self.local_batch_size) * self.batch_size

    def _check_position(self, position: int, total: int) -> None:
        super()._check_position(position, total)
        if position % self.batch_size:
            raise ValueError(f"IdentitySampler position {position} is not a multiple of the global batch size "
                             f"{self.batch_size}")


def _fit(indices: np.ndarray, size: int) -> np.ndarray:
    """Cut ``indices`` to ``size`` or pad it by cycling from its start (DistributedSampler padding)."""
    indices = np.asarray(indices, dtype=np.int64)
    if size <= len(indices):
        return indices[:size]
    if len(indices) == 0:
        raise ValueError("cannot pad an empty index stream")
    return np.resize(indices, size)
