"""What both benchmarks measure with: timed blocks, their series, and JSON-safe figures."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Block:
    """One timed block of one client or server variant."""

    calls: int
    elapsed_s: float
    latencies_s: list[float]

    @property
    def throughput(self) -> float:
        return self.calls / self.elapsed_s


@dataclass
class Series:
    """Every measured block of one client or variant in one row."""

    blocks: list[Block] = field(default_factory=list[Block])

    def throughput(self) -> float:
        """Median calls/s over blocks."""
        return statistics.median(block.throughput for block in self.blocks)

    def latency_us(self) -> float:
        """Median per-call latency over every measured call, in µs."""
        return statistics.median(lat for block in self.blocks for lat in block.latencies_s) * 1e6

    def calls(self) -> int:
        return sum(block.calls for block in self.blocks)

    def summary(self) -> dict[str, Any]:
        return {
            "calls_per_s": self.throughput(),
            "median_latency_us": self.latency_us(),
            "block_calls_per_s": [block.throughput for block in self.blocks],
            "block_median_latency_us": [statistics.median(b.latencies_s) * 1e6 for b in self.blocks],
        }


def finite(value: Any) -> Any:
    """``value`` with non-finite floats as None, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}  # pyright: ignore[reportUnknownVariableType]
    if isinstance(value, list):
        return [finite(item) for item in value]  # pyright: ignore[reportUnknownVariableType]
    return value
