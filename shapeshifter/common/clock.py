"""Injectable clocks: the daemon uses SystemClock; tests and the simulator use ManualClock."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...  # seconds, for intervals, deadlines, lease expiry
    def time(self) -> float: ...  # Unix seconds, for timestamps shown to people


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to (deterministic tests and simulation)."""

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        self._mono_s = 0.0
        self._epoch_offset_s = start_s

    def monotonic(self) -> float:
        return self._mono_s

    def time(self) -> float:
        return self._epoch_offset_s + self._mono_s

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._mono_s += seconds
