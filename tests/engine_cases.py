"""Behaviour both engines must show; test_engine_llama_cpp.py and test_engine_transformers.py run these."""

from __future__ import annotations

import pytest

from appliance.engines.scheduler import Delta, QueueFull, SamplingParams
from tests.server_fixtures import generate, generate_together, install_adapter, submit
from tests.waiting import wait_until

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count from one to five.", "What is 2 + 2?"]


def check_batched_equals_alone(engine) -> None:
    """Continuous batching must not change answers: each sequence has its own cache and sampler."""
    alone = [generate(engine, q, 16).text for q in QUESTIONS]
    together = [f.text for f in generate_together(engine, QUESTIONS, 16)]
    assert together == alone
    assert len(set(alone)) > 1


def check_join_mid_answer(engine) -> None:
    """A request that arrives while another is decoding joins the batch and both answer correctly."""
    ref_a, ref_b = generate(engine, QUESTIONS[0], 24).text, generate(engine, QUESTIONS[1], 8).text
    seq_a, done_a, ev_a = submit(engine, QUESTIONS[0], 24)
    wait_until(lambda: any(isinstance(e, Delta) for e in ev_a), "the first answer started")
    _, done_b, ev_b = submit(engine, QUESTIONS[1], 8)
    assert done_a.wait(300) and done_b.wait(300)
    assert ev_a[-1].text == ref_a and ev_b[-1].text == ref_b
    assert "".join(e.text for e in ev_a if isinstance(e, Delta)) == ref_a


def check_limits_and_stops(engine) -> None:
    fin = generate(engine, "Write a long story about a dragon.", 5)
    assert fin.reason == "length" and fin.completion_tokens == 5
    full = generate(engine, "Count from one to ten, separated by commas.", 30).text
    assert len(full) > 8
    stop = full[len(full) // 2: len(full) // 2 + 3]  # from the middle of the answer, possibly across tokens
    cut = generate(engine, "Count from one to ten, separated by commas.", 30, stop=(stop, "never-said-xyz"))
    assert cut.reason == "stop" and cut.text == full[: full.index(stop)]


def check_cancel_frees_slot(engine) -> None:
    seq, done, events = submit(engine, "Write a very long essay about the sea.", 400, ignore_eos=True)
    wait_until(lambda: any(isinstance(e, Delta) for e in events), "the answer started")
    seq.cancel()
    assert done.wait(60)
    assert events[-1].reason == "cancelled" and events[-1].completion_tokens < 400
    assert engine.live == 0  # the slot is free by the time the cancellation is reported


def check_queue_bound(engine) -> None:
    old = engine.max_queue
    engine.max_queue = 0
    try:
        held = [submit(engine, "Write a very long essay about mountains.", 200, ignore_eos=True) for _ in range(engine.max_batch)]
        with pytest.raises(QueueFull):
            for _ in range(engine.max_batch + 1):
                submit(engine, "hello", 4)
    finally:
        engine.max_queue = old
        for seq, _, _ in held:
            seq.cancel()
        for _, done, _ in held:
            assert done.wait(60)


def check_sampling_seed(engine) -> None:
    a = generate(engine, "Tell me a word.", 12, temperature=1.0, seed=7).text
    b = generate(engine, "Tell me a word.", 12, temperature=1.0, seed=7).text
    assert a == b


def check_adapter_swap(engine, layout, lora_dir) -> None:
    """Swapping changes answers, the old answer returns after going back, and nothing fails meanwhile."""
    base = [f.text for f in generate_together(engine, QUESTIONS, 12)]
    install_adapter(layout, "a1", lora_dir)
    from appliance import adapters

    busy = [submit(engine, q, 24) for q in QUESTIONS[: engine.max_batch]]
    wait_until(lambda: all(any(isinstance(e, Delta) for e in events) for _, _, events in busy), "every answer started")
    assert engine.swap_adapter(adapters.active_adapter(layout), wait=300)
    for _, done, events in busy:
        assert done.wait(300)
        assert events[-1].reason in ("stop", "length") and events[-1].adapter is None
    assert engine.adapter_id == "a1" and engine.adapter_error is None
    tuned = generate_together(engine, QUESTIONS, 12)
    assert all(f.adapter == "a1" for f in tuned)
    assert [f.text for f in tuned] != base  # a random LoRA may leave a confident answer alone, not all four
    # Base and adapter requests in the same batches: each gets what it asked for.
    mixed = [submit(engine, q, 12, use_adapter=(i % 2 == 0)) for i, q in enumerate(QUESTIONS)]
    for _, done, _ in mixed:
        assert done.wait(300)
    for i, (_, _, events) in enumerate(mixed):
        fin = events[-1]
        assert (fin.text, fin.adapter) == ((tuned[i].text, "a1") if i % 2 == 0 else (base[i], None))
    assert engine.swap_adapter(None, wait=300)
    assert engine.adapter_id is None and [f.text for f in generate_together(engine, QUESTIONS, 12)] == base


def check_bad_adapter_keeps_serving(engine, layout) -> None:
    from appliance.adapters import Adapter

    before = engine.adapter_id
    bad_dir = layout.adapters / "broken"
    (bad_dir / "peft").mkdir(parents=True, exist_ok=True)
    (bad_dir / "peft" / "adapter_model.safetensors").write_bytes(b"not a model")
    (bad_dir / "peft" / "adapter_config.json").write_text("{}")
    (bad_dir / "adapter.gguf").write_bytes(b"not a gguf")
    engine.swap_adapter(Adapter("broken", bad_dir, {}), wait=300)
    assert engine.adapter_id == before and "broken" in (engine.adapter_error or "")
    assert generate(engine, QUESTIONS[3], 4).reason in ("stop", "length")


def check_empty_and_overlong_prompts(engine) -> None:
    from appliance.errors import EngineError

    with pytest.raises(EngineError, match="empty"):
        engine.submit([], SamplingParams(max_tokens=4), lambda e: None)
    with pytest.raises(EngineError, match="context holds"):
        engine.submit([1] * engine.context_length, SamplingParams(max_tokens=4), lambda e: None)



def check_shared_prefix(engine) -> None:
    """The template's preamble is computed once and copied into each sequence: same answers as without."""
    backend = engine.backend
    with_prefix = [f.text for f in generate_together(engine, QUESTIONS, 12)]
    assert len(backend.prefix) >= 4  # the system preamble of SmolLM2's template
    saved, backend.prefix = backend.prefix, []
    try:
        without = [f.text for f in generate_together(engine, QUESTIONS, 12)]
    finally:
        backend.prefix = saved
    assert with_prefix == without
