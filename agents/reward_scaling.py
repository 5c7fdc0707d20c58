"""Running mean and standard deviation of rewards, for bandits that need a reward scale."""

from __future__ import annotations

import math
from typing import Any


class RunningMeanStd:
    """Mean and population standard deviation of a stream of values (Welford's algorithm).

    ``std`` is 1.0 until two distinct values have been seen, so it is never
    zero and dividing by it is safe.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, value: float) -> None:
        """Add one value."""
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def std(self) -> float:
        """Population standard deviation of the values so far, or 1.0 while it is zero or undefined."""
        if self.count < 2 or self.m2 <= 0.0:
            return 1.0
        return math.sqrt(self.m2 / self.count)

    def standardize(self, value: float) -> float:
        """Return ``(value - mean) / std`` under the current statistics."""
        return (value - self.mean) / self.std

    def state_dict(self) -> dict[str, Any]:
        """Return the statistics as JSON-serializable numbers."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics from ``state_dict``."""
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])
