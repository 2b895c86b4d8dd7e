"""Serving metrics from the client's side of a stream, defined as `vllm bench serve` defines them.

A request's record is when it was sent, when each chunk carrying content arrived and when the stream
ended. From it: TTFT (time to the first content chunk), TPOT ((latency - TTFT) / (tokens - 1), for
answers of two tokens or more), ITL (each gap between consecutive content chunks) and the end-to-end
latency. A run's summary pools them across its requests: output tokens per second of wall time, and
the p50, p90 and p99 of each (percentiles interpolated linearly, as numpy's default does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass
class Record:
    """One request as the client saw it; times are `time.perf_counter()` seconds."""

    sent: float
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk that carried content
    end: float = 0.0
    status: int = 0
    usage_tokens: int | None = None  # completion_tokens from the stream's usage chunk, when it sent one
    prompt_tokens: int | None = None
    text: str = ""
    retry_after: str | None = None
    error: str = ""
    conversation: int = 0
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and bool(self.chunks)

    @property
    def tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunks)

    @property
    def latency(self) -> float:
        return self.end - self.sent

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Dist:
    """p50, p90 and p99 of one metric, in seconds."""

    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Dist:
        return cls(*(percentile(values, p) for p in PERCENTILES))


@dataclass(frozen=True)
class Summary:
    requests: int
    failed: int
    tokens: int
    seconds: float
    ttft: Dist
    tpot: Dist
    itl: Dist
    latency: Dist

    @property
    def rate(self) -> float:
        """Output tokens per second of the run's wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else math.nan


def summarize(records: Sequence[Record], seconds: float) -> Summary:
    """A run's figures from its records and its wall time (first request sent to last stream ended)."""
    done = [r for r in records if r.ok]
    return Summary(
        requests=len(done), failed=len(records) - len(done), tokens=sum(r.tokens for r in done), seconds=seconds,
        ttft=Dist.of([r.ttft for r in done]),
        tpot=Dist.of([t for r in done if (t := r.tpot) is not None]),
        itl=Dist.of([gap for r in done for gap in r.itls]),
        latency=Dist.of([r.latency for r in done]))
