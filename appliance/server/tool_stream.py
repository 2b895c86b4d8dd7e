"""One streamed chat choice with tools: content while it is content, tool calls as OpenAI streams them.

`auto`: text flows as content until `<tool_call>` may have begun; what follows is held, and the
calls parsed at the end come as two deltas each (id, type and name; then the arguments). Forced
(`required` or a named function): the grammar guarantees the call, so its head goes out as soon as
the name is written and its arguments as they grow, piece by piece.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from appliance.server import tools

_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ContentFilter:
    """The part of an answer that can go out as content now."""

    def __init__(self, p: tools.ToolPlan) -> None:
        self.mode, self.seen, self.sent, self.holding = p.mode, "", 0, False

    def feed(self, text: str) -> str:
        self.seen += text
        if self.mode == "none":
            out, self.sent = self.seen[self.sent:], len(self.seen)
            return out
        if self.mode == "forced" or self.holding:
            return ""
        tag = tools.OPEN.strip()
        i = self.seen.find(tag)
        if i >= 0:
            self.holding = True
            end = i
        else:
            end = len(self.seen)
            for k in range(min(len(tag) - 1, len(self.seen)), 0, -1):  # an unfinished tag at the end
                if self.seen.endswith(tag[:k]):
                    end -= k
                    break
        out = self.seen[self.sent:max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out

    def rest(self, content: str | None) -> str:
        """At the end: the part of the final content not sent yet."""
        return (content or "")[self.sent:] if content is not None and content.startswith(self.seen[:self.sent]) else ""


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON object or array starting at `start` (after whitespace) ends, or None while it is open."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            esc, in_str = (False, in_str) if esc else (c == "\\", c != '"')
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        elif depth == 0 and not c.isspace():
            return None  # not an object: sent whole at the end
    return None


class ChoiceStream:
    def __init__(self, plan: tools.ToolPlan) -> None:
        self.plan, self.content = plan, ContentFilter(plan)
        self.text, self.call_id, self.args_at, self.sent, self.closed = "", f"call_{uuid.uuid4().hex[:24]}", -1, 0, False

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """The deltas `piece` of the answer makes."""
        text = self.content.feed(piece)
        if self.plan.mode != "forced":
            return [{"content": text}] if text else []
        self.text += piece
        out: list[dict[str, Any]] = []
        if self.args_at < 0:
            m = _HEAD.match(self.text, len(tools.OPEN)) if self.text.startswith(tools.OPEN) else None
            if m is None:
                return out
            self.args_at = self.sent = m.end()
            out.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                        "function": {"name": json.loads(f'"{m.group(1)}"'), "arguments": ""}}]})
        if not self.closed:
            end = _value_end(self.text, self.args_at)
            upto = len(self.text) if end is None else end
            if upto > self.sent:
                out.append({"tool_calls": [{"index": 0, "function": {"arguments": self.text[self.sent:upto]}}]})
                self.sent = upto
            self.closed = end is not None
        return out

    def finish(self, message: dict[str, Any], reason: str) -> list[dict[str, Any]]:
        """The deltas still owed once the answer is `message` (what tools.parse made of it)."""
        calls = message.get("tool_calls") or []
        if self.args_at >= 0:  # a forced call already streamed: its arguments are what was sent
            return []
        out: list[dict[str, Any]] = []
        for k, call in enumerate(calls):
            out.append({"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                        "function": {"name": call["function"]["name"], "arguments": ""}}]})
            out.append({"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]})
        if not calls and (rest := self.content.rest(message["content"])):
            out.append({"content": rest})
        return out
