"""`appliance serve` as systemd runs it: READY=1 after warm-up, WATCHDOG=1 pings, and feedback that
was acknowledged survives kill -9."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest

from appliance.feedback_store import FeedbackStore
from tests.server_fixtures import REPO, free_port, make_root


@pytest.fixture
def notify_socket():
    d = tempfile.mkdtemp(prefix="nfy", dir="/tmp")  # AF_UNIX paths are limited to 108 bytes
    path = os.path.join(d, "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    yield s, path
    s.close()
    os.unlink(path)
    os.rmdir(d)


def _messages(sock, until: str, timeout: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if until in got[-1]:
            break
    return got


def test_ready_watchdog_and_feedback_survives_kill9(tmp_path, smollm2_gguf, notify_socket):
    sock, path = notify_socket
    root = make_root(tmp_path / "root", smollm2_gguf)
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000", "PYTHONPATH": str(REPO)}
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--root", str(root.layout.root), "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        before_ready = _messages(sock, "READY=1", 180)
        assert any("READY=1" in m for m in before_ready), (tmp_path / "serve.log").read_text()
        url = f"http://127.0.0.1:{port}"
        # READY means: model loaded, warm-up answered, socket listening.
        assert httpx.get(f"{url}/health/ready").json()["status"] == "ready"
        pings = _messages(sock, "WATCHDOG=1", 10)
        assert any("WATCHDOG=1" in m for m in pings)

        headers = {"Authorization": f"Bearer {root.user_key}"}
        chat = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120,
                          json={"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0})
        assert chat.status_code == 200
        rid = chat.json()["id"]
        ack = httpx.post(f"{url}/v1/feedback", headers=headers, json={"request_id": rid, "rating": 1, "corrected": "Hi!"})
        assert ack.status_code == 200
        proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: only what was committed survives
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    with FeedbackStore(root.layout.data / "feedback.sqlite3") as store:
        rows = [e for e in store.feedback("held") if e.request_id == rid]  # a user key's correction waits for an admin
    assert len(rows) == 1 and rows[0].rating == 1 and rows[0].corrected == "Hi!"


def test_serve_with_a_missing_model_says_so(tmp_path, smollm2_gguf):
    root = make_root(tmp_path / "root", smollm2_gguf)
    next(p for p in root.layout.models.rglob("*.gguf")).unlink()
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--root", str(root.layout.root), "--port", str(free_port())],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode != 0
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_serve_without_config_says_so(tmp_path):
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--root", str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 17 and "appliance.toml does not exist" in r.stderr and "Traceback" not in r.stderr


def test_serve_decodes_a_test_prompt_in_a_child_before_it_loads_the_model(tmp_path, smollm2_gguf):
    root = make_root(tmp_path / "root", smollm2_gguf)
    model = next(p for p in root.layout.models.rglob("*.gguf"))
    model.unlink()
    model.write_bytes(b"GGUF" + b"\0" * 64)  # damaged: the child's decode fails, and says so before the server loads it
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "--root", str(root.layout.root), "--port", str(free_port())],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "The llama.cpp engine failed a test prompt on this CPU" in r.stderr and "loading " not in r.stderr, r.stderr[-1500:]
