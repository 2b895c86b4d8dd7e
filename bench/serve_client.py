"""The serving benchmark's client: streamed chat completions, timed chunk by chunk.

Every request streams (`stream: true`, usage asked for in the last chunk) and is timed on arrival of
each chunk that carries content, so TTFT, TPOT and ITL come from what a user of the API sees
(bench/serve_metrics.py). Conversations are run by `concurrency` clients at once, each turn after the
previous answer; with a rate, conversations arrive as a Poisson process (exponential gaps, seeded).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from bench.serve_metrics import Record
from bench.serve_workloads import Conversation, Message, short


@dataclass(frozen=True)
class Target:
    """A running server: its name in the tables, base URL and the headers its API wants."""

    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)


def chat_body(messages: list[Message], max_tokens: int) -> dict[str, object]:
    return {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


def read_event(rec: Record, data: str, now: float, parts: list[str]) -> None:
    """Fold one SSE `data:` payload into the record: content pieces timed at `now`, the usage chunk's count."""
    ev = json.loads(data)
    usage = ev.get("usage")
    if usage and usage.get("completion_tokens") is not None:
        rec.usage_tokens = int(usage["completion_tokens"])
        rec.prompt_tokens = usage.get("prompt_tokens")
    for choice in ev.get("choices") or []:
        piece = (choice.get("delta") or {}).get("content")
        if piece:
            rec.chunks.append(now)
            parts.append(piece)


async def stream_chat(c: httpx.AsyncClient, target: Target, messages: list[Message], max_tokens: int,
                      rec: Record | None = None) -> Record:
    """One streamed chat completion; the record (`rec`, filled as chunks arrive, or a new one) comes back."""
    rec = rec or Record(sent=time.perf_counter())
    rec.sent = time.perf_counter()
    parts: list[str] = []
    try:
        async with c.stream("POST", f"{target.url}/v1/chat/completions", json=chat_body(messages, max_tokens)) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.retry_after = r.headers.get("retry-after")
                rec.error = (await r.aread()).decode(errors="replace")[:300]
            else:
                async for line in r.aiter_lines():
                    now = time.perf_counter()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    read_event(rec, data, now, parts)
    except (httpx.HTTPError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter()
    rec.text = "".join(parts)
    return rec


def arrivals(n: int, rate: float | None, seed: int = 0) -> list[float]:
    """Start offsets of n conversations: all at 0 without a rate, else a Poisson process of `rate` per second."""
    if not rate:
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def client(target: Target, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections + 4)
    return httpx.AsyncClient(headers=target.headers, timeout=httpx.Timeout(900, connect=30), limits=limits)


async def warm_up(c: httpx.AsyncClient, target: Target) -> None:
    rec = await stream_chat(c, target, short(1)[0].messages(0, []), 4)
    if not rec.ok:
        raise RuntimeError(f"{target.name} failed a warm-up request: {rec.status} {rec.error}")


async def _run(target: Target, convs: Sequence[Conversation], concurrency: int, max_tokens: int,
               rate: float | None, seed: int) -> tuple[list[Record], float]:
    gate = asyncio.Semaphore(concurrency)
    records: list[Record] = []

    async def conversation(c: httpx.AsyncClient, k: int, conv: Conversation, delay: float) -> None:
        await asyncio.sleep(delay)
        async with gate:
            answers: list[str] = []
            for turn in range(len(conv.turns)):
                rec = Record(sent=time.perf_counter(), conversation=k, turn=turn)
                records.append(await stream_chat(c, target, conv.messages(turn, answers), max_tokens, rec))
                if not rec.ok:
                    return
                answers.append(rec.text)

    async with client(target, concurrency) as c:
        await warm_up(c, target)
        t0 = time.perf_counter()
        starts = arrivals(len(convs), rate, seed)
        await asyncio.gather(*(conversation(c, k, conv, starts[k]) for k, conv in enumerate(convs)))
        return records, max((r.end for r in records), default=t0) - t0


def run(target: Target, convs: Sequence[Conversation], concurrency: int, max_tokens: int,
        rate: float | None = None, seed: int = 0) -> tuple[list[Record], float]:
    """Every conversation's turns against `target`, `concurrency` at a time; the records and the wall time."""
    return asyncio.run(_run(target, convs, concurrency, max_tokens, rate, seed))


async def _burst(target: Target, n: int, max_tokens: int) -> list[Record]:
    async with client(target, n) as c:
        await warm_up(c, target)
        return list(await asyncio.gather(*(stream_chat(c, target, conv.messages(0, []), max_tokens) for conv in short(n))))


def burst(target: Target, n: int, max_tokens: int) -> list[Record]:
    """n requests sent at once (the overload case); refused ones keep their status and Retry-After."""
    return asyncio.run(_burst(target, n, max_tokens))


async def _live_and_long(target: Target, live: int, max_tokens: int, long: Conversation | None,
                         long_tokens: int, after: int) -> tuple[list[Record], Record | None]:
    async with client(target, live + 1) as c:
        await warm_up(c, target)
        recs = [Record(sent=time.perf_counter()) for _ in range(live)]
        tasks = [asyncio.create_task(stream_chat(c, target, conv.messages(0, []), max_tokens, rec))
                 for conv, rec in zip(short(live), recs, strict=True)]
        extra: Record | None = None
        if long is not None:
            await wait_until(lambda: all(len(r.chunks) >= after or r.end for r in recs))
            extra = await stream_chat(c, target, long.messages(0, []), long_tokens)
        await asyncio.gather(*tasks)
        return recs, extra


async def wait_until(condition: Callable[[], bool], deadline_s: float = 600.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the live streams did not get far enough in time")
        await asyncio.sleep(0.005)


def live_and_long(target: Target, live: int, max_tokens: int, long: Conversation | None = None,
                  long_tokens: int = 16, after: int = 16) -> tuple[list[Record], Record | None]:
    """`live` streams of `max_tokens`; with `long`, that prompt is sent once every stream has `after` chunks."""
    return asyncio.run(_live_and_long(target, live, max_tokens, long, long_tokens, after))
