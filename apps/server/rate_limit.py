"""A per-client request budget: a token bucket per remote address, so one client cannot take every
session or flood the model with messages."""

from __future__ import annotations

import time


class RateLimiter:
    """`per_minute` requests per client, in bursts of at most that many; idle clients are forgotten."""

    def __init__(self, per_minute: int, clock=time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last update)

    def allow(self, client: str) -> bool:
        """Take one request from the client's budget; False when it is spent."""
        now = self.clock()
        tokens, last = self._buckets.get(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if len(self._buckets) > 10_000:  # forget clients whose bucket is full again
            self._buckets = {c: (t, u) for c, (t, u) in self._buckets.items()
                             if t + (now - u) * self.rate < self.capacity}
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1.0, now)
        return True
