"""`appliance demo`: a newcomer's first run. Makes demo keys, builds the demo bundle, verifies and inspects it.

Re-running reuses the keys and the bundle when they are already there and still verify.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.errors import ApplianceError, UsageError


def _run(argv: list[str]) -> None:
    from appliance.cli import build_parser

    args = build_parser().parse_args(argv)
    code = args.func(args)
    if code:
        raise UsageError(f"`appliance {' '.join(argv)}` exited with {code}.")


def cmd_demo(args: argparse.Namespace) -> int:
    work = Path(args.workdir).resolve()
    spec = Path(args.spec)
    if not spec.is_file():
        raise UsageError(f"The demo spec {spec} does not exist.", "Run `make demo` from the repository root.")
    keys, bundle = work / "keys", work / "bundle"
    if not (keys / "signing.key").exists():
        print(f"== making demo vendor keys in {keys}")
        _run(["bundle", "keygen", "--out", str(keys)])
    trust = ["--trust", str(keys / "signing.pub")]
    if bundle.exists():
        try:
            print(f"== reusing the demo bundle in {bundle}")
            _run(["bundle", "verify", str(bundle), *trust])
        except ApplianceError as e:
            print(f"   it does not verify ({e.message}); building it again")
            import shutil

            shutil.rmtree(bundle)
    if not bundle.exists():
        print(f"== building the demo bundle from {spec} (wheelhouse, encrypted model, signed manifest)")
        _run(["bundle", "build", str(spec), "--signing-key", str(keys / "signing.key"),
              "--model-key", str(keys / "model.key"), "--out", str(bundle)])
        print("== verifying it as a site would")
        _run(["bundle", "verify", str(bundle), *trust])
    print("== what it holds")
    _run(["bundle", "inspect", str(bundle), *trust])
    return 0


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", help="a first run: demo keys, demo bundle, verify, inspect", parents=[root_parent])
    p.add_argument("--spec", default="bundles/demo.toml", help="bundle spec to build (default bundles/demo.toml)")
    p.add_argument("--workdir", default="demo", help="where keys and the bundle go (default ./demo)")
    p.set_defaults(func=cmd_demo)
