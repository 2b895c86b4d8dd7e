"""Power loss: SIGKILL the installer (its whole process group) at random instants during an install and
during an upgrade from sequence 1 to 2. After every kill, status shows exactly one consistent current
release (old or new, or none before the first switch), nothing half-written is in use, and running the
same command again completes.

Each kill is followed by a re-run of the same command, which may itself be killed (a chain); a chain
ends when a run completes. The seed is printed so a failure can be replayed (APPLIANCE_POWERLOSS_SEED).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.paths import Layout
from appliance.state import load_install_state
from installer.steps.lifecycle import status
from installer.system.config_file import read_config
from installer.system.release import read_release
from installer.system.runner import RecordingRunner
from tests.install_fixtures import InstallBundles

KILLS_PER_PHASE = 12  # 24 kills in all
CHAIN = 3  # kills in a row before a run is left to complete


def _cmd(verb: str, bundle: Path, root: Path, b: InstallBundles) -> list[str]:
    argv = [sys.executable, "-m", "appliance.cli", verb, str(bundle), "--root", str(root), "--no-systemd", "--yes",
            "--key-file", str(b.model_key)]
    return argv + (["--trust", str(b.pub)] if verb == "install" else [])


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _kill_at(argv: list[str], delay: float) -> int | None:
    """Start the command and SIGKILL its process group after `delay` s: None when it was killed, else its exit code."""
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = p.communicate(timeout=delay)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return None
    assert p.returncode == 0, err.decode()[-2000:]
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_consistent(root: Path, allowed: set[str | None], why: str) -> str | None:
    """The invariants after a crash; returns the current release id."""
    layout = Layout.at(root)
    s = status(layout, RecordingRunner(), False)
    json.dumps(s)  # what `status --json` prints
    assert s["problem"] is None, f"{why}: {s['problem']}"
    cur = s["current"]["id"] if s["current"] else None
    assert cur in allowed, f"{why}: current is {cur}, expected one of {allowed}"
    assert sum(r["current"] for r in s["releases"]) == (cur is not None), why
    load_install_state(layout)  # state.json always parses
    if cur is None:
        return None
    rel = read_release(layout.releases / cur)
    assert rel is not None and rel.appliance.is_file(), f"{why}: current release {cur} is incomplete"
    model = read_config(layout).get("model")
    assert model, f"{why}: a current release without [model] in appliance.toml"
    path = root / model["path"].lstrip("/")
    # the configured model is whole: its directory is named by the plaintext's SHA-256
    assert path.is_file() and _sha256(path) == path.parent.name, f"{why}: {path} is missing or half-written"
    return cur


def _no_leftovers(root: Path) -> None:
    left = [str(p) for p in root.rglob("*.partial")]
    assert not left, f"leftovers after a completed run: {left}"


def _chains(argv: list[str], root: Path, reset: callable, allowed: set[str | None], final: str,  # type: ignore[valid-type]
            full: float, rng: random.Random, seed: int) -> int:
    kills = 0
    while kills < KILLS_PER_PHASE:
        reset()
        completed = False
        for _ in range(CHAIN):  # one chain: kill, check, run again ... (a kill during staging loses its work)
            delay = rng.uniform(0.05, full)
            if _kill_at(argv, delay) is not None:
                completed = True  # this re-run finished (exit code 0) before its kill came
                break
            kills += 1
            check_consistent(root, allowed, f"seed {seed}, kill {kills} at {delay:.2f} s")
        if not completed:
            proc = _run(argv)  # the re-run that is left alone completes
            assert proc.returncode == 0, f"seed {seed}: re-run failed: {proc.stderr[-2000:]}"
        assert check_consistent(root, {final}, f"seed {seed}, after completing") == final
        _no_leftovers(root)
    return kills


@pytest.mark.slow
def test_sigkill_during_install_and_upgrade(install_bundles: InstallBundles, tmp_path: Path) -> None:
    b = install_bundles
    seed = int(os.environ.get("APPLIANCE_POWERLOSS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"power-loss seed {seed}")
    root = tmp_path / "root"

    # A reference install, timed, so kills land anywhere in a run's lifetime.
    t0 = time.monotonic()
    proc = _run(_cmd("install", b.b1, root, b))
    install_time = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    snapshot = tmp_path / "installed-1"
    shutil.copytree(root, snapshot, symlinks=True)

    def fresh() -> None:
        shutil.rmtree(root, ignore_errors=True)

    print(f"reference install {install_time:.1f} s")
    kills = _chains(_cmd("install", b.b1, root, b), root, fresh, {None, "1.0.0+1"}, "1.0.0+1", install_time, rng, seed)

    def installed() -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(snapshot, root, symlinks=True)  # same path, so the venv's scripts still point into it

    installed()
    t0 = time.monotonic()
    assert _run(_cmd("upgrade", b.b2, root, b)).returncode == 0
    upgrade_time = time.monotonic() - t0
    print(f"reference upgrade {upgrade_time:.1f} s")
    kills += _chains(_cmd("upgrade", b.b2, root, b), root, installed, {"1.0.0+1", "1.0.0+2"}, "1.0.0+2", upgrade_time, rng, seed)
    assert kills >= 2 * KILLS_PER_PHASE

    # The release that survived all this runs, and the state agrees with it.
    app = root / "opt/appliance/current/venv/bin/appliance"
    out = subprocess.run([str(app), "status", "--root", str(root), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    assert s["current"]["sequence"] == 2 and [r["sequence"] for r in s["releases"]] == [1, 2]
    assert load_install_state(Layout.at(root))["highest_sequence"] == 2
