"""Show text from logs and model output literally: no Rich markup, no terminal escape sequences.

Rich `Text` built from a plain string never parses markup; control characters (ESC, CSI, BEL, ...)
would still reach the terminal, so they are shown as visible `\\xNN` escapes instead.
"""

from __future__ import annotations

import re

from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def literal(s: str) -> str:
    """`s` with every control character but tab and newline made visible."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", s)


def text(s: str, style: str = "") -> Text:
    return Text(literal(s), style=style)
