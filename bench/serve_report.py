"""The serving benchmark's tables: one row per contender, workload and concurrency, then the ratios."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.serve_metrics import Dist, Summary

# ours / llama-server output tok/s the issue asks for, per workload, at 1 client and at 8.
TARGETS = {("short", 1): 0.95, ("shared-prefix", 1): 0.95, ("multi-turn", 1): 0.95,
           ("short", 8): 1.0, ("shared-prefix", 8): 1.2, ("multi-turn", 8): 1.2}


@dataclass(frozen=True)
class Row:
    contender: str
    workload: str
    clients: int
    summary: Summary
    round: int = 0  # --rounds: the same measurement repeated, the contenders' order alternating


def _ms(d: Dist) -> str:
    return " ".join(f"{v * 1000:>6.0f}" if not math.isnan(v) else f"{'-':>6}" for v in (d.p50, d.p90, d.p99))


HEADER = (f"{'contender':<16} {'workload':<13} {'clients':>7} {'reqs':>5} {'fail':>4} {'tokens':>6} {'tok/s':>7}   "
          f"{'TTFT ms p50/p90/p99':>20}   {'TPOT ms p50/p90/p99':>20}   {'ITL ms p50/p90/p99':>20}   {'E2E s p50/p99':>13}")


def line(r: Row) -> str:
    s = r.summary
    return (f"{r.contender:<16} {r.workload:<13} {r.clients:>7} {s.requests:>5} {s.failed:>4} {s.tokens:>6} {s.rate:>7.1f}   "
            f"{_ms(s.ttft)}   {_ms(s.tpot)}   {_ms(s.itl)}   {s.latency.p50:>6.2f} {s.latency.p99:>6.2f}")


def table(rows: Sequence[Row]) -> str:
    out, several = [HEADER], len({r.round for r in rows}) > 1
    for i, r in enumerate(rows):
        if several and (i == 0 or rows[i - 1].round != r.round):
            out.append(f"round {r.round + 1}")
        out.append(line(r))
    return "\n".join(out)


def _paired(rows: Sequence[Row], ours: str, other: str) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(tok/s ours/other, TTFT p50 ours/other) of each round in round order, per (workload, clients) where both ran."""
    by = {(r.contender, r.workload, r.clients, r.round): r.summary for r in rows}
    out: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for (name, workload, clients, rnd), mine in sorted(by.items(), key=lambda kv: kv[0][3]):
        theirs = by.get((other, workload, clients, rnd))
        if name == ours and theirs is not None:
            out.setdefault((workload, clients), []).append((mine.rate / theirs.rate, mine.ttft.p50 / theirs.ttft.p50))
    return out


def ratios(rows: Sequence[Row], ours: str, other: str) -> list[tuple[str, int, float, float]]:
    """(workload, clients, tok/s ours/other, TTFT p50 ours/other) wherever both ran; over several rounds,
    the median of the rounds' ratios."""
    return [(w, c, statistics.median(r for r, _ in v), statistics.median(t for _, t in v))
            for (w, c), v in _paired(rows, ours, other).items()]


def ratio_lines(rows: Sequence[Row], ours: str, other: str) -> list[str]:
    found = ratios(rows, ours, other)
    if not found:
        return []
    each = _paired(rows, ours, other)
    several = any(len(v) > 1 for v in each.values())
    lines = [f"ratios {ours} / {other}{' (median of the rounds; each round in brackets)' if several else ''}:",
             f"  {'workload':<13} {'clients':>7} {'tok/s':>6} {'TTFT p50':>9}  target (tok/s)"]
    for workload, clients, rate, ttft in found:
        target = TARGETS.get((workload, clients))
        verdict = "" if target is None else f">= {target:.2f} {'met' if rate >= target else 'NOT met'}"
        rounds = f"  [{' '.join(f'{r:.2f}' for r, _ in each[(workload, clients)])}]" if several else ""
        lines.append(f"  {workload:<13} {clients:>7} {rate:>6.2f} {ttft:>9.2f}  {verdict}{rounds}")
    lines.append("ratio_vs_llama_server " + " ".join(f"{w}@{c}={r:.2f}" for w, c, r, _ in found))
    return lines


def save(path: Path, rows: Sequence[Row], extra: dict[str, object]) -> None:
    """Every figure as JSON (seconds), for a later look or a RESULTS.md table."""
    data = {"rows": [{**asdict(r), "tok_per_s": r.summary.rate} for r in rows], **extra}
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
