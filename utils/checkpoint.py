"""Training checkpoints: atomic writes, exact resume, graceful shutdown.

A checkpoint is one ``<run_dir>/<name>.pth`` file (``last``, ``best_<dataset>``)
holding everything needed to continue a run as if it had never stopped: model,
optimizer, LR scheduler, AMP grad scaler, any named state the run adds (e.g. a
method's caches), every rank's RNG state, the epoch/step counters, the best metrics so far and the resolved
config. Only plain containers, numbers, strings and tensors go in, so the file
loads with ``torch.load(weights_only=True)``; anything else is refused when
*saving*, not discovered at resume time.

Checkpoints are untrusted input: :func:`read_checkpoint` loads them
weights-only and refuses a file that needs arbitrary unpickling unless the
caller explicitly trusts it. A file that is not a torch.save checkpoint at all
(text, random bytes, a bare pickle) or is truncated is recognised before any
unpickling and reported as such, never as "needs trust", and is not unpickled
even when trusted. What the model's keys must be is the model's business
(``Checkpointer(load_weights=...)``, :mod:`model.weights`).

Files are written atomically (temp file in the same directory, fsync, rename,
fsync of the directory): a crash or kill at any moment leaves either the old
or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import random
import re
import signal
import socket
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from utils import comm
from utils.device import unwrap_model
from utils.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointReadError",
    "FORMAT_VERSION",
    "SAFE_ON_RESUME",
    "ResumeConfigError",
    "ResumeCheckpointError",
    "check_resume_config",
    "Checkpointer",
    "GracefulExit",
    "atomic_save",
    "atomic_write",
    "capture_rng_state",
    "find_resume",
    "load_model_state",
    "read_checkpoint",
    "restore_rng_state",
    "to_weights_only_safe",
    "unwrap_model",
]

FORMAT_VERSION = 1
#: Top-level keys of the checkpoint format (a checkpointable may not take one of these names).
RESERVED_KEYS = ("format_version", "model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng",
                 "best_metrics", "config", "num_classes", "extra")
_TMP_SUFFIX = ".tmp"
# Leaf types that torch's weights-only unpickler reconstructs.
_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray,
                torch.Tensor, torch.Size, torch.dtype, torch.device)
_MAX_CONFIG_CHANGES_LOGGED = 20


# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: fsync the directory entry (unsupported on some filesystems)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        logger.debug("fsync of directory %s not supported: %s", directory, err)
    finally:
        os.close(fd)


def _tmp_prefix(target: Path) -> str:
    # pid and host in the name let a later save recognise temp files of dead writers.
    return f".{target.name}.{os.getpid()}@{socket.gethostname()}."


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files of `target` left by a killed writer on this host.

    A SIGKILL (OOM killer, preemption) during a save leaves a temp file as large
    as the checkpoint; without this, each such kill would leak one.
    """
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)@(.+)\.[^.]+" + re.escape(_TMP_SUFFIX))
    host = socket.gethostname()
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or match.group(2) != host:
            continue
        pid = int(match.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # the writer is alive: its save may be in progress
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, owned by another user
        try:
            os.remove(target.parent / name)
            logger.info("removed stale temporary checkpoint %s (writer pid %d is gone)", name, pid)
        except OSError as err:
            logger.debug("could not remove stale temp file %s: %s", name, err)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace `path` with what `write(file)` writes, atomically.

    The data goes to a temp file in the same directory, which is flushed,
    fsynced and renamed onto `path`; the directory is then fsynced. If `write`
    (or anything after it) fails, the temp file is removed and `path` keeps its
    previous content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)
    fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=_TMP_SUFFIX, dir=target.parent)
    try:
        # mkstemp creates the file owner-only; give it the permissions a plain open() would
        # (checkpoints in a shared folder stay readable by the group, as the umask says).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-save must not leave the temp file.
        try:
            os.remove(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that never leaves a torn or half-written file (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


# --------------------------------------------------------------------------- reading


class CheckpointReadError(UserInputError, RuntimeError):
    """A checkpoint file that cannot be read: not a checkpoint, corrupt, or untrusted."""


class CheckpointNotFoundError(CheckpointReadError, FileNotFoundError):
    """No checkpoint file at the given path."""


# The legacy (pre-zip) torch.save format starts with this number pickled on its own.
_LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER
# Bytes read to recognise a file's format (the legacy header pickle is 15 bytes long).
_SNIFF_BYTES = 4096


def read_checkpoint(path: str | os.PathLike, *, trust: bool = False) -> Any:
    """Load a checkpoint file on the CPU, weights-only unless `trust` is given.

    Raises:
        CheckpointNotFoundError: no such file (also a FileNotFoundError).
        CheckpointReadError: the file is not a torch.save checkpoint, is truncated or
            corrupt, or needs full unpickling and `trust` is False (also a RuntimeError).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path} is a directory, expected a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    fmt = _checkpoint_format(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not _main_pickle_is_whole(path, fmt):
            raise _corrupt(path, err) from err
        if not trust:
            raise CheckpointReadError(
                f"{path} contains objects that need arbitrary unpickling, which can run code. "
                "Load it only if you trust its source: set train.trust_checkpoints=true "
                f"(or pass --trust to the tools). Details: {_blocked_detail(err)}"
            ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise _corrupt(path, err) from err
    logger.warning("loading %s with full unpickling (trusted by the user)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ImportError) as err:
        raise CheckpointReadError(f"cannot read checkpoint {path}: it holds an object whose class cannot be "
                                  f"imported here ({err})") from err
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise _corrupt(path, err) from err


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (just the type when the message is empty)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _corrupt(path: str, err: BaseException | str) -> CheckpointReadError:
    detail = err if isinstance(err, str) else _first_line(err)
    return CheckpointReadError(f"cannot read checkpoint {path}: truncated or corrupt ({detail})")


def _not_a_checkpoint(path: str, what: str) -> CheckpointReadError:
    return CheckpointReadError(f"{path} is not a PyTorch checkpoint ({what}); expected a file written by torch.save")


def _blocked_detail(err: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that names what was blocked."""
    lines = str(err).splitlines()
    named = [line.strip() for line in lines if "GLOBAL" in line or "nsupported" in line]
    return named[0] if named else _first_line(err)


def _read_pickles(stream: io.BufferedIOBase, count: int) -> list[list[tuple[str, Any]]]:
    """Opcode names and arguments of the next `count` pickles, parsed without executing anything.

    Raises:
        ValueError: the stream does not hold `count` whole pickles.
    """
    pickles = []
    for _ in range(count):
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(stream)]
        pickles.append(ops)
    return pickles


def _is_legacy_header(head: bytes) -> bool:
    """Whether `head` starts with the magic-number pickle of the legacy torch.save format."""
    try:
        (ops,) = _read_pickles(io.BytesIO(head), 1)
    except ValueError:
        return False
    values = [arg for name, arg in ops if name not in ("PROTO", "FRAME", "STOP")]
    return values == [_LEGACY_MAGIC]


def _describe(head: bytes) -> str:
    """What a file that is no checkpoint looks like, from its first bytes."""
    try:
        _read_pickles(io.BytesIO(head), 1)
        return "a Python pickle, but not in torch.save's format"
    except ValueError:
        pass
    chunk = head[:80]
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the end of the chunk is still text.
        text = chunk[:err.start].decode("utf-8") if err.start >= len(chunk) - 3 else ""
    if text and all(c.isprintable() or c in "\t\r\n" for c in text):
        return f"it is text, starting {text.strip()[:40]!r}"
    return f"unrecognised content starting with {head[:8]!r}"


def _checkpoint_format(path: str) -> str:
    """``"zip"`` (torch.save since PyTorch 1.6) or ``"legacy"``, judged without unpickling.

    Raises:
        CheckpointReadError: the file is not a torch.save checkpoint, or is a truncated zip.
    """
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if not head:
        raise _not_a_checkpoint(path, "the file is empty")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
            raise _corrupt(path, f"a zip archive that cannot be opened: {err}") from err
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise _not_a_checkpoint(path, f"a zip archive without the data.pkl record of torch.save, "
                                          f"holding {', '.join(names[:3]) or 'nothing'}")
        return "zip"
    if _is_legacy_header(head):
        return "legacy"
    raise _not_a_checkpoint(path, _describe(head))


def _main_pickle_is_whole(path: str, fmt: str) -> bool:
    """Whether the checkpoint's object pickle parses to its end (so a refusal is about content)."""
    try:
        if fmt == "zip":
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
                _read_pickles(io.BytesIO(archive.read(name)), 1)
        else:
            # Legacy layout: magic number, protocol version, system info, then the object.
            with open(path, "rb") as f:
                _read_pickles(f, 4)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile):
        return False
    return True


