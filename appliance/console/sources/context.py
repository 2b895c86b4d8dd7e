"""`Sources`: everything the console reads from or acts on, in one object the screens share.

Production wires real things (SubprocessRunner, psutil/NVML, HTTP); tests and the README screenshot
wire recorded ones (`recorded.py`). Nothing here imports Textual.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.console.sources.host import HostSample, HostSampler
from appliance.paths import Layout


@dataclass
class Sources:
    layout: Layout
    runner: Any  # installer.system.runner.Runner: systemctl and journalctl go through it
    systemd_flag: bool | None = None  # whether systemd manages this root; None: find out on first use
    sample_host: Callable[[], HostSample] = field(default_factory=lambda: HostSampler().sample)
    transport: Any = None  # an httpx transport; None means the network
    api_key: str | None = None  # None: credentials.console_key() decides
    machine: Path | None = None  # a recorded machine file for the install screen, instead of probing
    bundle_roots: tuple[Path, ...] = ()  # where to look for bundles (default: USB mounts, then the cwd)
    refresh_s: float = 1.0  # the dashboard's poll interval
    clock: Callable[[], float] = time.monotonic  # when a /metrics scrape was taken (recorded data: recorded times)
    notes: list[str] = field(default_factory=list)  # things to tell the user once (e.g. a key was created)
    _server: Any = field(default=None, repr=False)
    _trainer: Any = field(default=None, repr=False)
    _starter: Any = field(default=None, repr=False)

    @classmethod
    def real(cls, root: str | Path, machine: Path | None = None) -> Sources:
        from installer.system.runner import SubprocessRunner

        return cls(Layout.at(root), SubprocessRunner(), machine=machine)

    @property
    def systemd(self) -> bool:
        """Only `/` on a host booted with systemd. Asked lazily: installer.steps.activate is not needed for the first paint."""
        if self.systemd_flag is None:
            from installer.steps.activate import systemd_running

            self.systemd_flag = systemd_running(self.layout.root)
        return self.systemd_flag

    def server_config(self) -> Any:
        from appliance.config import ConfigError, ServerConfig, load_config

        try:
            return load_config(self.layout).server
        except ConfigError:
            return ServerConfig()

    def server_url(self) -> str:
        from appliance import tls

        return tls.local_url(self.server_config())

    def key(self) -> str | None:
        if self.api_key is None:
            from appliance.console.sources.credentials import console_key

            key, note = console_key(self.layout)
            if note:
                self.notes.append(note)
            self.api_key = key
        return self.api_key

    def server(self) -> Any:
        if self._server is None:
            from appliance import tls
            from appliance.console.sources.server import ServerClient

            # HTTPS when [server] tls_cert is set, trusting exactly that certificate.
            ctx = tls.client_context(self.server_config(), self.layout)
            self._server = ServerClient(self.server_url(), self.key, self.transport, ssl_context=ctx)
        return self._server

    def trainer(self) -> Any:
        if self._trainer is None:
            from appliance.console.sources.training import Trainer

            self._trainer = Trainer(self.layout, self.runner, self.systemd)
        return self._trainer

    def server_starter(self) -> Any:
        if self._starter is None:
            from appliance.console.sources.services import ServerStarter

            self._starter = ServerStarter(self.layout, self.runner, self.systemd)
        return self._starter

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
