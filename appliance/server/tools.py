"""Tool calling: tools into the prompt, calls out of the answer, in one fixed format for every model.

The chat template renders the conversation; the tools, and the assistant's earlier calls, are
written into it as text the template needs no support for:

- the tools go into the system message (appended to the client's, or a system message of their
  own): `TOOLS_INTRO`, then one JSON line per function (`name`, `description`, `parameters`);
- a call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in the assistant's text,
  and an earlier assistant message's `tool_calls` are rendered back in that form;
- a `tool` message keeps its role, its content being the function's result.

`tool_choice` `required` or a named function constrains decoding to exactly one such call whose
arguments match the function's `parameters` schema (and its `name`); `auto` lets the model choose,
and calls are parsed from what it wrote; `none` (or no tools) leaves tools out of the prompt.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from appliance.engines.constraints import Constraint
from appliance.server import protocol as P

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
TOOLS_INTRO = ("You can call functions. To call one, answer with exactly\n"
               "<tool_call>\n{\"name\": <function name>, \"arguments\": <the arguments as a JSON object>}\n</tool_call>\n"
               "A function's result comes back in a message with role tool. The functions:")


@dataclass
class ToolPlan:
    messages: list[dict[str, Any]]  # what the chat template renders
    mode: str = "none"  # none | auto | forced
    names: set[str] = field(default_factory=set)
    constraint: Constraint | None = None
    parallel: bool = True


def plan(req: P.ChatCompletionRequest) -> ToolPlan:
    choice = req.tool_choice or ("auto" if req.tools else "none")
    tools = [t.function for t in req.tools or []] if choice != "none" else []
    messages = [_message(m) for m in req.messages]
    if not tools:
        return ToolPlan(messages)
    listing = "\n".join(json.dumps({"name": f.name, "description": f.description or "",
                                    "parameters": f.parameters or {"type": "object"}}, ensure_ascii=False) for f in tools)
    system = f"{TOOLS_INTRO}\n{listing}"
    if messages[0]["role"] in ("system", "developer"):
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{system}"}
    else:
        messages.insert(0, {"role": "system", "content": system})
    names = {f.name for f in tools}
    if choice == "auto":
        return ToolPlan(messages, "auto", names, parallel=req.parallel_tool_calls is not False)
    if isinstance(choice, P.NamedToolChoice):
        tools = [f for f in tools if f.name == choice.function.name]
        if not tools:
            raise ValueError(f"tool_choice names the function {choice.function.name!r}, which tools does not list.")
    calls = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for f in tools]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return ToolPlan(messages, "forced", names, Constraint.of(schema, OPEN, CLOSE, "tools"), parallel=False)


def _message(m: P.ChatMessage) -> dict[str, Any]:
    text = m.text()
    if m.tool_calls:
        text += "".join(OPEN + json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)},
                                          ensure_ascii=False) + CLOSE for c in m.tool_calls)
    return {"role": m.role, "content": text}


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse(text: str, p: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of an answer: calls in the fixed format naming a listed function."""
    if p.mode == "none":
        return text, []
    calls: list[dict[str, Any]] = []
    first, at = None, 0
    decoder = json.JSONDecoder()
    while (start := text.find(OPEN.strip(), at)) >= 0:
        body = text[start + len(OPEN.strip()):].lstrip()
        try:
            call, used = decoder.raw_decode(body)
        except ValueError:
            break
        at = len(text) - len(body) + used
        if not (isinstance(call, dict) and call.get("name") in p.names and isinstance(call.get("arguments"), dict)):
            break
        first = start if first is None else first
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}})
        rest = text[at:].lstrip()
        if rest.startswith(CLOSE.strip()):
            at = len(text) - len(rest) + len(CLOSE.strip())
        if not p.parallel:
            break
    if not calls:
        return text, []
    content = text[:first].strip()
    return content or None, calls
