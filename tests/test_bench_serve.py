"""The serving benchmark's own arithmetic and inputs (bench/serve_*.py): no timing is asserted.

The stream metrics are computed on recorded chunk arrival times and recorded SSE payloads; the
workloads are checked with the model's real tokenizer; the client is run once against our real
server on the real model, a multi-turn conversation included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import serve_client, serve_workloads
from bench.serve_client import Target
from bench.serve_contenders import ours
from bench.serve_metrics import Dist, Record, percentile, summarize


def test_ttft_tpot_and_itl_of_one_recorded_stream() -> None:
    rec = Record(sent=10.0, chunks=[10.5, 10.6, 10.8, 11.1], end=11.2, status=200, usage_tokens=4)
    assert rec.ok
    assert rec.ttft == pytest.approx(0.5)  # to the first content chunk, not to the response headers
    assert rec.latency == pytest.approx(1.2)
    assert rec.tpot == pytest.approx((1.2 - 0.5) / 3)  # (latency - TTFT) / (tokens - 1)
    assert rec.itls == pytest.approx([0.1, 0.2, 0.3])


def test_tokens_come_from_usage_when_sent_else_from_the_chunks() -> None:
    # a chunk may carry several tokens: the usage count wins, and TPOT follows it
    rec = Record(sent=0.0, chunks=[1.0, 2.0], end=2.0, status=200, usage_tokens=5)
    assert rec.tokens == 5 and rec.tpot == pytest.approx(0.25)
    assert Record(sent=0.0, chunks=[1.0, 2.0], end=2.0, status=200).tokens == 2
    assert Record(sent=0.0, chunks=[1.0], end=1.0, status=200).tpot is None  # one token has no per-token time


def test_percentiles_interpolate_between_ranks_as_numpy_does() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0 and math.isnan(percentile([], 50))


def test_a_run_pools_gaps_over_requests_and_leaves_failures_out() -> None:
    a = Record(sent=0.0, chunks=[0.2, 0.3, 0.5], end=0.5, status=200, usage_tokens=3)
    b = Record(sent=0.0, chunks=[0.4, 0.8], end=0.9, status=200, usage_tokens=2)
    refused = Record(sent=0.0, end=0.01, status=429, retry_after="3", error="busy")
    s = summarize([a, b, refused], seconds=1.0)
    assert (s.requests, s.failed, s.tokens, s.rate) == (2, 1, 5, 5.0)
    assert s.ttft == Dist.of([0.2, 0.4])
    assert s.itl == Dist.of([0.1, 0.2, 0.4])  # every gap of every request, pooled
    assert s.tpot.p50 == pytest.approx(((0.5 - 0.2) / 2 + (0.9 - 0.4) / 1) / 2)


def test_sse_payloads_are_read_as_the_two_servers_send_them() -> None:
    """The role chunk is not the first token; several pieces, then the usage chunk with no choices."""
    stream = [
        (1.0, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        (1.5, {"choices": [{"index": 0, "delta": {"content": "Once"}}]}),
        (1.6, {"choices": [{"index": 0, "delta": {"content": " upon"}}]}),
        (1.7, {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
        (1.8, {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}}),
    ]
    rec, parts = Record(sent=0.5, status=200), []
    for now, ev in stream:
        serve_client.read_event(rec, json.dumps(ev), now, parts)
    rec.end = 1.8
    assert rec.chunks == [1.5, 1.6] and "".join(parts) == "Once upon"
    assert rec.ttft == pytest.approx(1.0) and rec.tokens == 2


def test_poisson_arrivals_are_seeded_and_have_the_asked_rate() -> None:
    assert serve_client.arrivals(5, None) == [0.0] * 5
    times = serve_client.arrivals(2000, 4.0, seed=1)
    assert times == serve_client.arrivals(2000, 4.0, seed=1) and times[0] == 0.0
    assert all(b >= a for a, b in zip(times, times[1:], strict=False))
    assert 0.22 < times[-1] / (len(times) - 1) < 0.28  # mean gap 1/rate


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf: Path) -> object:
    from appliance.engines import cpu_backend

    cpu_backend.load()
    from llama_cpp import Llama

    return Llama(str(smollm2_gguf), vocab_only=True, verbose=False)


def _count(tokenizer: object, text: str) -> int:
    return len(tokenizer.tokenize(text.encode(), add_bos=False))  # type: ignore[attr-defined]


def test_the_shared_prefix_is_about_1500_tokens_and_the_questions_differ(tokenizer: object) -> None:
    convs = serve_workloads.shared_prefix(16)
    assert 1350 <= _count(tokenizer, convs[0].system) <= 1650
    assert {c.system for c in convs} == {convs[0].system}
    assert len({c.turns for c in convs}) == 16
    first = convs[3].messages(0, [])
    assert first == [{"role": "system", "content": convs[0].system}, {"role": "user", "content": convs[3].turns[0]}]


def test_the_long_prompt_is_about_2000_tokens_and_shares_no_text_with_the_handbook(tokenizer: object) -> None:
    text = serve_workloads.long_prompt().turns[0]
    assert 1800 <= _count(tokenizer, text) <= 2200
    assert text[:20] != serve_workloads.handbook()[:20] and not serve_workloads.long_prompt().system


def test_a_multi_turn_conversation_resends_the_whole_history() -> None:
    conv = serve_workloads.multi_turn(4, turns=3)[1]
    assert len(conv.turns) == 3 and conv.turns[0] == serve_workloads.PROMPTS[1]
    third = conv.messages(2, ["first answer", "second answer"])
    assert third == [
        {"role": "user", "content": conv.turns[0]}, {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": conv.turns[1]}, {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": conv.turns[2]}]
    with pytest.raises(ValueError, match="needs the 2 answers"):
        conv.messages(2, ["only one"])


@pytest.fixture(scope="module")
def our_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    contender = ours(smollm2_gguf.resolve(), "llama.cpp", 1, tmp_path_factory.mktemp("bench-serve"))
    with contender.start(2, 512) as target:
        yield target


@pytest.mark.slow
def test_the_client_streams_from_our_real_server_and_carries_the_answers_into_the_next_turn(our_server: Target) -> None:
    convs = [serve_workloads.multi_turn(1, turns=2)[0], *serve_workloads.short(1)]
    records, seconds = serve_client.run(our_server, convs, concurrency=2, max_tokens=6)
    assert len(records) == 3 and all(r.ok for r in records), [(r.status, r.error) for r in records]
    assert seconds > 0 and all(r.usage_tokens is not None and 1 <= r.tokens <= 6 for r in records)
    assert all(r.chunks == sorted(r.chunks) and r.sent <= r.chunks[0] <= r.end for r in records)
    first, second = sorted((r for r in records if r.conversation == 0), key=lambda r: r.turn)
    assert second.turn == 1 and first.prompt_tokens and second.prompt_tokens
    # the second turn's prompt holds the first turn's prompt and answer, then the follow-up
    assert second.prompt_tokens > first.prompt_tokens + first.tokens
    s = summarize(records, seconds)
    assert s.requests == 3 and s.tokens == sum(r.tokens for r in records) and not math.isnan(s.ttft.p50)


def test_the_ratios_are_ours_over_llama_server_per_workload_and_concurrency() -> None:
    from bench.serve_report import Row, ratio_lines, ratios

    def run(rate: float, ttft: float) -> object:
        return summarize([Record(sent=0.0, chunks=[ttft, ttft + 0.1], end=ttft + 0.1, status=200, usage_tokens=2)], 2 / rate)

    rows = [Row("llama-server", "short", 8, run(100.0, 0.2)), Row("ours", "short", 8, run(120.0, 0.1)),  # type: ignore[arg-type]
            Row("ours", "multi-turn", 8, run(50.0, 0.1))]  # type: ignore[arg-type]
    ((workload, clients, rate, ttft),) = ratios(rows, "ours", "llama-server")  # multi-turn has no llama-server row
    assert (workload, clients) == ("short", 8) and rate == pytest.approx(1.2) and ttft == pytest.approx(0.5)
    assert ratio_lines(rows, "ours", "llama-server")[-1] == "ratio_vs_llama_server short@8=1.20"


def test_over_several_rounds_the_ratio_is_the_median_of_each_rounds_own_ratio() -> None:
    from bench.serve_report import Row, ratio_lines, ratios, table

    def run(rate: float) -> object:
        return summarize([Record(sent=0.0, chunks=[0.1, 0.2], end=0.2, status=200, usage_tokens=2)], 2 / rate)

    # Round by round ours/llama-server is 0.90, 1.50, 1.00: the median 1.00, not the ratio of the mean rates.
    pairs = [(100.0, 90.0), (100.0, 150.0), (200.0, 200.0)]
    rows = [Row(name, "short", 1, run(rate), k)  # type: ignore[arg-type]
            for k, (theirs, mine) in enumerate(pairs) for name, rate in (("llama-server", theirs), ("ours", mine))]
    ((_, _, rate, _),) = ratios(rows, "ours", "llama-server")
    assert rate == pytest.approx(1.0)
    lines = ratio_lines(rows, "ours", "llama-server")
    assert "[0.90 1.50 1.00]" in lines[2] and lines[-1] == "ratio_vs_llama_server short@1=1.00"
    assert [t for t in table(rows).splitlines() if t.startswith("round")] == ["round 1", "round 2", "round 3"]
