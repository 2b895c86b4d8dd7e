"""The hash-chained audit log finds edited, deleted and inserted lines."""

from __future__ import annotations

import json
import threading

import pytest

from appliance import audit
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
