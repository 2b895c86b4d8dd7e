"""Per-key rate limits through the real API: requests and tokens per minute, live sequences, Retry-After.

The model is scripted (tests/scripted_engine.py) behind the real scheduler; the limiter's clock is
injected, so the windows are exercised without sleeping.
"""

from __future__ import annotations

import json
import threading

import openai
import pytest
from fastapi.testclient import TestClient

from appliance import apikeys
from appliance.cli import main
from appliance.config import ServerConfig
from appliance.engines.scheduler import Engine
from appliance.server.app import Settings, create_app
from appliance.server.limits import Lease, Limiter, Refused
from tests.scripted_engine import ScriptedBackend, scripted_engine
from tests.server_fixtures import live_server, running, scripted_root
from tests.waiting import wait_until

CHAT = "/v1/chat/completions"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("limits")
    return scripted_root(base)


@pytest.fixture(scope="module")
def engine(root):
    with running(scripted_engine(root.config)) as e:
        yield e


@pytest.fixture()
def app_clock(root, engine):
    cfg = root.config
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, own_engine=False, watch_adapters=False), engine)
    clock = Clock()
    app.state.limiter.clock = clock
    with TestClient(app) as c:
        yield c, clock


def ask(client, key, **body):
    body.setdefault("messages", [{"role": "user", "content": "Say hello."}])
    body.setdefault("max_tokens", 8)
    return client.post(CHAT, json=body, headers={"Authorization": f"Bearer {key}"})


def test_requests_per_minute_429_with_retry_after_from_the_window(app_clock, root):
    client, clock = app_clock
    _, key = apikeys.create(root.layout, "user", rpm=2)
    assert ask(client, key).status_code == 200
    clock.now += 10
    assert ask(client, key).status_code == 200
    clock.now += 10
    r = ask(client, key)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_requests" and "2 per minute" in err["message"]
    assert r.headers["Retry-After"] == "40"  # the first request leaves the window 60 s after it was made
    clock.now += 39
    assert ask(client, key).headers["Retry-After"] == "1"
    clock.now += 1
    assert ask(client, key).status_code == 200
    # Another key is not held back by this one's window.
    _, other = apikeys.create(root.layout, "user", rpm=2)
    assert ask(client, other).status_code == 200


def test_a_flood_over_the_limit_is_counted_not_audited_line_by_line(app_clock, root):
    client, _ = app_clock
    key_id, key = apikeys.create(root.layout, "user", rpm=1)
    before = len(root.layout.audit_log.read_text().splitlines()) if root.layout.audit_log.exists() else 0
    assert ask(client, key).status_code == 200
    for _ in range(20):
        assert ask(client, key).status_code == 429
    scrape = client.get("/metrics", headers={"Authorization": f"Bearer {root.admin_key}"}).text
    assert 'appliance_rejected_requests_total{reason="rate_limited"} 20.0' in scrape
    lines = [json.loads(x) for x in root.layout.audit_log.read_text().splitlines()[before:] if x.strip()]
    assert [x["status"] for x in lines if x.get("event") == "request" and x.get("key_id") == key_id] == [200]
    assert sum(1 for x in lines if x.get("event") == "requests_rejected" and x.get("reason") == "rate_limited") == 1


def test_tokens_per_minute_count_prompt_and_answer(app_clock, root):
    client, clock = app_clock
    _, key = apikeys.create(root.layout, "user", tpm=60)
    first = ask(client, key)
    used = first.json()["usage"]["total_tokens"]
    assert 30 < used < 60  # prompt (the rendered chat) and answer together
    clock.now += 5
    assert ask(client, key).status_code == 200  # under the limit when it started; it overshoots
    clock.now += 25
    r = ask(client, key)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_tokens"
    assert f"used {2 * used} tokens" in r.json()["error"]["message"]
    # Dropping the first request's prompt (charged at t=0) brings the window under 60: 30 s from now.
    assert r.headers["Retry-After"] == "30"
    clock.now += 30
    assert ask(client, key).status_code == 200


