"""The support bundle: every section present, its SHA-256 right, and no key, passphrase or API key inside."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from appliance import apikeys, audit
from appliance.cli.support import JOURNAL_LINES, collect, write_bundle
from appliance.paths import Layout
from installer.system.runner import RecordingRunner

PASSPHRASE = "correct horse battery staple"


def make_root(tmp_path: Path) -> tuple[Layout, str, bytes]:
    layout = Layout.at(tmp_path / "root")
    layout.etc.mkdir(parents=True)
    layout.var.mkdir(parents=True)
    layout.config_file.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 8088\n'
        f'[model]\ntier = "cpu"\nbackend = "llama.cpp"\n'
        f'[extra]\nupstream_token = "tok-123456"\nsmtp_password = "{PASSPHRASE}"\n'
    )
    _, key = apikeys.create(layout, "admin")
    model_key = os.urandom(32)
    (layout.etc / "model.key").write_bytes(model_key)  # a careless copy left on the host
    (layout.etc / "passphrase.txt").write_text(PASSPHRASE)
    layout.state_file.parent.mkdir(parents=True, exist_ok=True)
    layout.state_file.write_text(json.dumps({"highest_sequence": 2, "releases": [{"version": "0.1.0", "sequence": 2}]}))
    audit.append(layout, {"event": "install", "version": "0.1.0"})
    audit.append(layout, {"event": "upgrade", "version": "0.1.1"})
    return layout, key, model_key


def recorded_runner(api_key: str) -> RecordingRunner:
    journal = "".join(f"2026-11-22T03:00:{i % 60:02d} appliance[1]: request {i}\n" for i in range(5))
    journal += f"2026-11-22T03:01:00 appliance[1]: bad client sent Authorization: Bearer {api_key}\n"
    journal += f"2026-11-22T03:01:01 appliance[1]: pasted {api_key} into a prompt\n"
    return RecordingRunner(replies={
        ("systemctl", "show"): (0, "LoadState=loaded\nActiveState=active\nSubState=running\nNRestarts=1\n"),
        ("journalctl",): (0, journal),
    })


def extract(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_support_bundle_has_every_section_and_no_secret(tmp_path: Path) -> None:
    layout, api_key, model_key = make_root(tmp_path)
    runner = recorded_runner(api_key)
    tar_path = write_bundle(collect(layout, runner), tmp_path / "out", "20261122T030000Z")

    sha_line = (tmp_path / "out" / f"{tar_path.name}.sha256").read_text()
    assert sha_line == f"{hashlib.sha256(tar_path.read_bytes()).hexdigest()}  {tar_path.name}\n"

    files = extract(tar_path)
    assert {"versions.json", "state.json", "machine.json", "plan.json", "config.json", "audit.json", "units.json",
            "journal/appliance-server.service.log", "journal/appliance-trainer.timer.log"} <= set(files)
    assert json.loads(files["versions.json"])["packages"]["appliance"]
    assert json.loads(files["state.json"])["highest_sequence"] == 2
    assert "gpus" in json.loads(files["machine.json"])
    assert json.loads(files["units.json"])["appliance-server.service"]["ActiveState"] == "active"
    assert json.loads(files["audit.json"]) == {"ok": True, "first_bad_line": None}
    config = json.loads(files["config.json"])
    assert config["server"]["port"] == 8088
    assert config["extra"] == {"upstream_token": "[REDACTED]", "smtp_password": "[REDACTED]"}
    assert ["journalctl", "-u", "appliance-server.service", "-n", str(JOURNAL_LINES), "--no-pager", "-o", "short-iso"] in runner.commands
    assert b"request 4" in files["journal/appliance-server.service.log"]

    blob = b"\n".join(files.values())
    # the key is apl-<id>-<secret>, and the secret (token_urlsafe) may itself contain "-"
    for secret in (api_key.encode(), api_key.split("-", 2)[2].encode(), PASSPHRASE.encode(), b"tok-123456",
                   model_key, model_key.hex().encode()):
        assert secret not in blob
    assert b"Bearer [REDACTED]" in files["journal/appliance-server.service.log"]


def test_support_bundle_reports_a_broken_audit_chain(tmp_path: Path) -> None:
    layout, api_key, _ = make_root(tmp_path)
    lines = layout.audit_log.read_text().splitlines(keepends=True)
    i = next(n for n, x in enumerate(lines) if '"event": "install"' in x)  # after the key's creation
    lines[i] = lines[i].replace("install", "instal1")
    layout.audit_log.write_text("".join(lines))
    files = collect(layout, recorded_runner(api_key))
    result = json.loads(files["audit.json"])
    assert result["ok"] is False and result["first_bad_line"] is not None


def test_a_failing_section_does_not_stop_the_others(tmp_path: Path) -> None:
    layout, api_key, _ = make_root(tmp_path)
    layout.state_file.write_text("{not json")
    files = collect(layout, recorded_runner(api_key))
    assert "error" in json.loads(files["state.json"])
    assert json.loads(files["versions.json"])["python"]
