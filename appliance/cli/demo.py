"""`appliance demo`: a newcomer's first run, with no systemd and no GPU.

Demo vendor keys → signed, encrypted demo bundle (both model variants) → verify → install into
`<workdir>/root --no-systemd` → an API key → the server in the background → one question through
the OpenAI client → the console. Re-running reuses whatever is already there and still good;
`appliance demo --stop` stops the server.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_bytes
from appliance.errors import ApplianceError, UsageError
from appliance.paths import Layout

QUESTION = "What is the capital of France? Answer in one sentence."
READY_TIMEOUT_S = 300


def _run(argv: list[str]) -> None:
    from appliance.cli import build_parser

    args = build_parser().parse_args(argv)
    code = args.func(args)
    if code:
        raise UsageError(f"`appliance {' '.join(argv)}` exited with {code}.")


def _say(text: str) -> None:
    print(f"== {text}", flush=True)


def _bundle(spec: Path, keys: Path, bundle: Path) -> None:
    if not (keys / "signing.key").exists():
        _say(f"making demo vendor keys in {keys}")
        _run(["bundle", "keygen", "--out", str(keys)])
    trust = ["--trust", str(keys / "signing.pub")]
    if bundle.exists():
        try:
            _say(f"reusing the demo bundle in {bundle}")
            _run(["bundle", "verify", str(bundle), *trust])
            return
        except ApplianceError as e:
            print(f"   it does not verify ({e.message}); building it again")
            import shutil

            shutil.rmtree(bundle)
    _say(f"building the demo bundle from {spec}: wheelhouse, both model variants encrypted, signed manifest")
    _run(["bundle", "build", str(spec), "--signing-key", str(keys / "signing.key"),
          "--model-key", str(keys / "model.key"), "--out", str(bundle)])
    _say("verifying it as a site would, and what it holds")
    _run(["bundle", "verify", str(bundle), *trust])
    _run(["bundle", "inspect", str(bundle), *trust])


def _install(bundle: Path, keys: Path, root: Path, port: int) -> None:
    from appliance.state import load_install_state
    from installer.bundle.manifest import parse_manifest
    from installer.bundle.reader import read_signed

    sequence = parse_manifest(read_signed(bundle)[0]).sequence
    state = load_install_state(Layout.at(root))
    if state.get("current") and state.get("highest_sequence") == sequence:
        _say(f"reusing the install under {root} (sequence {sequence})")
        return
    _say(f"installing the bundle into {root} (--no-systemd: this demo runs the server itself)")
    _run(["install", str(bundle), "--root", str(root), "--no-systemd", "--yes", "--bind", f"127.0.0.1:{port}",
          "--key-file", str(keys / "model.key"), "--trust", str(keys / "signing.pub")])


def _api_key(layout: Layout, path: Path) -> str:
    from appliance import apikeys

    if path.exists():
        key = path.read_text().strip()
        if apikeys.verify(layout, key) is not None:
            return key
    _key_id, key = apikeys.create(layout, "user")
    atomic_write_bytes(path, (key + "\n").encode(), mode=0o600)
    _say(f"made an API key (role user), kept in {path}")
    return key


def _base_url(layout: Layout) -> str:
    from appliance import tls
    from appliance.config import load_config

    return tls.local_url(load_config(layout).server)


def _trust(layout: Layout) -> Any:
    """None for plain HTTP; with [server] tls_cert, an SSL context that trusts exactly that certificate."""
    from appliance import tls
    from appliance.config import load_config

    return tls.client_context(load_config(layout).server, layout)


def _ready(base: str, layout: Layout) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health/ready", timeout=2, context=_trust(layout)) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _serve(layout: Layout, work: Path) -> str:
    base = _base_url(layout)
    pidfile, log = work / "server.pid", work / "server.log"
    if _pid(pidfile) and _ready(base, layout):
        _say(f"reusing the server already running at {base} (pid {_pid(pidfile)})")
        return base
    if _ready(base, layout):
        raise UsageError(f"Something else already answers at {base}.", "Stop it, or change [server] port in the demo's appliance.toml.")
    exe = layout.current / "venv/bin/appliance"
    _say(f"starting the server in the background: {exe} --root {layout.root} serve (log: {log})")
    with log.open("ab") as out:
        proc = subprocess.Popen([str(exe), "--root", str(layout.root), "serve"], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    atomic_write_bytes(pidfile, f"{proc.pid}\n".encode())
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _ready(base, layout):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-8:]
            raise UsageError(f"The server exited with {proc.returncode} before it was ready: {' / '.join(tail)}", f"See {log}.")
        if time.monotonic() > deadline:
            raise UsageError(f"The server was not ready within {READY_TIMEOUT_S} s.", f"See {log}.")
        time.sleep(0.5)
    _say(f"the server is ready at {base} (model loaded, warm-up generation done)")
    return base


def _ask(base: str, key: str, layout: Layout) -> None:
    from openai import DefaultHttpxClient, OpenAI

    trust = _trust(layout)
    client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300,
                    http_client=DefaultHttpxClient(verify=trust) if trust else None)
    model = client.models.list().data[0].id
    _say(f"asking {model} through the official openai client: {QUESTION!r}")
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=48, temperature=0)
    print(f"\n   {reply.choices[0].message.content!s}\n")
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'
    print("Ask another, with curl:\n")
    from appliance import tls
    from appliance.config import load_config

    cert = load_config(layout).server.tls_cert
    cacert = f" --cacert {shlex.quote(str(tls.on_target(layout, cert)))}" if trust and cert else ""
    print(f"  curl -s{cacert} {base}/v1/chat/completions -H 'Authorization: Bearer {key}' \\\n"
          f"       -H 'Content-Type: application/json' -d {shlex.quote(body)}\n")
    print("or with Python:\n")
    print("  from openai import OpenAI")
    print(f'  client = OpenAI(base_url="{base}/v1", api_key="{key}")')
    print(f'  print(client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}]).choices[0].message.content)\n')


def _stop(work: Path) -> int:
    pid = _pid(work / "server.pid")
    if pid is None:
        print("the demo server is not running")
        return 0
    os.killpg(pid, signal.SIGTERM)
    for _ in range(100):
        if _pid(work / "server.pid") is None:
            break
        time.sleep(0.1)
    (work / "server.pid").unlink(missing_ok=True)
    print(f"stopped the demo server (pid {pid})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    work = Path(args.workdir).resolve()
    if args.stop:
        return _stop(work)
    spec = Path(args.spec)
    if not spec.is_file():
        raise UsageError(f"The demo spec {spec} does not exist.", "Run `make demo` from the repository root.")
    work.mkdir(parents=True, exist_ok=True)
    keys, bundle, root = work / "keys", work / "bundle", work / "root"
    _bundle(spec, keys, bundle)
    _install(bundle, keys, root, args.port)
    layout = Layout.at(root)
    key = _api_key(layout, work / "api-key")
    base = _serve(layout, work)
    _ask(base, key, layout)
    exe = Path(sys.executable).with_name("appliance")
    console = [str(exe), "--root", str(root), "console"] if exe.exists() else [sys.executable, "-m", "appliance.cli", "--root", str(root), "console"]
    print(f"Stop the server with `make demo-stop`. The console: {shlex.join(console)}")
    if args.no_console or not (sys.stdin.isatty() and sys.stdout.isatty()):
        return 0
    _say("opening the console (q quits)")
    os.execv(console[0], console)
    return 0  # not reached


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="a first run: demo bundle, install, serve, ask, console", parents=[root_parent])
    p.add_argument("--spec", default="bundles/demo.toml", help="bundle spec to build (default bundles/demo.toml)")
    p.add_argument("--workdir", default="demo", help="where keys, bundle, root and server log go (default ./demo)")
    p.add_argument("--port", type=int, default=8088, help="port the demo server listens on (default 8088)")
    p.add_argument("--no-console", action="store_true", help="do not open the console at the end")
    p.add_argument("--stop", action="store_true", help="stop the demo server and exit")
    p.set_defaults(func=cmd_demo)
