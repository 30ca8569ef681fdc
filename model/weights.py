"""Loading retrieval-model weights from our checkpoints and the reference ones.

Checkpoints are untrusted input: they are read with `torch.load(weights_only=True)`;
a file that needs arbitrary unpickling is refused unless the caller explicitly
trusts it. A file that is not a torch.save checkpoint at all (text, random bytes,
a bare pickle) or is truncated is recognised before any unpickling and reported
as such, never as "needs trust", and is not unpickled even when trusted.

Loading never succeeds silently with keys left out: the exact sets of missing and
unexpected keys are checked against what the caller allows (e.g. a pretrain ->
fine-tune load may miss only `classifier.*`) and reported readably.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from utils.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = ["CheckpointNotFoundError", "CheckpointReadError", "IncompatibleWeightsError", "LoadReport",
           "read_checkpoint", "unwrap_state_dict", "load_model_weights", "load_pretrained"]

WRAPPER_KEYS = ("model", "state_dict")
# Keys a checkpoint may carry that no model here has: CLIP's learnable temperature,
# in checkpoints written before the backbone dropped it (retrieval uses a fixed one).
IGNORED_KEYS = ("base_model.logit_scale",)


# The legacy (pre-zip) torch.save format starts with this number pickled on its own.
_LEGACY_MAGIC = torch.serialization.MAGIC_NUMBER
# Bytes read to recognise a file's format (the legacy header pickle is 15 bytes long).
_SNIFF_BYTES = 4096


class IncompatibleWeightsError(UserInputError, RuntimeError):
    """A checkpoint's keys or shapes do not fit the model."""


class CheckpointReadError(UserInputError, RuntimeError):
    """A checkpoint file that cannot be read: not a checkpoint, corrupt, or untrusted."""


class CheckpointNotFoundError(CheckpointReadError, FileNotFoundError):
    """No checkpoint file at the given path."""


@dataclass
class LoadReport:
    """What happened when loading a state dict."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = []
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("shape mismatch", self.shape_mismatch)):
            if keys:
                parts.append(f"{title} ({len(keys)}): {summarize_keys(keys)}")
        return "; ".join(parts) if parts else "all keys matched"


def summarize_keys(keys: Iterable[str], depth: int = 2) -> str:
    """Group keys by their first `depth` components: 'base_model.visual.* (152 keys)'."""
    groups: dict[str, list[str]] = defaultdict(list)
    for key in sorted(keys):
        parts = key.split(".")
        groups[".".join(parts[:depth]) + (".*" if len(parts) > depth else "")].append(key)
    return ", ".join(f"{g} ({len(v)} keys)" if len(v) > 1 else v[0] for g, v in groups.items())


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


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The tensor state dict inside `{'model': ...}` / `{'state_dict': ...}` wrappers, minus `module.`."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise IncompatibleWeightsError(f"{source}: no state dict found (expected a mapping of tensors, "
                                       f"optionally under {' or '.join(repr(k) for k in WRAPPER_KEYS)})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if len(tensors) != len(obj):
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)][:5]
        raise IncompatibleWeightsError(f"{source}: state dict has non-tensor entries, e.g. {bad}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _allowed(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def load_model_weights(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    allowed_missing: Iterable[str] = (),
    allowed_unexpected: Iterable[str] = (),
    source: str = "checkpoint",
) -> LoadReport:
    """Load `state_dict` into `model`, allowing only the given key prefixes to differ.

    A key whose shape differs from the model's counts as missing (it is not
    loaded) and must be allowed like one — e.g. a classifier trained on another
    number of identities.

    Raises:
        IncompatibleWeightsError: keys or shapes outside what is allowed, with a
            grouped list of the offending keys.
    """
    allowed_missing, allowed_unexpected = tuple(allowed_missing), tuple(allowed_unexpected)
    own = model.state_dict()
    report = LoadReport()
    loadable = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
            report.missing.append(key)
        else:
            loadable[key] = value
    report.missing.extend(k for k in own if k not in state_dict)
    bad_missing = [k for k in report.missing if not _allowed(k, allowed_missing)]
    bad_unexpected = [k for k in report.unexpected if k not in IGNORED_KEYS and not _allowed(k, allowed_unexpected)]
    if bad_missing or bad_unexpected:
        lines = [f"{source} does not fit the model:"]
        if bad_missing:
            lines.append(f"  missing or wrong shape ({len(bad_missing)}): {summarize_keys(bad_missing)}")
        if report.shape_mismatch:
            lines.append("  shape mismatches: " + ", ".join(report.shape_mismatch[:5]))
        if bad_unexpected:
            lines.append(f"  unexpected ({len(bad_unexpected)}): {summarize_keys(bad_unexpected)}")
        lines.append(f"  allowed to be missing: {list(allowed_missing) or 'nothing'}; "
                     f"allowed unexpected: {list(allowed_unexpected) or 'nothing'}")
        raise IncompatibleWeightsError("\n".join(lines))
    model.load_state_dict(loadable, strict=False)
    ignored = [k for k in report.unexpected if k in IGNORED_KEYS]
    if ignored:
        logger.info("%s: ignoring %s (CLIP's learnable temperature; retrieval uses model.temperature)",
                    source, ", ".join(ignored))
    logger.info("loaded %s: %s", source, report.summary())
    return report


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    allowed_missing: Iterable[str] = ("classifier.",),
    allowed_unexpected: Iterable[str] = (),
    trust: bool = False,
) -> LoadReport:
    """Initialise `model` from a checkpoint file (ours, the GA-DMS authors' or IRRA's).

    By default only the ID classifier may be missing (pretraining has none, and a
    fine-tuning checkpoint of another dataset has another number of classes).
    """
    state = unwrap_state_dict(read_checkpoint(path, trust=trust), source=os.fspath(path))
    return load_model_weights(model, state, allowed_missing=allowed_missing,
                              allowed_unexpected=allowed_unexpected, source=os.fspath(path))
