"""Tool calling through the official openai client on both engines: a forced call whose arguments
match the function's schema, the round trip with the function's result, tool_choice none, required
and named, streamed tool-call deltas; and the fixed call format parsed from free (auto) answers."""

from __future__ import annotations

import json

import pytest

from appliance.server import protocol as P
from appliance.server import tool_stream, tools
from tests.openai_fixtures import MODEL, serve


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def api(request):
    yield from serve(request)


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16}},
                          "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _ask(api, messages, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 40)
    return api.client.chat.completions.create(model=MODEL, messages=messages, **kw)


def test_round_trip_with_a_named_tool(api):
    r = _ask(api, ASK, tools=[WEATHER, TIME], tool_choice=NAMED)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city"} and isinstance(args["city"], str)
    assert call.id and call.type == "function"
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
    answer = _ask(api, history, tools=[WEATHER, TIME], max_tokens=24)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_required_calls_one_of_the_tools(api):
    r = _ask(api, [{"role": "user", "content": "What time is it in Berlin?"}], tools=[WEATHER, TIME], tool_choice="required")
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert (call.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"zone"}))
    assert call.function.name != "get_time" or args["zone"] in ("UTC", "CET")


def test_none_answers_as_if_there_were_no_tools(api):
    plain = _ask(api, ASK, max_tokens=16)
    none = _ask(api, ASK, max_tokens=16, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.content == plain.choices[0].message.content
    assert not none.choices[0].message.tool_calls


def test_a_forced_call_streams_as_tool_call_deltas(api):
    chunks = list(_ask(api, ASK, tools=[WEATHER], tool_choice="required", stream=True))
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    assert len(deltas) > 3 and all(d.index == 0 and not d.id for d in deltas[1:])  # the arguments as they grow
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert set(args) == {"city"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_a_tool_choice_naming_an_unlisted_function_is_a_400(api):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        _ask(api, ASK, tools=[TIME], tool_choice=NAMED)
    assert e.value.body["param"] == "tool_choice" and "which tools does not list" in e.value.body["message"]


def test_a_forced_tool_whose_schema_cannot_be_compiled_is_a_400_naming_tools(api):
    import openai

    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}}
    with pytest.raises(openai.BadRequestError) as e:
        _ask(api, ASK, tools=[bad], tool_choice="required")
    assert e.value.body["param"] == "tools" and "strin" in e.value.body["message"]


def _plan(**kw):
    return tools.plan(P.ChatCompletionRequest.model_validate({"messages": ASK, "tools": [WEATHER, TIME], **kw}))


def test_auto_calls_are_parsed_from_the_fixed_format():
    plan = _plan()
    assert plan.mode == "auto" and tools.TOOLS_INTRO in plan.messages[0]["content"] and "get_time" in plan.messages[0]["content"]
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' \
           '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    content, calls = tools.parse(text, plan)
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert len(tools.parse(text, _plan(parallel_tool_calls=False))[1]) == 1
    # an unknown function or broken JSON is content, not a call
    assert tools.parse('<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call>', plan)[1] == []
    assert tools.parse("<tool_call>\n{oops", plan) == ("<tool_call>\n{oops", [])


def test_auto_streaming_holds_back_a_call():
    f = tool_stream.ContentFilter(_plan())
    out = f.feed("Sure. <tool") + f.feed("_call>\n{\"name\"")
    assert out == "Sure. " and f.feed(" more") == ""


def test_earlier_calls_and_results_are_rendered_for_the_template():
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    msgs = tools.plan(P.ChatCompletionRequest.model_validate({"messages": history})).messages
    assert msgs[1] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert msgs[2] == {"role": "tool", "content": "sunny"}


def test_a_forced_call_streams_its_arguments_as_they_grow():
    s = tool_stream.ChoiceStream(_plan(tool_choice="required"))
    text = '<tool_call>\n{ "name": "get_weather", "arguments": {"city": "Pa\\"ris}"} }\n</tool_call>'
    deltas = [d for ch in text for d in s.feed(ch)]
    head, *rest = [d["tool_calls"][0] for d in deltas]
    assert head["function"] == {"name": "get_weather", "arguments": ""} and head["id"].startswith("call_")
    assert json.loads("".join(d["function"]["arguments"] for d in rest)) == {"city": 'Pa"ris}'}
    assert s.finish({"content": None, "tool_calls": [{}]}, "tool_calls") == []
