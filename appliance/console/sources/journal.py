"""Log lines for the Logs screen: the units' journal through `journalctl` (the installer's runner, so a
recorded runner replays it), followed by cursor; without systemd, the audit log under the root."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.paths import UNITS, Layout

BACKLOG = 500
CURSOR = "-- cursor: "


@dataclass
class Journal:
    """Each poll returns the lines written since the last one."""

    runner: Any
    units: tuple[str, ...] = UNITS
    cursor: str | None = None

    def argv(self) -> list[str]:
        # --after-cursor goes right after the command so a recorded runner can key on it as a prefix.
        first = [f"--after-cursor={self.cursor}"] if self.cursor else ["-n", str(BACKLOG)]
        unit_args = [a for u in self.units for a in ("-u", u)]
        return ["journalctl", *first, "--no-pager", "-o", "short-iso", "--show-cursor", *unit_args]

    def poll(self) -> list[str]:
        out = self.runner.run(self.argv(), check=False, timeout=10).stdout
        lines = out.split("\n")  # not splitlines(): a carriage return inside a line is not a new line
        if lines and lines[-1] == "":
            lines.pop()
        if lines and lines[-1].startswith(CURSOR):
            self.cursor = lines.pop()[len(CURSOR):].strip()
        return [ln for ln in lines if ln != "-- No entries --"]

    @property
    def title(self) -> str:
        return "journal: " + ", ".join(self.units)


@dataclass
class FileTail:
    """New lines of a file since the last poll (the audit log when systemd is not running)."""

    path: Any
    offset: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def poll(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < self.offset:  # rotated or truncated
                    self.offset = 0
                if self.offset == 0 and size > 256 << 10:
                    self.offset = size - (256 << 10)
                f.seek(self.offset)
                data = self._partial + f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        *lines, self._partial = data.split(b"\n")
        return [ln.decode("utf-8", "replace") for ln in lines]

    @property
    def title(self) -> str:
        return f"{self.path} (systemd is not running for this root, so there is no journal)"


@dataclass
class Files:
    """Without systemd there is no journal: follow the files that stand in for it, each line tagged."""

    tails: dict[str, FileTail]

    def poll(self) -> list[str]:
        return [f"{name}: {line}" for name, t in self.tails.items() for line in t.poll()]

    @property
    def title(self) -> str:
        return "no journal (systemd does not run this root); following the " + ", ".join(self.tails) + " logs"


def log_source(layout: Layout, runner: Any, systemd: bool) -> Journal | Files:
    if systemd:
        return Journal(runner)
    return Files({
        "audit": FileTail(layout.audit_log),
        "train": FileTail(layout.log_dir / "console-train.log"),  # `train now` from the console
        "serve": FileTail(layout.log_dir / "console-server.log"),  # a server started from the console
        "server": FileTail(layout.root.parent / "server.log"),  # where `appliance demo` keeps the server's output
    })
