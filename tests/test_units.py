"""Unit rendering (pure) and what systemd itself says about the units: verify is clean, exposure <= 2.0."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance.errors import StateError
from installer.system.units import SERVER, TIMER, TRAINER, UNITS, UnitSettings, fill, load_templates, render_units

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def _render(**kw: object) -> dict[str, str]:
    return render_units(UnitSettings(**kw), load_templates())  # type: ignore[arg-type]


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_server_unit_is_notify_with_watchdog_and_restart() -> None:
    d = _directives(_render()[SERVER])
    assert d["Type"] == ["notify"] and d["Restart"] == ["on-failure"] and d["WatchdogSec"]
    assert d["User"] == ["appliance"] and d["ExecStart"] == ["/opt/appliance/current/venv/bin/appliance serve"]
    assert d["StateDirectory"] == ["appliance"] and d["ProtectSystem"] == ["strict"]


def test_cpu_tier_has_no_devices_and_no_writable_executable_memory() -> None:
    d = _directives(_render(backend="llama.cpp", uses_gpu=False)[SERVER])
    assert d["PrivateDevices"] == ["yes"] and "DeviceAllow" not in d
    assert d["MemoryDenyWriteExecute"] == ["yes"]


def test_gpu_tier_allows_exactly_the_nvidia_nodes() -> None:
    units = _render(backend="transformers", uses_gpu=True)
    d = _directives(units[SERVER])
    assert d["PrivateDevices"] == ["no"] and d["DevicePolicy"] == ["closed"]
    assert d["DeviceAllow"] == ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"]
    assert "MemoryDenyWriteExecute" not in d  # CUDA maps executable memory
    assert "DeviceAllow" in _directives(units[TRAINER])


def test_trainer_never_gets_memory_deny_write_execute() -> None:
    d = _directives(_render()[TRAINER])
    assert "MemoryDenyWriteExecute" not in d  # torch's CPU kernels are JIT-compiled
    assert d["Type"] == ["oneshot"] and d["Nice"] == ["19"] and int(d["CPUWeight"][0]) < 100 and int(d["IOWeight"][0]) < 100


def test_loopback_server_may_talk_to_loopback_only_and_public_bind_says_so() -> None:
    d = _directives(_render(host="127.0.0.1")[SERVER])
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
    public = _render(host="0.0.0.0")[SERVER]
    assert "IPAddressDeny" not in _directives(public) and "Listening on 0.0.0.0" in public


def test_timer_schedule_comes_from_settings_and_bad_ones_are_refused() -> None:
    d = _directives(_render(schedule="Mon *-*-* 01:30:00")[TIMER])
    assert d["OnCalendar"] == ["Mon *-*-* 01:30:00"] and d["Persistent"] == ["true"]
    with pytest.raises(StateError, match="calendar"):
        _render(schedule="daily\nExecStartPre=/bin/sh")


def test_every_placeholder_is_filled_and_an_unknown_one_is_an_error() -> None:
    for text in _render().values():
        assert not re.search(r"@[A-Z_]+@", text)
    with pytest.raises(KeyError):
        fill("X=@NOPE@", {})


def _write(units: dict[str, str], d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for name, text in units.items():
        (d / name).write_text(text)


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    app = prefix / "current/venv/bin/appliance"
    app.parent.mkdir(parents=True)
    app.write_text("#!/bin/sh\n")
    app.chmod(0o755)
    _write(render_units(UnitSettings(prefix=str(prefix)), load_templates()), tmp_path / "units")
    proc = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / "units" / u) for u in UNITS]],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("unit", [SERVER, TRAINER])
def test_security_exposure_is_at_most_2(tmp_path: Path, unit: str) -> None:
    _write(_render(), tmp_path / "etc/systemd/system")
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", f"--root={tmp_path}", unit],
                          capture_output=True, text=True, timeout=120)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr
    assert float(m[1]) <= 2.0, proc.stdout
