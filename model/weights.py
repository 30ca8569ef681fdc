"""Loading retrieval-model weights from our checkpoints and the reference ones.

Checkpoints are untrusted input: `read_checkpoint` (utils/checkpoint.py) loads
them weights-only and refuses a file that needs arbitrary unpickling unless the
caller explicitly trusts it.

Loading never succeeds silently with keys left out: the exact sets of missing and
unexpected keys are checked against what the caller allows (e.g. a pretrain ->
fine-tune load may miss only `classifier.*`) and reported readably.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from utils.checkpoint import read_checkpoint
from utils.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = ["IncompatibleWeightsError", "LoadReport", "unwrap_state_dict", "load_checkpoint_weights", "load_model_weights",
           "load_pretrained"]

WRAPPER_KEYS = ("model", "state_dict")
# Keys a checkpoint may carry that no model here has: CLIP's learnable temperature,
# in checkpoints written before the backbone dropped it (retrieval uses a fixed one).
IGNORED_KEYS = ("base_model.logit_scale",)


class IncompatibleWeightsError(UserInputError, RuntimeError):
    """A checkpoint's keys or shapes do not fit the model."""


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


def load_checkpoint_weights(model: nn.Module, ckpt: Any, source: str = "checkpoint") -> LoadReport:
    """Load the weights of a read checkpoint (any wrapper, see `unwrap_state_dict`) into `model`, strictly.

    The `load_weights` of `utils.checkpoint.Checkpointer` for this codebase's models.

    Raises:
        IncompatibleWeightsError: no state dict, or keys or shapes that do not fit.
    """
    return load_model_weights(model, unwrap_state_dict(ckpt, source=source), source=source)


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
