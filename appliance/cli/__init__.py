"""`appliance`: one command, many verbs. Expected failures print one sentence and a hint, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from appliance import __version__
from appliance.errors import ApplianceError

# Each module here has `add_parser(sub, root_parent)` and registers its verbs with `set_defaults(func=...)`.
# Modules are imported when the parser is built; heavy imports stay inside the command functions.
VERB_MODULES = (
    "appliance.cli.bundle",
    "appliance.cli.demo",
    "appliance.cli.support",
    "appliance.cli.hw",
    "appliance.cli.lifecycle",
    "appliance.cli.server",
    "appliance.cli.feedback",
    "appliance.cli.trainer",
    "appliance.cli.console",
)

def build_parser() -> argparse.ArgumentParser:
    help_text = "install root (default: $APPLIANCE_ROOT or /); tests and demos use a temporary tree"
    parser = argparse.ArgumentParser(prog="appliance", description="A private LLM for sites with no internet.")
    parser.add_argument("--root", default=os.environ.get("APPLIANCE_ROOT", "/"), help=help_text)
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    # Verbs accept --root after the verb too. SUPPRESS: a verb that is not given --root must not
    # overwrite one given before the verb (`appliance --root R keys create`) with the default.
    root = argparse.ArgumentParser(add_help=False)
    root.add_argument("--root", default=argparse.SUPPRESS, help=help_text)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    for name in VERB_MODULES:
        importlib.import_module(name).add_parser(sub, root)

    return parser


def render_error(e: ApplianceError) -> str:
    text = f"error: {e.message}"
    if e.hint:
        text += f"\nhint: {e.hint}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return code
    except ApplianceError as e:
        print(render_error(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`appliance ... | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141

