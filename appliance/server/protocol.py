"""Wire models: what the OpenAI-compatible API accepts and returns.

Nothing a client asks for is silently ignored: a field this server does not honour is a 400 that
names it (`unsupported_parameter`), whether it is unknown or an OpenAI field we do not implement
(the deprecated `functions`; tools on /v1/completions); the latter pass only at the value that
changes nothing (`functions: []`, `tools: []`, ...), which some clients send with every request.
Known fields are checked strictly, so bad input is a 4xx in the OpenAI error shape, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

# Larger than any context, small enough to be a plain int everywhere: values above it are typos.
MAX_TOKENS_BOUND = 1 << 30
Role = Literal["system", "user", "assistant", "developer", "tool"]


def _json_int(v: object) -> object:
    """JSON integers only: 1.0 is one (JSON Schema says so), `true` and "1" are not."""
    if isinstance(v, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if not isinstance(v, int):
        raise ValueError("must be an integer")
    return v


JsonInt = BeforeValidator(_json_int)


# OpenAI request fields this server does not implement, and the values at which they change nothing.
UNHONOURED: dict[str, tuple[Any, ...]] = {"functions": ([],), "function_call": ("none",)}
# ... and on /v1/completions also these, which only chat takes.
UNHONOURED_COMPLETIONS: dict[str, tuple[Any, ...]] = {
    **UNHONOURED, "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},), "top_logprobs": (0,),
}
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _same(value: Any, neutral: Any) -> bool:
    """`value` is the neutral value: `false` is not 0, and 0.0 is 0."""
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(neutral, int):
        return isinstance(value, int | float) and value == neutral
    return bool(value == neutral)


class _Request(BaseModel):
    # strict: "1" is not a number nor 1 a boolean (schemathesis found both); integers take JsonInt.
    # forbid: a field we do not know is refused by name, never ignored.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=1 << 20)]


class CalledFunction(_Request):
    name: Name
    arguments: Annotated[str, Field(max_length=1 << 20)] = Field(description="the arguments, as JSON text")


class ToolCall(_Request):
    id: Annotated[str, Field(min_length=1, max_length=128)]
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(_Request):
    role: Role
    tool_calls: Annotated[list[ToolCall], Field(max_length=64)] | None = Field(default=None, description="assistant messages only")
    tool_call_id: Annotated[str, Field(min_length=1, max_length=128)] | None = Field(default=None, description="tool messages: the call answered")
    content: Annotated[str, Field(max_length=1 << 20)] | Annotated[list[TextPart], Field(max_length=256)] | None = Field(
        default=None, description="required, except in an assistant message with tool_calls")

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) when the fields do not go together (a 400: the schema cannot say it)."""
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            return "content", "content is required (null only in an assistant message with tool_calls)"
        if self.tool_calls is not None and self.role != "assistant":
            return "tool_calls", "only assistant messages carry tool_calls"
        if (self.tool_call_id is not None) != (self.role == "tool"):
            return "tool_call_id", "a tool message needs tool_call_id, and only a tool message takes it"
        return None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDef(_Request):
    name: Name
    description: Annotated[str, Field(max_length=1 << 16)] | None = None
    parameters: dict[str, Any] | None = Field(default=None, description="a JSON schema of the arguments")
    strict: bool | None = Field(default=None, description="arguments of forced calls always match the schema")


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: Name


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Request):
    name: Name
    description: Annotated[str, Field(max_length=1 << 16)] | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(default=None, description="required with type json_schema, and only there")


class StreamOptions(_Request):
    include_usage: bool = False


Stop = Annotated[str, Field(min_length=1, max_length=256)] | Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=4)] | None


