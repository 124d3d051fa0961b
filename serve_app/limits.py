"""Limits of the HTTP layer: token buckets for the per-hotkey submission rate (and, in front of authentication, the
per-address one), and what one connection may cost (ConnectionLimits)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBuckets:
    """Token buckets by key, in this process: each API replica limits on its own.

    Only touched from the event loop, so no lock. Full (idle) buckets are dropped once there are many, so memory
    follows the keys active in the last few minutes, not every key ever seen."""

    def __init__(self, burst: int, per_minute: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10_000) -> None:
        self.burst = float(burst)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        now = self._clock()
        level = self._level(key, now)
        if level < 1.0:
            self._buckets[key] = (level, now)
            return (1.0 - level) / self.rate
        self._buckets[key] = (level - 1.0, now)
        if len(self._buckets) > self._max_keys:
            self._buckets = {k: v for k, v in self._buckets.items() if self._level(k, now) < self.burst}
        return 0.0

    def _level(self, key: str, now: float) -> float:
        level, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, level + (now - at) * self.rate)
