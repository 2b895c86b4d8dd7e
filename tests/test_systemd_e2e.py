"""End to end under a real systemd: a Debian bookworm container booted by systemd-nspawn, offline.

1. The demo bundle is copied in; its bootstrap.sh runs `appliance install --yes` (no network inside).
2. The server unit is active and answers a chat request with a key; the trainer timer is listed with
   its next 03:00 run; `kill -9` of the server's main process brings it back through systemd within 10 s.
3. An upgrade to a sequence-2 bundle, then a rollback, checking the API after each.

Run by `.ci/run` as root (`make test-systemd`); needs systemd-container and debootstrap.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from installer.bundle.keys import fingerprint, load_public_key
from installer.bundle.manifest import MANIFEST, SIGNATURE, canonical_json
from installer.toolchain.keygen import keygen, load_signing_key
from tests.systemd_container import Container, ensure_base

REPO = Path(__file__).resolve().parent.parent
APP = "/opt/appliance/current/venv/bin/appliance"

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a container needs root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("systemd-nspawn", "nsenter", "debootstrap")),
                       reason="needs the Debian packages systemd-container and debootstrap"),
]

CHAT = r"""
import json, sys, urllib.request
key, model = sys.argv[1], sys.argv[2]
body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}).encode()
req = urllib.request.Request("http://127.0.0.1:8088/v1/chat/completions", body,
                             {"Authorization": "Bearer " + key, "Content-Type": "application/json"})
print(json.dumps(json.load(urllib.request.urlopen(req, timeout=120))))
"""
READY = r"""
import urllib.request
try:
    print(urllib.request.urlopen("http://127.0.0.1:8088/health/ready", timeout=2).status)
except Exception as e:
    print(type(e).__name__)
"""


def _resign_as_sequence_2(b1: Path, b2: Path, signing_key: Path) -> None:
    """A second genuine bundle: the same files under a new version and sequence, signed by the vendor."""
    subprocess.run(["cp", "-al", str(b1), str(b2)], check=True)  # hard links: no second copy of the wheelhouse
    data = json.loads((b1 / MANIFEST).read_bytes())
    data["sequence"], data["version"] = 2, data["version"] + ".post1"
    raw = canonical_json(data)
    for name, content in ((MANIFEST, raw), (SIGNATURE, load_signing_key(signing_key).sign(raw))):
        (b2 / name).unlink()  # never write through a hard link into bundle 1
        (b2 / name).write_bytes(content)


@pytest.fixture(scope="module")
def container() -> Iterator[tuple[Container, Path]]:
    base = ensure_base()
    work = Path(tempfile.mkdtemp(prefix="appliance-e2e-", dir="/var/tmp"))
    try:
        keys = work / "keys"
        keygen(keys)
        b1 = work / "bundle-1"
        subprocess.run([str(REPO / ".venv/bin/appliance"), "bundle", "build", str(REPO / "bundles/demo.toml"),
                        "--signing-key", str(keys / "signing.key"), "--model-key", str(keys / "model.key"), "--out", str(b1)],
                       check=True, capture_output=True, timeout=1800)
        _resign_as_sequence_2(b1, work / "bundle-2", keys / "signing.key")
        tree = work / "rootfs"
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(tree)], check=True)
        for name in ("bundle-1", "bundle-2"):
            subprocess.run(["cp", "-al", str(work / name), str(tree / "root" / name)], check=True)
        shutil.copy(keys / "model.key", tree / "root/model.key")
        (tree / "root/fingerprint").write_text(fingerprint(load_public_key(keys / "signing.pub")))
        c = Container(tree, work / "boot.log")
        try:
            c.wait_booted()
            yield c, work
        finally:
            c.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _journal(c: Container) -> str:
    return c.sh("journalctl -u appliance-server -n 40 --no-pager -o cat", check=False).stdout


def _lifecycle(c: Container, command: str) -> None:
    """An installer command; on failure the assertion carries the server's journal too."""
    proc = c.sh(command, timeout=2400, check=False)
    assert proc.returncode == 0, f"`{command}` exited {proc.returncode}:\n{proc.stderr[-4000:]}\njournal:\n{_journal(c)}"


