"""Seconds from FLOPs and bytes: a roofline with one compute rate and one bandwidth.

The rates are rough defaults per device type; they rank options against each other
(recompute this segment or that one), they do not promise wall-clock times.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Roofline", "ROOFLINES"]


@dataclass(frozen=True)
class Roofline:
    flops_per_second: float
    bytes_per_second: float

    def seconds(self, flops: float, moved_bytes: float = 0.0) -> float:
        return max(flops / self.flops_per_second, moved_bytes / self.bytes_per_second)


ROOFLINES = {
    "cpu": Roofline(flops_per_second=1e11, bytes_per_second=2e10),
    "cuda": Roofline(flops_per_second=2e14, bytes_per_second=2e12),
}
