"""`appliance support-bundle --out DIR`: diagnostics for the vendor, with no secrets in them.

Each section is collected on its own: one that fails records its error and the rest still go in.
The result is one tarball with its SHA-256 beside it (`<name>.tar.gz.sha256`, sha256sum format).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import re
import sys
import tarfile
import time
import tomllib
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_file, atomic_write_bytes
from appliance.errors import UsageError
from appliance.paths import UNITS, Layout

JOURNAL_LINES = 1000
PACKAGES = ("appliance", "torch", "transformers", "peft", "llama_cpp_python", "textual", "fastapi",
            "cryptography", "nvidia-ml-py", "psutil")
SECRET_NAME = re.compile(r"(?i)(secret|token|passw|passphrase|api_?key|private|credential|auth)")
REDACTED = "[REDACTED]"


def redact(value: Any) -> Any:
    """Replace the value of every key whose name suggests a secret, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_NAME.search(str(k)) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def scrub_text(text: str) -> str:
    """Blank anything in free text (journal lines) that looks like an API key or a bearer token."""
    from appliance.apikeys import PREFIX

    text = re.sub(rf"{re.escape(PREFIX)}-([0-9a-f]+)-[A-Za-z0-9_\-]+", rf"{PREFIX}-\1-{REDACTED}", text)
    return re.sub(r"(?i)(bearer\s+)\S+", rf"\1{REDACTED}", text)


def _versions(_layout: Layout) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": found}


def _state(layout: Layout) -> dict[str, Any]:
    from appliance.state import load_install_state

    return load_install_state(layout)


def _machine(layout: Layout) -> dict[str, Any]:
    from installer.hardware.probe import probe

    return probe(layout.root).to_json()


def _plan(layout: Layout) -> dict[str, Any]:
    from installer.bundle.manifest import MANIFEST, parse_manifest
    from installer.hardware.probe import probe
    from installer.planning.planner import plan
    from installer.planning.tiers import models_of, parse_tiers

    manifest = layout.current / MANIFEST
    if not manifest.is_file():
        return {"note": "no installed release with a manifest; nothing to plan"}
    m = parse_manifest(manifest.read_bytes())
    return plan(probe(layout.root), parse_tiers(m.tiers, models_of(m.models)), m.runtimes).to_json()


def _config(layout: Layout) -> dict[str, Any]:
    if not layout.config_file.is_file():
        return {"note": f"{layout.config_file} does not exist"}
    return redact(tomllib.loads(layout.config_file.read_text()))


def _audit(layout: Layout) -> dict[str, Any]:
    from appliance.audit import verify

    if not layout.audit_log.is_file():
        return {"note": "no audit log yet"}
    ok, bad_line = verify(layout)
    return {"ok": ok, "first_bad_line": bad_line}


def _units(runner: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for unit in UNITS:
        proc = runner.run(["systemctl", "show", unit, "--no-pager",
                           "--property=LoadState,ActiveState,SubState,Result,NRestarts,ExecMainStatus,NextElapseUSecRealtime"],
                          check=False)
        out[unit] = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line) or {"error": proc.stderr.strip()}
    return out


def _journal(runner: Any, unit: str) -> str:
    proc = runner.run(["journalctl", "-u", unit, "-n", str(JOURNAL_LINES), "--no-pager", "-o", "short-iso"], check=False)
    return proc.stdout if proc.returncode == 0 else f"journalctl failed ({proc.returncode}): {proc.stderr.strip()}\n"


def collect(layout: Layout, runner: Any) -> dict[str, bytes]:
    """Every file of the support bundle, name → bytes."""
    sections: dict[str, Callable[[Layout], Any]] = {
        "versions": _versions, "state": _state, "machine": _machine, "plan": _plan,
        "config": _config, "audit": _audit,
    }
    files: dict[str, bytes] = {}
    for name, fn in sections.items():
        try:
            value = fn(layout)
        except Exception as e:  # a diagnostics tool reports what broke instead of breaking
            value = {"error": f"{type(e).__name__}: {e}"}
        files[f"{name}.json"] = (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode()
    try:
        files["units.json"] = (json.dumps(_units(runner), indent=2) + "\n").encode()
        for unit in UNITS:
            files[f"journal/{unit}.log"] = scrub_text(_journal(runner, unit)).encode()
    except Exception as e:
        files["units.json"] = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode()
    return files


def write_bundle(files: dict[str, bytes], out: Path, stamp: str) -> Path:
    """Write `appliance-support-<stamp>.tar.gz` and its `.sha256` into `out` atomically."""
    out.mkdir(parents=True, exist_ok=True)
    name = f"appliance-support-{stamp}"
    tar_path = out / f"{name}.tar.gz"
    h = hashlib.sha256()
    with atomic_file(tar_path, mode=0o600) as f:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for rel, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{name}/{rel}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o600
                tar.addfile(info, io.BytesIO(data))
        h.update(buf.getvalue())
        f.write(buf.getvalue())
    atomic_write_bytes(out / f"{tar_path.name}.sha256", f"{h.hexdigest()}  {tar_path.name}\n".encode())
    return tar_path


def cmd_support_bundle(args: argparse.Namespace) -> int:
    from installer.system.runner import SubprocessRunner

    if not args.out:
        raise UsageError("support-bundle needs --out DIR.")
    layout = Layout.at(args.root)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_bundle(collect(layout, SubprocessRunner()), Path(args.out), stamp)
    print(f"wrote {path} and {path.name}.sha256; it holds no keys, passphrases or API keys")
    return 0


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("support-bundle", help="collect diagnostics for the vendor, without secrets", parents=[root_parent])
    p.add_argument("--out", required=True, help="directory for the tarball and its .sha256")
    p.set_defaults(func=cmd_support_bundle)
