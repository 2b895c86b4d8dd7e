"""The console's text input: an Input that leaves the screen keys to the app."""

from __future__ import annotations

from textual.widgets import Input

from appliance.console.widgets.nav import ALT_KEYS


class TextInput(Input):
    """alt+<n> switches screens while typing. A terminal that sends it as ESC <n> arrives as a printable
    character (¡ for alt+1), which an Input would claim as text and so hide the app's key for it."""

    def check_consume_key(self, key: str, character: str | None) -> bool:
        return key not in ALT_KEYS and super().check_consume_key(key, character)
