"""The llama.cpp engine on SmolLM2 GGUF: continuous batching, limits, cancellation, LoRA swaps."""

from __future__ import annotations

import pytest

from appliance.engines.chat_template import ChatTemplate, ChatTemplateError


def test_chat_template_comes_from_the_gguf(llama_engine):
    text = llama_engine.render_chat([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


def test_chat_template_is_sandboxed():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(evil).render([{"role": "user", "content": "x"}])
    refusing = "{{ raise_exception('only user and assistant roles') }}"
    with pytest.raises(ChatTemplateError, match="only user and assistant"):
        ChatTemplate(refusing).render([])


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(llama_engine, monkeypatch):
    from tests.server_fixtures import generate

    real, calls = llama_engine.backend.step, []

    def fail_once(admit, live):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected decode failure")
        return real(admit, live)

    monkeypatch.setattr(llama_engine.backend, "step", fail_once)
    fin = generate(llama_engine, "Hello", 4)
    assert fin.reason == "error" and "injected" in fin.error
    assert generate(llama_engine, "Hello", 4).reason in ("stop", "length")
    assert llama_engine.live == 0


def test_every_decode_runs_on_the_engine_thread(gguf_root, monkeypatch):
    """One thread calls llama_decode, from the first (the shared prefix) to the last: a decode from a
    second thread gives libgomp a second team, and then every step ran about 2.5x slower."""
    import threading

    import llama_cpp

    from appliance.engines import load_engine
    from tests.server_fixtures import generate

    callers: list[int] = []
    real = llama_cpp.llama_decode

    def recording(ctx, batch):
        callers.append(threading.get_ident())
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    engine = load_engine(gguf_root.config.model, gguf_root.layout, max_batch=2, max_queue=2)
    assert callers == []  # loading decodes nothing
    engine.start()
    try:
        assert generate(engine, "Hello", 4).completion_tokens >= 1
    finally:
        engine.close()
    assert len(callers) > 2 and set(callers) == {engine._thread.ident}


def test_flash_attention_setting_reaches_llama_cpp_and_keeps_the_greedy_answer(gguf_root):
    """[model] flash_attn picks llama.cpp's attention kernel: the model's log-probabilities differ in their
    last digits (the two kernels sum in another order), the greedy answer to a real question does not,
    except where the model was torn between two tokens (on a CPU with AVX-512 the kernels part there)."""
    from dataclasses import replace

    from appliance.engines import load_engine
    from tests.server_fixtures import generate

    answers = {}
    for setting in ("on", "off"):
        engine = load_engine(replace(gguf_root.config.model, flash_attn=setting), gguf_root.layout, max_batch=1, max_queue=1)
        engine.start()
        try:
            answers[setting] = generate(engine, "What is the capital of France?", 12, logprobs=2)
        finally:
            engine.close()
    on, off = answers["on"], answers["off"]
    assert on.completion_tokens == off.completion_tokens == len(on.logprobs) == len(off.logprobs), (on.text, off.text)
    same = next((i for i, (a, b) in enumerate(zip(on.logprobs, off.logprobs, strict=True)) if a.token != b.token), len(off.logprobs))
    assert same >= 4, (on.text, off.text)
    if same < len(off.logprobs):  # where the answers part, the kernels' difference exceeded the model's margin
        (first, p1), (second, p2) = off.logprobs[same].top[:2]
        assert {first, second} == {off.logprobs[same].token, on.logprobs[same].token} and p1 - p2 < 0.2, (on.text, off.text, p1 - p2)
    else:
        assert on.text == off.text
    deltas = [abs(a.logprob - b.logprob) for a, b in zip(on.logprobs[:same], off.logprobs[:same], strict=True)]
    # The same model: flash attention sums the values in half precision, which moved a token's
    # log-probability by up to 0.2 here; another model moves them by nats.
    assert max(deltas) < 0.5 and sum(deltas) / len(deltas) < 0.1
    assert any(d > 0 for d in deltas)  # computed by another kernel: the setting reached the context
