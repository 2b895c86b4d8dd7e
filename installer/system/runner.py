"""The command runner every caller of systemctl, journalctl, useradd and pip goes through.

Dry runs and tests swap the implementation (after subiquity): `RecordingRunner` records each
command and answers from canned replies instead of executing anything.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from appliance.errors import ApplianceError


class CommandError(ApplianceError):
    default_hint = "The command's own message is above; fix the cause and run the same command again."


class Runner(Protocol):
    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]: ...


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the installer dies, so no orphaned pip keeps writing into a release
    that the next run is cleaning up (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _tail(text: str, lines: int = 5) -> str:
    return " / ".join(text.strip().splitlines()[-lines:])


@dataclass
class SubprocessRunner:
    """Runs commands for real; a failure with check=True raises CommandError naming the command."""

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env,
                                  preexec_fn=_die_with_parent)
        except FileNotFoundError:
            raise CommandError(f"The command {argv[0]!r} is not installed on this host.") from None
        except subprocess.TimeoutExpired:
            raise CommandError(f"`{shlex.join(argv)}` did not finish within {timeout:.0f} s.") from None
        if check and proc.returncode != 0:
            raise CommandError(f"`{shlex.join(argv)}` failed with exit code {proc.returncode}: "
                               f"{_tail(proc.stderr or proc.stdout) or 'no output'}.")
        return proc


@dataclass
class RecordingRunner:
    """Records commands instead of running them. `replies` maps an argv prefix to (returncode, stdout)."""

    replies: dict[tuple[str, ...], tuple[int, str]] = field(default_factory=dict)
    commands: list[list[str]] = field(default_factory=list)

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = list(argv)
        self.commands.append(argv)
        rc, out = 0, ""
        for prefix, reply in sorted(self.replies.items(), key=lambda kv: -len(kv[0])):
            if tuple(argv[: len(prefix)]) == prefix:
                rc, out = reply
                break
        if check and rc != 0:
            raise CommandError(f"`{shlex.join(argv)}` failed with exit code {rc} (recorded).")
        return subprocess.CompletedProcess(argv, rc, out, "")

    def lines(self) -> list[str]:
        return [shlex.join(c) for c in self.commands]
