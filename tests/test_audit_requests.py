"""Requests no key took are counted in /metrics and sampled into the audit log, not fsynced one by one."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from appliance import audit
from appliance.server.app import Settings, create_app
from appliance.server.middleware import Gate
from tests.scripted_engine import scripted_engine
from tests.server_fixtures import scripted_root


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def served(tmp_path):
    root = scripted_root(tmp_path)
    engine = scripted_engine(root.config)
    engine.start()
    app = create_app(Settings(root.layout, root.config.server, root.config.model.id, own_engine=False), engine)
    with TestClient(app) as client:
        gate = app.middleware_stack
        while not isinstance(gate, Gate):
            gate = gate.app
        clock = Clock()
        gate.sampler.clock = clock
        yield root, client, clock
    engine.close()


def rows(layout, since=0):
    if not layout.audit_log.exists():
        return []
    return [json.loads(x) for x in layout.audit_log.read_text().splitlines()[since:]]


def metric(client, root, reason):
    text = client.get("/metrics", headers={"Authorization": f"Bearer {root.admin_key}"}).text
    line = [x for x in text.splitlines() if x.startswith(f'appliance_rejected_requests_total{{reason="{reason}"}}')]
    return float(line[0].split()[-1]) if line else 0.0


def test_a_flood_without_a_key_writes_one_sampled_line_per_reason_a_minute(served):
    root, client, clock = served
    before = len(rows(root.layout))
    for _ in range(40):
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer apl-nope-nope"}).status_code == 401
        assert client.get("/no/such/path").status_code == 404
    new = rows(root.layout, before)
    assert [(r["event"], r["reason"], r["count"]) for r in new] == [
        ("requests_rejected", "unauthenticated", 1), ("requests_rejected", "unknown_path", 1)]
    assert new[0]["last"] == {"method": "GET", "status": 401}
    assert metric(client, root, "unauthenticated") == 80 and metric(client, root, "unknown_path") == 40

    clock.t += 61  # a minute on: the next one of each reason carries the count since the last line
    client.get("/v1/models")
    client.get("/no/such/path")
    new = rows(root.layout, before)[2:]
    assert [(r["reason"], r["count"]) for r in new if r["event"] == "requests_rejected"] == [("unauthenticated", 80), ("unknown_path", 40)]
    assert audit.verify(root.layout) == (True, None)


def test_loading_the_chat_page_is_neither_logged_nor_counted_as_rejected(served):
    root, client, _ = served
    before = len(rows(root.layout))
    for url in ("/", "/chat", "/chat/", "/chat/chat.js", "/chat/chat.css"):
        assert client.get(url).status_code == 200, url
    assert rows(root.layout, before) == []
    assert metric(client, root, "unauthenticated") == 0


def test_a_request_with_a_key_still_gets_its_own_line(served):
    root, client, _ = served
    before = len(rows(root.layout))
    for _ in range(3):
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {root.user_key}"}).status_code == 200
    assert [(r["event"], r["route"], r["status"]) for r in rows(root.layout, before)] == [("request", "/v1/models", 200)] * 3


def test_the_sampler_counts_between_lines():
    clock = Clock()
    s = audit.Sampler(interval=60, clock=clock)
    assert s.note("unauthenticated", status=401)["count"] == 1
    assert all(s.note("unauthenticated", status=401) is None for _ in range(9))
    assert s.note("unknown_path")["count"] == 1  # each reason has its own minute
    clock.t += 60
    rec = s.note("unauthenticated", status=403)
    assert rec["count"] == 10 and rec["last"] == {"status": 403}
