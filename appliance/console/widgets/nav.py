"""The one-line bar of screens at the top: digits (or F1..F7, also while typing) switch screens."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

SCREENS = (
    ("1", "dashboard", "Dashboard"), ("2", "install", "Install"), ("3", "training", "Training"),
    ("4", "adapters", "Adapters"), ("5", "keys", "Keys"), ("6", "logs", "Logs"), ("7", "playground", "Playground"),
)


class NavBar(Static):
    def __init__(self, current: str) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        for key, mode, label in SCREENS:
            style = "reverse bold" if mode == current else ""
            t.append(f" {key} ", style="bold " + style)
            t.append(f"{label} ", style=style)
        super().__init__(t, id="nav")
