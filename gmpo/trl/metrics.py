"""Micro-batch statistics reduced across processes with a single collective and a single host sync."""

import math
from collections.abc import Callable

import torch


class MetricPack:
    """Collects ratio-of-sums means, maxima and minima as 0-d tensors; `reduce` gathers them all at once.

    A mean is stored as (sum, count) so that the global value is sum-of-sums / sum-of-counts, exact across processes
    with different token counts. An empty mean, or an extreme over nothing (+-inf), reduces to NaN, which the
    trainer's `log` skips.
    """

    def __init__(self):
        self._means: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._maxima: dict[str, torch.Tensor] = {}
        self._minima: dict[str, torch.Tensor] = {}

    def add_mean(self, name: str, total: torch.Tensor, count: torch.Tensor | float) -> None:
        self._means[name] = (total, count)

    def add_max(self, name: str, value: torch.Tensor) -> None:
        self._maxima[name] = value

    def add_min(self, name: str, value: torch.Tensor) -> None:
        self._minima[name] = value

    def reduce(self, gather: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict[str, float]:
        """`gather` maps a (1, K) tensor to (num_processes, K), e.g. `accelerator.gather`."""
        parts = [torch.as_tensor(x, dtype=torch.float32, device=device).reshape(1) for pair in self._means.values()
                 for x in pair]
        parts += [v.detach().float().reshape(1).to(device) for v in self._maxima.values()]
        parts += [-v.detach().float().reshape(1).to(device) for v in self._minima.values()]
        if not parts:
            return {}
        packed = torch.cat(parts).unsqueeze(0)
        gathered = gather(packed).reshape(-1, packed.size(1))
        num_sums = 2 * len(self._means)
        values = torch.cat([gathered[:, :num_sums].sum(0), gathered[:, num_sums:].amax(0)]).tolist()

        out = {}
        for i, name in enumerate(self._means):
            total, count = values[2 * i], values[2 * i + 1]
            out[name] = total / count if count > 0 else math.nan
        extremes = values[num_sums:]
        for name, value in zip(self._maxima, extremes):
            out[name] = value if math.isfinite(value) else math.nan
        for name, value in zip(self._minima, extremes[len(self._maxima):]):
            out[name] = -value if math.isfinite(value) else math.nan
        return out
