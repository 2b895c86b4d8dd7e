"""How the console shows an error, everywhere: an ApplianceError's own sentence and hint (as the
command line prints them), anything else by its type and text; always literally."""

from __future__ import annotations

from rich.text import Text

from appliance.console.widgets.literal import literal, text
from appliance.errors import ApplianceError


def error_parts(error: BaseException) -> tuple[str, str]:
    """(message, hint): what went wrong and what to do; the hint is "" when there is none."""
    if isinstance(error, ApplianceError):
        return literal(error.message), literal(error.hint or "")
    return literal(f"{type(error).__name__}: {error}"), ""


def error_line(error: BaseException) -> str:
    """Message and hint on one line, for a panel or a sentence."""
    return " ".join(p for p in error_parts(error) if p)


def error_text(error: BaseException, prefix: str = "") -> Text:
    """A prefix in bold red, the message, and the hint in italics on its own line."""
    message, hint = error_parts(error)
    out = Text(prefix, style="bold red").append_text(text(message))
    return out.append("\n").append_text(text(hint, "italic")) if hint else out
