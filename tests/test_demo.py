"""`appliance demo` end to end on this machine: install, serve, one answer through the openai client; re-run reuses; stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bundle_fixtures import REPO
from tests.demo_fixtures import DemoBundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("appliance")
    return subprocess.run([str(exe), "demo", "--workdir", str(work), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=900, stdin=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.mark.slow
def test_demo_installs_serves_answers_and_reuses(demo_bundle: DemoBundle, tmp_path: Path) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    # The bundle is built by the session fixture; hard links stand in for a first run's build.
    subprocess.run(["cp", "-al", str(demo_bundle.dir), str(work / "bundle")], check=True)
    subprocess.run(["cp", "-a", str(demo_bundle.keys), str(work / "keys")], check=True)
    port = free_port()
    try:
        first = demo(work, "--port", str(port), "--no-console")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "installing the bundle into" in first.stdout
        assert "Paris" in first.stdout
        assert f"curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Authorization: Bearer apl-" in first.stdout
        assert (work / "api-key").stat().st_mode & 0o777 == 0o600

        again = demo(work, "--port", str(port), "--no-console")
        assert again.returncode == 0, again.stdout + again.stderr
        assert "reusing the install" in again.stdout and "reusing the server already running" in again.stdout
        assert "made an API key" not in again.stdout
    finally:
        stopped = demo(work, "--stop")
    assert "stopped the demo server" in stopped.stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
