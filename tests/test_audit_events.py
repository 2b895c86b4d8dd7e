"""Who did what, and how it ended: keys, adapters, the installer's verbs and training runs each leave
an audit line, written in the one function every caller (CLI, console, trainer) goes through."""

from __future__ import annotations

import json
import os

import pytest

from appliance import adapters as reg
from appliance import apikeys, audit
from appliance.cli import main
from appliance.paths import Layout
from appliance.trainer.run import RunOptions, run_training
from tests.trainer_fixtures import TrainerRoot


def events(layout, since=0):
    if not layout.audit_log.exists():
        return []
    return [json.loads(x) for x in layout.audit_log.read_text().splitlines()[since:]]


def test_key_creation_and_revocation_are_audited_once_each(tmp_path, capsys):
    layout = Layout.at(tmp_path)
    assert main(["keys", "create", "--role", "user", "--json", "--root", str(tmp_path)]) == 0
    created = json.loads(capsys.readouterr().out)
    key_id = created["id"]
    assert main(["keys", "revoke", key_id, "--root", str(tmp_path)]) == 0
    apikeys.revoke(layout, key_id)  # again, as the console's Revoke would: nothing changes, nothing is logged
    ev = events(layout)
    assert [(e["event"], e["key_id"], e["role"], e["uid"]) for e in ev] == [
        ("key_created", key_id, "user", os.getuid()), ("key_revoked", key_id, "user", os.getuid())]
    assert ev[0]["rpm"] is None and created["key"] not in layout.audit_log.read_text()  # the key itself, never
    assert audit.verify(layout) == (True, None)


def _adapter(layout, adapter_id):
    staged = reg.staging_dir(layout, adapter_id)
    (staged / "peft").mkdir()
    (staged / "peft/adapter_model.safetensors").write_bytes(b"x")
    reg.register(layout, adapter_id, staged, {"created_at": adapter_id})


def test_adapter_promotion_and_rollback_are_audited(tmp_path, capsys):
    layout = Layout.at(tmp_path)
    _adapter(layout, "a1")
    _adapter(layout, "a2")
    reg.promote(layout, "a1")
    assert main(["adapters", "promote", "a2", "--root", str(tmp_path)]) == 0
    assert main(["adapters", "rollback", "--root", str(tmp_path)]) == 0
    reg.rollback(layout)
    assert [(e["event"], e.get("adapter"), e.get("previous"), e.get("from"), e.get("to")) for e in events(layout)] == [
        ("adapter_promoted", "a1", None, None, None), ("adapter_promoted", "a2", "a1", None, None),
        ("adapter_rolled_back", None, None, "a2", "a1"), ("adapter_rolled_back", None, None, "a1", None)]
    assert all(e["uid"] == os.getuid() for e in events(layout))


def test_a_failed_upgrade_and_rollback_and_an_uninstall_are_audited(tmp_path, capsys):
    layout = Layout.at(tmp_path)
    layout.log_dir.mkdir(parents=True)  # a site whose log survives (a broken install, an uninstall without --purge)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert main(["upgrade", str(bundle), "--root", str(tmp_path), "--yes", "--no-systemd"]) != 0
    assert main(["rollback", "--root", str(tmp_path), "--yes", "--no-systemd"]) != 0
    assert main(["uninstall", "--root", str(tmp_path), "--yes", "--no-systemd"]) == 0
    ev = events(layout)
    assert [(e["event"], e["outcome"], e["actor"]) for e in ev] == [
        ("upgrade", "failed", "installer"), ("rollback", "failed", "installer"), ("uninstall", "done", "installer")]
    assert ev[0]["reason"].startswith("Nothing is installed under") and ev[0]["bundle"] == str(bundle)
    assert ev[1]["reason"] == "There is no earlier release to roll back to."
    assert all(e["uid"] == os.getuid() for e in ev) and audit.read_anchor(layout).lines == 3


def test_a_dry_run_leaves_no_audit_line(tmp_path, capsys):
    layout = Layout.at(tmp_path)
    layout.log_dir.mkdir(parents=True)
    assert main(["rollback", "--root", str(tmp_path), "--yes", "--no-systemd", "--dry-run"]) != 0
    assert events(layout) == []


def test_training_runs_are_audited_with_their_outcome(trainer_root: TrainerRoot):
    trainer_root.add_inbox("few.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)])
    report = run_training(trainer_root.layout, RunOptions(log=lambda s: None))
    ev = events(trainer_root.layout)
    assert [(e["event"], e["run"]) for e in ev] == [("training_started", report["id"]), ("training_finished", report["id"])]
    assert ev[1]["outcome"] == "skipped" and "min_new_examples = 5" in ev[1]["reason"] and ev[1]["adapter"] is None
    assert ev[0]["uid"] == os.getuid() and ev[1]["seconds"] >= 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_key_made_and_revoked_in_the_console_is_audited(tmp_path, anyio_backend):
    from tests.test_console_screens import make_app, until

    app = make_app(tmp_path, first="keys")
    layout = app.sources.layout
    before = len(events(layout))
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one("DataTable")
        await until(pilot, lambda: table.row_count == 3, "the key list")
        await pilot.press("u")
        await until(pilot, lambda: type(app.screen).__name__ == "SecretDialog", "the new key")
        key_id = apikeys.verify(layout, app.screen.secret).id
        await pilot.press("c")
        await pilot.press("escape")
        keys_screen = app.screen
        await until(pilot, lambda: keys_screen.query_one("DataTable").row_count == 4, "the list with the new key")
        keys_screen.query_one("DataTable").move_cursor(row=3)
        await pilot.press("r")
        await until(pilot, lambda: type(app.screen).__name__ == "ConfirmDialog", "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: len(events(layout)) == before + 2, "the revocation's audit line")
    assert [(e["event"], e["key_id"], e["role"]) for e in events(layout, before)] == [
        ("key_created", key_id, "user"), ("key_revoked", key_id, "user")]
