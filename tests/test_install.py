"""Install, upgrade, rollback, uninstall and status into a temporary root, with the slim installable bundles."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.cli import main
from appliance.errors import EXIT_CODES
from appliance.paths import Layout
from appliance.state import load_install_state
from installer.steps.lifecycle import install_lock
from tests.bundle_fixtures import SlimBundle
from tests.install_fixtures import InstallBundles


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def install_args(b: InstallBundles, root: Path, bundle: Path | None = None, *extra: str) -> list[str]:
    return ["install", str(bundle or b.b1), "--root", str(root), "--yes", "--key-file", str(b.model_key), *extra]


def status_json(capsys: pytest.CaptureFixture[str], root: Path) -> dict:
    code, out, err = cli(capsys, "status", "--root", str(root), "--json")
    assert code == 0, err
    return json.loads(out)


def test_install_upgrade_rollback_uninstall(install_bundles: InstallBundles, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    b, root = install_bundles, tmp_path / "root"
    code, out, err = cli(capsys, *install_args(b, root, None, "--no-systemd", "--trust", str(b.pub)))
    assert code == 0, err
    for step in ("verify", "plan", "preflight", "stage", "model", "engine", "config", "switch", "record"):
        assert f"==> {step}:" in err
    assert "appliance --root" in err and "serve" in err  # --no-systemd says how to run the server
    s = status_json(capsys, root)
    assert s["current"]["sequence"] == 1 and s["current"]["tier"] == "cpu" and len(s["releases"]) == 1
    model1 = s["model"]["path"]
    assert (root / model1.lstrip("/")).is_file()
    assert not (Layout.at(root).releases / s["current"]["id"] / "wheelhouse").exists()  # the copy pip used is gone
    # The release keeps its bundle's signed manifest: `hw` plans from the installed tier table.
    assert (Layout.at(root).current / "manifest.json").read_bytes() == (b.b1 / "manifest.json").read_bytes()
    code, out, err = cli(capsys, "hw", "--root", str(root), "--json")
    assert json.loads(out)["source"].startswith(f"bundle {Layout.at(root).current / 'manifest.json'}"), out
    from appliance.cli.support import collect
    from installer.system.runner import RecordingRunner

    assert json.loads(collect(Layout.at(root), RecordingRunner())["plan.json"])["chosen"] == "cpu"
    # `appliance` is on PATH: a link through `current` into the release's venv, which runs.
    link = Layout.at(root).command_link
    assert os.readlink(link) == str(Layout.at(root).command)
    assert subprocess.run([str(link), "--version"], capture_output=True, text=True, check=True).stdout.startswith("appliance ")

    # An administrator edits the config; the upgrade keeps the edit and the comment, and moves the model.
    config = Layout.at(root).config_file
    config.write_text(config.read_text().replace("port = 8088", "port = 9001  # our proxy expects this"))
    code, out, err = cli(capsys, "upgrade", str(b.b2), "--root", str(root), "--yes", "--no-systemd", "--key-file", str(b.model_key))
    assert code == 0, err
    assert "kept your values for server.port" in err
    s = status_json(capsys, root)
    assert s["current"]["sequence"] == 2 and [r["sequence"] for r in s["releases"]] == [1, 2]
    assert s["model"]["path"] != model1 and "port = 9001  # our proxy expects this" in config.read_text()
    assert s["last_install"]["action"] == "upgrade"

    # The same bundle again is a no-op; an older one is refused.
    code, out, err = cli(capsys, "upgrade", str(b.b2), "--root", str(root), "--yes", "--no-systemd", "--key-file", str(b.model_key))
    assert code == 0 and "nothing to do" in err + out
    code, out, err = cli(capsys, "upgrade", str(b.b1), "--root", str(root), "--yes", "--no-systemd", "--key-file", str(b.model_key))
    assert code == 12 and "lower than the installed sequence 2" in err

    code, out, err = cli(capsys, "rollback", "--root", str(root), "--yes", "--no-systemd")
    assert code == 0, err
    s = status_json(capsys, root)
    assert s["current"]["sequence"] == 1 and s["model"]["path"] == model1 and "port = 9001" in config.read_text()
    assert s["last_install"]["action"] == "rollback" and s["highest_sequence"] == 2

    from appliance import audit
    assert audit.verify(Layout.at(root)) == (True, None)
    events = [json.loads(line) for line in Layout.at(root).audit_log.read_text().splitlines()]
    assert [(e["event"], e["outcome"]) for e in events] == [("install", "done"), ("upgrade", "done"), ("upgrade", "failed"), ("rollback", "done")]
    assert "lower than the installed sequence 2" in events[2]["reason"] and events[2]["bundle"] == str(b.b1)
    assert all(e["uid"] == os.getuid() and e["actor"] == "installer" for e in events)

    code, out, err = cli(capsys, "uninstall", "--root", str(root), "--yes", "--no-systemd")
    assert code == 0, err
    assert not (root / "opt/appliance").exists() and config.is_file() and (root / model1.lstrip("/")).is_file()
    assert not link.is_symlink()
    assert status_json(capsys, root)["current"] is None
    # The state outlives an uninstall: an older bundle is still refused afterwards.
    code, out, err = cli(capsys, *install_args(b, root, None, "--no-systemd"))
    assert code == 12
    code, out, err = cli(capsys, "uninstall", "--root", str(root), "--yes", "--purge", "--no-systemd")
    assert code == 0, err
    assert not (root / "etc/appliance").exists() and not (root / "var/lib/appliance").exists()


@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl is not installed")
def test_units_written_and_enabled_offline_with_answers_and_leftovers_cleaned(
        install_bundles: InstallBundles, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b, root = install_bundles, tmp_path / "root"
    layout = Layout.at(root)
    # leftovers of an interrupted run, which must be removed and never used
    (layout.releases / "1.0.0+1.partial/venv").mkdir(parents=True)
    os.symlink("1.0.0+1.partial", layout.releases / "1.0.0+1")
    (layout.models / "abc.partial").mkdir(parents=True)
    layout.command_link.parent.mkdir(parents=True)
    layout.command_link.write_text("#!/bin/sh\n")
    answers = tmp_path / "answers.toml"
    shutil.copy(b.model_key, tmp_path / "site.key")
    answers.write_text(f'tier = "cpu"\nkey_file = "site.key"\nbind = "0.0.0.0:9000"\ntrust_fingerprint = "{b.fingerprint}"\n')
    code, out, err = cli(capsys, "install", str(b.b1), "--root", str(root), "--yes", "--answers", str(answers))
    assert code == 0, err
    assert "removed 3 leftover(s)" in err and not list(root.rglob("*.partial"))
    assert "units are installed and enabled but not started" in err
    # An administrator's own /usr/local/bin/appliance is left alone, and the install says so.
    assert "is not the appliance's, so it was left alone" in err and layout.command_link.read_text() == "#!/bin/sh\n"
    units = layout.systemd_units
    assert (units / "multi-user.target.wants/appliance-server.service").is_symlink()
    assert (units / "timers.target.wants/appliance-trainer.timer").is_symlink()
    server = (units / "appliance-server.service").read_text()
    assert "Type=notify" in server and "IPAddressDeny" not in server  # bound to 0.0.0.0 by the answers file
    text = layout.config_file.read_text()
    assert 'host = "0.0.0.0"' in text and "port = 9000" in text
    assert list(layout.trust_dir.glob("*.pub"))  # the vendor key is pinned
    s = status_json(capsys, root)
    assert s["units"]["appliance-server.service"] == {"installed": True, "enabled": True}
    assert (layout.releases / s["current"]["id"] / "units/appliance-server.service").read_text() == server

    # The timer follows appliance.toml: after an edit, running the same install again re-renders it.
    layout.config_file.write_text(layout.config_file.read_text().replace('"*-*-* 03:00:00"', '"Sat *-*-* 22:00:00"'))
    code, out, err = cli(capsys, "install", str(b.b1), "--root", str(root), "--yes", "--answers", str(answers))
    assert code == 0 and "nothing to do" in err, err
    assert "OnCalendar=Sat *-*-* 22:00:00" in (units / "appliance-trainer.timer").read_text()


def test_dry_run_records_and_writes_nothing(install_bundles: InstallBundles, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    b, root = install_bundles, tmp_path / "root"
    code, out, err = cli(capsys, *install_args(b, root, None, "--dry-run", "--trust", str(b.pub)))
    assert code == 0, err
    assert not root.exists()
    assert "run systemctl --root=" in out and "--no-index --find-links" in out and "symlink" in out and "decrypt" in out


def test_first_install_trust_rules(install_bundles: InstallBundles, slim_master: SlimBundle, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    b, root = install_bundles, tmp_path / "root"
    code, out, err = cli(capsys, *install_args(b, root, None, "--no-systemd"))
    assert code == 2 and "--trust-fingerprint SHA256:" in err
    assert not (root / "etc").exists() and not (root / "opt").exists()  # only the lock file under run/
    code, out, err = cli(capsys, *install_args(b, root, None, "--no-systemd", "--trust-fingerprint", "SHA256:" + "0" * 64))
    assert code == 11 and "not the expected" in err and not (root / "etc/appliance/trust").exists()
    code, out, err = cli(capsys, *install_args(b, root, None, "--no-systemd", "--trust-fingerprint", b.fingerprint))
    assert code == 0, err
    # Pinned now: another vendor's key on the command line is refused, and so is a bundle it signed.
    code, out, err = cli(capsys, *install_args(b, root, None, "--no-systemd", "--trust", str(slim_master.pub)))
    assert code == 11 and "not pinned" in err
    code, out, err = cli(capsys, "upgrade", str(slim_master.dir), "--root", str(root), "--yes", "--no-systemd")
    assert code == 11 and "not a valid signature" in err


def test_a_second_install_is_refused_while_one_runs(install_bundles: InstallBundles, tmp_path: Path) -> None:
    b, root = install_bundles, tmp_path / "root"
    with install_lock(Layout.at(root)):
        proc = subprocess.run([sys.executable, "-m", "appliance.cli", *install_args(b, root, None, "--no-systemd")],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_CODES["LockedError"] and f"pid {os.getpid()}" in proc.stderr, proc.stderr
    assert not (root / "opt").exists()


def test_not_ready_switches_back_to_the_previous_release(install_bundles: InstallBundles, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from installer.steps.activate import NotReadyError, step_ready
    from installer.steps.context import Context, Options
    from installer.system.release import current_release, list_releases
    from installer.system.runner import RecordingRunner
    from installer.system.target import Target

    b, root = install_bundles, tmp_path / "root"
    assert cli(capsys, *install_args(b, root, None, "--no-systemd", "--trust", str(b.pub)))[0] == 0
    assert cli(capsys, "upgrade", str(b.b2), "--root", str(root), "--yes", "--no-systemd", "--key-file", str(b.model_key))[0] == 0
    layout = Layout.at(root)
    old, new = list_releases(layout)
    runner = RecordingRunner(replies={("systemctl", "show"): (0, "activating\n")})
    ctx = Context(layout=layout, opts=Options(ready_timeout=1.5), runner=runner, target=Target(), emit=lambda e: None,
                  confirm=lambda q: False, systemd_running=True, started=True, previous=old,
                  plan=new.plan, config={"server": {"host": "127.0.0.1", "port": 9}})
    with pytest.raises(NotReadyError, match="Switched back to release 1.0.0\\+1"):
        step_ready(ctx, lambda m, f: None)
    assert current_release(layout).id == old.id
    assert ["systemctl", "restart", "appliance-server.service"] in runner.commands
    assert load_install_state(layout)["current"] == new.id  # state is only rewritten by a completed run


def test_the_lock_holder_is_printed_only_as_a_pid(tmp_path: Path) -> None:
    """Whatever the lock file holds reaches root's terminal only as digits."""
    import fcntl
    import os

    from installer.steps.lifecycle import LockedError, install_lock

    layout = Layout.at(tmp_path)
    path = layout.install_lock
    path.parent.mkdir(parents=True)
    path.write_text("\x1b]0;owned\x07 rm -rf /")
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(LockedError) as e, install_lock(layout):
            pass
    finally:
        os.close(fd)
    assert "(pid unknown)" in e.value.message and "\x1b" not in e.value.message


def test_a_bundle_whose_vendor_key_is_not_a_key_installs_nothing(install_bundles: InstallBundles, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    b, root = install_bundles, tmp_path / "root"
    bundle = tmp_path / "bundle"
    shutil.copytree(b.b1, bundle)
    (bundle / "trust" / "vendor.pub").write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    code, _, err = cli(capsys, *install_args(b, root, bundle, "--no-systemd", "--trust-fingerprint", b.fingerprint))
    assert code != 0 and "Cannot load the trusted key trust/vendor.pub" in err and "Traceback" not in err
    assert not Layout.at(root).opt.exists() and not Layout.at(root).trust_dir.exists()
