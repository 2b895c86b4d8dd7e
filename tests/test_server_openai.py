"""The official openai client (sync, async, streaming) against a real uvicorn on 127.0.0.1; overload
and client disconnects on the same live server."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from appliance.server.app import Settings, create_app
from tests.server_fixtures import live_server, submit
from tests.waiting import wait_until

MSG = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def url(gguf_root, llama_engine):
    cfg = gguf_root.config
    with live_server(create_app(Settings(gguf_root.layout, cfg.server, cfg.model.id, own_engine=False), llama_engine)) as u:
        yield u


def test_sync_client(url, gguf_root):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=gguf_root.user_key, max_retries=0)
    r = client.chat.completions.create(model="smollm2-135m-instruct", messages=MSG, max_tokens=12, temperature=0)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
    c = client.completions.create(model="x", prompt="One, two, three,", max_tokens=4, temperature=0)
    assert c.usage.completion_tokens == 4 and c.choices[0].text


def test_ignore_eos_runs_to_max_tokens(url, gguf_root):
    """vLLM's `ignore_eos` extension: the answer that would stop early goes on to max_tokens."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=gguf_root.user_key, max_retries=0)
    short = [{"role": "user", "content": "What is 2 + 2?"}]  # greedy SmolLM2 answers in about a dozen tokens
    plain = client.chat.completions.create(model="m", messages=short, max_tokens=60, temperature=0)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 60
    forced = client.chat.completions.create(model="m", messages=short, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 60
    assert forced.choices[0].message.content.startswith(plain.choices[0].message.content)


def test_streaming_matches_non_streaming(url, gguf_root):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=gguf_root.user_key, max_retries=0)
    whole = client.chat.completions.create(model="m", messages=MSG, max_tokens=12, temperature=0)
    stream = client.chat.completions.create(model="m", messages=MSG, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_async_client_concurrent(url, gguf_root):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=gguf_root.user_key, max_retries=0)
        questions = ["Name a colour.", "Name a fruit.", "Name an animal.", "Name a city."]
        outs = await asyncio.gather(*[client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0) for q in questions])
        stream = await client.chat.completions.create(model="m", messages=MSG, max_tokens=6, temperature=0, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return outs, streamed

    outs, streamed = asyncio.run(main())
    assert len({o.id for o in outs}) == 4 and all(o.choices[0].message.content for o in outs)
    assert streamed


def test_client_errors_are_typed(url, gguf_root):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="apl-0-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=MSG, max_tokens=2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=gguf_root.user_key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 700}], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="m", messages=MSG, max_tokens=0)


def test_overload_gives_429_with_retry_after(url, gguf_root, llama_engine):
    """With the live batch and the queue full, a request is refused at once with Retry-After; the queued one is served."""
    old = llama_engine.max_queue
    llama_engine.max_queue = 1
    headers = {"Authorization": f"Bearer {gguf_root.user_key}"}
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0}
    # Requests that cannot end early (ignore_eos) hold every slot while the test looks.
    held = [submit(llama_engine, "Write a long essay about rivers.", 400, ignore_eos=True) for _ in range(llama_engine.max_batch)]
    queued: list[httpx.Response] = []
    t = threading.Thread(target=lambda: queued.append(httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)))
    try:
        wait_until(lambda: llama_engine.live == llama_engine.max_batch, "every slot busy")
        t.start()
        wait_until(lambda: llama_engine.waiting == 1, "one request queued")
        refused = [httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) for _ in range(3)]
        assert llama_engine.live == llama_engine.max_batch and not any(done.is_set() for _, done, _ in held)
    finally:
        for seq, _, _ in held:
            seq.cancel()
        llama_engine.max_queue = old
    t.join(300)
    assert [r.status_code for r in refused] == [429] * 3
    assert all(int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error" for r in refused)
    assert queued[0].status_code == 200 and queued[0].json()["choices"][0]["message"]["content"]
    assert all(done.wait(60) and events[-1].reason == "cancelled" for _, done, events in held)


def test_a_whole_answer_relays_only_its_first_text_and_its_end(url, gguf_root, monkeypatch):
    """Non-streaming requests do not wake the event loop per token; streaming ones get every piece."""
    from appliance.engines.scheduler import Delta, Finished
    from appliance.server import serving

    relayed: list = []
    real_put = serving._Relay.put
    monkeypatch.setattr(serving._Relay, "put", lambda self, q, ev: (relayed.append(ev), real_put(self, q, ev))[1])
    headers = {"Authorization": f"Bearer {gguf_root.user_key}"}
    body = {"messages": [{"role": "user", "content": "Write about rivers."}], "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120).json()
    assert whole["usage"]["completion_tokens"] == 20 and whole["choices"][0]["message"]["content"]
    assert [type(ev) for ev in relayed] == [Delta, Finished]
    relayed.clear()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=headers, timeout=120) as r:
        text = "".join(r.iter_text())
    assert text.endswith("data: [DONE]\n\n") and sum(isinstance(ev, Delta) for ev in relayed) > 2


def _tokens_out(url, key) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    return float([ln for ln in text.splitlines() if ln.startswith("appliance_completion_tokens_total")][0].split()[-1])


def _wait_idle(engine) -> None:
    wait_until(lambda: engine.live == 0, "the engine went idle")


LONG = [{"role": "user", "content": "Write a very long essay about the sea."}]


def test_disconnect_mid_stream_frees_the_sequence(url, gguf_root, llama_engine):
    headers = {"Authorization": f"Bearer {gguf_root.user_key}"}
    before = _tokens_out(url, gguf_root.user_key)
    body = {"messages": LONG, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert llama_engine.live == 1
    _wait_idle(llama_engine)
    # The cancelled sequence stopped well short of its 400 tokens.
    assert _tokens_out(url, gguf_root.user_key) - before < 300


def test_non_streaming_disconnect_frees_the_sequence(url, gguf_root, llama_engine):
    headers = {"Authorization": f"Bearer {gguf_root.user_key}"}
    before = _tokens_out(url, gguf_root.user_key)
    body = {"messages": LONG, "max_tokens": 400, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=1.0)
    _wait_idle(llama_engine)
    assert _tokens_out(url, gguf_root.user_key) - before < 300
