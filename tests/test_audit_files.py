"""Rotation carries the chain across files, retention keeps six months, verify walks every file."""

from __future__ import annotations

import json
import multiprocessing
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from appliance import audit
from appliance.audit import files
from appliance.errors import StateError
from appliance.paths import Layout

MIB = 1024 * 1024
BLOB = "x" * (600 * 1024)  # two of these pass the smallest rotation size


@pytest.fixture
def layout(tmp_path):
    lay = Layout.at(tmp_path)
    lay.config_file.parent.mkdir(parents=True)
    lay.config_file.write_text(f"[server]\naudit_rotate_bytes = {MIB}\n")
    return lay


def rotated(layout):
    return [p.name for p in files.chain_files(layout.audit_log)[:-1]]


def fill(layout, n, **kw):
    for i in range(n):
        audit.append(layout, {"event": "request", "blob": BLOB, "i": i}, **kw)


def test_a_full_file_is_rotated_and_the_next_one_continues_the_chain(layout):
    fill(layout, 3)
    assert len(rotated(layout)) == 1 and files.ROTATED.match(rotated(layout)[0])
    old = (layout.log_dir / rotated(layout)[0]).read_text().splitlines()
    first = json.loads(layout.audit_log.read_text().splitlines()[0])
    assert first["event"] == "audit_rotated" and first["previous_file"] == rotated(layout)[0] and first["previous_lines"] == 2
    assert first["prev"] == json.loads(old[-1])["hash"]
    r = audit.verify_log(layout)
    assert r.ok and r.lines == 4 and r.files == [rotated(layout)[0], "audit.jsonl"]
    assert audit.read_anchor(layout).lines == 2  # the header and the third line, in the new file


def test_the_anchor_follows_its_file_under_the_rotated_name(layout):
    fill(layout, 2)  # anchored: 2 lines of audit.jsonl
    fill(layout, 1, anchor=False)  # the service rotates it away
    a = audit.read_anchor(layout)
    assert a.file == "audit.jsonl" and a.lines == 2
    old = layout.log_dir / rotated(layout)[0]
    old.write_text(old.read_text().splitlines()[0] + "\n")  # cut below the anchor, in the rotated file
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and r.problem.startswith(f"{old.name} has 1 lines, but root anchored 2 lines of audit.jsonl")


def test_a_missing_middle_file_is_an_error(layout):
    fill(layout, 7)
    names = rotated(layout)
    assert len(names) == 3
    (layout.log_dir / names[1]).unlink()
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and r.problem == f"{names[2]} continues {names[1]}, which is missing (the file before it is {names[0]})."


def test_retention_deletes_only_files_closed_longer_ago_than_six_months(layout, monkeypatch):
    now = datetime.now(timezone.utc)
    for days_ago in (250, 100):
        monkeypatch.setattr(audit, "_now", lambda d=days_ago: now - timedelta(days=d))
        fill(layout, 3, anchor=False)
    monkeypatch.setattr(audit, "_now", lambda: now)
    before = rotated(layout)
    assert len(before) == 2
    fill(layout, 2, anchor=False)  # the third rotation prunes
    after = rotated(layout)
    assert before[0] not in after and before[1] in after and len(after) == 2
    r = audit.verify_log(layout, anchor=False)
    assert r.ok and any("deleted after the retention of 183 days" in n for n in r.notes)
    (layout.log_dir / before[1]).unlink()  # 100 days old: its absence is not retention
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and "which is missing and not yet past the retention of 183 days" in r.problem


def test_retention_cannot_be_set_below_six_months(layout):
    from appliance.config import ConfigError, ServerConfig, validate_section

    with pytest.raises(ConfigError, match="audit_retention_days is 30; it must be at least 183"):
        validate_section(ServerConfig, "server", {"audit_retention_days": 30})


def _appender(root: str, k: int) -> None:
    lay = Layout.at(root)
    for i in range(6):
        audit.append(lay, {"event": "request", "blob": BLOB, "proc": k, "i": i})


def test_two_appending_processes_rotate_once_each_time_and_keep_one_chain(layout):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(layout.root), k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    r = audit.verify_log(layout, anchor=False)
    assert r.ok, r.problem
    sizes = [(layout.log_dir / n).stat().st_size for n in rotated(layout)]
    assert all(MIB <= s < 2 * MIB for s in sizes)  # never a file rotated twice (a near-empty one)
    bodies = [json.loads(x) for n in [*rotated(layout), "audit.jsonl"] for x in (layout.log_dir / n).read_text().splitlines()]
    assert sorted((b["proc"], b["i"]) for b in bodies if b["event"] == "request") == [(k, i) for k in range(2) for i in range(6)]


def test_verify_streams_and_never_reads_a_whole_file(layout, monkeypatch):
    fill(layout, 3)

    def refusing(original):
        def read(self, *a, **k):
            assert self.parent != layout.log_dir, f"read all of {self.name}"
            return original(self, *a, **k)
        return read

    monkeypatch.setattr(Path, "read_bytes", refusing(Path.read_bytes))
    monkeypatch.setattr(Path, "read_text", refusing(Path.read_text))
    assert audit.verify(layout) == (True, None)


def test_a_file_root_creates_is_handed_to_the_log_directory_s_owner(layout):
    layout.log_dir.mkdir(parents=True)
    os.chown(layout.log_dir, 4321, 4321)  # the service user's directory
    fill(layout, 3)  # as root: the second file is created by root
    st = layout.audit_log.stat()
    assert (st.st_uid, st.st_gid) == (4321, 4321)


@pytest.mark.parametrize("plant", ["fifo", "hardlink", "lock-link"])
def test_a_planted_file_is_refused_without_writing_or_waiting(layout, tmp_path, plant):
    layout.log_dir.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_text("root ALL=(ALL) ALL\n")
    if plant == "fifo":
        os.mkfifo(layout.audit_log)
    elif plant == "hardlink":
        os.link(victim, layout.audit_log)
    else:
        (layout.log_dir / files.LOCK_NAME).symlink_to(victim)
    with pytest.raises(StateError, match="not a regular file|hard link|symbolic link"):
        audit.append(layout, {"event": "key_revoked"})
    assert victim.read_text() == "root ALL=(ALL) ALL\n"
