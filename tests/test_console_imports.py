"""Layering: the console never imports torch, transformers or peft (checked in a fresh interpreter),
and `appliance console --help` works without opening the app."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "peft", "llama_cpp")


def test_console_imports_no_ml_stack() -> None:
    code = (
        "import sys\n"
        "import appliance.console.app\n"
        "from appliance.console.screens import dashboard, install, training, adapters, keys, logs, playground\n"
        "from appliance.console.sources import context, overview, install as i, training as t, server, recorded\n"
        f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_console_verb_is_registered() -> None:
    r = subprocess.run([sys.executable, "-m", "appliance.cli", "console", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--root" in r.stdout and "--machine" in r.stdout
