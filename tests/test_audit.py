"""The hash-chained audit log finds edited, deleted and inserted lines."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from appliance import audit
from appliance.audit import chain
from appliance.cli import main
from appliance.paths import Layout


@pytest.fixture
def layout(tmp_path):
    lay = Layout.at(tmp_path)
    for i in range(5):
        audit.append(lay, {"event": "request", "route": "/v1/chat/completions", "status": 200, "n": i})
    return lay


def lines(layout):
    return layout.audit_log.read_text().splitlines()


def test_chain_verifies_and_links(layout):
    assert audit.verify(layout) == (True, None)
    rows = [json.loads(x) for x in lines(layout)]
    assert rows[0]["prev"] == audit.GENESIS
    assert all(rows[i + 1]["prev"] == rows[i]["hash"] for i in range(4))
    assert all("time" in r for r in rows)


def test_edited_line_is_found(layout):
    ls = lines(layout)
    ls[2] = ls[2].replace('"status": 200', '"status": 201')
    layout.audit_log.write_text("\n".join(ls) + "\n")
    assert audit.verify(layout) == (False, 3)


def test_deleted_line_is_found(layout):
    ls = lines(layout)
    del ls[1]
    layout.audit_log.write_text("\n".join(ls) + "\n")
    assert audit.verify(layout) == (False, 2)


def test_reordered_and_garbage_lines_are_found(layout):
    ls = lines(layout)
    ls[3], ls[4] = ls[4], ls[3]
    layout.audit_log.write_text("\n".join(ls) + "\n")
    assert audit.verify(layout) == (False, 4)
    layout.audit_log.write_text("\n".join(lines(layout)[:2] + ["not json"]) + "\n")
    assert audit.verify(layout) == (False, 3)


def test_concurrent_appends_keep_one_chain(tmp_path):
    lay = Layout.at(tmp_path)

    def work(k):
        for i in range(20):
            audit.append(lay, {"event": "t", "thread": k, "i": i})

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lines(lay)) == 80
    assert audit.verify(lay) == (True, None)


def test_audit_verify_verb(layout, capsys):
    assert main(["audit", "verify", "--root", str(layout.root)]) == 0
    assert "5 lines, chain intact" in capsys.readouterr().out
    ls = lines(layout)
    del ls[0]
    layout.audit_log.write_text("\n".join(ls) + "\n")
    layout.audit_anchor.unlink()  # without the anchor, the chain's own check still finds it
    assert main(["--root", str(layout.root), "audit", "verify"]) == 19
    assert "breaks at line 1" in capsys.readouterr().err


def test_a_link_in_place_of_the_log_is_not_written_through(tmp_path):
    """The log's directory is the service user's; root appends to it (`appliance keys revoke`)."""
    from appliance.errors import StateError

    lay = Layout.at(tmp_path / "root")
    lay.audit_log.parent.mkdir(parents=True)
    victim = tmp_path / "sudoers"
    victim.write_text("root ALL=(ALL) ALL\n")
    lay.audit_log.symlink_to(victim)
    with pytest.raises(StateError, match="symbolic link"):
        audit.append(lay, {"event": "key_revoked"})
    assert victim.read_text() == "root ALL=(ALL) ALL\n"


# The anchor: root records the head where the service cannot write, and verify holds the chain to it.

def rewrite(layout, rows):
    layout.audit_log.write_bytes(b"".join(chain.encode(r) for r in rows))


def rechained(rows):
    """What a service user with no secret can do: edit a line and recompute every hash after it."""
    out, prev = [], audit.GENESIS
    for r in rows:
        out.append(chain.seal(prev, r))
        prev = out[-1]["hash"]
    return out


def test_root_appends_anchor_the_head_in_root_s_own_directory(layout):
    a = audit.read_anchor(layout)
    last = json.loads(lines(layout)[-1])
    assert (a.file, a.lines, a.hash, a.offset) == ("audit.jsonl", 5, last["hash"], layout.audit_log.stat().st_size)
    assert layout.audit_anchor.parent == layout.installer_state
    assert oct(layout.installer_state.stat().st_mode & 0o777) == "0o755"


def test_a_truncated_tail_fails_against_the_anchor(layout, capsys):
    layout.audit_log.write_text("\n".join(lines(layout)[:3]) + "\n")
    assert audit.verify(layout) == (False, 3)
    assert main(["audit", "verify", "--root", str(layout.root)]) == 19
    assert "audit.jsonl has 3 lines, but root anchored 5 lines of audit.jsonl" in capsys.readouterr().err


def test_an_emptied_log_fails_against_the_anchor(layout, capsys):
    layout.audit_log.write_bytes(b"")
    assert main(["audit", "verify", "--root", str(layout.root)]) == 19
    assert "audit.jsonl is empty, but root anchored 5 lines" in capsys.readouterr().err
    layout.audit_log.unlink()
    assert audit.verify(layout)[0] is False


def test_an_edited_and_re_chained_line_fails_against_the_anchor(layout, capsys):
    rows = [json.loads(x) for x in lines(layout)]
    rows[2]["status"] = 500
    rewrite(layout, rechained(rows))
    assert main(["audit", "verify", "--root", str(layout.root)]) == 19
    assert "audit.jsonl line 5 is not the line root anchored" in capsys.readouterr().err
    rows[0]["route"] = "/elsewhere"  # re-chained from the very first line: the anchored file is gone
    rewrite(layout, rechained(rows))
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and r.problem.startswith("No audit file begins with the line that began audit.jsonl")


def test_what_the_service_appends_after_the_anchor_is_not_yet_proven(layout, capsys):
    """The service can still cut what it wrote after the last anchor; the anchor's lines stay proven."""
    for i in range(3):
        audit.append(layout, {"event": "request", "n": 10 + i}, anchor=False)
    assert audit.read_anchor(layout).lines == 5
    layout.audit_log.write_text("\n".join(lines(layout)[:6]) + "\n")
    assert audit.verify(layout) == (True, None)
    assert main(["audit", "verify", "--root", str(layout.root)]) == 0  # run as root: anchors what it checked
    assert audit.read_anchor(layout).lines == 6
    assert "the chain passes through the anchor: 6 lines of audit.jsonl" in capsys.readouterr().out


