"""Constrained decoding: what a request's output must match, compiled for each engine.

A `Constraint` is a JSON schema the output's JSON must satisfy, optionally between two fixed
texts (a forced tool call's `<tool_call>` tags). llama.cpp gets a GBNF grammar (llama-cpp-python's
JSON-schema converter, run by llama.cpp's grammar sampler); transformers gets an llguidance grammar
(its JSON-schema compiler, applied as a token mask). JSON is written compactly with single spaces
after `,` and `:`, so a small model cannot wander off into endless whitespace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from appliance.errors import EngineError

# llguidance's JSON options: the separators llama-cpp-python's converter also writes.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(EngineError):
    """The schema cannot be compiled into a grammar: the request's fault."""

    http_status = 400
    openai_type = "invalid_request_error"
    default_hint = "Simplify the JSON schema (see docs/operations.md for what structured output supports)."

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    schema: str  # the JSON schema, as JSON text
    prefix: str = ""  # literal text before the JSON
    suffix: str = ""  # literal text after it
    param: str = "response_format"  # the request field an error names

    @staticmethod
    def of(schema: dict[str, Any], prefix: str = "", suffix: str = "", param: str = "response_format") -> Constraint:
        return Constraint(json.dumps(schema, sort_keys=False), prefix, suffix, param)


def _refuse(c: Constraint, why: object) -> ConstraintError:
    text = str(why).strip().rstrip(".") or "it is not a valid JSON schema"
    return ConstraintError(f"The JSON schema in {c.param} cannot be compiled into a grammar: {text}.", c.param)


def gbnf(c: Constraint) -> tuple[str, str]:
    """(GBNF grammar, root rule name) for llama.cpp's grammar sampler."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(c.schema, prop_order=["name", "arguments"])
    except Exception as e:  # the converter raises assertions, KeyErrors, ValueErrors, RecursionErrors...
        raise _refuse(c, f"{type(e).__name__}: {e}" if not str(e) else e) from None
    if not (c.prefix or c.suffix):
        return grammar, "root"
    # The JSON keeps `root` (a schema's "$ref": "#" points at it); the whole output is another rule.
    wrap = f"constrained-output ::= {json.dumps(c.prefix)} root {json.dumps(c.suffix)}\n"
    return grammar + "\n" + wrap, "constrained-output"


def lark(c: Constraint) -> str:
    """An llguidance grammar (its Lark dialect with an embedded JSON schema)."""
    import llguidance

    try:
        schema = json.loads(c.schema)
    except ValueError as e:
        raise _refuse(c, e) from None
    if not isinstance(schema, dict):
        raise _refuse(c, "the schema must be a JSON object")
    if not (c.prefix or c.suffix):
        try:
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_STYLE))  # type: ignore[arg-type]
        except ValueError as e:
            raise _refuse(c, e) from None
    styled = {**schema, "x-guidance": {**_JSON_STYLE, **schema.get("x-guidance", {})}}
    return str(llguidance.LLMatcher.grammar_from_lark(
        f"start: {json.dumps(c.prefix)} body {json.dumps(c.suffix)}\nbody: %json {json.dumps(styled)}\n"))


def check_matcher(matcher: Any, c: Constraint) -> Any:
    """An llguidance matcher, or a ConstraintError naming what its compiler refused."""
    if matcher.is_error():
        raise _refuse(c, matcher.get_error())
    return matcher
