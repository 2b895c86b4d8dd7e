"""Playground: chat with the served model, streamed token by token, with the active adapter on or off.

"Off" asks for the base model by its id, "on" for `<model>:<adapter>`, the ids /v1/models lists.
The answer is shown literally (no markup, no escape sequences).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.widgets import Footer, Input, Label, Static, Switch
from textual.worker import WorkerState

from appliance.console.screens.base import ConsoleScreen
from appliance.console.widgets.inputs import TextInput
from appliance.console.widgets.literal import text
from appliance.console.widgets.nav import NavBar


@dataclass
class Delta(Message):
    text: str


@dataclass
class AnswerDone(Message):
    answer: str
    model: str | None


class PlaygroundScreen(ConsoleScreen):
    NAV = "playground"
    BINDINGS = [Binding("ctrl+l", "clear", "Clear chat"), Binding("ctrl+t", "toggle_adapter", "Adapter on/off")]
    TEMPERATURE = 0.2  # small models ramble at the API default of 1.0

    def __init__(self) -> None:
        super().__init__()
        self.history: list[dict[str, str]] = []
        self.partial = ""
        self.answer: Static | None = None  # the message the stream is writing into

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        with Horizontal(id="play-bar"):
            yield Label("adapter ")
            yield Switch(value=True, id="adapter")
            yield Label("", id="model-label")
        yield VerticalScroll(id="chat")
        yield TextInput(placeholder="ask the model; Enter sends", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()

    def action_toggle_adapter(self) -> None:
        sw = self.query_one("#adapter", Switch)
        sw.value = not sw.value

    def action_clear(self) -> None:
        self.history.clear()
        self.query_one("#chat", VerticalScroll).remove_children()

    def say(self, who: str, style: str, body: str) -> Static:
        msg = Static(Text(f"{who}: ", style=style).append_text(text(body)), classes="msg")
        chat = self.query_one("#chat", VerticalScroll)
        chat.mount(msg)
        chat.scroll_end(animate=False)
        return msg

    def on_input_submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt or self.busy("chat"):
            return
        event.input.value = ""
        self.say("you", "bold cyan", prompt)
        self.history.append({"role": "user", "content": prompt})
        self.partial = ""
        self.answer = self.say("model", "bold green", "…")
        self.ask(list(self.history), self.query_one("#adapter", Switch).value)

    @work(thread=True, exclusive=True, exit_on_error=False, group="chat")
    def ask(self, messages: list[dict[str, str]], adapter_on: bool) -> None:
        server = self.sources.server()
        ids = server.models()
        base = ids[0] if ids else None
        with_adapter = next((i for i in ids if base and i.startswith(base + ":")), None)
        model = with_adapter if adapter_on and with_adapter else base
        parts: list[str] = []
        for piece in server.chat_stream(messages, model, temperature=self.TEMPERATURE):
            parts.append(piece)
            self.post_message(Delta(piece))
        self.post_message(AnswerDone("".join(parts), model))

    def on_delta(self, m: Delta) -> None:
        self.partial += m.text
        if self.answer is not None:
            self.answer.update(Text("model: ", style="bold green").append_text(text(self.partial)))
            self.query_one("#chat", VerticalScroll).scroll_end(animate=False)

    def on_answer_done(self, m: AnswerDone) -> None:
        self.history.append({"role": "assistant", "content": m.answer})
        self.query_one("#model-label", Label).update(text(f"  answered by {m.model or 'the default model'}", "dim"))
        if self.answer is not None:
            self.answer.update(Text("model: ", style="bold green").append_text(text(m.answer)))
        self.answer = None

    def on_worker_state_changed(self, event: Any) -> None:
        super().on_worker_state_changed(event)
        if event.state == WorkerState.ERROR and self.answer is not None:
            self.answer.update(Text("model: ", style="bold green").append(Text("(no answer: see the notification)", style="dim")))
            self.answer = None
