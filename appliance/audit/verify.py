"""Verify the chain: every file in order, line by line (never a whole file in memory), each line in
the writer's canonical form, each chained onto the one before, across files, and through the line
root anchored. Each failure is one sentence naming the file and line."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from appliance.audit.anchor import Anchor
from appliance.audit.chain import GENESIS, ROTATED_EVENT, BadLine, parse
from appliance.audit.files import chain_files, last_line, open_file, rotated_at
from appliance.errors import StateError


@dataclass
class Result:
    ok: bool
    lines: int = 0  # lines checked
    files: list[str] = field(default_factory=list)
    problem: str | None = None  # one sentence when not ok
    bad_line: int | None = None  # 1-based, in the file the problem names
    head: Anchor | None = None  # the last line checked, as an anchor would record it (time left empty)
    notes: list[str] = field(default_factory=list)


class _Broken(Exception):
    def __init__(self, problem: str, line: int | None) -> None:
        super().__init__(problem)
        self.problem, self.line = problem, line


def _open(path: Path) -> IO[bytes]:
    return os.fdopen(open_file(path), "rb")


class _Walk:
    """The state of one pass over the chain."""

    def __init__(self, anchor: Anchor | None, retention_days: int, now: datetime, relaxed: bool) -> None:
        self.anchor, self.retention_days, self.relaxed = anchor, retention_days, relaxed
        self.cutoff = now - timedelta(days=retention_days)
        self.anchor_seen = False
        self.prev: str | None = None  # the last hash of the file before
        self.prev_name: str | None = None
        self.head: Anchor | None = None
        self.result = Result(True)

    def file(self, path: Path, f: IO[bytes], n: int = 0, offset: int = 0, last: str | None = None, first: str | None = None) -> None:
        """Check `path` from byte `offset` (after `n` lines ending in hash `last`) to its end."""
        f.seek(offset)
        for raw in f:
            n += 1
            try:
                line = parse(raw)
            except BadLine as e:
                raise _Broken(f"{path.name} line {n} is not a line the writer produced: {e}.", n) from None
            if n == 1:
                first = line["hash"]
                self._start(path, line)
            elif line["prev"] != last:
                raise _Broken(f"{path.name}: the hash chain breaks at line {n}: that line or the one before it was edited, deleted or inserted.", n)
            last, offset = line["hash"], offset + len(raw)
            self.result.lines += 1
            a = self.anchor
            if a is not None and first == a.first and n == a.lines:
                if last != a.hash or offset != a.offset:
                    raise _Broken(f"{path.name} line {n} is not the line root anchored ({a.describe()}): "
                                  "the lines up to it were rewritten and re-chained.", n)
                self.anchor_seen = True
        a = self.anchor
        if a is not None and first == a.first and not self.anchor_seen:
            raise _Broken(f"{path.name} has {n} lines, but root anchored {a.describe()}: lines were cut off its end.", n)
        self.result.files.append(path.name)
        if n and first is not None and last is not None:
            self.prev, self.prev_name = last, path.name
            self.head = Anchor(path.name, first, n, offset, last, "")

    def _start(self, path: Path, line: dict[str, Any]) -> None:
        """Line 1 of a file: the genesis, or the continuation of the file before it."""
        continues = line.get("previous_file") if line.get("event") == ROTATED_EVENT else None
        if self.prev is None:  # the oldest file there is
            if line["prev"] == GENESIS or self.relaxed:
                return
            closed = rotated_at(continues) if isinstance(continues, str) else None
            if closed is not None and closed < self.cutoff:
                self.result.notes.append(f"the files up to {continues} were deleted after the retention of {self.retention_days} days")
                return
            if closed is not None:
                raise _Broken(f"{path.name} continues {continues}, which is missing and not yet past the retention of {self.retention_days} days.", 1)
            raise _Broken(f"{path.name}: the hash chain breaks at line 1: that line or the one before it was edited, deleted or inserted.", 1)
        if continues is not None and continues != self.prev_name:
            raise _Broken(f"{path.name} continues {continues}, which is missing (the file before it is {self.prev_name}).", 1)
        if line["prev"] != self.prev:
            raise _Broken(f"{path.name} line 1 does not continue the last line of {self.prev_name}: "
                          "a file between them is missing, or one of them was edited.", 1)

    def finish(self, current: Path, files: list[Path]) -> None:
        """After the last file: the anchored line must have been passed."""
        a = self.anchor
        if a is None or self.anchor_seen or self.relaxed:
            return
        if datetime.fromisoformat(a.time) < self.cutoff:
            self.result.notes.append(f"the anchor ({a.describe()}) is older than the retention, and its file is gone")
            return
        if not files:
            raise _Broken(f"There is no audit log at {current}, but root anchored {a.describe()}: the log was deleted.", None)
        if files[-1] == current and os.lstat(current).st_size == 0:
            raise _Broken(f"{current.name} is empty, but root anchored {a.describe()}: the log was emptied.", None)
        raise _Broken(f"No audit file begins with the line that began {a.file} when root anchored {a.describe()}: "
                      "that file was deleted, or rewritten from its first line.", None)


def _run(walk: _Walk, current: Path, files: list[Path], start: int = 0, at: Anchor | None = None) -> Result:
    try:
        for i, path in enumerate(files[start:], start):
            with _open(path) as f:
                if i == start and at is not None:
                    walk.file(path, f, at.lines, at.offset, at.hash, at.first)
                else:
                    walk.file(path, f)
        walk.finish(current, files)
    except _Broken as b:
        walk.result.ok, walk.result.problem, walk.result.bad_line = False, b.problem, b.line
    except StateError as e:  # a link, FIFO or hard link in place of a file
        walk.result.ok, walk.result.problem = False, e.message
    walk.result.head = walk.head
    return walk.result


def check(current: Path, anchor: Anchor | None, retention_days: int, *, now: datetime | None = None,
          only: Iterable[Path] | None = None) -> Result:
    """The whole chain that ends in `current` (or just the files `only`, each a chain of its own start)."""
    now = now or datetime.now(timezone.utc)
    files = list(only) if only is not None else chain_files(current)
    return _run(_Walk(anchor, retention_days, now, relaxed=only is not None), current, files)


def _first_hash(path: Path) -> str | None:
    with _open(path) as f:
        raw = f.readline()
    try:
        return str(parse(raw)["hash"])
    except BadLine:
        return None


def _anchored_file(files: list[Path], anchor: Anchor) -> int | None:
    """The index of the file whose line `anchor.lines` is the anchored line, if that is still so."""
    try:
        at = next((i for i in reversed(range(len(files))) if _first_hash(files[i]) == anchor.first), None)
        if at is None:
            return None
        with _open(files[at]) as f:
            size = f.seek(0, os.SEEK_END)
            raw = last_line(f, anchor.offset) if size >= anchor.offset else b""
        return at if parse(raw)["hash"] == anchor.hash else None
    except (StateError, BadLine):
        return None


def check_since(current: Path, anchor: Anchor, retention_days: int, *, now: datetime | None = None) -> Result | None:
    """What root checks before moving the anchor: from the anchored line to the end; None when that
    line is not where the anchor says (then only the whole chain, `check`, can say what is wrong)."""
    files = chain_files(current)
    at = _anchored_file(files, anchor)
    if at is None:
        return None
    walk = _Walk(anchor, retention_days, now or datetime.now(timezone.utc), relaxed=False)
    walk.anchor_seen = True
    walk.head = replace(anchor, time="")
    return _run(walk, current, files, at, anchor)
