"""`appliance console [--root R] [--machine FILE]`: the Textual console."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_console(args: argparse.Namespace) -> int:
    from appliance.console.app import run
    from appliance.console.sources.context import Sources

    run(Sources.real(args.root, machine=Path(args.machine) if args.machine else None))
    return 0


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("console", help="open the Textual console: install, watch and steer the appliance", parents=[root_parent])
    p.add_argument("--machine", metavar="FILE", help="install screen: plan for a recorded machine file instead of probing this one")
    p.set_defaults(func=cmd_console)
