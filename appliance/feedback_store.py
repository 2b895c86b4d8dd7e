"""The feedback store: every chat exchange the server answers, and the ratings users give them.

SQLite in WAL mode, so the server writes while the trainer reads. Text is masked for personal data
(appliance.pii) before it is written: the store exists to feed the trainer, and nothing
personal should reach disk in the first place.

Each exchange remembers the key that asked for it; only that key may rate it, once. A correction
can be held (status `held`) until an admin accepts or rejects it; the trainer reads accepted
feedback only. Acceptance gives the rating a new row, after every row a trainer run has consumed,
so the next run picks it up however long it was held.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.pii import mask_messages, mask_text

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exchanges (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    messages TEXT NOT NULL,
    answer TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT,
    key_id TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES exchanges(request_id),
    created_at REAL NOT NULL,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    corrected TEXT,
    key_id TEXT,
    status TEXT NOT NULL DEFAULT 'accepted' CHECK (status IN ('accepted', 'held', 'rejected'))
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""
# Columns added since the first schema: a store written before them gains them (NULL key: no owner).
_ADDED = (("exchanges", "key_id", "TEXT"), ("feedback", "key_id", "TEXT"),
          ("feedback", "status", "TEXT NOT NULL DEFAULT 'accepted' CHECK (status IN ('accepted', 'held', 'rejected'))"))
DAY = 86400.0
STATUSES = ("accepted", "held", "rejected")


class FeedbackRefused(Exception):
    """A rating the store will not take: not the exchange's key (403), rated already (409), over the cap (429)."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after = status, code, message, retry_after


@dataclass(frozen=True)
class FeedbackExample:
    """One rating of one exchange; `row` orders them (the trainer remembers the last row it used)."""

    row: int
    request_id: str
    messages: list[dict]
    answer: str
    rating: int
    corrected: str | None
    model: str
    adapter: str | None
    status: str = "accepted"
    key_id: str | None = None

    @property
    def usable(self) -> bool:
        """Worth training on: rated good, or a user wrote the answer it should have given."""
        return bool(self.corrected) or self.rating > 0

    def item(self) -> dict[str, object]:
        """What an admin reviews (the admin API, `appliance feedback list`, the console): `id` is the row."""
        question = next((str(m.get("content", "")) for m in reversed(self.messages) if m.get("role") == "user"), "")
        return {"id": self.row, "request_id": self.request_id, "key_id": self.key_id, "rating": self.rating,
                "status": self.status, "question": question, "answer": self.answer, "corrected": self.corrected}

    def to_chat(self) -> list[dict]:
        """The conversation with the answer to learn: the correction when there is one."""
        return [*self.messages, {"role": "assistant", "content": self.corrected or self.answer}]


class FeedbackStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the server's threads; the lock serialises use of it.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._db.executescript(_SCHEMA)
            for table, column, decl in _ADDED:
                have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_exchange(self, request_id: str, messages: list[dict], answer: str, model: str, adapter: str | None,
                        key_id: str | None = None) -> None:
        """Remember one answered chat and the key that asked; a repeated request id keeps the first record."""
        masked, _ = mask_messages([{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages])
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO exchanges(request_id, created_at, messages, answer, model, adapter, key_id) VALUES (?,?,?,?,?,?,?)",
                (request_id, time.time(), json.dumps(masked, ensure_ascii=False), mask_text(answer), model, adapter, key_id),
            )

    def add_feedback(self, request_id: str, rating: int, corrected: str | None = None, *, key_id: str | None = None,
                     hold: bool = False, cap: int = 0, now: float | None = None) -> str:
        """Record `key_id`'s rating (+1 good, -1 bad) of its own exchange, optionally with the answer that
        should have been given; return its status (`held` when `hold` and there is a correction).

        KeyError for an unknown request id, ValueError for a rating other than +1/-1, FeedbackRefused for
        another key's exchange, a second rating, or a correction over `cap` in 24 hours (0: no cap).
        Committed before it returns.
        """
        if rating not in (-1, 1):
            raise ValueError(f"rating must be +1 or -1, not {rating!r}")
        now = time.time() if now is None else now
        status = "held" if hold and corrected else "accepted"
        with self._lock:
            row = self._db.execute("SELECT key_id FROM exchanges WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                raise KeyError(request_id)
            if row[0] != key_id:
                raise FeedbackRefused(403, "not_your_exchange", f"The exchange {request_id} was made with another API key; "
                                      "only the key that asked may rate or correct it.")
            if self._db.execute("SELECT 1 FROM feedback WHERE request_id = ?", (request_id,)).fetchone() is not None:
                raise FeedbackRefused(409, "already_rated", f"The exchange {request_id} has been rated already; "
                                      "an exchange takes one rating, and it cannot be changed.")
            if corrected and cap:
                self._check_cap(key_id, cap, now)
            self._db.execute(
                "INSERT INTO feedback(request_id, created_at, rating, corrected, key_id, status) VALUES (?,?,?,?,?,?)",
                (request_id, now, rating, mask_text(corrected) if corrected else None, key_id, status),
            )
        return status

    def _check_cap(self, key_id: str | None, cap: int, now: float) -> None:
        times = [t for (t,) in self._db.execute(
            "SELECT created_at FROM feedback WHERE key_id IS ? AND corrected IS NOT NULL AND created_at > ? ORDER BY created_at",
            (key_id, now - DAY))]
        if len(times) >= cap:
            wait = max(1, math.ceil(times[len(times) - cap] + DAY - now))
            raise FeedbackRefused(429, "correction_limit", f"This key sent {len(times)} corrections in the last 24 hours, "
                                  f"the limit ([server] corrections_per_day); retry in {wait} s.", wait)

    _SELECT = ("SELECT f.row, f.request_id, e.messages, e.answer, f.rating, f.corrected, e.model, e.adapter, f.status, f.key_id "
               "FROM feedback f JOIN exchanges e ON e.request_id = f.request_id ")

    def _examples(self, where: str, args: tuple[object, ...]) -> list[FeedbackExample]:
        with self._lock:
            rows = self._db.execute(self._SELECT + where + " ORDER BY f.row", args).fetchall()
        return [FeedbackExample(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7], r[8], r[9]) for r in rows]

    def examples_since(self, last_row: int) -> list[FeedbackExample]:
        """Every accepted rating after feedback row `last_row`, oldest first (filter with `.usable`):
        what the trainer reads. Held and rejected corrections never appear."""
        return self._examples("WHERE f.row > ? AND f.status = 'accepted'", (last_row,))

    def feedback(self, status: str | None = None) -> list[FeedbackExample]:
        """Every rating, or those with `status` (`held`: what waits for an admin)."""
        return self._examples("WHERE f.status = ?", (status,)) if status else self._examples("", ())

    def decide(self, row: int, accept: bool) -> FeedbackExample:
        """Accept or reject the held correction `row`; an accepted one moves to a new row, after every
        row a trainer run has read. KeyError when no held correction has that row."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                found = self._db.execute("SELECT request_id, created_at, rating, corrected, key_id FROM feedback "
                                         "WHERE row = ? AND status = 'held'", (row,)).fetchone()
                if found is None:
                    raise KeyError(row)
                if accept:
                    self._db.execute("DELETE FROM feedback WHERE row = ?", (row,))
                    cur = self._db.execute("INSERT INTO feedback(request_id, created_at, rating, corrected, key_id, status) "
                                           "VALUES (?,?,?,?,?, 'accepted')", found)
                    row = int(cur.lastrowid or 0)
                else:
                    self._db.execute("UPDATE feedback SET status = 'rejected' WHERE row = ?", (row,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return self._examples("WHERE f.row = ?", (row,))[0]

    def last_row(self) -> int:
        with self._lock:
            (value,) = self._db.execute("SELECT COALESCE(MAX(row), 0) FROM feedback").fetchone()
        return int(value)

    def counts(self) -> dict[str, int]:
        """Exchanges and ratings stored (for the console and status)."""
        with self._lock:
            (ex,) = self._db.execute("SELECT COUNT(*) FROM exchanges").fetchone()
            good, bad = self._db.execute(
                "SELECT COALESCE(SUM(rating > 0), 0), COALESCE(SUM(rating < 0), 0) FROM feedback"
            ).fetchone()
        return {"exchanges": int(ex), "good": int(good), "bad": int(bad)}