def test_a_request_that_fails_before_the_engine_frees_its_live_slot(app_clock, root):
    client, _ = app_clock
    _, key = apikeys.create(root.layout, "user", max_live=1)
    for _ in range(3):
        too_long = ask(client, key, messages=[{"role": "user", "content": "x" * 600}])
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert ask(client, key).status_code == 200


def test_the_server_default_applies_to_keys_without_their_own(root):
    """A keys store written before limits existed still loads; its keys get [server] key_rpm; 0 on a key is none."""
    layout = root.layout
    path = apikeys.keys_file(layout)
    saved = path.read_text()
    try:
        legacy = json.loads(saved)
        for r in legacy["keys"]:
            for name in ("rpm", "tpm", "max_live"):
                r.pop(name, None)
        path.write_text(json.dumps(legacy))
        record = apikeys.verify(layout, root.user_key)
        assert record is not None and (record.rpm, record.tpm, record.max_live) == (None, None, None)
    finally:
        path.write_text(saved)
    limiter = Limiter(ServerConfig(key_rpm=1, key_tpm=0, key_max_live=3), clock=Clock())
    assert limiter.limits(record) == (1, 0, 3)
    assert isinstance(limiter.admit(record), Lease)
    refused = limiter.admit(record)
    assert isinstance(refused, Refused) and refused.retry_after == 60
    _, key = apikeys.create(layout, "user", rpm=0)
    own = apikeys.verify(layout, key)
    assert own is not None
    limiter = Limiter(ServerConfig(key_rpm=1), clock=Clock())
    assert all(isinstance(limiter.admit(own), Lease) for _ in range(5))


class GatedBackend(ScriptedBackend):
    """Decodes only while `go` is set, so a test can hold a sequence live as long as it needs."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.go.set()

    def step(self, admit, live):
        assert self.go.wait(60), "the test never let the engine go on"
        return super().step(admit, live)


def test_live_sequences_and_the_openai_client_sees_rate_limit_error(root):
    cfg = root.config
    backend = GatedBackend()
    engine = Engine(backend, model_id=cfg.model.id, context_length=cfg.model.context_length, max_batch=4, max_queue=8,
                    backend_name="scripted")
    app = create_app(Settings(root.layout, cfg.server, cfg.model.id, watch_adapters=False), engine)
    clock = Clock()
    app.state.limiter.clock = clock
    _, key = apikeys.create(root.layout, "user", max_live=1, rpm=2)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        backend.go.clear()
        held = threading.Thread(target=lambda: client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4))
        held.start()
        try:
            wait_until(lambda: engine.live + engine.waiting == 1, "the first request is in the engine", 30)
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
            assert e.value.code == "too_many_live_requests" and e.value.response.headers["retry-after"] == "1"
        finally:
            backend.go.set()
            held.join(30)
        # Its end freed the slot: the next one runs; then its 2 requests a minute are spent (a refused one is not counted).
        assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4).choices
        clock.now += 15
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert e.value.response.headers["retry-after"] == "45"


def test_keys_create_with_limits_and_list_shows_them(tmp_path, capsys):
    assert main(["--root", str(tmp_path), "keys", "create", "--role", "user", "--rpm", "30", "--tpm", "20000",
                 "--max-live", "2", "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert (made["rpm"], made["tpm"], made["max_live"]) == (30, 20000, 2)
    assert main(["--root", str(tmp_path), "keys", "create", "--role", "admin"]) == 0
    capsys.readouterr()
    assert main(["--root", str(tmp_path), "keys", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "rpm 30, tpm 20000, live 2" in lines[0] and "rpm default, tpm default, live default" in lines[1]
    assert main(["--root", str(tmp_path), "keys", "create", "--role", "user", "--rpm", "-1"]) == apikeys.ApiKeyError.exit_code
    assert "0 (none) or more" in capsys.readouterr().err
