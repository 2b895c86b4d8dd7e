"""The keys that move between screens, and the one-line bar at the top that shows them.

The keys follow the order of the app's list of pages (appliance.console.app.PAGES): the n-th page has
the digit n, F<n> and alt+<n>. A digit is text in an input, so the digits work while no input has the
focus; F<n> and alt+<n> are priority keys and work everywhere, also while typing (in a TextInput). The
bar shows the keys that work in the state it is in: digits, or F-keys while the focus is in an input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual._ansi_sequences import ANSI_SEQUENCES_KEYS
from textual.binding import Binding
from textual.keys import _character_to_key
from textual.widget import Widget

if TYPE_CHECKING:
    from textual.screen import Screen

MAX_PAGES = 9  # one digit each


@dataclass(frozen=True)
class Page:
    """One screen: its mode name, its label in the bar, and its class as `module:Class` under
    appliance.console.screens (imported when first shown: a fast first paint)."""

    mode: str
    label: str
    screen: str

    def load(self) -> Screen[Any]:
        module, cls = self.screen.split(":")
        screen: Screen[Any] = getattr(import_module(f"appliance.console.screens.{module}"), cls)()
        return screen


def digit(pages: Sequence[Page], mode: str) -> str:
    """The digit that shows the page `mode` (e.g. for a hint that says "press 3")."""
    return str(next(n for n, p in enumerate(pages, 1) if p.mode == mode))


def alt_keys(n: int) -> list[str]:
    """alt+<n>, and the key Textual reads when a terminal sends alt+<n> as ESC <n> (tmux, xterm, most
    terminals over SSH): Textual takes that for macOS's Option+<n> and names the character (¡ for 1)."""
    keys = [f"alt+{n}"]
    char = ANSI_SEQUENCES_KEYS.get(f"\x1b{n}")
    if isinstance(char, str):
        keys.append(_character_to_key(char))
    return keys


ALT_KEYS = frozenset(k for n in range(1, MAX_PAGES + 1) for k in alt_keys(n))


def screen_bindings(pages: Sequence[Page]) -> list[Binding]:
    """For the n-th page: the digit n, and F<n> / alt+<n> as priority keys (they work while typing)."""
    if len(pages) > MAX_PAGES:
        raise ValueError(f"The console has {len(pages)} screens; keys exist for {MAX_PAGES} at most: merge some.")
    out: list[Binding] = []
    for n, p in enumerate(pages, 1):
        out.append(Binding(str(n), f"show('{p.mode}')", p.label, show=False))
        out.append(Binding(",".join([f"f{n}", *alt_keys(n)]), f"show('{p.mode}')", p.label, show=False, priority=True))
    return out


def typing(screen: Screen[Any]) -> bool:
    """The focus is in a widget that takes a digit as text (an input)."""
    focused = screen.focused
    return focused is not None and focused.check_consume_key("1", "1")


def _shorten(labels: list[str]) -> list[str]:
    """The longest labels lose a letter (shown as an ellipsis)."""
    longest = max(map(len, labels))
    return [lb[: longest - 2] + "…" if len(lb) == longest else lb for lb in labels]


def nav_text(pages: Sequence[Page], current: str, typing: bool, width: int) -> Text:
    """Every page with the key that shows it now. When the bar is too narrow, first the spaces go
    (between pages, then between key and label), then the longest labels get shorter."""
    keys = [f"F{n}" if typing else str(n) for n in range(1, len(pages) + 1)]
    labels = [p.label for p in pages]
    layouts = [(" ", " "), ("", " "), ("", "")]  # (before a key, between key and label)
    pad, sep = layouts.pop(0)
    while sum(len(pad + k + sep + lb) + 1 for k, lb in zip(keys, labels, strict=True)) - 1 > width > 0:
        if layouts:
            pad, sep = layouts.pop(0)
        elif max(map(len, labels)) > 4:
            labels = _shorten(labels)
        else:
            break  # the rest is cut off at the edge
    t = Text(no_wrap=True, overflow="ellipsis")
    for key, label, p in zip(keys, labels, pages, strict=True):
        style = "reverse bold" if p.mode == current else ""
        t.append(f"{pad}{key}{sep}", style="bold " + style)
        t.append(f"{label} ", style=style)
    t.rstrip()
    return t


class NavBar(Widget):
    def __init__(self, current: str) -> None:
        super().__init__(id="nav")
        self.current = current

    def on_mount(self) -> None:
        # Published when the focus moves (into or out of an input) and when the app asks for it.
        self.screen.bindings_updated_signal.subscribe(self, self.changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def changed(self, _screen: Screen[Any]) -> None:
        self.refresh()

    def render(self) -> Text:
        pages: Sequence[Page] = self.app.PAGES  # type: ignore[attr-defined]
        return nav_text(pages, self.current, typing(self.screen), self.size.width)
