"""The HTTP API in process (FastAPI TestClient): auth, bad input, feedback, adapters, metrics and audit.

The model is scripted (tests/scripted_engine.py) so these run in seconds; the scheduler, the app,
the key store and the audit log are the real ones. The real engines answer through the real API in
tests/test_server_openai.py."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from appliance import adapters, audit
from appliance.feedback_store import FeedbackStore
from appliance.server.app import Settings, create_app
from tests.scripted_engine import REPLY, scripted_engine
from tests.server_fixtures import install_adapter, running, scripted_root
from tests.waiting import wait_until

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """An installed-looking root whose model is the scripted one (its file is never read)."""
    base = tmp_path_factory.mktemp("scripted")
    return scripted_root(base)


@pytest.fixture(scope="module")
def engine(root):
    with running(scripted_engine(root.config)) as e:
        yield e


@pytest.fixture(scope="module")
def client(root, engine):
    cfg = root.config
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, own_engine=False), engine)
    with TestClient(app) as c:
        yield c


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def ask(client, key, **body):
    body.setdefault("messages", [{"role": "user", "content": "Say hello."}])
    body.setdefault("max_tokens", 8)
    body.setdefault("temperature", 0)
    return client.post(CHAT, json=body, headers=auth(key))


def error_of(r):
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return body["error"]


def test_health_needs_no_key(client, root):
    assert client.get("/health/live").json()["status"] == "live"
    assert client.get("/health/ready").json() == {"status": "ready"}  # details only for an admin key
    ready = client.get("/health/ready", headers=auth(root.admin_key)).json()
    assert ready["status"] == "ready" and ready["model"] == "smollm2-135m-instruct"


@pytest.mark.parametrize("path, method", [(CHAT, "post"), ("/v1/completions", "post"), ("/v1/models", "get"),
                                          ("/v1/feedback", "post"), ("/metrics", "get"), ("/generate", "post"),
                                          ("/admin/keys", "get"), ("/admin/adapters/reload", "post"), ("/openapi.json", "get")])
def test_every_other_route_needs_a_key(client, path, method):
    r = getattr(client, method)(path)
    assert r.status_code == 401 and error_of(r)["code"] == "missing_api_key"
    r = getattr(client, method)(path, headers=auth("apl-00000000-wrong"))
    assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"


def test_admin_routes_refuse_user_keys(client, root):
    r = client.get("/admin/keys", headers=auth(root.user_key))
    assert r.status_code == 403 and error_of(r)["type"] == "permission_error"
    r = client.get("/admin/keys", headers=auth(root.admin_key))
    assert r.status_code == 200
    assert sorted(k["role"] for k in r.json()) == ["admin", "user"] and "hash" not in r.text


@pytest.mark.parametrize("change, status, param", [
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": -5}, 422, "max_tokens"),
    ({"max_tokens": "many"}, 422, "max_tokens"),
    ({"max_tokens": 10**9}, 400, "max_tokens"),
    ({"max_tokens": 10**30}, 422, "max_tokens"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 422, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ({"messages": [{"role": "tool", "content": "sunny"}]}, 400, "messages.0.tool_call_id"),
    ({"temperature": 9}, 422, "temperature"),
    ({"n": 9}, 422, "n"),
    ({"logit_bias": {"the": 1}}, 400, "logit_bias"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"response_format": {"type": "json_schema"}}, 400, "response_format.json_schema"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"stop": ""}, 422, "stop"),
])
def test_bad_input_is_a_4xx_in_openai_shape(client, root, change, status, param):
    r = ask(client, root.user_key, **change)
    assert r.status_code == status, r.text
    assert error_of(r)["param"] == param


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("temprature", 0.2), ("best_of", 2),
])
def test_a_field_the_server_does_not_honour_is_a_400_that_names_it(client, root, field, value):
    r = ask(client, root.user_key, **{field: value})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == field and err["code"] == "unsupported_parameter" and repr(field) in err["message"]


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}), ("top_logprobs", 2),
])
def test_chat_only_fields_are_a_400_on_completions(client, root, field, value):
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, field: value}, headers=auth(root.user_key))
    assert r.status_code == 400 and error_of(r)["param"] == field and error_of(r)["code"] == "unsupported_parameter"


def test_an_unhonoured_field_at_its_neutral_value_changes_nothing(client, root):
    neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False,
               "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "parallel_tool_calls": False,
               "functions": [], "function_call": "none"}
    r = ask(client, root.user_key, max_tokens=6, **neutral)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == REPLY[:6]
    assert ask(client, root.user_key, logprobs=0).status_code == 422  # 0 is not false
    nested = ask(client, root.user_key, messages=[{"role": "user", "content": "hi", "name": "bob"}])
    assert nested.status_code == 400 and error_of(nested)["param"] == "messages.0.name"


def test_broken_json_and_wrong_body_type(client, root):
    r = client.post(CHAT, content=b"{not json", headers={**auth(root.user_key), "Content-Type": "application/json"})
    assert r.status_code == 422 and error_of(r)
    r = client.post(CHAT, json=[1, 2], headers=auth(root.user_key))
    assert r.status_code == 422 and error_of(r)


def test_prompt_over_the_context_names_the_numbers(client, root):
    r = ask(client, root.user_key, messages=[{"role": "user", "content": "word " * 700}])
    assert r.status_code == 400
    err = error_of(r)
    assert err["code"] == "context_length_exceeded" and "512 tokens" in err["message"]
    assert any(w.isdigit() and int(w) > 512 for w in err["message"].split())


def test_body_over_the_cap_is_413(client, root):
    big = {"messages": [{"role": "user", "content": "x" * 70000}]}
    r = client.post(CHAT, json=big, headers=auth(root.user_key))
    assert r.status_code == 413 and error_of(r)["code"] == "body_too_large"


def test_chat_usage_record_and_feedback(client, root):
    r = ask(client, root.user_key, max_tokens=6)
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["role"] == "assistant"
    assert out["choices"][0]["message"]["content"] == REPLY[:6] and out["choices"][0]["finish_reason"] == "length"
    u = out["usage"]
    assert u["completion_tokens"] <= 6 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] > 6
    ok = client.post("/v1/feedback", json={"request_id": out["id"], "rating": -1, "corrected": "Hello!"}, headers=auth(root.user_key))
    assert ok.status_code == 200 and ok.json() == {"request_id": out["id"], "stored": True, "status": "held"}
    with FeedbackStore(root.layout.data / "feedback.sqlite3") as store:
        ex = [e for e in store.feedback("held") if e.request_id == out["id"]]
    assert len(ex) == 1 and ex[0].rating == -1 and ex[0].corrected == "Hello!"
    assert ex[0].answer == out["choices"][0]["message"]["content"]
    unknown = client.post("/v1/feedback", json={"request_id": "chatcmpl-nope", "rating": 1}, headers=auth(root.user_key))
    assert unknown.status_code == 404 and error_of(unknown)["param"] == "request_id"
    bad = client.post("/v1/feedback", json={"request_id": out["id"], "rating": 0}, headers=auth(root.user_key))
    assert bad.status_code == 422


def test_completions_and_generate_alias(client, root):
    r = client.post("/v1/completions", json={"prompt": "The sky is", "max_tokens": 4, "temperature": 0}, headers=auth(root.user_key))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 4
    g = client.post("/generate", json={"prompt": "Say hello.", "max_tokens": 6}, headers=auth(root.user_key))
    assert g.status_code == 200 and g.json()["text"] == ask(client, root.user_key, max_tokens=6).json()["choices"][0]["message"]["content"]


def test_streaming_sse_shape(client, root):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", CHAT, json=body, headers=auth(root.user_key)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 6
    assert text == ask(client, root.user_key, max_tokens=6).json()["choices"][0]["message"]["content"]


def test_metrics_count_requests_tokens_and_latency(client, root):
    ask(client, root.user_key, max_tokens=3)
    text = client.get("/metrics", headers=auth(root.user_key)).text
    assert 'appliance_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'appliance_requests_total{route="/v1/chat/completions",status="401"}' in text
    for name in ("appliance_request_latency_seconds_bucket", "appliance_time_to_first_token_seconds_count",
                 "appliance_prompt_tokens_total", "appliance_completion_tokens_total", "appliance_queue_depth",
                 "appliance_active_sequences", "appliance_adapter_info"):
        assert name in text
    count = [ln for ln in text.splitlines() if ln.startswith("appliance_time_to_first_token_seconds_count")][0]
    assert float(count.split()[-1]) >= 1


def test_audit_line_per_request_without_prompt_text(client, root):
    before = len(root.layout.audit_log.read_text().splitlines())
    r = ask(client, root.user_key, messages=[{"role": "user", "content": "secret-token-xyz"}], max_tokens=2)
    client.get("/v1/models")  # a 401
    rows = [json.loads(x) for x in root.layout.audit_log.read_text().splitlines()[before:]]
    chat = [x for x in rows if x.get("request_id") == r.json()["id"]][0]
    assert chat["route"] == CHAT and chat["status"] == 200 and chat["key_id"] and chat["completion_tokens"] <= 2
    assert chat["prompt_tokens"] > 0 and chat["latency_ms"] > 0 and "prompt" not in chat
    assert not any(x["event"] == "request" and x["key_id"] is None for x in rows)  # sampled: tests/test_audit_requests.py
    assert "secret-token-xyz" not in root.layout.audit_log.read_text()
    assert audit.verify(root.layout) == (True, None)


def test_audit_prompts_when_configured(root, engine):
    cfg = root.config
    server = dataclasses.replace(cfg.server, audit_prompts=True)
    app = create_app(Settings(root.layout, server, cfg.model.id, own_engine=False, watch_adapters=False), engine)
    with TestClient(app) as c:
        ask(c, root.user_key, messages=[{"role": "user", "content": "audit-me-please"}], max_tokens=2)
    assert "audit-me-please" in root.layout.audit_log.read_text()


def test_adapter_reload_route_and_watcher(client, root, random_lora):
    layout, admin = root.layout, root.admin_key
    install_adapter(layout, "r1", random_lora)
    r = client.post("/admin/adapters/reload", headers=auth(admin))
    assert r.status_code == 200 and r.json()["adapter"] == "r1"
    ids = [m["id"] for m in client.get("/v1/models", headers=auth(root.user_key)).json()["data"]]
    assert ids == ["smollm2-135m-instruct", "smollm2-135m-instruct:r1"]
    assert 'appliance_adapter_info{adapter="r1"} 1.0' in client.get("/metrics", headers=auth(admin)).text
    # The ids /v1/models lists choose per request: the base id turns the adapter off (the console's playground).
    key = root.user_key
    assert ask(client, key, model="smollm2-135m-instruct").json()["model"] == "smollm2-135m-instruct"
    assert ask(client, key, model="smollm2-135m-instruct:r1").json()["model"] == "smollm2-135m-instruct:r1"
    assert ask(client, key, model="gpt-4o").json()["model"] == "smollm2-135m-instruct:r1"  # unknown names: the default
    missing = ask(client, key, model="smollm2-135m-instruct:nope")
    assert missing.status_code == 404 and error_of(missing)["code"] == "model_not_found"
    # The server follows adapters/active by itself (about once a second), with no reload call.
    adapters.rollback(layout)
    wait_until(lambda: client.app.state.engine.adapter_id is None, "the server followed adapters/active back", 30)
    assert client.get("/health/ready", headers=auth(root.admin_key)).json()["adapter"] is None


def test_reload_of_a_broken_adapter_is_409_and_keeps_serving(client, root):
    layout = root.layout
    bad = layout.adapters / "bad1"
    (bad / "peft").mkdir(parents=True)
    (bad / "metadata.json").write_text("{}")
    (bad / "peft" / "adapter_model.safetensors").write_bytes(b"junk")
    (bad / "adapter.gguf").write_bytes(b"junk")
    adapters.promote(layout, "bad1")
    r = client.post("/admin/adapters/reload", headers=auth(root.admin_key))
    assert r.status_code == 409 and "bad1" in error_of(r)["message"]
    assert "bad1" in client.get("/health/ready", headers=auth(root.admin_key)).json()["adapter_error"]
    assert ask(client, root.user_key, max_tokens=2).status_code == 200
    adapters.rollback(layout)


def test_unreadable_key_file_is_503_not_500(client, root):
    path = root.layout.etc / "api-keys.json"
    saved = path.read_bytes()
    path.write_text("{broken")
    try:
        r = client.get("/v1/models", headers=auth(root.user_key))
        assert r.status_code == 503 and error_of(r)["code"] == "key_store_unavailable"
    finally:
        path.write_bytes(saved)
    assert client.get("/v1/models", headers=auth(root.user_key)).status_code == 200