def _status(c: Container) -> dict:
    # through the link the install puts on PATH
    return json.loads(c.sh("/usr/local/bin/appliance status --json").stdout)


def _chat(c: Container, key: str) -> str:
    model = _status(c)["model"]["id"]
    c.sh(f"cat > /root/chat.py <<'EOF'\n{CHAT}\nEOF")
    answer = json.loads(c.sh(f"python3 /root/chat.py {key} {model}", timeout=180).stdout)
    text = answer["choices"][0]["message"]["content"]
    assert isinstance(text, str) and answer["model"] == model
    return text


def test_install_serve_restart_upgrade_rollback(container: tuple[Container, Path]) -> None:
    c, work = container
    # 1. offline: the container has only its own loopback
    assert c.sh("ls /sys/class/net").stdout.split() == ["lo"]
    fp = c.sh("cat /root/fingerprint").stdout.strip()
    _lifecycle(c, f"cd /root/bundle-1 && ./bootstrap.sh install /root/bundle-1 --yes --key-file /root/model.key --trust-fingerprint {fp}")
    s = _status(c)
    assert s["current"]["sequence"] == 1 and s["units"]["appliance-server.service"]["active"] == "active"

    # 2. the API, the timer, and a restart through systemd after kill -9
    assert c.sh("systemctl is-active appliance-server").stdout.strip() == "active"
    assert c.sh("systemctl show -p Type --value appliance-server").stdout.strip() == "notify"
    key = json.loads(c.sh(f"{APP} keys create --role user --json").stdout)["key"]
    _chat(c, key)
    timers = c.sh("systemctl list-timers --all --no-pager appliance-trainer.timer").stdout
    assert "appliance-trainer.timer" in timers and "03:00:00" in timers, timers
    main_pid = c.sh("systemctl show -p MainPID --value appliance-server").stdout.strip()
    c.sh(f"cat > /root/ready.py <<'EOF'\n{READY}\nEOF")
    c.sh(f"kill -9 {main_pid}")
    # Back = systemd restarted it and it sent READY=1 again (model loaded, warm-up done): `active`.
    t0, back = time.monotonic(), None
    while time.monotonic() - t0 < 90:  # the self-test and the warm-up first: seconds when quiet, far more on a shared machine
        pid = c.sh("systemctl show -p MainPID --value appliance-server").stdout.strip()
        if pid not in ("0", main_pid) and c.sh("systemctl is-active appliance-server", check=False).stdout.strip() == "active":
            back = time.monotonic() - t0
            break
        time.sleep(0.2)
    assert back is not None, _journal(c)
    print(f"server back through systemd {back:.1f} s after kill -9")
    assert c.sh("python3 /root/ready.py").stdout.strip() == "200"
    assert int(c.sh("systemctl show -p NRestarts --value appliance-server").stdout) >= 1
    for unit in ("appliance-server.service", "appliance-trainer.service"):
        out = c.sh(f"systemd-analyze security --no-pager {unit}", check=False).stdout
        assert float(out.rsplit("exposure level for", 1)[1].split(":")[1].split()[0]) <= 2.0, out
    c.sh("systemd-analyze verify /etc/systemd/system/appliance-server.service /etc/systemd/system/appliance-trainer.service "
         "/etc/systemd/system/appliance-trainer.timer")

    # 3. upgrade to sequence 2, then roll back, with the API answering after each
    _lifecycle(c, f"{APP} upgrade /root/bundle-2 --yes --key-file /root/model.key")
    s = _status(c)
    assert s["current"]["sequence"] == 2 and s["units"]["appliance-server.service"]["active"] == "active"
    _chat(c, key)
    _lifecycle(c, f"{APP} rollback --yes")
    s = _status(c)
    assert s["current"]["sequence"] == 1 and [r["sequence"] for r in s["releases"]] == [1, 2]
    _chat(c, key)
    assert c.sh(f"{APP} audit verify", check=False).returncode == 0
