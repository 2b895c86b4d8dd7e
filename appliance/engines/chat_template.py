"""Chat templates rendered in jinja2's ImmutableSandboxedEnvironment.

A template comes from the model file (GGUF metadata or tokenizer_config.json), so it is data from
the bundle, not code we trust: CVE-2024-34359 was llama-cpp-python rendering one unsandboxed.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from appliance.errors import EngineError

# ChatML: what SmolLM2 and many others use; the fallback when a model carries no template.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(EngineError):
    http_status = 400  # the messages cannot be rendered: the request's fault
    openai_type = "invalid_request_error"
    default_hint = "The model's chat template could not render these messages; check the roles and contents."


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self._error = TemplateError
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(f"The chat template refused the messages: {message}")

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source or CHATML)
        except TemplateError as e:
            raise EngineError(f"The model's chat template does not parse: {e}.") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except self._error as e:  # includes SecurityError from the sandbox
            raise ChatTemplateError(f"The chat template failed: {e}.") from None


def shared_prefix(tokenize: Callable[[str], list[int]], render: Callable[[list[dict[str, Any]]], str]) -> list[int]:
    """The tokens every rendered chat starts with (the template's system preamble), or [] when that
    is under 4 tokens: engines compute its cache once and copy it into each new sequence."""
    a, b = (tokenize(render([{"role": "user", "content": c}])) for c in ("A", "B"))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n] if n >= 4 else []
