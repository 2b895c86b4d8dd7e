"""Sampled audit lines for requests nobody authenticated: a flood must not fsync one line each."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

SAMPLE_INTERVAL_S = 60.0


class Sampler:
    """At most one record per `interval` seconds for each reason, carrying how many requests of that
    reason came since the last record (the first of a reason is written at once). Counts not yet
    written when the process stops are in the metrics, not in the log."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, str]] = {}  # reason -> (count, time of the first)
        self._last: dict[str, float] = {}

    def note(self, reason: str, **last: Any) -> dict[str, Any] | None:
        """Count one request; return the record to append now, or None when this one is only counted."""
        now, wall = self.clock(), datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        with self._lock:
            count, since = self._pending.get(reason, (0, wall))
            count += 1
            if reason in self._last and now - self._last[reason] < self.interval:
                self._pending[reason] = (count, since)
                return None
            self._last[reason] = now
            self._pending.pop(reason, None)
        return {"event": "requests_rejected", "reason": reason, "count": count, "since": since, "last": last}
