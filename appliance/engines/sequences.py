"""A request inside the engine: its sampling parameters, its state while it runs, and the events it sends back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    use_adapter: bool = True  # False: the base model, even while an adapter is active
    ignore_eos: bool = False  # go on past end-of-sequence until max_tokens (load tests, benchmarks)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # times the number of times it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, added to its logit)
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k likeliest alternatives
    grammar: Any = None  # the backend's compiled constraint (compile_constraint): the output must match it

    @property
    def plain(self) -> bool:
        """Nothing but temperature and top_p shapes the choice of token."""
        return not (self.presence_penalty or self.frequency_penalty or self.logit_bias or self.grammar is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the likeliest tokens at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """New answer text for one sequence (and its tokens' log-probabilities when asked for)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled | error
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None
    text: str
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


Event = Delta | Finished
Sink = Callable[[Event], None]


@dataclass(eq=False)
class Sequence:
    """One request inside the engine; `slot` is its KV-cache sequence id while it is live."""

    prompt: list[int]
    params: SamplingParams
    sink: Sink
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already sent
    adapter: str | None = None
    cancelled: bool = False
    state: Any = None  # per-backend (e.g. a llama.cpp sampler chain)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # filled by the backend when params.logprobs is set
    lp_sent: int = 0  # entries of `logprobs` already sent
    prefilled: int = 0  # prompt tokens already in its KV cache (reused from a cached prefix, or computed)
    chunk: int = 0  # prompt tokens the backend may compute for it in this step (chunked prefill)
    follows: tuple[Sequence, int] | None = None  # (a sequence prefilling the same first n tokens, n): wait, then copy them

    def cancel(self) -> None:
        """Ask the engine to drop this sequence at the next step (safe from any thread)."""
        self.cancelled = True
