"""Recorded data for the console: a recorded installation tree, systemctl and journalctl answers,
/metrics scrapes, a host sample. Snapshot tests, the README screenshot and the start-up benchmark
run the real console on it, with nothing live underneath.

Layout of a fixture directory (tests/fixtures/console/): `root/` (copied into a fresh root),
`links.json` (symlinks to make there), `systemctl.json` (argv -> stdout), `journal.txt`,
`health.json`, `models.json`, `metrics-*.txt` (scrapes ten seconds apart), `chat.sse`, `host.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from appliance.console.sources.context import Sources
from appliance.console.sources.host import HostSample
from appliance.console.sources.journal import CURSOR, Journal
from appliance.paths import Layout

SCRAPE_INTERVAL_S = 10.0


def build_root(fixtures: Path, root: Path) -> Layout:
    shutil.copytree(fixtures / "root", root, symlinks=True, dirs_exist_ok=True)
    for rel, target in json.loads((fixtures / "links.json").read_text()).items():
        link = root / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link)
    return Layout.at(root)


def recorded_runner(fixtures: Path) -> Any:
    import shlex

    from installer.system.runner import RecordingRunner

    replies = {tuple(shlex.split(k)): (0, v + "\n") for k, v in json.loads((fixtures / "systemctl.json").read_text()).items()}
    journal = (fixtures / "journal.txt").read_bytes().decode()  # bytes: read_text() would turn \r into \n
    replies[("journalctl",)] = (0, journal)
    cursor = next((ln[len(CURSOR):] for ln in journal.splitlines() if ln.startswith(CURSOR)), None)
    if cursor:
        replies[tuple(Journal(None, cursor=cursor).argv()[:2])] = (0, f"{CURSOR}{cursor}\n")
    return RecordingRunner(replies)


class ReplayTransport:
    """An httpx transport answering from the fixture files; /metrics replays its scrapes in order."""

    def __init__(self, fixtures: Path, down: bool = False) -> None:
        import httpx

        self.httpx = httpx
        self.fixtures, self.down = fixtures, down
        self.scrapes = sorted(fixtures.glob("metrics-*.txt"))
        self.served = 0
        self.requests: list[tuple[str, str, bytes]] = []
        self._inner = httpx.MockTransport(self.answer)

    @property
    def clock(self) -> float:
        """The recorded time of the last scrape served, so rates do not depend on how fast tests run."""
        return max(min(self.served, len(self.scrapes)) - 1, 0) * SCRAPE_INTERVAL_S

    def answer(self, request: Any) -> Any:
        httpx, path = self.httpx, request.url.path
        self.requests.append((request.method, path, request.content))
        if self.down:
            raise httpx.ConnectError("Connection refused", request=request)
        if path == "/metrics":
            f = self.scrapes[min(self.served, len(self.scrapes) - 1)]
            self.served += 1
            return httpx.Response(200, text=f.read_text())
        if path == "/health/ready":
            return httpx.Response(200, content=(self.fixtures / "health.json").read_bytes())
        if path == "/v1/models":
            return httpx.Response(200, content=(self.fixtures / "models.json").read_bytes())
        if path == "/v1/chat/completions":
            return httpx.Response(200, content=(self.fixtures / "chat.sse").read_bytes(), headers={"content-type": "text/event-stream"})
        if path == "/admin/adapters/reload":
            return httpx.Response(200, json={"adapter": os.environ.get("_RECORDED_ADAPTER"), "error": None})
        return httpx.Response(404, json={"error": {"message": f"no recording for {path}"}})

    def handle_request(self, request: Any) -> Any:
        return self._inner.handle_request(request)

    def close(self) -> None:
        pass


def recorded_sources(fixtures: Path, root: Path, server_down: bool = False) -> Sources:
    layout = build_root(fixtures, root)
    transport = ReplayTransport(fixtures, down=server_down)
    host = HostSample.from_json(json.loads((fixtures / "host.json").read_text()))
    return Sources(layout, recorded_runner(fixtures), systemd_flag=True, sample_host=lambda: host, transport=transport,
                   api_key="apl-recorded-key", clock=lambda: transport.clock)
