"""Count the places where the host waits for a tensor's value (host-device syncs).

On a GPU, reading a value computed on the device (``loss.item()``, ``float(t)``,
``if t:``, ``t.tolist()``, a copy to the CPU, boolean-mask indexing, whose output
size depends on the data) blocks the Python thread until the device has finished
everything queued so far; the next step's kernels cannot be queued meanwhile and
the device idles. `HostSyncCounter` finds those reads on any device, the CPU
included, by watching the torch calls made inside it (a `TorchFunctionMode`): it
counts each call that would block on a CUDA tensor, by kind and by the line of our
code that made it. On the CPU nothing actually waits; the count is what a GPU run
would wait for::

    with HostSyncCounter() as syncs:
        loop.step(batch)
    syncs.total, syncs.by_site()     # 0, {} for a step with no host reads

What counts: the calls above made by our code (torch's own Python code, such as a
foreach optimiser reading its CPU step counters, is trusted; its wrappers that only
dispatch a call are looked through); a blocking ``.to()``/``copy_`` between two
different devices (on a CPU run there is none, so a host-to-device copy of a
constant is only seen on a GPU run). Reads of tensors that are on the host by
construction are counted too: wrap the code that runs once the batch is on the device.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostCopy", "HostSyncCounter", "PerStep", "SYNCING_CALLS"]

#: Tensor methods / torch functions that return a host value or a data-dependent shape.
SYNCING_CALLS = frozenset({
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__format__", "__repr__",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal", "allclose", "is_nonzero",
    "repeat_interleave",
})

_TORCH_DIR = os.path.dirname(torch.__file__)
# torch's Python wrappers that hand a call on to the torch-function modes (not callers themselves).
_DISPATCH_FILES = frozenset(os.path.join(_TORCH_DIR, name)
                            for name in ("overrides.py", "_tensor.py", "functional.py", "_jit_internal.py"))


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _syncs(name: str, args: tuple, kwargs: dict) -> bool:
    if name in SYNCING_CALLS:
        return True
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and len(args) > 1:
        return any(t.dtype == torch.bool and t.dim() > 0 for t in _tensors(args[1]))
    if name in ("to", "copy_") and not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True):
        # A blocking copy between devices waits for the device; within one device it is not a copy.
        source = args[0] if torch.is_tensor(args[0]) else None
        targets = [t for t in list(args[1:]) + list(kwargs.values()) if isinstance(t, (torch.device, str))
                   or torch.is_tensor(t)]
        for target in targets:
            device = target.device if torch.is_tensor(target) else torch.device(target)
            if source is not None and device.type != source.device.type:
                return True
    return False


class HostSyncCounter(TorchFunctionMode):
    """Counts host reads of tensor values (see the module doc). Re-entrant use is not supported.

    Args:
        root: Call sites are reported relative to this directory (default: the working directory).

    Attributes:
        counts: Calls by kind (``item``, ``__float__``, ``__getitem__`` with a boolean mask, ...).
        sites: Calls by ``file:line`` of the first caller outside torch.
    """

    def __init__(self, *, root: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.root = os.fspath(root) if root is not None else os.getcwd()
        self.counts: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_site(self) -> dict[str, int]:
        """``{"file:line (kind)": calls}``, most frequent first."""
        return dict(self.sites.most_common())

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if _syncs(name, args, kwargs) and self._from_our_code():
            self.counts[name] += 1
            self.sites[f"{self._site()} ({name})"] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _from_our_code() -> bool:
        """Whether the call was made by code outside torch (torch's own Python code is trusted) and
        outside this module (`HostCopy` reads host memory)."""
        frame = sys._getframe(2)  # the caller of __torch_function__
        while frame is not None and frame.f_code.co_filename in _DISPATCH_FILES:
            frame = frame.f_back
        if frame is None:
            return False
        path = frame.f_code.co_filename
        return path != __file__ and not path.startswith(_TORCH_DIR)

    def _site(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = frame.filename
            if path.startswith(_TORCH_DIR) or path == __file__:
                continue
            return f"{os.path.relpath(path, self.root)}:{frame.lineno}"
        return "?"


class PerStep:
    """A fresh `HostSyncCounter` per call, all kept in `steps`: give it as a training loop's
    `step_context` to count the host reads of each optimisation step (and its hooks)."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = root
        self.steps: list[HostSyncCounter] = []

    def __call__(self) -> HostSyncCounter:
        self.steps.append(HostSyncCounter(root=self.root))
        return self.steps[-1]


class HostCopy:
    """Tensors copied to the host without making it wait: `get()` later returns them as numpy arrays.

    The copy is queued on the device's stream (``non_blocking``); `get()` waits only for
    that point of the stream, which is normally long done when it is called a step
    later. On the CPU the copy is immediate. `HostSyncCounter` does not count the reads
    `get()` makes (they read host memory).
    """

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self._host = {name: t.detach().to("cpu", non_blocking=True) for name, t in tensors.items()}
        self._event = None
        if any(t.is_cuda for t in tensors.values()):
            self._event = torch.cuda.Event()
            self._event.record()

    def get(self) -> dict[str, np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        return {name: t.numpy() for name, t in self._host.items()}
