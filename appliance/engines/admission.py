"""Admission by expected wait: the engine's measured drain rate, and what it says about a new request.

A bound on the number of waiting requests (`max_queue`) alone lets a queue of long answers wait many
times longer than a queue of short ones. The engine therefore also measures how fast sequences
leave it and refuses a request whose expected wait for a batch slot passes `max_queue_wait_s`, with a
Retry-After taken from the same rate. Pure: every function takes the time as an argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class DrainRate:
    """Busy seconds between two sequences finishing, as an exponentially weighted average.

    Each finished sequence adds the busy time since the previous one; older intervals weigh
    (1 - 1/window) less per finish, so the average spans about the last `window` finishes (a whole
    batch finishing in one step averages out). Time in which nothing waited or decoded is not
    counted: an idle hour says nothing about how fast the engine drains.
    """

    def __init__(self, window: int, min_finished: int = 1) -> None:
        if window < 1 or min_finished < 1:
            raise ValueError("window and min_finished must be at least 1")
        self.decay = 1.0 - 1.0 / window
        self.min_finished = min_finished
        self.finished = 0  # sequences seen finishing, ever
        self.outstanding = 0  # submitted and not yet finished
        self._num = 0.0  # weighted sum of intervals
        self._sq = 0.0  # weighted sum of their squares
        self._den = 0.0  # sum of the weights (the average is unbiased from the first finish on)
        self._busy = 0.0  # busy seconds since the last finish
        self._last: float | None = None

    def _advance(self, now: float) -> None:
        if self._last is not None and self.outstanding > 0 and now > self._last:
            self._busy += now - self._last
        self._last = now if self._last is None else max(self._last, now)

    def submitted(self, now: float) -> None:
        self._advance(now)
        self.outstanding += 1

    def finished_one(self, now: float) -> None:
        self._advance(now)
        self.outstanding = max(0, self.outstanding - 1)
        self._num = self._num * self.decay + self._busy
        self._sq = self._sq * self.decay + self._busy ** 2
        self._den = self._den * self.decay + 1.0
        self._busy = 0.0
        self.finished += 1

    def interval(self, now: float) -> float | None:
        """Expected seconds from one finish to the next; None until `min_finished` have finished.

        The interval still open counts as if it ended now once it is longer than the average, so a
        stalled engine (a long prefill, a slow step) is seen before anything finishes.
        """
        if self.finished < self.min_finished:
            return None
        self._advance(now)
        mean = self._num / self._den
        return max(mean, (self._num * self.decay + self._busy) / (self._den * self.decay + 1.0))

    def gap(self, now: float) -> float | None:
        """The gap between finishes that a request arriving at a random moment falls into, on average
        (E[x²]/E[x]): the interval itself when finishes are evenly spread, a whole batch's time when
        the batch finishes together. What the first of a request's needed finishes may take."""
        mean = self.interval(now)
        if mean is None or self._num <= 0:
            return mean
        return max(mean, self._sq / self._num)

    def rate(self, now: float) -> float | None:
        """Sequences finished per busy second (None: not measured yet)."""
        gap = self.interval(now)
        return None if gap is None else (math.inf if gap <= 0 else 1.0 / gap)


@dataclass(frozen=True)
class Refusal:
    code: str  # queue_full (too many waiting) | queue_wait (they would wait too long)
    message: str  # one sentence: what happened and when to retry
    retry_after: int | None  # whole seconds, at least 1; None: no rate measured yet


def expected_wait(drain: DrainRate, now: float, *, waiting: int, free_slots: int) -> float | None:
    """Seconds a request queued now waits for a slot (0 while a slot is free for it; None before
    anything was measured): the gap it arrives in, then the measured interval for each further
    finish it needs. Bursty finishes (a batch of equal answers) make the first gap long."""
    needed = waiting + 1 - free_slots
    if needed <= 0:
        return 0.0
    mean, first = drain.interval(now), drain.gap(now)
    return None if mean is None or first is None else first + (needed - 1) * mean


def check(drain: DrainRate, now: float, *, waiting: int, free_slots: int, max_queue: int, max_wait_s: float) -> Refusal | None:
    """Why a request arriving now is refused, or None to queue it. `max_wait_s` 0: no time bound."""
    gap = drain.interval(now)
    if waiting >= max_queue + free_slots:
        excess = waiting - (max_queue + free_slots) + 1  # finishes before a place in the queue opens
        retry = None if gap is None else _whole(excess * gap)
        when = f"retry in {retry} s" if retry else "retry in a few seconds"
        return Refusal("queue_full", f"The server is busy: {waiting} requests are already waiting; {when}.", retry)
    wait = expected_wait(drain, now, waiting=waiting, free_slots=free_slots)
    if max_wait_s <= 0 or wait is None or wait <= max_wait_s:
        return None
    retry = _whole(wait - max_wait_s)  # until the queue ahead has drained to within the bound
    return Refusal("queue_wait", f"The server is busy: a new request would wait about {wait:.1f} s for a slot, "
                                 f"more than the {max_wait_s:g} s it allows; retry in {retry} s.", retry)


def _whole(seconds: float) -> int:
    return max(1, math.ceil(seconds))
