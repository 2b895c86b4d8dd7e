"""Prometheus text from the server's /metrics, turned into the few figures the dashboard shows.

Pure functions over parsed samples: rates and quantiles come from the difference of two scrapes,
like Prometheus' rate() and histogram_quantile(), so the console needs no Prometheus library.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
# The console's own scrapes and health probes are not traffic.
_IGNORED_ROUTES = ("/metrics", "/health/live", "/health/ready")


def parse(text: str) -> Samples:
    """Samples keyed by (name, sorted labels); comments and malformed lines are skipped."""
    out: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
        out[(m.group(1), labels)] = value
    return out


def _label(labels: Labels, name: str) -> str | None:
    return next((v for k, v in labels if k == name), None)


def _traffic(labels: Labels) -> bool:
    return _label(labels, "route") not in _IGNORED_ROUTES


def total(s: Samples, name: str) -> float:
    return sum(v for (n, labels), v in s.items() if n == name and _traffic(labels))


def buckets(s: Samples, name: str) -> dict[float, float]:
    """Cumulative bucket counts by upper bound, summed over routes."""
    out: dict[float, float] = {}
    for (n, labels), v in s.items():
        if n == f"{name}_bucket" and _traffic(labels):
            le = _label(labels, "le")
            if le is not None:
                bound = math.inf if le == "+Inf" else float(le)
                out[bound] = out.get(bound, 0.0) + v
    return out


def quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """histogram_quantile(): linear interpolation inside the bucket the rank falls in."""
    if not cumulative:
        return None
    bounds = sorted(cumulative)
    count = cumulative[bounds[-1]]
    if count <= 0:
        return None
    rank, lower, below = q * count, 0.0, 0.0
    for b in bounds:
        c = cumulative[b]
        if c >= rank:
            if math.isinf(b):
                return lower  # beyond the last finite bucket: its bound is the best we know
            return lower + (b - lower) * ((rank - below) / (c - below) if c > below else 1.0)
        lower, below = b, c
    return lower


@dataclass(frozen=True)
class ServerStats:
    requests_per_s: float | None
    p50_s: float | None
    p99_s: float | None
    tokens_per_s: float | None
    queue_depth: float | None
    active: float | None
    adapter: str | None


LATENCY = "appliance_request_latency_seconds"
REQUESTS = "appliance_requests_total"
TOKENS_OUT = "appliance_completion_tokens_total"


def _gauge(s: Samples, name: str) -> float | None:
    vals = [v for (n, _), v in s.items() if n == name]
    return sum(vals) if vals else None


@dataclass(frozen=True)
class GpuStat:
    """One GPU as the server's /metrics reports it (NVML): memory used/total, utilisation."""

    gpu: str
    used_mib: float | None
    total_mib: float | None
    util_pct: float | None


def gpus(s: Samples) -> list[GpuStat]:
    """The server's GPUs, in index order, from appliance_gpu_* (none on a CPU tier)."""
    by: dict[str, dict[str, float]] = {}
    for (name, labels), v in s.items():
        if name.startswith("appliance_gpu_") and (g := _label(labels, "gpu")) is not None:
            by.setdefault(g, {})[name] = v
    mib = float(1 << 20)

    def get(d: dict[str, float], name: str, scale: float = 1.0) -> float | None:
        return d[name] / scale if name in d else None

    return [GpuStat(g, get(d, "appliance_gpu_memory_used_bytes", mib), get(d, "appliance_gpu_memory_total_bytes", mib),
                    get(d, "appliance_gpu_utilization_percent")) for g, d in sorted(by.items(), key=lambda kv: int(kv[0]))]


def stats(newer: Samples, older: Samples | None, seconds: float) -> ServerStats:
    """Figures over the interval between two scrapes (`older` None: since the server started)."""
    older = older or {}
    dt = seconds if seconds > 0 else None
    req = total(newer, REQUESTS) - total(older, REQUESTS)
    tok = total(newer, TOKENS_OUT) - total(older, TOKENS_OUT)
    nb, ob = buckets(newer, LATENCY), buckets(older, LATENCY)
    window = {b: c - ob.get(b, 0.0) for b, c in nb.items()}
    adapter = next((_label(labels, "adapter") for (n, labels), v in newer.items() if n == "appliance_adapter_info" and v), None)
    return ServerStats(
        requests_per_s=req / dt if dt else None,
        p50_s=quantile(0.5, window), p99_s=quantile(0.99, window),
        tokens_per_s=tok / dt if dt else None,
        queue_depth=_gauge(newer, "appliance_queue_depth"),
        active=_gauge(newer, "appliance_active_sequences"),
        adapter=adapter,
    )
