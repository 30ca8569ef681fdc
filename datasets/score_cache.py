"""The GASS score cache: one float32 score vector per training caption (METHOD §5).

Layout on disk (all in ``run_dir``)::

    score_cache.npy            live scores, [N, L] float32 .npy, written in place
    score_cache.snapshot.npy   scores as they were at the start of the epoch
                               ("epoch" policy only), replaced atomically
    score_cache.lock           flock(2) file guarding whole-row reads/writes

One truth for every process of a node. Only one process per node (the node's
local rank 0, the *writer*) ever writes these files. :meth:`ScoreCache.update`
is a collective call: every rank all-gathers its ``(indices, scores)``, so the
writer holds every rank's updates and no update is lost. Readers (DataLoader
workers of every rank, forked or spawned) map the files read-only.

Multi-node: updates reach every rank, so each node's writer keeps a complete
copy. When there is more than one node the file names get a ``.node<k>``
suffix (``score_cache.node1.npy``), so the copies never collide whether
``run_dir`` is node-local or on a shared filesystem.

Refresh policies:

* ``"epoch"`` (reference behaviour): masks drawn during epoch e use the scores
  as they were when epoch e started. Updates go to the live file;
  :meth:`begin_epoch` copies it to a temporary file, fsyncs it and renames it
  over the snapshot. Readers only ever map a complete, immutable snapshot;
  before every read they ``stat`` the snapshot path and re-map it when the
  file identity changed, so even persistent workers switch at the epoch start.
* ``"step"``: readers read the live file and see each update once the writer
  has stored it (DataLoader prefetching still makes them a few steps stale).
  A torn row (half old, half new) is impossible: the writer stores rows under
  an exclusive ``flock`` and readers copy rows under a shared one; the lock
  calls are system calls, hence also memory barriers between the processes.

Within one :meth:`update` call, when the same caption index appears more than
once (across ranks or within a rank), the occurrence from the highest rank
wins, and within a rank the last occurrence wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils import comm
from utils.host_sync import HostCopy

logger = logging.getLogger(__name__)

__all__ = ["REFRESH_POLICIES", "ScoreCache"]

REFRESH_POLICIES = ("epoch", "step")
_FORMAT = "gass_score_cache"
_FORMAT_VERSION = 1
# Rows copied per chunk when loading a checkpoint, to bound the temporary memory.
_LOAD_CHUNK_ROWS = 1 << 16


def _node_suffix() -> str:
    """File-name suffix that keeps the nodes' copies apart in a multi-node run."""
    if comm.get_local_size() >= comm.get_world_size():
        return ""
    node = int(os.environ.get("GROUP_RANK", comm.get_rank() // comm.get_local_size()))
    return f".node{node}"


def _fsync_dir(path: Path) -> None:
    """Persist a rename by fsyncing the directory that holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ScoreCache:
    """Per-caption GASS scores shared by all workers and ranks of a node.

    Constructing, :meth:`update`, :meth:`begin_epoch` and
    :meth:`load_state_dict` are collective under DDP (every rank calls them,
    in the same order); :meth:`get`, :meth:`state_dict` and :meth:`save` are
    local. Pickling keeps only paths and sizes: an unpickled copy (spawned
    worker) or a forked copy is a read-only view that re-opens the files
    lazily in its own process.

    Args:
        run_dir: directory for the cache files (created if missing).
        num_captions: number of training captions N (row i belongs to caption i).
        context_length: scores per caption L (the tokenizer context, 77).
        init_value: initial score of every token (0.85 in the reference).
        refresh: ``"epoch"`` or ``"step"`` (module docstring).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        num_captions: int,
        context_length: int = 77,
        *,
        init_value: float = 0.85,
        refresh: str = "epoch",
    ) -> None:
        if refresh not in REFRESH_POLICIES:
            raise ValueError(f"ScoreCache: refresh={refresh!r}; expected one of {list(REFRESH_POLICIES)}")
        if num_captions <= 0 or context_length <= 0:
            raise ValueError(
                f"ScoreCache: num_captions and context_length must be positive, got {num_captions}, {context_length}"
            )
        self.run_dir = Path(run_dir)
        self.num_captions = int(num_captions)
        self.context_length = int(context_length)
        self.init_value = float(init_value)
        self.refresh = refresh
        self.epoch: int | None = None
        suffix = _node_suffix()
        self.live_path = self.run_dir / f"score_cache{suffix}.npy"
        self.snapshot_path = self.run_dir / f"score_cache{suffix}.snapshot.npy"
        self.lock_path = self.run_dir / f"score_cache{suffix}.lock"
        self._owner_pid: int | None = os.getpid()
        self._pending: HostCopy | None = None  # an update not yet stored (`update(..., wait=False)`)
        self._is_writer = comm.get_local_rank() == 0
        self._reset_handles()
        if self._is_writer:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock_path.touch()
            live = np.lib.format.open_memmap(self.live_path, mode="w+", dtype=np.float32, shape=self.shape)
            live[:] = self.init_value
            live.flush()
            self._live = live
            if refresh == "epoch":
                self._write_snapshot(live, tag="init")
            logger.info(
                "score cache %s: %d x %d float32, init %.3f, refresh=%s",
                self.live_path,
                self.num_captions,
                self.context_length,
                self.init_value,
                refresh,
            )
        # Readers on other ranks may open the files only once the writer created them.
        comm.synchronize()

    # ----------------------------------------------------------------- basics
    @property
    def shape(self) -> tuple[int, int]:
        """(num_captions, context_length)."""
        return (self.num_captions, self.context_length)

    def __len__(self) -> int:
        return self.num_captions

    def __repr__(self) -> str:
        return (
            f"ScoreCache({str(self.live_path)!r}, shape={self.shape}, refresh={self.refresh!r}, epoch={self.epoch})"
        )

    def _reset_handles(self) -> None:
        self._pid = os.getpid()
        self._live: np.ndarray | None = None
        self._snapshot: np.ndarray | None = None
        self._snapshot_id: tuple[int, ...] | None = None
        self._lock_fd: int | None = None

    def _writes_here(self) -> bool:
        """True only in the writer's own process (never in its forked workers)."""
        return self._is_writer and self._owner_pid == os.getpid()

    def _require_owner(self, what: str) -> None:
        if self._owner_pid != os.getpid():
            raise RuntimeError(
                f"ScoreCache.{what}: this is a read-only copy (DataLoader worker or unpickled); "
                "call it from the training process that constructed the cache"
            )

    def _check_process(self) -> None:
        """Drop handles inherited through fork; the child re-opens its own."""
        if self._pid == os.getpid():
            return
        if self._lock_fd is not None:
            # Closing the child's duplicate does not release the parent's lock.
            os.close(self._lock_fd)
        self._reset_handles()

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = {
            key: getattr(self, key)
            for key in (
                "run_dir",
                "num_captions",
                "context_length",
                "init_value",
                "refresh",
                "epoch",
                "live_path",
                "snapshot_path",
                "lock_path",
            )
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pending = None
        self._owner_pid = None
        self._is_writer = False
        self._reset_handles()

    # ------------------------------------------------------------------- files
    def _open_npy(self, path: Path) -> np.ndarray:
        try:
            array = np.load(path, mmap_mode="r")
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"ScoreCache: {path} does not exist; the writer (local rank 0) creates it when the cache "
                "is constructed"
            ) from err
        if array.shape != self.shape or array.dtype != np.float32:
            raise ValueError(
                f"ScoreCache: {path} holds {array.dtype} {array.shape}, expected float32 {self.shape}"
            )
        return array

    def _live_view(self) -> np.ndarray:
        self._check_process()
        if self._live is None:
            self._live = self._open_npy(self.live_path)
        return self._live

    def _snapshot_view(self) -> np.ndarray:
        self._check_process()
        st = os.stat(self.snapshot_path)
        identity = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        if self._snapshot is None or identity != self._snapshot_id:
            # If the writer swaps the file between stat and open we map the newer
            # snapshot under the older identity; the next read re-maps it again.
            self._snapshot = self._open_npy(self.snapshot_path)
            self._snapshot_id = identity
        return self._snapshot

    @contextlib.contextmanager
    def _locked(self, shared: bool) -> Iterator[None]:
        self._check_process()
        if self._lock_fd is None:
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _write_snapshot(self, source: np.ndarray, tag: str) -> None:
        """Publish ``source`` as the snapshot: temp file, fsync, atomic rename."""
        tmp = self.snapshot_path.with_name(f"{self.live_path.stem}.{tag}.tmp.npy")
        with open(tmp, "wb") as f:
            np.save(f, source)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)
        _fsync_dir(self.run_dir)

    # ----------------------------------------------------------------- reading
    def _as_rows(self, indices: int | Sequence[int] | np.ndarray | torch.Tensor, what: str) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        rows = np.asarray(indices)
        if rows.size == 0:
            return np.zeros(0, dtype=np.int64)
        if rows.dtype.kind not in "iu":
            raise TypeError(f"ScoreCache.{what}: caption indices must be integers, got dtype {rows.dtype}")
        rows = rows.astype(np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_captions):
            raise IndexError(
                f"ScoreCache.{what}: caption index out of range [0, {self.num_captions}): "
                f"min {rows.min()}, max {rows.max()}"
            )
        return rows

    def get(self, indices: int | Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores of the given captions under the refresh policy.

        Args:
            indices: one caption index, or a 1-D collection of them.

        Returns:
            float32 tensor [L] for a single int index, else [b, L] (a copy).
        """
        single = isinstance(indices, (int, np.integer)) or (
            isinstance(indices, (torch.Tensor, np.ndarray)) and indices.ndim == 0
        )
        rows = self._as_rows(indices, "get")
        self.flush()
        if self.refresh == "epoch":
            values = np.asarray(self._snapshot_view()[rows])
        else:
            live = self._live_view()
            with self._locked(shared=True):
                values = np.asarray(live[rows])
        out = torch.from_numpy(values)
        return out[0] if single else out

    # ----------------------------------------------------------------- writing
    def update(self, indices: torch.Tensor, scores: torch.Tensor, *, applied: torch.Tensor | None = None,
               wait: bool = True) -> None:
        """Store new scores (collective: every rank calls it, possibly with b = 0).

        The writer stores the gathered rows before returning; other ranks
        return right after the gather, so a "step" reader elsewhere may still
        see the previous (complete) row for a moment.

        With ``wait=False`` the host does not wait for the device: the gathered rows are
        copied to the host in the background and stored at the next `update`, `get`,
        `flush`, `begin_epoch` or `state_dict` (so a "step" reader sees them one update
        later, and an out-of-range index is reported there).

        Args:
            indices: [b] caption indices of this rank's samples.
            scores: [b, L] their new scores (any float dtype and device; under
                NCCL the gather runs on this rank's GPU).
            applied: A boolean (on any device, the same on every rank): store the rows
                only if true (a training step skipped on the device leaves the cache as it was).
            wait: Store before returning (see above).
        """
        self._require_owner("update")
        self.flush()
        indices = torch.as_tensor(indices).reshape(-1)
        scores = torch.as_tensor(scores).detach()
        if scores.shape != (indices.shape[0], self.context_length):
            raise ValueError(
                f"ScoreCache.update: expected scores [{indices.shape[0]}, {self.context_length}] for "
                f"{indices.shape[0]} indices, got {tuple(scores.shape)}"
            )
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(f"ScoreCache.update: caption indices must be integers, got {indices.dtype}")
        # One gather for both: float64 holds every index below 2**53 and every float32 exactly.
        packed = torch.cat(
            [indices.to(scores.device, torch.float64, non_blocking=True).unsqueeze(1), scores.to(torch.float64)],
            dim=1,
        )
        pending = {"rows": comm.all_gather_tensor(packed)}
        if applied is not None:
            pending["applied"] = torch.as_tensor(applied).reshape(1)
        self._pending = HostCopy(pending)
        if wait:
            self.flush()

    def flush(self) -> None:
        """Store the rows of an `update(..., wait=False)` still on their way (waits for their copy only)."""
        if self._pending is None:
            return
        if self._owner_pid != os.getpid():  # a forked reader (DataLoader worker): the rows are the owner's
            self._pending = None
            return
        pending, self._pending = self._pending.get(), None
        if "applied" in pending and not pending["applied"].all():
            return
        gathered = pending["rows"]
        # Every rank validates the gathered rows, so a bad index fails on all ranks alike.
        rows = self._as_rows(gathered[:, 0].astype(np.int64), "update")
        if not self._writes_here():
            return
        values = gathered[:, 1:].astype(np.float32)
        # Keep the last occurrence of each row: highest rank, then latest position.
        _, last_from_end = np.unique(rows[::-1], return_index=True)
        keep = rows.shape[0] - 1 - last_from_end
        live = self._live_view()
        with self._locked(shared=False):
            live[rows[keep]] = values[keep]

    def begin_epoch(self, epoch: int) -> None:
        """Mark the start of ``epoch`` (collective; call before iterating its loader).

        Under the "epoch" policy the writer publishes the live scores as the
        snapshot every reader uses during this epoch, so every rank must be done
        reading the previous epoch's scores (in training, the previous epoch's last
        step is a collective that orders this). Calling it again for the
        current epoch keeps the snapshot: the epoch's masks must all come from
        the scores at its start, also after resuming mid-epoch from a checkpoint.
        """
        self._require_owner("begin_epoch")
        self.flush()
        if self.epoch is not None and int(epoch) == self.epoch:
            logger.debug("score cache: epoch %d already begun; snapshot kept", epoch)
        elif self._writes_here() and self.refresh == "epoch":
            live = self._live_view()
            self._write_snapshot(live, tag=f"epoch{epoch}")
        self.epoch = int(epoch)
        comm.synchronize()

    # ------------------------------------------------------------- checkpoints
    def state_dict(self, include_snapshot: bool = True) -> dict[str, Any]:
        """Copy of the cache for a checkpoint.

        Args:
            include_snapshot: also store the current epoch snapshot ("epoch"
                policy), needed to resume exactly in the middle of an epoch.

        Returns:
            ``scores`` [N, L] float32 tensor, ``snapshot`` (tensor or None),
            ``epoch``, ``refresh``, ``format``, ``version``. On a rank other than
            a writer it may lag the writer by one in-flight update.
        """
        self.flush()
        live = self._live_view()
        with self._locked(shared=True):
            scores = torch.from_numpy(np.array(live))
        snapshot = None
        if include_snapshot and self.refresh == "epoch":
            snapshot = torch.from_numpy(np.array(self._snapshot_view()))
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "scores": scores,
            "snapshot": snapshot,
            "epoch": self.epoch,
            "refresh": self.refresh,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (collective under DDP).

        Raises:
            ValueError: not a score-cache state, or a shape different from this cache.
        """
        self._require_owner("load_state_dict")
        self._pending = None  # superseded by the restored scores
        if state.get("format") != _FORMAT or "scores" not in state:
            raise ValueError(f"ScoreCache.load_state_dict: not a score-cache state (keys {sorted(state)})")
        scores = torch.as_tensor(state["scores"])
        snapshot = state.get("snapshot")
        for name, value in (("scores", scores), ("snapshot", snapshot)):
            if value is not None and tuple(value.shape) != self.shape:
                raise ValueError(
                    f"ScoreCache.load_state_dict: {name} has shape {tuple(value.shape)}, expected {self.shape} "
                    "(different number of training captions or context length?)"
                )
        if state.get("refresh") != self.refresh:
            logger.warning(
                "score cache: checkpoint was written with refresh=%s, continuing with refresh=%s",
                state.get("refresh"),
                self.refresh,
            )
        if self._writes_here():
            live = self._live_view()
            with self._locked(shared=False):
                for start in range(0, self.num_captions, _LOAD_CHUNK_ROWS):
                    stop = min(start + _LOAD_CHUNK_ROWS, self.num_captions)
                    live[start:stop] = scores[start:stop].to("cpu", torch.float32).numpy()
            live.flush()
            if self.refresh == "epoch":
                source = live if snapshot is None else torch.as_tensor(snapshot).to("cpu", torch.float32).numpy()
                self._write_snapshot(source, tag="restore")
        self.epoch = state.get("epoch")
        comm.synchronize()

    def save(self, path: str | os.PathLike, include_snapshot: bool = True) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (temp file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(include_snapshot=include_snapshot), tmp)
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> None:
        """Restore a cache written by :meth:`save` (collective under DDP)."""
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        self.load_state_dict(state)
