"""Chunked prefill: a long prompt is prefilled `prefill_chunk` tokens a step, between the live answers'
tokens, so it never holds up the live streams for a whole prompt's work. Counted in steps and tokens per
decode call, never in time."""

from __future__ import annotations

import threading
from itertools import pairwise

import pytest

from appliance.engines.scheduler import Engine, SamplingParams, generate
from appliance.engines.sequences import Delta, Finished
from tests.scripted_engine import ScriptedBackend
from tests.server_fixtures import make_root
from tests.waiting import wait_until

LONG = 2000  # prompt tokens of the long request
LIVE = 7  # streams already decoding when it arrives
CHUNK = 256


def scripted(chunk: int) -> tuple[Engine, ScriptedBackend]:
    backend = ScriptedBackend()
    # Chunks of `chunk` whatever a step costs (prefill_share 1): these count steps, the time share is tested below.
    return Engine(backend, model_id="m", context_length=4096, max_batch=8, max_queue=8, prefill_chunk=chunk, prefill_share=1.0), backend


def collect(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[object, list]:
    events: list = []
    return engine.submit(prompt, params, events.append), events


def test_prompts_share_the_chunk_first_come_first_served():
    engine, backend = scripted(CHUNK)
    a = collect(engine, [65] * 600, SamplingParams(max_tokens=3))[1]
    b = collect(engine, [66] * 100, SamplingParams(max_tokens=3))[1]
    engine.start()  # both waiting: admitted at the same step
    try:
        wait_until(lambda: a and b and isinstance(a[-1], Finished) and isinstance(b[-1], Finished), "both answered")
    finally:
        engine.close()
    # 600 + 100 prompt tokens at 256 a step: 256, 256, then the last 88 and all of the second (188)
    first_token = next(i for i, seqs in enumerate(backend.answered) if seqs)
    assert first_token == 2 and len(backend.answered[2]) == 2
    assert a[-1].text == b[-1].text == "Hel" and a[-1].prompt_tokens == 600


class GatedBackend(ScriptedBackend):
    """Each step waits for `go`, so a test can act between two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()

    def step(self, admit, live):
        assert self.go.wait(60), "the test never let the engine go on"
        return super().step(admit, live)


def test_a_sequence_cancelled_mid_prefill_frees_its_slot():
    backend = GatedBackend()
    engine = Engine(backend, model_id="m", context_length=4096, max_batch=2, max_queue=2, prefill_chunk=16)
    engine.start()
    try:
        seq, events = collect(engine, [65] * 4000, SamplingParams(max_tokens=3))
        wait_until(lambda: engine.live == 1, "the long prompt admitted")
        seq.cancel()
        backend.go.set()
        wait_until(lambda: events, "the cancellation reported")
        assert events[-1].reason == "cancelled" and events[-1].completion_tokens == 0
        assert seq.prefilled < 4000 and not any(isinstance(e, Delta) for e in events) and engine.live == 0
    finally:
        backend.go.set()
        engine.close()


def test_live_streams_get_a_token_every_step_of_a_long_prefill_scripted():
    engine, backend = scripted(CHUNK)
    engine.start()
    try:
        live = [collect(engine, [67], SamplingParams(max_tokens=500, ignore_eos=True))[0] for _ in range(LIVE)]
        wait_until(lambda: all(s.generated for s in live), "the live streams started")
        _, events = collect(engine, [68] * LONG, SamplingParams(max_tokens=2))
        wait_until(lambda: events and isinstance(events[-1], Finished), "the long prompt answered")
        for s in live:
            s.cancel()
    finally:
        engine.close()
    during = [i for i, (admitted, _) in enumerate(backend.steps) if admitted]
    assert len(during) >= LONG // CHUNK
    assert all(all(s in backend.answered[i] for s in live) for i in during)


@pytest.fixture(scope="module")
def long_engine(tmp_path_factory, smollm2_gguf):
    """SmolLM2 with room for a 2,000-token prompt beside 7 live streams."""
    from appliance.engines import load_engine

    root = make_root(tmp_path_factory.mktemp("chunk"), smollm2_gguf, max_batch=LIVE + 1, context=LONG + 160)
    engine = load_engine(root.config.model, root.layout, max_batch=LIVE + 1, max_queue=4, prefix_cache_mib=0)
    engine.backend.index.best = lambda *a: (None, 0)  # every prompt prefilled whole: this is about chunks
    engine.prefill_share = 1.0  # chunks of CHUNK whatever they cost (the test of the time share sets its own)
    engine.start()
    yield engine
    engine.close()


def pump_log(engine, lines: int) -> list[int]:
    """A chat prompt asking about a log of `lines` lines (about 19 tokens a line)."""
    text = " ".join(f"Line {i}: the pump at station {i % 17} ran for {i * 3 % 50} minutes." for i in range(lines))
    return engine.tokenize(engine.render_chat([{"role": "user", "content": text + "\nWhich station ran longest?"}]))


def long_prompt(engine) -> list[int]:
    tokens = pump_log(engine, 107)
    assert abs(len(tokens) - LONG) < 200, len(tokens)
    return tokens


def unchunked_answer(model, prompt: list[int], params: SamplingParams) -> str:
    """The answer with the whole prompt in one llama_decode call, which llama.cpp computes in pieces of
    CHUNK tokens (its ubatch): the same pieces as the chunked prefill, so the same rounding. (Other
    piece sizes round differently, and on a long prompt that can change a greedy answer: llama.cpp's
    own answers depend on its batch size the same way.)"""
    from appliance.engines.llama_cpp_engine import LlamaCppBackend

    backend = LlamaCppBackend(model, context_length=LONG + 160, max_batch=1, threads=1, ubatch=CHUNK, prefix_cache_mib=0)
    backend.index.best = lambda *a: (None, 0)
    engine = Engine(backend, model_id="m", context_length=LONG + 160, max_batch=1, max_queue=1, prefill_chunk=0)
    engine.start()
    try:
        return generate(engine, prompt, params, 300).text
    finally:
        engine.close()


def test_llama_cpp_live_streams_get_a_token_every_step_and_the_answer_is_unchanged(long_engine, smollm2_gguf, monkeypatch):
    import llama_cpp

    engine = long_engine
    prompt = long_prompt(engine)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    unchunked = unchunked_answer(smollm2_gguf, prompt, params)
    assert engine.prefill_chunk == CHUNK

    sizes: list[int] = []
    real = llama_cpp.llama_decode
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, batch: sizes.append(batch.n_tokens) or real(ctx, batch))
    steps: list[tuple[list[int], int]] = []  # (each live stream's tokens so far, the long prompt's prefilled tokens)
    live = [engine.submit(engine.tokenize(engine.render_chat([{"role": "user", "content": f"Count to {n}."}])),
                          SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True), lambda e: None) for n in range(LIVE)]
    wait_until(lambda: all(s.generated for s in live), "the live streams started", 300)
    box: list = []
    held: list = []
    engine.on_step = lambda e: held and steps.append(([len(s.generated) for s in live], held[0].prefilled))
    held.append(engine.submit(prompt, params, box.append))
    try:
        wait_until(lambda: box and isinstance(box[-1], Finished), "the long prompt answered", 300)
    finally:
        engine.on_step = None
        for s in live:
            s.cancel()
        wait_until(lambda: engine.live == 0, "the live streams cancelled")
    assert box[-1].text == unchunked
    prefill = [i for i in range(1, len(steps)) if steps[i - 1][1] < len(prompt)]  # steps that prefilled part of it
    assert len(prefill) >= len(prompt) // CHUNK
    for i in prefill:
        assert [b - a for a, b in zip(steps[i - 1][0], steps[i][0], strict=True)] == [1] * LIVE
    assert max(sizes) <= CHUNK  # no decode call carried more than a chunk (the live tokens go in a call of their own)


def test_llama_cpp_prefill_beside_streaming_answers_takes_only_its_share_of_the_step(long_engine, monkeypatch):
    """With prefill_share, a long prompt's chunks beside 7 streams are sized from the measured step times,
    far below CHUNK (which alone took a step of many decode steps' time), and every stream still gets a
    token each step."""
    from appliance.engines.step_cost import MIN_CHUNK, StepCost

    engine = long_engine
    monkeypatch.setattr(engine, "prefill_share", 0.4)
    monkeypatch.setattr(engine, "cost", StepCost())  # measured afresh from this test's steps
    prompt = long_prompt(engine)[:700]  # long enough for many chunks, short enough for a quick test
    live = [engine.submit(engine.tokenize(engine.render_chat([{"role": "user", "content": f"Count to {n}."}])),
                          SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True), lambda e: None) for n in range(LIVE)]
    wait_until(lambda: all(s.generated for s in live), "the live streams started", 300)
    box: list = []
    held: list = []
    steps: list[tuple[list[int], int]] = []  # (each stream's tokens so far, the long prompt's prefilled tokens)
    engine.on_step = lambda e: held and steps.append(([len(s.generated) for s in live], held[0].prefilled))
    held.append(engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0.0), box.append))
    try:
        wait_until(lambda: box and isinstance(box[-1], Finished), "the long prompt answered", 600)
    finally:
        engine.on_step = None
        for s in live:
            s.cancel()
        wait_until(lambda: engine.live == 0, "the live streams cancelled")
    assert box[-1].reason == "length" and box[-1].prompt_tokens == len(prompt)
    done = [0, *(prefilled for _, prefilled in steps)]
    chunks = [b - a for a, b in pairwise(done) if b > a]
    assert sum(chunks) == len(prompt) and all(MIN_CHUNK <= c < CHUNK for c in chunks[:-1]), sorted(set(chunks))
    assert len(chunks) > 2 * len(prompt) // CHUNK  # well below CHUNK: a step's prefill is timed against its decode
    for (before, _), (after, _) in pairwise(steps):
        assert [b - a for a, b in zip(before, after, strict=True)] == [1] * LIVE


# --- the transformers engine (SmolLM2 as safetensors) -------------------------------------------------------------
TF_CHUNK = 64


@pytest.fixture(scope="module")
def tf_chunked(st_root):
    """SmolLM2 through transformers, prefilling TF_CHUNK prompt tokens a step whatever they cost."""
    from appliance.engines import load_engine

    cfg = st_root.config
    engine = load_engine(cfg.model, st_root.layout, max_batch=cfg.server.max_batch, max_queue=4, prefill_chunk=TF_CHUNK,
                         prefill_share=1.0)
    engine.start()
    yield engine
    engine.close()


def tf_long_prompt(engine) -> list[int]:
    tokens = pump_log(engine, 20)
    assert 300 < len(tokens) < 450, len(tokens)
    return tokens


def submit_held(engine, prompt: list[int], params: SamplingParams, sink, held: list) -> None:
    """Submit into `held`, which the on_step hooks read: the engine admits nothing until it is there (its
    condition's lock is reentrant), so the hooks see every step of the prefill."""
    with engine._cv:
        held.append(engine.submit(prompt, params, sink))


@pytest.fixture(scope="module")
def tf_whole(tf_chunked):
    """The long prompt's greedy answer with the prompt prefilled whole, in one forward pass."""
    prompt = tf_long_prompt(tf_chunked)
    tf_chunked.prefill_chunk = 0
    try:
        answer = generate(tf_chunked, prompt, SamplingParams(max_tokens=8, temperature=0.0), 120).text
    finally:
        tf_chunked.prefill_chunk = TF_CHUNK
        tf_chunked.backend.saved.clear()
    return prompt, answer


def test_transformers_prefills_a_long_prompt_in_chunks_and_answers_the_same(tf_chunked, tf_whole):
    engine, backend = tf_chunked, tf_chunked.backend
    prompt, whole = tf_whole
    box: list = []
    held: list = []
    steps: list[tuple[int, bool]] = []  # (its prefilled prompt tokens, answered yet) after each step
    engine.on_step = lambda e: held and steps.append((held[0].prefilled, bool(box)))
    before = engine.prefix_reused_tokens
    try:
        submit_held(engine, prompt, SamplingParams(max_tokens=8, temperature=0.0), box.append, held)
        wait_until(lambda: box and isinstance(box[-1], Finished), "the long prompt answered")
    finally:
        engine.on_step = None
        backend.saved.clear()
    assert box[-1].text == whole and box[-1].prompt_tokens == len(prompt)
    reused = engine.prefix_reused_tokens - before
    assert reused == len(backend.prefix) > 0  # the template's preamble, counted once, not once a chunk
    done = [reused, *(n for n, _ in steps)]
    chunks = [b - a for a, b in pairwise(done) if b > a]
    assert sum(chunks) == len(prompt) - reused and max(chunks) <= TF_CHUNK
    first = next(i for i, (_, answered) in enumerate(steps) if answered)
    assert first >= (len(prompt) - reused) // TF_CHUNK  # no token before the whole prompt was in the cache
    assert not backend.partial


def test_transformers_live_stream_gets_a_token_every_step_of_a_long_prefill(tf_chunked, tf_whole):
    engine = tf_chunked
    prompt, whole = tf_whole
    live = engine.submit(engine.tokenize(engine.render_chat([{"role": "user", "content": "Count to ten."}])),
                         SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), lambda e: None)
    wait_until(lambda: live.generated, "the live stream started")
    box: list = []
    held: list = []
    steps: list[tuple[int, int]] = []  # (the live stream's tokens, the long prompt's prefilled tokens) after each step
    engine.on_step = lambda e: held and steps.append((len(live.generated), held[0].prefilled))
    submit_held(engine, prompt, SamplingParams(max_tokens=4, temperature=0.0), box.append, held)
    try:
        wait_until(lambda: box and isinstance(box[-1], Finished), "the long prompt answered")
    finally:
        engine.on_step = None
        live.cancel()
        wait_until(lambda: engine.live == 0, "the live stream cancelled")
        engine.backend.saved.clear()
    assert box[-1].text == whole[:len(box[-1].text)] and box[-1].completion_tokens == 4
    prefilling = [i for i in range(1, len(steps)) if steps[i - 1][1] < len(prompt)]  # steps that computed part of it
    assert len(prefilling) >= (len(prompt) - len(engine.backend.prefix)) // TF_CHUNK
    assert all(steps[i][0] - steps[i - 1][0] == 1 for i in prefilling), steps


def test_transformers_sequence_cancelled_mid_prefill_is_dropped_and_the_next_answers(tf_chunked, tf_whole):
    engine, backend = tf_chunked, tf_chunked.backend
    prompt, whole = tf_whole
    events: list = []
    held: list = []
    seen: list[int] = []  # its prefilled tokens at the step it was cancelled

    def cancel_mid_prefill(e) -> None:
        if held and 0 < held[0].prefilled < len(prompt) and not seen:
            seen.append(held[0].prefilled)
            held[0].cancel()  # dropped before the next step

    engine.on_step = cancel_mid_prefill
    try:
        held.append(engine.submit(prompt, SamplingParams(max_tokens=8, temperature=0.0), events.append))
        wait_until(lambda: events and isinstance(events[-1], Finished), "the cancellation reported")
    finally:
        engine.on_step = None
    assert events[-1].reason == "cancelled" and events[-1].completion_tokens == 0 and len(events) == 1
    assert seen and seen[0] < len(prompt) and engine.live == 0
    assert not backend.partial and backend.saved.nbytes == 0  # its partial cells are gone, not saved as a prompt's
    assert generate(engine, prompt, SamplingParams(max_tokens=8, temperature=0.0), 120).text == whole
    backend.saved.clear()