def test_a_broken_chain_does_not_move_the_anchor(layout, caplog):
    ls = lines(layout)
    del ls[1]
    layout.audit_log.write_text("\n".join(ls) + "\n")
    audit.append(layout, {"event": "key_revoked", "key_id": "k"})  # root: tries to anchor
    assert audit.read_anchor(layout).lines == 5 and "anchor stays where it was" in caplog.text
    assert audit.verify(layout) == (False, 2)


def test_a_non_canonical_line_is_rejected(layout):
    rows = [json.loads(x) for x in lines(layout)]
    compact = json.dumps(rows[1], sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # same content, same hash
    ls = lines(layout)
    ls[1] = compact
    layout.audit_log.write_text("\n".join(ls) + "\n")
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and r.bad_line == 2 and "not in the canonical form" in r.problem


def test_a_line_with_a_duplicate_key_is_rejected(layout):
    ls = lines(layout)
    ls[1] = '{"status": 999, ' + ls[1][1:]  # json.loads alone keeps the last "status": the hash would match
    layout.audit_log.write_text("\n".join(ls) + "\n")
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and r.bad_line == 2 and "names the key 'status' twice" in r.problem


def test_the_anchor_goes_to_the_journal_only_for_the_host_root(tmp_path, monkeypatch):
    from appliance.audit import anchor as anchor_mod

    seen = tmp_path / "journal"
    tool = tmp_path / "bin" / "systemd-cat"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\necho \"$@\" >> {seen}\n/bin/cat >> {seen}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    a = audit.Anchor("audit.jsonl", "f" * 64, 7, 900, "e" * 64, "2026-01-01T00:00:00+00:00")
    anchor_mod._journal(Layout.at(tmp_path), a)
    assert not seen.exists()
    anchor_mod._journal(Layout(Path("/")), a)
    assert seen.read_text() == f"-t appliance-audit -p notice\naudit anchor: file=audit.jsonl lines=7 offset=900 hash={'e' * 64} first={'f' * 64}\n"


def test_an_anchor_directory_the_service_took_over_is_not_written(layout, caplog):
    os.chown(layout.installer_state, 4321, 4321)
    audit.append(layout, {"event": "key_revoked", "key_id": "k"})  # the line is written, the anchor is not moved
    assert "must be a directory owned by root" in caplog.text and audit.read_anchor(layout).lines == 5
    assert len(lines(layout)) == 6


def test_a_torn_last_line_is_ended_and_reported_not_merged_into_the_next(layout):
    with layout.audit_log.open("ab") as f:
        f.write(b'{"event": "request", "n": 5, "pr')  # power lost mid-write
    audit.append(layout, {"event": "request", "n": 6}, anchor=False)
    ls = lines(layout)
    assert ls[5] == '{"event": "request", "n": 5, "pr' and json.loads(ls[6])["n"] == 6
    r = audit.verify_log(layout, anchor=False)
    assert not r.ok and r.bad_line == 6 and "line 6 is not a line the writer produced: it is not JSON" in r.problem