# --------------------------------------------------------------------------- payload checks


def to_weights_only_safe(obj: Any, where: str = "checkpoint") -> Any:
    """A copy of `obj` that ``torch.load(weights_only=True)`` can read back.

    Numpy scalars become Python numbers and numpy arrays become tensors (metrics
    are often numpy); containers are rebuilt with the same type; tensors are
    kept as they are (not copied).

    Raises:
        TypeError: an object the weights-only loader would refuse, named by its
            path inside `obj` (e.g. ``scheduler.lr_lambdas[0]``).
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, _SAFE_LEAVES):
        return obj
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = OrderedDict() if isinstance(obj, OrderedDict) else {}
        for key, value in obj.items():
            key = to_weights_only_safe(key, f"{where} (key {key!r})")
            out[key] = to_weights_only_safe(value, f"{where}.{key}")
        metadata = getattr(obj, "_metadata", None)
        if isinstance(out, OrderedDict) and metadata is not None:
            # Module state dicts carry per-module versions that load_state_dict uses for upgrades.
            out._metadata = to_weights_only_safe(metadata, f"{where}._metadata")  # type: ignore[attr-defined]
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [to_weights_only_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, list):
            return items
        if isinstance(obj, tuple):
            return tuple(items)
        return set(items)
    raise TypeError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a checkpoint "
        "(it would need full unpickling to load); store plain numbers, strings, lists, dicts or tensors"
    )


def _plain_config(config: Any) -> dict | None:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise TypeError(f"Checkpointer: config must be a mapping (Config or dict), got {type(config).__name__}")
    return to_weights_only_safe(dict(config), "config")


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


#: Settings a run may change when it resumes: they decide how long to train, where
#: things are, how often to log/evaluate/save, how fast it runs, or how weights are
#: first obtained (irrelevant once they come from the checkpoint) — never what is learnt.
SAFE_ON_RESUME = (
    "solver.epochs", "log_period", "output_dir", "device", "precision", "deterministic",
    "data.root", "data.num_workers", "data.test_batch_size", "data.skip_bad_images",
    "eval.", "train.", "model.clip.cache_dir", "model.clip.pretrained", "model.clip.grad_checkpointing",
    "model.finetune", "num_threads", "data.cache_dir",
)


class ResumeConfigError(UserInputError):
    """A run would resume a checkpoint trained with other settings."""


class ResumeCheckpointError(UserInputError, ValueError):
    """A checkpoint that a run cannot resume from: weights only, lacking state, or from newer code."""


def check_resume_config(saved: Mapping | None, current: Mapping | None, path: str) -> None:
    """Refuse to resume `path` when the run's config changes what it learns.

    Changes to the keys in `SAFE_ON_RESUME` (a trailing dot covers a section) are
    allowed; they are logged when the checkpoint is loaded.

    Raises:
        ResumeConfigError: other keys differ (each named with both values).
    """
    if not saved or not current:
        return
    old, new = _flatten(saved), _flatten(current)

    def safe(key: str) -> bool:
        return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_ON_RESUME)

    # A key only one side has came or went with a code version (the checkpoint predates
    # it): not a change the user asked for; _log_config_changes reports it.
    changed = [f"{k}: {old[k]!r} in the checkpoint, {new[k]!r} now"
               for k in sorted(set(old) & set(new)) if old[k] != new[k] and not safe(k)]
    if changed:
        raise ResumeConfigError(
            f"cannot resume {path}: the config changes what the run learns ({'; '.join(changed)}). "
            "Restore these settings, or start the new experiment in another output_dir. "
            f"Changes allowed on resume: {', '.join(SAFE_ON_RESUME)} (a trailing dot is a whole section)")


def _log_config_changes(saved: Mapping | None, current: Mapping | None, path: str) -> None:
    """Warn about settings that differ between the checkpoint and this run."""
    if not saved or not current:
        return
    old, new = _flatten(saved), _flatten(current)
    changes = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changes:
        shown = changes[:_MAX_CONFIG_CHANGES_LOGGED]
        more = len(changes) - len(shown)
        logger.warning("resuming %s with %d config change(s): %s%s", path, len(changes), "; ".join(shown),
                       f"; ... and {more} more" if more else "")


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """State of python ``random``, numpy's global RNG, torch CPU and every CUDA device.

    Everything is stored as tensors and Python numbers, so it survives
    ``torch.load(weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": bit_generator,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned.

    Raises:
        ValueError: `state` lacks one of the generators.
    """
    missing = [k for k in ("python", "numpy", "torch", "cuda") if k not in state]
    if missing:
        raise ValueError(f"restore_rng_state: RNG state lacks {missing} (keys present: {sorted(state)})")
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state((nps["bit_generator"], nps["keys"].numpy().astype(np.uint32), nps["pos"],
                         nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = list(state["cuda"])
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda_states) != count:
            logger.warning("RNG state has %d CUDA generator(s) but %d device(s) are visible; restoring the first %d",
                           len(cuda_states), count, min(count, len(cuda_states)))
        for device, cuda_state in enumerate(cuda_states[:count]):
            torch.cuda.set_rng_state(cuda_state, device)
    elif cuda_states:
        logger.warning("RNG state has %d CUDA generator(s) but CUDA is not available; they are ignored",
                       len(cuda_states))


def _reseed(base_seed: int, step: int) -> int:
    """Seed every generator from (base seed, step, rank): deterministic, distinct per rank."""
    seed = int(np.random.SeedSequence([base_seed, step, comm.get_rank()]).generate_state(1, np.uint32)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


# --------------------------------------------------------------------------- checkpointer


def load_model_state(model: nn.Module, ckpt: Any, source: str = "checkpoint") -> None:
    """Torch's strict ``load_state_dict`` of a read checkpoint's ``model`` entry (what `Checkpointer` saves).

    Raises:
        ResumeCheckpointError: the checkpoint has no ``model`` mapping.
        RuntimeError: torch's report of missing / unexpected keys or shape mismatches.
    """
    state = ckpt.get("model") if isinstance(ckpt, Mapping) else None
    if not isinstance(state, Mapping):
        raise ResumeCheckpointError(f"{source}: no model weights (a 'model' entry) in this checkpoint")
    model.load_state_dict(state)


class Checkpointer:
    """Save and restore the complete training state of a run.

    Every rank constructs one and calls :meth:`save` / :meth:`load` at the same
    points (both are collective under DDP); only rank 0 writes files.

    Args:
        run_dir: directory of the run; checkpoints are ``<run_dir>/<name>.pth``.
        model: the model (DDP / compile wrappers are unwrapped).
        optimizer: optimizer, if the run has one.
        scheduler: LR scheduler (anything with ``state_dict``/``load_state_dict``).
        scaler: AMP grad scaler.
        checkpointables: more state, by name: objects with ``state_dict()`` and
            ``load_state_dict(state)`` (e.g. a task's caches), each stored under its name;
            ``state_dict`` is called on rank 0 only, ``load_state_dict`` on every rank. A
            resumed checkpoint without one of them leaves it as it is (with a warning).
        config: the resolved config (``Config`` or plain dict), stored as a dict.
        num_classes: training identities the model was built for.
        load_weights: ``load_weights(model, checkpoint, path)`` puts a read checkpoint's
            model weights into the (unwrapped) model or raises; the model's owner knows
            its keys (``model.weights.load_checkpoint_weights``). Default:
            :func:`load_model_state`, torch's strict ``load_state_dict`` of the
            checkpoint's ``model`` entry.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        checkpointables: Mapping[str, Any] | None = None,
        config: Any = None,
        num_classes: int = 0,
        load_weights: Callable[[nn.Module, Any, str], Any] | None = None,
    ) -> None:
        self.checkpointables = dict(checkpointables or {})
        taken = sorted(set(self.checkpointables) & set(RESERVED_KEYS))
        if taken:
            raise ValueError(f"Checkpointer: checkpointable name(s) {', '.join(taken)} are keys of the checkpoint "
                             "format itself; choose other names")
        for name, obj in (("scheduler", scheduler), ("scaler", scaler), *self.checkpointables.items()):
            if obj is not None and not (callable(getattr(obj, "state_dict", None))
                                        and callable(getattr(obj, "load_state_dict", None))):
                raise TypeError(f"Checkpointer: {name} ({type(obj).__name__}) needs state_dict() and "
                                "load_state_dict() methods")
        self.run_dir = Path(run_dir)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.scaler = scaler
        self.config = _plain_config(config)
        self.num_classes = int(num_classes)
        self.load_weights = load_weights or load_model_state

    def path(self, name: str) -> Path:
        """File of the checkpoint called `name` (``last`` -> ``<run_dir>/last.pth``)."""
        if not name or "/" in name or os.sep in name or name in (".", ".."):
            raise ValueError(f"Checkpointer: invalid checkpoint name {name!r} (a plain file stem like 'last')")
        return self.run_dir / f"{name}.pth"

    def save(
        self,
        name: str,
        *,
        epoch: int,
        step: int,
        best_metrics: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write ``<run_dir>/<name>.pth`` (collective: every rank must call it).

        Args:
            name: checkpoint name, e.g. ``last`` or ``best_CUHK-PEDES``.
            epoch: the loop's epoch counter, stored as given.
            step: the global optimisation step, stored as given.
            best_metrics: best metrics so far (plain numbers / dicts).
            extra: anything else the loop needs to resume (plain data / tensors).

        Returns:
            The checkpoint path. Every rank returns only once the file is written.

        Raises:
            TypeError: part of the state cannot be loaded weights-only (named by its path).
        """
        path = self.path(name)
        # Every rank takes part in the gather; rank 0 stores all states.
        rng_states = comm.all_gather_object(capture_rng_state())
        if comm.is_main_process():
            payload = {
                "format_version": FORMAT_VERSION,
                "model": unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "epoch": int(epoch),
                "step": int(step),
                "rng": rng_states,
                "best_metrics": dict(best_metrics) if best_metrics is not None else {},
                "config": self.config,
                "num_classes": self.num_classes,
                "extra": dict(extra) if extra is not None else {},
                **{name: obj.state_dict() for name, obj in self.checkpointables.items()},
            }
            atomic_save(to_weights_only_safe(payload), path)
            logger.info("saved checkpoint %s (epoch %d, step %d)", path, epoch, step)
        # Nobody may read the file (or exit) before rank 0 has finished writing it.
        comm.synchronize()
        return path

    def load(self, path: str | os.PathLike, *, resume: bool = True, trust: bool = False,
             ckpt: Any = None) -> dict[str, Any]:
        """Restore a checkpoint (collective under DDP: every rank must call it).

        Args:
            path: checkpoint file.
            resume: restore the whole training state (model strictly, optimizer,
                scheduler, scaler, the checkpointables, this rank's RNG); False loads only
                the model weights (strictly).
            trust: allow files that need full unpickling (reference checkpoints).
            ckpt: the file's contents when the caller has already read it.

        Returns:
            ``epoch``, ``step``, ``best_metrics``, ``extra``, ``num_classes`` and
            ``config`` of the checkpoint (``None`` where the file has none).

        Raises:
            Whatever ``load_weights`` raises when the weights do not fit the model.
            ResumeCheckpointError: a file written by newer code, or `resume` with one that is not
                a training checkpoint of this codebase or lacks the optimizer/scheduler state
                this run needs (also a ValueError).
        """
        path = os.fspath(path)
        if ckpt is None:
            ckpt = read_checkpoint(path, trust=trust)
        version = ckpt.get("format_version") if isinstance(ckpt, Mapping) else None
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ResumeCheckpointError(f"{path}: checkpoint format_version {version} is newer than this code "
                                        f"understands ({FORMAT_VERSION}); update the code")
        self.load_weights(unwrap_model(self.model), ckpt, path)
        meta = {key: ckpt.get(key) if isinstance(ckpt, Mapping) else None
                for key in ("epoch", "step", "best_metrics", "extra", "num_classes", "config")}
        if not resume:
            return meta
        if version is None or "rng" not in ckpt or "epoch" not in ckpt:
            raise ResumeCheckpointError(f"{path} is not a training checkpoint of this codebase (no format_version/"
                                        "epoch/rng): it holds weights only, so a run cannot resume from it. Load it "
                                        "as pretrained weights instead (model.finetune=...), or use resume=False")
        _log_config_changes(ckpt.get("config"), self.config, path)
        self._load_component("optimizer", self.optimizer, ckpt, path, required=True)
        self._load_component("scheduler", self.scheduler, ckpt, path, required=True)
        self._load_component("scaler", self.scaler, ckpt, path, required=False)
        for name, obj in self.checkpointables.items():
            self._load_component(name, obj, ckpt, path, required=False)
        self._restore_rng(ckpt["rng"], ckpt, path)
        logger.info("resumed from %s: epoch %s, step %s", path, ckpt["epoch"], ckpt["step"])
        return meta

    @staticmethod
    def _load_component(name: str, component: Any, ckpt: Mapping[str, Any], path: str, *, required: bool) -> None:
        state = ckpt.get(name)
        if component is None:
            if state:
                logger.warning("%s: has %s state but this run has no %s; it is ignored", path, name, name)
            return
        if state is None:
            if required:
                raise ResumeCheckpointError(f"{path} has no {name} state but this run has a {name}; resuming "
                                            "would silently restart it (start a fresh run, or load the weights only)")
            logger.warning("%s: has no %s state; the %s starts fresh", path, name, name)
            return
        component.load_state_dict(state)

    def _restore_rng(self, rng_states: Any, ckpt: Mapping[str, Any], path: str) -> None:
        world_size, rank = comm.get_world_size(), comm.get_rank()
        if isinstance(rng_states, list) and len(rng_states) == world_size:
            restore_rng_state(rng_states[rank])
            return
        saved = len(rng_states) if isinstance(rng_states, list) else 0
        config = ckpt.get("config") or {}
        base_seed = config.get("seed", 0) if isinstance(config, Mapping) else 0
        seed = _reseed(int(base_seed or 0), int(ckpt.get("step") or 0))
        logger.warning("%s was saved by %d rank(s) but this run has %d: the RNG streams cannot be continued, "
                       "reseeded deterministically from (seed %s, step %s, rank %d) -> %d",
                       path, saved, world_size, base_seed, ckpt.get("step"), rank, seed)


def find_resume(run_dir: str | os.PathLike, resume: str) -> str | None:
    """The checkpoint to resume from, following ``train.resume``.

    Args:
        run_dir: the run directory.
        resume: ``"auto"`` -> ``<run_dir>/last.pth`` if it exists, else None
            (fresh start); ``""`` -> None; anything else is a checkpoint path.

    Raises:
        CheckpointNotFoundError: an explicit path that does not exist or is a directory
            (a FileNotFoundError naming ``train.resume``).
    """
    if resume is None or resume == "":
        return None
    if resume == "auto":
        last = Path(run_dir) / "last.pth"
        if last.is_file():
            logger.info("train.resume=auto: resuming from %s", last)
            return str(last)
        logger.info("train.resume=auto: no %s, starting fresh", last)
        return None
    path = Path(resume).expanduser()
    if path.is_dir():
        hint = f"; did you mean {path / 'last.pth'}?" if (path / "last.pth").is_file() else ""
        raise CheckpointNotFoundError(f"train.resume={resume!r} is a directory, expected a checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointNotFoundError(f"train.resume={resume!r}: no such checkpoint file (use 'auto' to resume "
                                      "from <output_dir>/last.pth when it exists, or '' to start fresh)")
    return str(path)


# --------------------------------------------------------------------------- graceful shutdown


class GracefulExit:
    """Turn SIGTERM / SIGINT into a stop request the training loop polls.

    The handlers only set :attr:`requested` (and log once); the loop decides
    when to stop, so a checkpoint is never written from inside a signal handler
    or in the middle of an optimizer step. The contract for the loop::

        with GracefulExit() as stop:
            for batch in loader:
                ...one training step...
                if stop.should_stop():           # after every step
                    checkpointer.save("last", epoch=epoch, step=step)
                    return 0                     # exit code 0: stopped cleanly, resumable

    ``save`` stores the epoch in progress and the global step; resuming
    (``train.resume=auto``) continues from there. A second SIGINT while a stop
    is pending raises KeyboardInterrupt, so Ctrl-C twice still quits at once
    (without saving). Repeated SIGTERMs only keep the request.

    Under DDP, ranks may receive the signal at different steps; use
    :meth:`should_stop` (a collective that ORs the flag over ranks) rather than
    :attr:`requested`, so that all ranks stop after the same step.

    Signal handlers can only be installed from the main thread; elsewhere the
    context manager does nothing (and :attr:`requested` stays False).

    Args:
        signals: signals to intercept.
    """

    def __init__(self, signals: Iterable[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second SIGINT while a graceful stop ({self.signal_name}) was pending")
        if self.requested:
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: stopping after the current step and saving `last` "
                       "(Ctrl-C again to quit immediately without saving)", self.signal_name)

    def should_stop(self) -> bool:
        """Whether any rank has been asked to stop (collective under DDP; every rank must call it)."""
        if comm.get_world_size() > 1:
            anyone = comm.reduce_dict({"stop": float(self.requested)}, average=False)["stop"].item() > 0
            self.requested = self.requested or anyone
        return self.requested

    def __enter__(self) -> GracefulExit:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("GracefulExit: not in the main thread, signal handlers not installed")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            # None means a handler installed outside Python: the default is the best we can restore.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
