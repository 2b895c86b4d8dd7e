"""Starting the server from the console: `systemctl restart appliance-server` where systemd runs the
root, otherwise `appliance serve --root R` (the installed release's own command when there is one)
as a background process that outlives the console, with its output in the log directory."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.paths import SERVER_UNIT, Layout


def server_log(layout: Layout) -> Path:
    return layout.log_dir / "console-server.log"


@dataclass
class ServerStarter:
    layout: Layout
    runner: Any
    systemd: bool
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        installed = self.layout.current / "venv" / "bin" / "appliance"
        base = [str(installed)] if installed.is_file() else [sys.executable, "-m", "appliance.cli"]
        return [*base, "serve", "--root", str(self.layout.root)]

    def start(self) -> str:
        if self.systemd:
            self.runner.run(["systemctl", "restart", SERVER_UNIT])
            return f"restarted {SERVER_UNIT}; the dashboard shows it ready once the model is loaded"
        if self.proc is not None and self.proc.poll() is None:
            return f"the server started from here is still running (pid {self.proc.pid})"
        log = server_log(self.layout)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return f"started `appliance serve` (pid {self.proc.pid}); its output is on the Logs screen"
