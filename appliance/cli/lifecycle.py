"""`appliance install | upgrade | rollback | uninstall | status`: thin shells over installer/steps/install.py and installer/steps/lifecycle.py."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from appliance.errors import UsageError
from appliance.paths import Layout


def _answers(path: str | None) -> dict[str, Any]:
    """--answers FILE (TOML): tier, key_file, passphrase_file, bind ("HOST" or "HOST:PORT"), trust, trust_fingerprint."""
    if not path:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"Cannot read the answers file {path}: {e.strerror}.") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"The answers file {path} is not valid TOML: {e}.") from None
    known = {"tier", "key_file", "passphrase_file", "bind", "trust", "trust_fingerprint"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"The answers file {path} has an unknown key {unknown[0]!r}.", f"Known keys: {', '.join(sorted(known))}.")
    bad = [k for k, v in data.items() if not isinstance(v, str)]
    if bad:
        raise UsageError(f"The answers file's {bad[0]} must be a string.")
    base = Path(path).resolve().parent  # relative paths in it are relative to the file
    return {k: (str(base / v) if k in ("key_file", "passphrase_file", "trust") and not Path(v).is_absolute() else v) for k, v in data.items()}


def _bind(text: str | None) -> tuple[str | None, int | None]:
    if not text:
        return None, None
    host, sep, port = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else ("", "", "")
    if not sep:
        return text, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"The bind address {text!r} has no valid port.", "Write HOST or HOST:PORT, e.g. 0.0.0.0:8088.")
    return host.strip("[]"), int(port)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError(f"{question} — there is no terminal to answer on.", "Pass --yes (and the options it needs) for an unattended run.")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _context(args: argparse.Namespace, upgrade: bool = False) -> Any:
    from installer.steps.activate import systemd_running
    from installer.steps.context import Context, Options
    from installer.steps.framework import print_events
    from installer.system.runner import RecordingRunner, SubprocessRunner
    from installer.system.target import RecordingTarget, Target

    ans = _answers(getattr(args, "answers", None))
    layout = Layout.at(args.root)

    def opt(name: str) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else ans.get(name)

    host, port = _bind(opt("bind"))
    key_file, pass_file, trust = opt("key_file"), opt("passphrase_file"), opt("trust")
    if key_file and pass_file:
        raise UsageError("Give either --key-file or --passphrase-file, not both.")
    opts = Options(
        bundle=Path(args.dir).resolve() if getattr(args, "dir", None) else None, upgrade=upgrade, tier=opt("tier"),
        key_file=Path(key_file) if key_file else None, passphrase_file=Path(pass_file) if pass_file else None,
        trust=Path(trust) if trust else None, trust_fingerprint=opt("trust_fingerprint"), yes=bool(getattr(args, "yes", False)),
        no_systemd=bool(getattr(args, "no_systemd", False)), machine=Path(args.machine) if getattr(args, "machine", None) else None,
        host=host, port=port, ready_timeout=float(getattr(args, "ready_timeout", 600)),
    )
    dry = bool(getattr(args, "dry_run", False))
    ctx = Context(layout=layout, opts=opts, runner=RecordingRunner() if dry else SubprocessRunner(),
                  target=RecordingTarget() if dry else Target(), emit=print_events(sys.stderr, getattr(args, "verbose", False)),
                  confirm=_confirm, systemd_running=systemd_running(layout.root) and not opts.no_systemd)
    return ctx


def _finish(ctx: Any, summary: str) -> int:
    for n in ctx.notices:
        print(f"note: {n}", file=sys.stderr)
    if ctx.dry_run:
        print("dry run: nothing was changed. It would have:")
        for line in ctx.target.actions:
            print(f"  {line}")
        for line in ctx.runner.lines():
            print(f"  run {line}")
        return 0
    print(summary)
    return 0


def _locked(ctx: Any) -> Any:
    import contextlib

    from installer.steps.lifecycle import install_lock

    return contextlib.nullcontext() if ctx.dry_run else install_lock(ctx.layout)


def cmd_install(args: argparse.Namespace, upgrade: bool = False) -> int:
    from installer.steps.install import install

    ctx = _context(args, upgrade)
    with _locked(ctx):
        install(ctx)
    info = None if ctx.verified is None or ctx.verified.current else ctx.plan
    done = (f"{'upgraded to' if upgrade else 'installed'} {info.name} {info.version} (sequence {info.sequence}), "
            f"tier {info.tier}, under {ctx.layout.root}") if info else "nothing to do: already installed and current"
    return _finish(ctx, done)


def cmd_upgrade(args: argparse.Namespace) -> int:
    return cmd_install(args, upgrade=True)


def cmd_rollback(args: argparse.Namespace) -> int:
    from installer.steps.lifecycle import rollback

    ctx = _context(args)
    with _locked(ctx):
        to = rollback(ctx, args.to)
    return _finish(ctx, f"rolled back to release {to}")


def cmd_uninstall(args: argparse.Namespace) -> int:
    from installer.steps.lifecycle import uninstall

    ctx = _context(args)
    if args.purge and not args.yes and not ctx.dry_run and not _confirm(f"Delete every model, adapter, key and log under {ctx.layout.root}?"):
        raise UsageError("Cancelled; nothing was removed.")
    with _locked(ctx):
        uninstall(ctx, args.purge)
    return _finish(ctx, "uninstalled" + (" and purged" if args.purge else "; configuration, keys and data are kept"))


def cmd_status(args: argparse.Namespace) -> int:
    from installer.steps.activate import systemd_running
    from installer.steps.lifecycle import format_status, status
    from installer.system.runner import SubprocessRunner

    layout = Layout.at(args.root)
    s = status(layout, SubprocessRunner(), systemd_running(layout.root))
    print(json.dumps(s, indent=2) if args.json else format_status(s))
    return 0 if s["problem"] is None else 16


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dry-run", action="store_true", help="show what would be done; change nothing")
    common.add_argument("--no-systemd", action="store_true", help="for hosts without systemd: no units; prints how to run the server")
    common.add_argument("--yes", action="store_true", help="do not ask; for unattended runs (with --answers)")
    common.add_argument("--answers", metavar="FILE", help="TOML with tier, key_file or passphrase_file, bind, trust_fingerprint")
    common.add_argument("--ready-timeout", type=float, default=600, metavar="S", help="seconds to wait for /health/ready (default 600)")
    common.add_argument("-v", "--verbose", action="store_true", help="show progress within steps")

    bundle = argparse.ArgumentParser(add_help=False)
    bundle.add_argument("dir", help="bundle directory (the stick)")
    bundle.add_argument("--tier", help="install this tier instead of the one the planner chooses")
    keys = bundle.add_mutually_exclusive_group()
    keys.add_argument("--key-file", help="the site's model key (model.key, from the second stick)")
    keys.add_argument("--passphrase-file", help="a file holding the passphrase that opens the model files")
    bundle.add_argument("--machine", metavar="FILE", help="a recorded machine file instead of probing this host")
    bundle.add_argument("--bind", metavar="HOST[:PORT]", help="address the API listens on (default 127.0.0.1:8088)")

    p = sub.add_parser("install", help="install a bundle", parents=[root_parent, common, bundle])
    p.add_argument("--trust", metavar="FILE", help="first install: the vendor's public key, delivered out of band")
    p.add_argument("--trust-fingerprint", metavar="SHA256:HEX", help="first install: accept the bundle's vendor key if it has this fingerprint")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("upgrade", help="upgrade to a newer bundle (verified against the pinned vendor keys)", parents=[root_parent, common, bundle])
    p.set_defaults(func=cmd_upgrade)

    p = sub.add_parser("rollback", help="return to the previous release", parents=[root_parent, common])
    p.add_argument("--to", metavar="RELEASE", help="a specific installed release (default: the one before current)")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("uninstall", help="remove the appliance (configuration, keys and data stay unless --purge)", parents=[root_parent, common])
    p.add_argument("--purge", action="store_true", help="also delete configuration, keys, models, adapters, data and logs")
    p.set_defaults(func=cmd_uninstall)

    p = sub.add_parser("status", help="releases, current, tier, model, units, last install", parents=[root_parent])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
