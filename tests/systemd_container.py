"""A Debian bookworm tree booted with a real systemd as PID 1 (systemd-nspawn), for the end-to-end test.

The debootstrapped base tree is cached outside the repository and never booted itself; each
session boots a copy. See /work/shared/notes/systemd-in-a-container.md for the facts this relies on.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

BASE = Path(os.environ.get("APPLIANCE_TEST_ROOTFS", "/var/cache/appliance-test/bookworm"))
# libgomp1: the wheelhouse's llama-cpp-python is built on the vendor's machine and links the system's OpenMP
# runtime (it is not an auditwheel-repaired wheel), so a target needs it like it needs python3.
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,libgomp1"
STAMP = ".appliance-test-packages"
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}


def ensure_base() -> Path:
    """Build the cached tree once (about a minute); a half-built one is never used."""
    stamp = BASE / STAMP
    if stamp.is_file() and stamp.read_text() == PACKAGES:
        return BASE
    partial = BASE.with_name(BASE.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm", str(partial)],
                   check=True, capture_output=True, timeout=1800)
    (partial / STAMP).write_text(PACKAGES)
    shutil.rmtree(BASE, ignore_errors=True)  # an older tree, made with another package list
    os.replace(partial, BASE)
    return BASE


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Container:
    def __init__(self, tree: Path, log: Path, network: bool = False) -> None:
        self.tree, self.log = tree, log
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--console=passive", "-D", str(tree), "-b"]
        if not network:
            argv.insert(1, "--private-network")  # offline for real: only the container's own loopback
        self._log = log.open("wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        self.leader = self._find_leader()

    def _find_leader(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            todo = [self.proc.pid]
            while todo:
                pid = todo.pop()
                try:
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    continue
                if comm == "systemd" and pid != self.proc.pid:
                    return pid
                todo.extend(_children(pid))
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        raise RuntimeError("no systemd came up inside the container")

    def sh(self, command: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "/bin/sh", "-c", command],
                              capture_output=True, text=True, timeout=timeout, env=ENV)
        if check and proc.returncode != 0:
            raise AssertionError(f"`{command}` exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def wait_booted(self, timeout: float = 120) -> str:
        deadline, state = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            state = self.sh("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"the container's systemd is {state!r} after {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to shut down cleanly
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
