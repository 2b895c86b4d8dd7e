"""The feedback store: SQLite in WAL mode, masked on write, read back by the trainer."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from appliance.feedback_store import FeedbackStore


def test_round_trip_and_usable(tmp_path):
    store = FeedbackStore(tmp_path / "data/feedback.sqlite3")
    msgs = [{"role": "user", "content": "How do I list adapters?"}]
    store.record_exchange("r1", msgs, "appliance adapters list", "m", None)
    store.record_exchange("r2", msgs, "no idea", "m", "a1")
    store.record_exchange("r3", msgs, "dunno", "m", "a1")
    store.add_feedback("r1", 1)
    store.add_feedback("r2", -1)
    store.add_feedback("r3", -1, corrected="Run `appliance adapters list`.")
    ex = store.examples_since(0)
    assert [e.request_id for e in ex] == ["r1", "r2", "r3"]
    assert [e.usable for e in ex] == [True, False, True]
    assert ex[2].to_chat()[-1] == {"role": "assistant", "content": "Run `appliance adapters list`."}
    assert ex[1].adapter == "a1"
    assert store.examples_since(ex[1].row) == [ex[2]]
    assert store.last_row() == ex[2].row
    assert store.counts() == {"exchanges": 3, "good": 1, "bad": 2}
    store.close()


def test_unknown_request_and_bad_rating(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")
    with pytest.raises(KeyError):
        store.add_feedback("nope", 1)
    store.record_exchange("r1", [], "x", "m", None)
    with pytest.raises(ValueError):
        store.add_feedback("r1", 5)
    assert store.examples_since(0) == []


def test_wal_and_committed_before_return(tmp_path):
    path = tmp_path / "f.sqlite3"
    store = FeedbackStore(path)
    store.record_exchange("r1", [{"role": "user", "content": "hi"}], "hello", "m", None)
    store.add_feedback("r1", 1)
    # A second connection (the trainer's process) sees the rating at once.
    other = sqlite3.connect(path)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert other.execute("SELECT rating FROM feedback").fetchall() == [(1,)]
    other.close()


def test_pii_masked_before_it_is_stored(tmp_path):
    path = tmp_path / "f.sqlite3"
    store = FeedbackStore(path)
    store.record_exchange("r1", [{"role": "user", "content": "mail me at zhang.wei@example.cn, phone 13812345678"}],
                          "card 4111 1111 1111 1111 noted", "m", None)
    store.add_feedback("r1", -1, corrected="ID 11010519491231002X received")
    store.close()
    raw = path.read_bytes() + (path.with_name(path.name + "-wal").read_bytes() if path.with_name(path.name + "-wal").exists() else b"")
    for secret in (b"zhang.wei@example.cn", b"13812345678", b"4111 1111 1111 1111", b"11010519491231002X"):
        assert secret not in raw
    ex = FeedbackStore(path).examples_since(0)[0]
    assert ex.messages[0]["content"] == "mail me at [EMAIL], phone [PHONE]"
    assert ex.answer == "card [CARD] noted" and ex.corrected == "ID [ID] received"


def test_concurrent_writers(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3")

    def work(n: int) -> None:
        for i in range(20):
            rid = f"{n}-{i}"
            store.record_exchange(rid, [{"role": "user", "content": rid}], "a", "m", None)
            store.add_feedback(rid, 1)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.examples_since(0)) == 80
