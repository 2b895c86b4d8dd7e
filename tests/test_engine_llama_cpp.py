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
