"""The feedback store: every chat exchange the server answers, and the ratings users give them.

SQLite in WAL mode, so the server writes while the trainer reads. Text is masked for personal data
(appliance.pii) before it is written: the store exists to feed the trainer, and nothing
personal should reach disk in the first place.
"""

from __future__ import annotations

import json
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
    adapter TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES exchanges(request_id),
    created_at REAL NOT NULL,
    rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
    corrected TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
"""


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

    @property
    def usable(self) -> bool:
        """Worth training on: rated good, or a user wrote the answer it should have given."""
        return bool(self.corrected) or self.rating > 0

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_exchange(self, request_id: str, messages: list[dict], answer: str, model: str, adapter: str | None) -> None:
        """Remember one answered chat; a repeated request id keeps the first record."""
        masked, _ = mask_messages([{"role": str(m.get("role", "")), "content": str(m.get("content", ""))} for m in messages])
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO exchanges(request_id, created_at, messages, answer, model, adapter) VALUES (?,?,?,?,?,?)",
                (request_id, time.time(), json.dumps(masked, ensure_ascii=False), mask_text(answer), model, adapter),
            )

    def add_feedback(self, request_id: str, rating: int, corrected: str | None = None) -> None:
        """Record a rating (+1 good, -1 bad), optionally with the answer that should have been given.

        Raises KeyError for an unknown request id and ValueError for a rating other than +1/-1.
        Committed before it returns.
        """
        if rating not in (-1, 1):
            raise ValueError(f"rating must be +1 or -1, not {rating!r}")
        with self._lock:
            if self._db.execute("SELECT 1 FROM exchanges WHERE request_id = ?", (request_id,)).fetchone() is None:
                raise KeyError(request_id)
            self._db.execute(
                "INSERT INTO feedback(request_id, created_at, rating, corrected) VALUES (?,?,?,?)",
                (request_id, time.time(), rating, mask_text(corrected) if corrected else None),
            )

    def examples_since(self, last_row: int) -> list[FeedbackExample]:
        """Every rating after feedback row `last_row`, oldest first (filter with `.usable`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT f.row, f.request_id, e.messages, e.answer, f.rating, f.corrected, e.model, e.adapter "
                "FROM feedback f JOIN exchanges e ON e.request_id = f.request_id WHERE f.row > ? ORDER BY f.row",
                (last_row,),
            ).fetchall()
        return [FeedbackExample(r[0], r[1], json.loads(r[2]), r[3], r[4], r[5], r[6], r[7]) for r in rows]

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
