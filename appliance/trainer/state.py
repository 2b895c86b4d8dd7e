"""What the trainer remembers between runs, under /var/lib/appliance/trainer/, and the one-run-at-a-time lock.

Everything here is written atomically and only after an adapter was registered, so a run killed at
any point leaves the previous state, and the next run simply does the work again.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.atomic import atomic_write_bytes, atomic_write_json, fsync_dir, remove_partials
from appliance.errors import ApplianceError
from appliance.paths import Layout
from appliance.pii import Network, mask_line
from appliance.trainer.data import Example
from appliance.trainer.dedupe import SeenIndex

ANCHOR_MAX = 200  # earlier validation examples kept for the anti-forgetting check


class TrainerBusy(ApplianceError):
    default_hint = "Another `appliance train` is running; wait for it to finish (see `systemctl status appliance-trainer`)."


@dataclass(frozen=True)
class TrainerPaths:
    layout: Layout

    @property
    def dir(self) -> Path:
        return self.layout.var / "trainer"

    @property
    def state(self) -> Path:
        return self.dir / "state.json"

    @property
    def seen(self) -> Path:
        return self.dir / "seen.json"

    @property
    def anchor(self) -> Path:
        return self.dir / "anchor.jsonl"

    @property
    def replay(self) -> Path:
        return self.dir / "replay.jsonl"

    @property
    def lock(self) -> Path:
        return self.dir / "lock"

    @property
    def base_cache(self) -> Path:
        return self.dir / "base-cache"

    @property
    def runs(self) -> Path:
        return self.layout.var / "runs"

    @property
    def inbox(self) -> Path:
        return self.layout.data / "inbox"

    @property
    def processed(self) -> Path:
        return self.layout.data / "processed"

    @property
    def feedback_db(self) -> Path:
        return self.layout.data / "feedback.sqlite3"


@contextmanager
def run_lock(paths: TrainerPaths) -> Iterator[None]:
    """An exclusive flock: the kernel drops it when the process dies, even by kill -9."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainerBusy(f"A training run already holds {paths.lock}.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def clean_leftovers(paths: TrainerPaths) -> None:
    for d in (paths.dir, paths.runs, paths.layout.data):
        remove_partials(d)


def load_trainer_state(paths: TrainerPaths) -> dict:
    try:
        value = json.loads(paths.state.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def load_seen(paths: TrainerPaths) -> SeenIndex:
    try:
        return SeenIndex.from_json(json.loads(paths.seen.read_text()))
    except (OSError, ValueError):
        return SeenIndex()


def _load_examples(path: Path) -> list[Example]:
    try:
        return [Example.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError):
        return []


def _write_examples(path: Path, examples: list[Example]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(e.to_json(), ensure_ascii=False) + "\n" for e in examples).encode(), 0o640)


def load_anchor(paths: TrainerPaths) -> list[Example]:
    return _load_examples(paths.anchor)


def load_replay(paths: TrainerPaths) -> list[Example]:
    """Earlier runs' training examples, masked, newest last (appliance.trainer.replay)."""
    return _load_examples(paths.replay)


def commit_state(paths: TrainerPaths, state: dict, seen: SeenIndex, anchor: list[Example],
                 replay: list[Example] | None = None) -> None:
    """Record what this run consumed; the state file goes last, so it never points past the others."""
    atomic_write_json(paths.seen, seen.to_json())
    _write_examples(paths.anchor, anchor[-ANCHOR_MAX:])
    if replay is not None:
        _write_examples(paths.replay, replay)
    atomic_write_json(paths.state, state)


def move_processed(paths: TrainerPaths, files: list[Path], run_id: str, keep: tuple[Network, ...] = ()) -> list[str]:
    """Inbox files leave the inbox only when a run has finished with them, and no raw copy stays:
    processed/<run>/ keeps each file with its personal data masked, line by line, as it was trained on
    (a JSON line after its escapes are decoded; `keep`: the networks [trainer] keep_networks names)."""
    dest = paths.processed / run_id
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in files:
        if f.exists():
            lines = f.read_text(errors="replace").splitlines(keepends=True)
            masked = "".join(mask_line(line, keep) for line in lines)
            atomic_write_bytes(dest / f.name, masked.encode("utf-8", "backslashreplace"), 0o640)
            f.unlink()
            moved.append(f.name)
    if moved:
        fsync_dir(paths.inbox)
    return moved