class _Sampling(_Request):
    UNHONOURED: ClassVar[dict[str, tuple[Any, ...]]] = UNHONOURED
    model: Annotated[str, Field(max_length=256)] | None = None
    n: Annotated[int, Field(ge=1, le=8), JsonInt] = Field(default=1, description="answers to the same prompt, decoded in one batch")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[Annotated[str, Field(max_length=16)], Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=1024)] | None = Field(default=None, description="token id (digits) -> added to its logit")
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND), JsonInt] | None = Field(default=None, description="answer tokens at most")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    # +-2**53: every integer in range survives a trip through a JSON float unchanged.
    seed: Annotated[int, Field(ge=-(1 << 53), le=1 << 53), JsonInt] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # vLLM's extension (the openai client sends it with extra_body): generate max_tokens whatever the model says
    ignore_eos: bool = Field(default=False, description="go on past end-of-sequence until max_tokens")

    @model_validator(mode="before")
    @classmethod
    def _unhonoured(cls, data: Any) -> Any:
        """Take out the fields in UNHONOURED at their neutral value (or null); refuse any other value."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, neutral in cls.UNHONOURED.items():
            if name in data:
                value = data.pop(name)
                if value is not None and not any(_same(value, v) for v in neutral):
                    raise PydanticCustomError("unsupported_parameter", "{field} is not supported by this server",
                                              {"field": name})
        return data

    def stops(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def top_count(self) -> int | None:
        """None: no log-probabilities; k: each token's and its k likeliest alternatives."""
        raise NotImplementedError

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) when values do not go together or mean nothing (a 400: the schema cannot say it)."""
        if any(not (k.isascii() and k.isdigit()) for k in self.logit_bias or {}):
            return "logit_bias", "logit_bias keys are token ids, written in decimal digits"
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND), JsonInt] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20), JsonInt] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def problem(self) -> tuple[str, str] | None:
        """(field, what is wrong) when the fields do not go together (a 400: the schema cannot say it)."""
        if p := super().problem():
            return p
        for i, m in enumerate(self.messages):
            if p := m.problem():
                return f"messages.{i}.{p[0]}", p[1]
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if (isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required") and not self.tools:
            return "tool_choice", "tool_choice asks for a tool call but tools is empty"
        rf = self.response_format
        if rf is not None and (rf.type == "json_schema") != (rf.json_schema is not None):
            return "response_format.json_schema", "json_schema is required with type json_schema, and only there"
        if self.ignore_eos and ((rf is not None and rf.type != "text") or self.tool_choice not in (None, "none", "auto")):
            return "ignore_eos", "ignore_eos cannot go past the end of a response_format or a forced tool call"
        return None

    def top_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: Annotated[str, Field(min_length=1, max_length=1 << 20)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=1 << 20)]], Field(min_length=1, max_length=1)]
    UNHONOURED: ClassVar[dict[str, tuple[Any, ...]]] = UNHONOURED_COMPLETIONS
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_BOUND), JsonInt] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=5), JsonInt] | None = Field(default=None, description="k: each token's log-probability and its k likeliest alternatives")

    def top_count(self) -> int | None:
        return self.logprobs

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class GenerateRequest(_Request):
    """The seed's `POST /generate`, kept as a thin alias of a one-message chat."""

    prompt: str = Field(min_length=1, max_length=1 << 20)
    max_tokens: Annotated[int, JsonInt] = Field(default=128, ge=1, le=MAX_TOKENS_BOUND)


class FeedbackRequest(_Request):
    request_id: str = Field(min_length=1, max_length=128, description="the `id` of a chat completion")
    rating: Annotated[Literal[1, -1], JsonInt] = Field(description="+1 good, -1 bad")
    corrected: Annotated[str, Field(max_length=1 << 20)] | None = Field(default=None, description="the answer it should have given")


# --- responses ----------------------------------------------------------------------------------
class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ContentLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _Choice(BaseModel):
    index: int
    finish_reason: str


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class _Answer(BaseModel):
    """What a chat completion and a text completion both carry."""

    id: str
    created: int
    model: str
    usage: Usage


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    system_fingerprint: str | None = None


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackAck(BaseModel):
    request_id: str
    stored: bool
    status: Literal["accepted", "held"] = Field(description="held: a correction waits for an admin before the trainer uses it")


class FeedbackItem(BaseModel):
    """One rating as an admin reviews it: `id` is what `appliance feedback accept ID` takes."""

    id: int
    request_id: str
    key_id: str | None
    rating: int
    status: Literal["accepted", "held", "rejected"]
    question: str = Field(description="the exchange's last user message")
    answer: str
    corrected: str | None


class GenerateResponse(BaseModel):
    id: str
    text: str
    finish_reason: str
    usage: Usage


class AdapterState(BaseModel):
    adapter: str | None
    error: str | None = None


class KeyInfo(BaseModel):
    id: str
    role: str
    created_at: str
    revoked_at: str | None


class Health(BaseModel):
    status: str
    model: str | None = None
    adapter: str | None = None
    adapter_error: str | None = None  # why the adapter adapters/active names is not the one in use
