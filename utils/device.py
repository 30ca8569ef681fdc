"""Device, precision and model wrappers, decided in one place.

`resolve_device` turns the config's `device` into a torch device; the
precision names (`fp32`, `bf16`, `fp16`) map to autocast dtypes here only,
and autocast is entered on CUDA only (the CPU always runs float32, see
configs/base.yaml). `unwrap_model` reaches the module under DDP,
DataParallel and `torch.compile` wrappers.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from utils import comm
from utils.config import ConfigError

__all__ = ["PRECISIONS", "autocast_context", "autocast_dtype", "dtype_autocast", "resolve_device", "unwrap_model"]

#: Precision name -> autocast dtype on CUDA (None = plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    """`auto` -> this rank's GPU if CUDA is available, else the CPU.

    Raises:
        ConfigError: `spec` names no device, or CUDA where there is none.
    """
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", comm.get_local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"device={spec!r}: not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={spec!r} but CUDA is not available; use device=cpu or auto")
    return device


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None for fp32).

    Raises:
        ValueError: an unknown name, listing the valid ones.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def dtype_autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on CUDA; nothing on the CPU or for None (float32)."""
    if device.type != "cuda" or dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; the CPU always runs float32 (see configs/base.yaml)."""
    return dtype_autocast(device, autocast_dtype(precision))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model
