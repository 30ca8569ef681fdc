"""Distributed helpers (detectron2 style).

Every helper is a no-op (or the trivial single-process answer) when
``torch.distributed`` is unavailable, not initialised, or the world size is 1,
so single-process code calls them unconditionally.

Process layout follows ``torchrun``: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``
/ ``LOCAL_WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` in the environment,
ranks of one node contiguous.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "all_gather_object",
    "all_gather_tensor",
    "all_gather_with_grad",
    "broadcast_object",
    "cleanup",
    "get_local_rank",
    "get_local_size",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist_initialized",
    "is_main_process",
    "reduce_dict",
    "seed_everything",
    "synchronize",
]

_REQUIRED_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_dist_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes in the default group (1 without distributed)."""
    return dist.get_world_size() if is_dist_initialized() else 1


def get_rank() -> int:
    """Global rank of this process (0 without distributed)."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_local_rank() -> int:
    """Rank of this process on its node (torchrun's ``LOCAL_RANK``; 0 without distributed)."""
    if not is_dist_initialized():
        return 0
    return int(os.environ.get("LOCAL_RANK", get_rank()))


def get_local_size() -> int:
    """Number of processes on this node (torchrun's ``LOCAL_WORLD_SIZE``; 1 without distributed)."""
    if not is_dist_initialized():
        return 1
    return int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size()))


def is_main_process() -> bool:
    """True on global rank 0 (and always without distributed)."""
    return get_rank() == 0


def _comm_device() -> torch.device:
    """Device that collective buffers must live on for the active backend."""
    if is_dist_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def synchronize() -> None:
    """Barrier across all ranks; returns immediately at world size 1."""
    if get_world_size() == 1:
        return
    if dist.get_backend() == "nccl":
        # Without device_ids NCCL guesses the device from the rank and warns.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def init_distributed(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default nccl when CUDA is available,
            gloo otherwise.

    Returns:
        True if a process group is (now) initialised, False for a plain
        single-process run (``WORLD_SIZE`` unset or 1).

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but another required variable is missing.
    """
    if is_dist_initialized():
        return True
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    missing = [name for name in _REQUIRED_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_distributed: WORLD_SIZE={world_size} but environment variables {missing} "
            "are not set; launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, "
            "MASTER_ADDR, MASTER_PORT)"
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank)
    logger.info(
        "initialised torch.distributed: backend=%s rank=%d/%d local_rank=%d",
        backend,
        rank,
        world_size,
        local_rank,
    )
    return True


def cleanup(*, barrier: bool = True) -> None:
    """Destroy the default process group if one exists.

    Args:
        barrier: First wait until every rank gets here. Without it, a rank that
            finished early tears its connections down while a peer may still be
            completing the last collective with it, which kills that peer (gloo
            aborts: "terminate called without an active exception"). Pass False
            when leaving on an error, where the other ranks may never arrive.
    """
    if is_dist_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def _gather_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension may differ across ranks.

    Returns one tensor per rank, on ``tensor``'s device, without autograd history.
    """
    if tensor.dim() == 0:
        raise ValueError("all_gather_tensor: expected a tensor with at least one dimension, got a scalar")
    device = _comm_device()
    local = tensor.detach().to(device).contiguous()
    world_size = get_world_size()
    size = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    max_count = max(counts)
    if max_count == 0:
        # Every rank sees the same counts, so all of them skip the data collective together.
        return [tensor.detach()[:0] for _ in counts]
    # all_gather needs equal shapes: pad every rank to the largest first dimension.
    padded = local.new_zeros((max_count, *local.shape[1:]))
    padded[: local.shape[0]] = local
    buffers = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(buffers, padded)
    return [buf[:count].to(tensor.device) for buf, count in zip(buffers, counts, strict=True)]


@torch.no_grad()
def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks along dim 0 (rank order), without gradient.

    First-dimension sizes may differ across ranks (padded internally); other
    dimensions and the dtype must agree. The result is on ``t``'s device.
    """
    if get_world_size() == 1:
        return t.detach()
    return torch.cat(_gather_list(t), dim=0)


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0; the local slice keeps its graph.

    Like open_clip's ``gather_features`` (``local_loss=False``): other ranks'
    slices are gathered without gradient and this rank's own tensor is put
    back in its slot, so a loss over the gathered batch back-propagates into
    this rank's inputs only. Each rank thus gets the exact partial derivative
    of that loss w.r.t. its own inputs; DDP then *averages* parameter
    gradients over ranks, i.e. the parameter gradient is the single-process
    gradient divided by the world size unless the caller compensates (see
    ``model.objectives`` for the convention the losses use).

    First-dimension sizes may differ across ranks.
    """
    if get_world_size() == 1:
        return tensor
    parts = _gather_list(tensor)
    parts[get_rank()] = tensor
    return torch.cat(parts, dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every rank; ``[obj]`` at world size 1."""
    world_size = get_world_size()
    if world_size == 1:
        return [obj]
    output: list[Any] = [None] * world_size
    dist.all_gather_object(output, obj)
    return output


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank; ``obj`` itself at world size 1."""
    if get_world_size() == 1:
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def reduce_dict(d: Mapping[str, torch.Tensor | float], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) scalar values over ranks; every rank receives the result.

    Args:
        d: name -> scalar tensor or number; every rank must pass the same keys.
        average: divide the sum by the world size.

    Returns:
        name -> 0-dim float tensor (on the first tensor value's device, else CPU).
    """
    values = {k: torch.as_tensor(v).detach().float().reshape(()) for k, v in d.items()}
    if get_world_size() == 1 or not values:
        return values
    # Sorted keys so every rank stacks the values in the same order.
    names = sorted(values)
    out_device = values[names[0]].device
    stacked = torch.stack([values[k].to(_comm_device()) for k in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= get_world_size()
    return {k: v.to(out_device) for k, v in zip(names, stacked, strict=True)}


def seed_everything(seed: int, rank_offset: bool = True) -> int:
    """Seed python, numpy and torch (all devices).

    Args:
        seed: base seed.
        rank_offset: add the global rank so ranks draw different augmentations.

    Returns:
        The effective seed (``seed + rank`` when ``rank_offset``).
    """
    effective = seed + (get_rank() if rank_offset else 0)
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)
    return effective
