"""response_format on both engines through the official openai client: parse() with a Pydantic model
(whole and streamed), json_object, a schema that cannot be compiled, and a constrained request in
the same batch as a free one."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from pydantic import BaseModel, Field

from tests.openai_fixtures import MODEL, chat, serve


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def api(request):
    yield from serve(request)


class Capital(BaseModel):
    city: str = Field(max_length=16)
    country: str = Field(max_length=16)


ASK = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]


def test_parse_returns_the_pydantic_object(api):
    r = api.client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Capital, max_tokens=40, temperature=0)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(msg.parsed, Capital) and Capital.model_validate_json(msg.content) == msg.parsed


def test_parse_streamed(api):
    with api.client.chat.completions.stream(model=MODEL, messages=ASK, response_format=Capital, max_tokens=40,
                                            temperature=0.8, seed=3) as stream:
        pieces = [ev.delta for ev in stream if ev.type == "content.delta"]
        final = stream.get_final_completion()
    assert len(pieces) > 1  # it did stream
    assert isinstance(final.choices[0].message.parsed, Capital)
    assert "".join(pieces) == final.choices[0].message.content


def test_json_object(api):
    r = chat(api, ASK[0]["content"], 40, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_a_schema_that_cannot_be_compiled_is_a_400_naming_it(api):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        chat(api, "Hi", 8, response_format=bad)
    err = e.value.body
    assert err["param"] == "response_format.json_schema.schema" and "strin" in err["message"]


def test_constrained_and_free_requests_in_one_batch(api):
    free_q = [{"role": "user", "content": "Name three colours."}]
    alone = chat(api, free_q[0]["content"], 16).choices[0].message.content
    steps = api.engine.steps

    async def both():
        client = api.aclient()
        try:
            return await asyncio.gather(
                client.chat.completions.parse(model=MODEL, messages=ASK, response_format=Capital, max_tokens=40, temperature=0),
                client.chat.completions.create(model=MODEL, messages=free_q, max_tokens=16, temperature=0))
        finally:
            await client.close()

    constrained, free = asyncio.run(both())
    assert isinstance(constrained.choices[0].message.parsed, Capital)
    assert free.choices[0].message.content == alone  # the other sequence's grammar did not touch it
    # decoded together: fewer steps than the two answers' tokens one after the other
    assert api.engine.steps - steps < constrained.usage.completion_tokens + free.usage.completion_tokens
