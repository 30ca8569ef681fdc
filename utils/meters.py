"""Running averages of training scalars."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

__all__ = ["AverageMeter", "MeterDict"]


class AverageMeter:
    """Mean of the values seen since the last reset (weighted by count)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum = 0.0
        self.count = 0
        self.last = 0.0

    def update(self, value: float, n: int = 1) -> None:
        self.last = float(value)
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / self.count if self.count else 0.0


class MeterDict:
    """One AverageMeter per scalar name; tensors are read with a single sync per update."""

    def __init__(self) -> None:
        self.meters: dict[str, AverageMeter] = defaultdict(AverageMeter)

    def update(self, values: Mapping[str, torch.Tensor | float], n: int = 1) -> None:
        names = [k for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1]
        if not names:
            return
        if not any(torch.is_tensor(values[k]) for k in names):  # host values: nothing to read back
            for name in names:
                self.meters[name].update(values[name], n)
            return
        device = next((v.device for v in values.values() if torch.is_tensor(v)), torch.device("cpu"))
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32, device=device).detach().reshape(())
                               for k in names])
        for name, value in zip(names, stacked.tolist()):  # one device sync for all scalars
            self.meters[name].update(value, n)

    def averages(self) -> dict[str, float]:
        return {k: m.avg for k, m in self.meters.items()}

    def reset(self) -> None:
        for m in self.meters.values():
            m.reset()
