"""The serving benchmark's two stress cases.

- long prompt among live streams: 7 streams decode alone (ITL p50 without), then again while one
  prompt of about 2,000 tokens arrives once every stream has a quarter of its answer (ITL p99 with,
  over the 7 streams only). Chunked prefill is what keeps the second within 2x the first.
- overload: 25x the queue's capacity (`max_batch` live + `max_queue` waiting) in requests at once,
  against ours only (llama-server has no admission limit: it queues everything). Reports accepted
  requests' latency p99, the count of 429s and the Retry-After values they carried.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bench.serve_client import burst, live_and_long
from bench.serve_contenders import Contender
from bench.serve_metrics import Dist, Record
from bench.serve_workloads import long_prompt


@dataclass(frozen=True)
class LongPromptResult:
    contender: str
    itl_without: Dist
    itl_with: Dist
    max_gap_with: float
    long_ttft: float
    failed: int

    @property
    def ratio(self) -> float:
        """ITL p99 with the long prompt over ITL p50 without it (the issue's target: <= 2)."""
        return self.itl_with.p99 / self.itl_without.p50

    def line(self) -> str:
        return (f"{self.contender:<16} ITL p50 without {self.itl_without.p50 * 1000:6.1f} ms   "
                f"ITL p99 with {self.itl_with.p99 * 1000:7.1f} ms (p50 {self.itl_with.p50 * 1000:.1f}, "
                f"max {self.max_gap_with * 1000:.0f})   p99 with / p50 without = {self.ratio:.2f} (target <= 2)   "
                f"long prompt TTFT {self.long_ttft:.2f} s   failed {self.failed}")


def _gaps(records: list[Record]) -> list[float]:
    return [g for r in records if r.ok for g in r.itls]


def long_prompt_case(contender: Contender, live: int = 7, max_tokens: int = 64, context: int = 4096) -> LongPromptResult:
    """One server with live+1 slots of `context` tokens: the live streams alone, then with the long prompt."""
    with contender.start(live + 1, context) as target:
        alone, _ = live_and_long(target, live, max_tokens)
        mixed, extra = live_and_long(target, live, max_tokens, long_prompt(), long_tokens=16, after=max(1, max_tokens // 4))
    gaps = _gaps(mixed)
    failed = sum(not r.ok for r in [*alone, *mixed]) + int(extra is None or not extra.ok)
    return LongPromptResult(contender.name, Dist.of(_gaps(alone)), Dist.of(gaps), max(gaps, default=float("nan")),
                            extra.ttft if extra is not None and extra.ok else float("nan"), failed)


@dataclass(frozen=True)
class OverloadResult:
    sent: int
    capacity: int
    accepted: int
    refused: int
    other: Counter[str]
    latency: Dist
    retry_after: Counter[str]

    def lines(self) -> list[str]:
        others = ", ".join(f"{k} x{v}" for k, v in sorted(self.other.items())) or "none"
        retry = ", ".join(f"{k} s x{v}" for k, v in sorted(self.retry_after.items(), key=lambda kv: _num(kv[0]))) or "none"
        return [f"overload: {self.sent} requests at once = {self.sent / self.capacity:.0f}x the capacity of {self.capacity} "
                f"(live + queued)",
                f"  accepted {self.accepted}: latency p50 {self.latency.p50:.2f} s, p90 {self.latency.p90:.2f} s, "
                f"p99 {self.latency.p99:.2f} s",
                f"  429: {self.refused}; Retry-After values: {retry}; other outcomes: {others}"]


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


def overload_case(contender: Contender, max_batch: int = 8, max_queue: int = 8, factor: int = 25,
                  max_tokens: int = 32, context: int = 2048) -> OverloadResult:
    """`factor` x (max_batch + max_queue) requests at once; `contender` must be started with that queue."""
    capacity = max_batch + max_queue
    with contender.start(max_batch, context) as target:
        records = burst(target, factor * capacity, max_tokens)
    accepted = [r for r in records if r.ok]
    refused = [r for r in records if r.status == 429]
    other = Counter(f"{r.status} {r.error[:60]}".strip() for r in records if not r.ok and r.status != 429)
    return OverloadResult(len(records), capacity, len(accepted), len(refused), other,
                          Dist.of([r.latency for r in accepted]), Counter(r.retry_after or "(none)" for r in refused))
