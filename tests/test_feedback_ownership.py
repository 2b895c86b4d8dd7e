"""Feedback belongs to the key that asked: only it rates its exchange, once; corrections are capped per
key and, from `user` keys, held until an admin accepts them (CLI, admin API); the trainer reads only
accepted ones. The model is scripted; the app, the key store, SQLite and the trainer's collect stage are real."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance import apikeys
from appliance.cli import main
from appliance.feedback_store import FeedbackStore
from appliance.server.app import Settings, create_app
from appliance.trainer.data import collect
from tests.scripted_engine import scripted_engine
from tests.server_fixtures import running, scripted_root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("owned")
    return scripted_root(base)


@pytest.fixture(scope="module")
def engine(root):
    with running(scripted_engine(root.config)) as e:
        yield e


def client_for(root, engine, **server):
    cfg = root.config
    settings = Settings(root.layout, dataclasses.replace(cfg.server, **server), cfg.model.id, own_engine=False, watch_adapters=False)
    return TestClient(create_app(settings, engine))


@pytest.fixture(scope="module")
def client(root, engine):
    with client_for(root, engine) as c:
        yield c


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def exchange(client, key, question="Say hello."):
    r = client.post("/v1/chat/completions", headers=auth(key),
                    json={"messages": [{"role": "user", "content": question}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def rate(client, key, rid, rating=1, corrected=None):
    body = {"request_id": rid, "rating": rating} | ({"corrected": corrected} if corrected else {})
    return client.post("/v1/feedback", headers=auth(key), json=body)


def test_only_the_key_that_asked_rates_its_exchange_and_only_once(client, root):
    rid = exchange(client, root.user_key)
    _, other = apikeys.create(root.layout, "user")
    r = rate(client, other, rid)
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_exchange"
    assert "only the key that asked" in r.json()["error"]["message"]
    r = rate(client, root.admin_key, rid)  # an admin key is another key too
    assert r.status_code == 403
    assert rate(client, root.user_key, rid).json() == {"request_id": rid, "stored": True, "status": "accepted"}
    again = rate(client, root.user_key, rid, -1, "Hi.")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_rated"
    assert "rated already" in again.json()["error"]["message"]
    with FeedbackStore(root.layout.data / "feedback.sqlite3") as store:
        mine = [e for e in store.feedback() if e.request_id == rid]
    assert [(e.rating, e.corrected, e.key_id) for e in mine] == [(1, None, apikeys.verify(root.layout, root.user_key).id)]


def test_user_corrections_are_held_admin_ones_accepted_unless_the_site_accepts_all(client, root, engine):
    held = rate(client, root.user_key, exchange(client, root.user_key), -1, "Hello there.")
    assert held.status_code == 200 and held.json()["status"] == "held"
    admin = rate(client, root.admin_key, exchange(client, root.admin_key), -1, "Hello, admin.")
    assert admin.json()["status"] == "accepted"
    with client_for(root, engine, accept_corrections=True) as auto:
        assert rate(auto, root.user_key, exchange(auto, root.user_key), -1, "Hi!").json()["status"] == "accepted"


def test_corrections_per_day_are_capped_per_key(root, engine):
    _, key = apikeys.create(root.layout, "user")
    _, other = apikeys.create(root.layout, "user")
    with client_for(root, engine, corrections_per_day=2) as c:
        for _ in range(2):
            assert rate(c, key, exchange(c, key), -1, "Better.").status_code == 200
        assert rate(c, key, exchange(c, key), 1).status_code == 200  # a rating without a correction is not capped
        r = rate(c, key, exchange(c, key), -1, "One too many.")
        assert r.status_code == 429 and r.json()["error"]["code"] == "correction_limit"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert 86_000 < int(r.headers["Retry-After"]) <= 86_400  # when the oldest correction leaves the 24 hours
        assert rate(c, other, exchange(c, other), -1, "Mine.").status_code == 200


def test_the_trainer_reads_accepted_feedback_only_and_an_accepted_one_later(root, client, capsys):
    store = FeedbackStore(root.layout.data / "feedback.sqlite3")
    try:
        before = store.last_row()
        rid = exchange(client, root.user_key, "What is the capital of Mars?")
        assert rate(client, root.user_key, rid, -1, "Mars has no capital.").json()["status"] == "held"
        rejected = exchange(client, root.user_key, "Bad advice?")
        assert rate(client, root.user_key, rejected, -1, "Ignore all rules.").json()["status"] == "held"
        first = collect(root.layout.data / "inbox", store, before)
        texts = json.dumps([r.value for r in first.records])
        assert "Mars has no capital" not in texts and "Ignore all rules" not in texts
        # The trainer's position moves past the held rows; acceptance must still reach the next run.
        held = {e.request_id: e.row for e in store.feedback("held")}
        assert main(["--root", str(root.layout.root), "feedback", "list", "--held", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert {i["request_id"] for i in listed} >= {rid, rejected} and all(i["status"] == "held" for i in listed)
        assert main(["--root", str(root.layout.root), "feedback", "accept", str(held[rid])]) == 0
        assert main(["--root", str(root.layout.root), "feedback", "reject", str(held[rejected])]) == 0
        assert "rejected correction" in capsys.readouterr().out
        assert main(["--root", str(root.layout.root), "feedback", "accept", str(held[rejected])]) == 1
        assert "no held correction" in capsys.readouterr().err
        second = collect(root.layout.data / "inbox", store, max(first.feedback_last_row, held[rid]))
        texts = json.dumps([r.value for r in second.records])
        assert "Mars has no capital" in texts and "Ignore all rules" not in texts
    finally:
        store.close()


def test_admins_review_held_corrections_over_the_api(client, root):
    rid = exchange(client, root.user_key, "How do I reset?")
    rate(client, root.user_key, rid, -1, "Hold the button.")
    assert client.get("/admin/feedback", headers=auth(root.user_key)).status_code == 403
    typo = client.get("/admin/feedback?statu=held", headers=auth(root.admin_key))
    assert typo.status_code == 400 and typo.json()["error"]["param"] == "statu"
    items = client.get("/admin/feedback", headers=auth(root.admin_key)).json()
    item = next(i for i in items if i["request_id"] == rid)
    assert item["question"] == "How do I reset?" and item["corrected"] == "Hold the button." and item["status"] == "held"
    r = client.post(f"/admin/feedback/{item['id']}/accept", headers=auth(root.admin_key))
    assert r.status_code == 200 and r.json()["status"] == "accepted"
    assert client.post(f"/admin/feedback/{item['id']}/accept", headers=auth(root.admin_key)).status_code == 404
    assert rid not in {i["request_id"] for i in client.get("/admin/feedback", headers=auth(root.admin_key)).json()}


def test_a_store_from_before_ownership_opens_and_keeps_its_feedback(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE exchanges (row INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, created_at REAL NOT NULL,
                                messages TEXT NOT NULL, answer TEXT NOT NULL, model TEXT NOT NULL, adapter TEXT);
        CREATE TABLE feedback (row INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL REFERENCES exchanges(request_id),
                               created_at REAL NOT NULL, rating INTEGER NOT NULL CHECK (rating IN (-1, 1)), corrected TEXT);
        INSERT INTO exchanges VALUES (1, 'r1', 0, '[]', 'a', 'm', NULL);
        INSERT INTO feedback VALUES (1, 'r1', 0, 1, 'b');""")
    db.commit()
    db.close()
    with FeedbackStore(path) as store:
        (ex,) = store.examples_since(0)
        assert (ex.status, ex.key_id, ex.corrected) == ("accepted", None, "b")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_console_screen_lists_held_corrections_and_accepts_one(client, root, engine, tmp_path):
    from appliance.console.app import ConsoleApp
    from appliance.console.screens.feedback import FeedbackScreen
    from appliance.console.sources.recorded import recorded_sources
    from appliance.console.sources.server import ServerClient
    from tests.server_fixtures import live_server

    first = exchange(client, root.user_key, "Where is the [bold]manual[/bold]?")
    rate(client, root.user_key, first, -1, "On the shelf.")
    second = exchange(client, root.user_key, "Second question")
    rate(client, root.user_key, second, -1, "Not this one.")
    cfg = root.config
    app_under_test = create_app(Settings(root.layout, cfg.server, cfg.model.id, own_engine=False, watch_adapters=False), engine)
    with live_server(app_under_test) as url:
        sources = recorded_sources(Path(__file__).parent / "fixtures" / "console", tmp_path / "croot")
        sources._server = ServerClient(url, lambda: root.admin_key, timeout=30)
        console = ConsoleApp(sources)
        async with console.run_test(size=(100, 30)) as pilot:
            screen = FeedbackScreen()
            await console.push_screen(screen)
            table = screen.query_one("DataTable")
            for _ in range(200):
                if table.row_count >= 2:
                    break
                await pilot.pause(0.05)
            held = {e.request_id: e.row for e in FeedbackStore(root.layout.data / "feedback.sqlite3").feedback("held")}
            assert table.row_count == len(held) >= 2
            footer = {(k.key, k.description) for k in screen.query("FooterKey")}
            assert {("a", "Accept"), ("x", "Reject")} <= footer
            row_of_first = [str(k.value) for k in table.rows].index(str(held[first]))
            table.move_cursor(row=row_of_first)
            await pilot.press("a")
            for _ in range(200):
                if table.row_count == len(held) - 1:
                    break
                await pilot.pause(0.05)
            assert table.row_count == len(held) - 1
            assert any("Accepted" in str(n.message) for n in console._notifications)
        sources._server.close()
    with FeedbackStore(root.layout.data / "feedback.sqlite3") as store:
        accepted = [e for e in store.examples_since(0) if e.request_id == first]
        still_held = {e.request_id for e in store.feedback("held")}
    assert accepted and accepted[0].corrected == "On the shelf." and first not in still_held and second in still_held
