"""The console's data sources on their own: Prometheus arithmetic, literal text, journal cursors,
run reports, bundle discovery, the console's API key."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from appliance.console.sources import prom
from appliance.console.sources.journal import FileTail, Journal
from appliance.console.sources.recorded import build_root, recorded_runner
from appliance.console.sources.training import load_runs, read_run
from appliance.console.widgets.literal import literal
from appliance.paths import Layout

FIX = Path(__file__).parent / "fixtures" / "console"


def test_parse_skips_comments_and_keeps_labels() -> None:
    s = prom.parse('# HELP x y\nx_total{route="/a",status="200"} 3\nbad line\ny 1.5e2\n')
    assert s[("x_total", (("route", "/a"), ("status", "200")))] == 3
    assert s[("y", ())] == 150.0
    assert len(s) == 2


def test_quantile_interpolates_inside_the_bucket() -> None:
    # 10 observations: 4 under 0.1 s, 6 between 0.1 and 1 s
    cumulative = {0.1: 4.0, 1.0: 10.0, math.inf: 10.0}
    assert prom.quantile(0.5, cumulative) == pytest.approx(0.1 + 0.9 * (1 / 6))
    assert prom.quantile(0.99, {0.1: 0.0, math.inf: 5.0}) == 0.1  # all beyond the last bound
    assert prom.quantile(0.5, {}) is None


def test_stats_over_two_recorded_scrapes_ignore_the_consoles_own_requests() -> None:
    a = prom.parse((FIX / "metrics-1.txt").read_text())
    b = prom.parse((FIX / "metrics-2.txt").read_text())
    s = prom.stats(b, a, 10.0)
    assert s.requests_per_s == pytest.approx(4.5)  # 45 chat requests; the /metrics counter is not traffic
    assert s.tokens_per_s == pytest.approx(792.0)
    assert s.queue_depth == 3 and s.active == 8 and s.adapter == "20261121-030009"
    assert 0.5 < s.p50_s < 1.0 and 4.0 < s.p99_s <= 8.0


def test_literal_makes_escapes_visible_and_keeps_markup_as_text() -> None:
    assert literal("\x1b[31mred\x07") == "\\x1b[31mred\\x07"
    assert literal("[bold]x[/] \t ok") == "[bold]x[/] \t ok"
    assert literal("\x9b2J") == "\\x9b2J"  # the 8-bit CSI too


def test_journal_follows_by_cursor(tmp_path: Path) -> None:
    j = Journal(recorded_runner(FIX))
    first = j.poll()
    assert len(first) == 8 and j.cursor == "s=recorded;i=8"
    assert j.argv()[1] == "--after-cursor=s=recorded;i=8"
    assert j.poll() == []  # nothing new


def test_file_tail_returns_only_new_complete_lines(tmp_path: Path) -> None:
    f = tmp_path / "audit.jsonl"
    f.write_text("one\ntw")
    t = FileTail(f)
    assert t.poll() == ["one"]
    with f.open("a") as fh:
        fh.write("o\nthree\n")
    assert t.poll() == ["two", "three"]
    assert FileTail(tmp_path / "missing").poll() == []


def test_without_systemd_the_logs_are_the_audit_log_the_train_log_and_the_demo_server_log(tmp_path: Path) -> None:
    from appliance.console.sources.journal import log_source

    layout = Layout.at(tmp_path / "root")
    layout.log_dir.mkdir(parents=True)
    layout.audit_log.write_text('{"event": "install"}\n')
    (tmp_path / "server.log").write_text("INFO: ready\n")
    src = log_source(layout, None, systemd=False)
    assert src.poll() == ['audit: {"event": "install"}', "server: INFO: ready"]
    assert "no journal" in src.title


def test_run_reports_newest_first_and_a_damaged_one_is_shown_not_fatal(tmp_path: Path) -> None:
    layout = build_root(FIX, tmp_path / "root")
    (layout.var / "runs" / "broken.json").write_text("{not json")
    runs = load_runs(layout)
    assert [r.id for r in runs][:3] == ["20261122-030011", "20261121-030009", "20261120-030012"]
    newest = runs[0]
    assert newest.examples == 362 + 40 and newest.pii_masked == 17 and newest.promoted is False and newest.status == "kept"
    assert newest.candidate_loss == pytest.approx(1.639) and len(newest.curve) > 10 and newest.val_curve
    broken = next(r for r in runs if r.id == "broken")
    assert broken.error.startswith("unreadable report")


def test_read_run_tolerates_missing_fields(tmp_path: Path) -> None:
    p = tmp_path / "r1.json"
    p.write_text(json.dumps({"id": "r1", "status": "failed", "reason": "out of memory at batch 1", "stages": {"gate": {"promote": False}}}))
    r = read_run(p)
    assert r.promoted is False and r.examples is None and r.base_loss is None and r.curve == ()
    assert r.status == "failed" and r.reason == "out of memory at batch 1"


def test_find_bundles_lists_usb_first(tmp_path: Path) -> None:
    from appliance.console.sources.install import find_bundles

    usb, local = tmp_path / "media" / "stick", tmp_path / "work"
    for d in (usb / "bundle", local / "bundle"):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")
        (d / "manifest.sig").write_bytes(b"x")
    (usb / "not-a-bundle").mkdir()
    found = find_bundles((usb,), (local,))
    assert [(c.path, c.usb) for c in found] == [((usb / "bundle").resolve(), True), ((local / "bundle").resolve(), False)]


def test_console_key_is_created_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import apikeys
    from appliance.console.sources.credentials import console_key, key_path

    monkeypatch.delenv("APPLIANCE_API_KEY", raising=False)
    layout = Layout.at(tmp_path)
    assert console_key(layout) == (None, None)  # nothing installed: no key made
    layout.etc.mkdir(parents=True)
    layout.config_file.write_text("[model]\npath = '/m'\n")
    key, note = console_key(layout)
    assert key and note and apikeys.verify(layout, key).role == "admin"
    assert key_path(layout).stat().st_mode & 0o777 == 0o600
    assert console_key(layout) == (key, None)
    apikeys.revoke(layout, apikeys.verify(layout, key).id)
    newer, note = console_key(layout)  # a revoked console key is replaced, not reused
    assert newer != key and note


def test_server_client_polls_over_http_with_the_key_and_reports_down() -> None:
    """The once-a-second polls go over the stdlib's http.client: a real socket, the bearer key, kept alive."""
    from appliance.console.sources.server import ServerClient, ServerDown, ServerRefused
    from tests.recorded_http import http_answers

    seen: list[tuple[str, str | None]] = []

    def answer(path: str, auth: str | None) -> tuple[int, bytes]:
        seen.append((path, auth))
        if path == "/metrics" and auth != "Bearer good":
            return 401, b'{"error": {"message": "The API key is not valid (unknown or revoked)."}}'
        return 200, (FIX / "health.json").read_bytes() if path == "/health/ready" else b"appliance_queue_depth 2\n"

    key = ["good"]
    with http_answers(answer) as url:
        client = ServerClient(url, lambda: key[0])
        try:
            h = client.health()
            assert (h.status, h.adapter) == ("ready", "20261121-030009")
            assert prom.parse(client.metrics())[("appliance_queue_depth", ())] == 2
            assert seen == [("/health/ready", "Bearer good"), ("/metrics", "Bearer good")]  # the admin key: health with details
            key[0] = "revoked"
            with pytest.raises(ServerRefused, match="401"):
                client.metrics()
        finally:
            client.close()
    down = ServerClient(url, lambda: None, timeout=1.0)
    assert down.health().status == "down"
    with pytest.raises(ServerDown):
        down.metrics()


def test_server_starter_uses_the_installed_release_command_when_there_is_one(tmp_path: Path) -> None:
    import sys

    from appliance.console.sources.services import ServerStarter

    layout = Layout.at(tmp_path)
    s = ServerStarter(layout, None, systemd=False)
    assert s.command() == [sys.executable, "-m", "appliance.cli", "serve", "--root", str(layout.root)]
    exe = layout.releases / "1.0.0+1" / "venv" / "bin" / "appliance"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    layout.current.symlink_to("releases/1.0.0+1")
    assert s.command()[:2] == [str(layout.current / "venv/bin/appliance"), "serve"]
