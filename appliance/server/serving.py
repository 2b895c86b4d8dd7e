"""The serving layer: turns API requests into engine submissions and engine events into responses.

This module submits and collects (one request may be `n` sequences, decoded in the same batches);
appliance/server/answers.py shapes what chat and completions send back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi import Request

from appliance.engines.chat_template import ChatTemplateError
from appliance.engines.constraints import Constraint, ConstraintError
from appliance.engines.scheduler import Delta, Engine, Finished, QueueFull, SamplingParams, Sequence
from appliance.errors import EngineError
from appliance.feedback_store import FeedbackRefused
from appliance.server import answers
from appliance.server import protocol as P
from appliance.server.api_errors import ApiError
from appliance.server.limits import Lease
from appliance.server.metrics import Metrics

log = logging.getLogger("appliance.server")


@dataclass
class Job:
    """One submitted request: its id, its engine sequences (`n` of them) and the queue where each
    one's events arrive as (index, event)."""

    id: str
    seqs: list[Sequence]
    events: asyncio.Queue[tuple[int, Delta | Finished]]
    started: float
    prompt_tokens: int
    model: str
    answered: bool = False
    finished: dict[int, Finished] = field(default_factory=dict)

    def cancel(self) -> None:
        for s in self.seqs:
            s.cancel()


class _Target(Protocol):
    def put_nowait(self, ev: Delta | Finished) -> None: ...


@dataclass(frozen=True)
class _Tagged:
    """A job's queue as one sequence's events go into it: tagged with the sequence's index."""

    queue: asyncio.Queue[tuple[int, Delta | Finished]]
    index: int

    def put_nowait(self, ev: Delta | Finished) -> None:
        self.queue.put_nowait((self.index, ev))


class _Relay:
    """Engine events onto the event loop with one wake-up per burst, not one per token.

    The engine thread calls `put` for every event of every sequence; the loop is woken only when
    nothing is pending yet, so a decode step that advances eight sequences costs one wake-up, and
    the loop thread takes the GIL and a core from the decode thread as seldom as possible.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[_Target, Delta | Finished]] = []

    def put(self, queue: _Target, ev: Delta | Finished) -> None:
        with self._lock:
            self._pending.append((queue, ev))
            if len(self._pending) > 1:
                return
        self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, ev in items:
            queue.put_nowait(ev)


class Serving:
    def __init__(self, engine: Engine, model_id: str, metrics: Metrics, store: Any) -> None:
        self.engine, self.model_id, self.metrics, self.store = engine, model_id, metrics, store
        self._relay: _Relay | None = None
        self._pieces: dict[int, str] = {}

    # --- shared ---------------------------------------------------------------------------------
    async def _prompt_tokens(self, render: Any) -> list[int]:
        def work() -> list[int]:
            return self.engine.tokenize(render() if callable(render) else render)

        try:
            return await anyio.to_thread.run_sync(work)
        except ChatTemplateError as e:
            raise ApiError(400, e.message, param="messages") from None

    def _choose(self, requested: str | None) -> tuple[bool, str]:
        """(use the adapter?, model name to answer with) for the request's `model`.

        The base id asks for the base model even while an adapter is active; `<base>:<adapter>` for
        that adapter (404 if it is not the active one); anything else gets the default, the active
        adapter, so clients with a hard-coded model name keep working.
        """
        active = self.engine.adapter_id
        default = f"{self.model_id}:{active}" if active else self.model_id
        if requested == self.model_id:
            return False, self.model_id
        if requested and requested.startswith(self.model_id + ":"):
            if requested != default:
                raise ApiError(404, f"The model {requested!r} is not served; GET /v1/models lists what is.",
                               param="model", code="model_not_found")
            return True, default
        return True, default

    async def compile(self, c: Constraint | None) -> Any:
        """The engine's grammar for `c` (None for none); a 400 naming the field when it cannot be made."""
        if c is None:
            return None
        compile_ = getattr(self.engine.backend, "compile_constraint", None)
        if compile_ is None:
            raise ApiError(400, f"The {self.engine.backend_name} engine cannot constrain its output; leave out {c.param}.",
                           param=c.param, code="unsupported_parameter")
        try:
            return await anyio.to_thread.run_sync(compile_, c)
        except ConstraintError as e:
            raise ApiError(400, e.message, param=e.param, code="invalid_schema") from None

    def _params(self, tokens: list[int], req: P._Sampling, max_tokens: int | None, grammar: Any) -> tuple[SamplingParams, str]:
        use_adapter, model_name = self._choose(req.model)
        ctx = self.engine.context_length
        if len(tokens) >= ctx:
            raise ApiError(400, f"The prompt has {len(tokens)} tokens but the model's context holds {ctx} tokens; "
                                "shorten the prompt.", param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > ctx:
            raise ApiError(400, f"max_tokens is {max_tokens} but the model's context holds {ctx} tokens.",
                           param="max_tokens", code="context_length_exceeded")
        budget = ctx - len(tokens) if max_tokens is None else min(max_tokens, ctx - len(tokens))
        n_vocab = getattr(self.engine.backend, "n_vocab", None)
        bias = tuple((int(t), b) for t, b in (req.logit_bias or {}).items())
        if n_vocab is not None and any(t >= n_vocab for t, _ in bias):
            raise ApiError(400, f"logit_bias names a token id the model does not have (it has {n_vocab} tokens).", param="logit_bias")
        params = SamplingParams(max_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stops(),
                                use_adapter=use_adapter, ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                                frequency_penalty=req.frequency_penalty, logit_bias=bias, logprobs=req.top_count(), grammar=grammar)
        return params, model_name

    def _submit(self, prefix: str, tokens: list[int], req: P._Sampling, max_tokens: int | None, lease: Lease | None = None,
                grammar: Any = None) -> Job:
        """Submit `req.n` sequences of the prompt (seeds seed, seed+1, ... when seeded) as one job."""
        params, model_name = self._params(tokens, req, max_tokens, grammar)
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = _Relay(loop)
        events: asyncio.Queue[tuple[int, Delta | Finished]] = asyncio.Queue()
        left = [req.n]
        seqs: list[Sequence] = []
        try:
            for i in range(req.n):
                p = params if params.seed is None or i == 0 else dataclasses.replace(params, seed=params.seed + i)
                seqs.append(self.engine.submit(tokens, p, self._sink(_Tagged(events, i), req.stream, lease, left)))
        except (QueueFull, EngineError) as e:
            for s in seqs:
                s.cancel()
            if isinstance(e, QueueFull):
                self.metrics.overloaded.labels(e.code).inc()
                if e.retry_after is not None:  # from the engine's measured drain rate
                    raise ApiError(429, e.message, type_="rate_limit_error", code=e.code,
                                   headers={"Retry-After": str(e.retry_after)}) from None
                wait = 1 + self.engine.waiting // max(1, self.engine.max_batch)  # nothing measured yet: a guess
                raise ApiError(429, f"The server is busy: {self.engine.waiting} requests are waiting; retry in {wait} s.",
                               type_="rate_limit_error", code=e.code, headers={"Retry-After": str(wait)}) from None
            raise ApiError(503, e.message, type_="server_error", code="engine_unavailable") from None
        self.metrics.tokens_in.inc(len(tokens))
        if lease is not None:
            lease.handed_over = True
            lease.charge(len(tokens))
        return Job(f"{prefix}-{uuid.uuid4().hex}", seqs, events, time.monotonic(), len(tokens), model_name)

    def _sink(self, target: _Tagged, stream: bool, lease: Lease | None, left: list[int]) -> Any:
        relay = self._relay
        assert relay is not None
        # A whole answer needs only its first text (time to first token) and the end; a stream needs every piece.
        text_sent = [False]

        def sink(ev: Delta | Finished) -> None:
            if isinstance(ev, Delta) and not stream:
                if text_sent[0]:
                    return
                text_sent[0] = True
            if isinstance(ev, Finished) and lease is not None:  # every sequence ends with one, cancelled ones too
                lease.charge(ev.completion_tokens)
                left[0] -= 1
                if left[0] == 0:
                    lease.release()
            relay.put(target, ev)

        return sink

    def _observe(self, job: Job, ev: Delta | Finished) -> None:
        if isinstance(ev, Delta) and not job.answered:
            self.metrics.ttft.observe(time.monotonic() - job.started)
            job.answered = True
        elif isinstance(ev, Finished):
            self.metrics.tokens_out.inc(ev.completion_tokens)

    async def events(self, job: Job) -> AsyncIterator[tuple[int, Delta | Finished]]:
        """(index, event) of every sequence of `job` until each has finished."""
        try:
            while len(job.finished) < len(job.seqs):
                i, ev = await job.events.get()
                self._observe(job, ev)
                if isinstance(ev, Finished):
                    job.finished[i] = ev
                yield i, ev
        finally:
            job.cancel()  # no-op when it finished; frees the slots when the client went away

    async def collect(self, job: Job, request: Request) -> list[Finished]:
        """Wait for the whole answer; a client that hangs up cancels its sequences within about 0.5 s."""
        next_check = time.monotonic() + 0.5
        try:
            while len(job.finished) < len(job.seqs):
                try:
                    item: tuple[int, Delta | Finished] | None = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    item = None
                # Deltas arrive many times a second, so look at the clock, not only at timeouts.
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        job.cancel()
                if item is None:
                    continue
                self._observe(job, item[1])
                if isinstance(item[1], Finished):
                    job.finished[item[0]] = self._check(item[1])
            return [job.finished[i] for i in range(len(job.seqs))]
        finally:
            job.cancel()

    @staticmethod
    def _check(fin: Finished) -> Finished:
        if fin.reason == "error":
            raise ApiError(500, f"The engine failed on this request: {fin.error}", type_="server_error", code="engine_error")
        return fin

    def answered_by(self, fin: Finished) -> str:
        return f"{self.model_id}:{fin.adapter}" if fin.adapter else self.model_id

    @staticmethod
    def usage(fins: list[Finished]) -> dict[str, int]:
        done = sum(f.completion_tokens for f in fins)
        return {"prompt_tokens": fins[0].prompt_tokens, "completion_tokens": done, "total_tokens": fins[0].prompt_tokens + done}

    async def record(self, job_id: str, messages: list[dict[str, Any]], fin: Finished, key_id: str | None) -> None:
        if self.store is None or fin.reason not in ("stop", "length"):
            return
        try:
            await anyio.to_thread.run_sync(self.store.record_exchange, job_id, messages, fin.text, self.model_id, fin.adapter, key_id)
        except Exception:  # the answer was given; losing its feedback record is logged, not fatal
            log.exception("could not record exchange %s", job_id)

    @staticmethod
    def note(request: Request, fins: list[Finished]) -> None:
        request.state.tokens = (fins[0].prompt_tokens, sum(f.completion_tokens for f in fins))

    def piece(self, token: int) -> str:
        """One token's text, for log-probabilities."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.engine.backend.detokenize([token])
        return text

    # --- endpoints ------------------------------------------------------------------------------
    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Any:
        return await answers.chat(self, req, request)

    async def completion(self, req: P.CompletionRequest, request: Request) -> Any:
        return await answers.completion(self, req, request)

    async def generate(self, req: P.GenerateRequest, request: Request) -> dict[str, Any]:
        chat = P.ChatCompletionRequest(messages=[P.ChatMessage(role="user", content=req.prompt)], max_tokens=req.max_tokens, temperature=0)
        out = await self.chat(chat, request)
        return {"id": out["id"], "text": out["choices"][0]["message"]["content"],
                "finish_reason": out["choices"][0]["finish_reason"], "usage": out["usage"]}

    async def feedback(self, req: P.FeedbackRequest, key_id: str, hold: bool, cap: int) -> dict[str, Any]:
        """`key_id`'s one rating of its own exchange; a correction is held for an admin when `hold`."""
        if self.store is None:
            raise ApiError(503, "The feedback store is not available.", "server_error")

        def add() -> str:
            return str(self.store.add_feedback(req.request_id, req.rating, req.corrected, key_id=key_id, hold=hold, cap=cap))

        try:
            # Committed (WAL, synchronous=FULL) before this returns, so a 200 survives kill -9.
            status = await anyio.to_thread.run_sync(add)
        except KeyError:
            raise ApiError(404, f"There is no answered chat completion with id {req.request_id!r}.",
                           param="request_id", code="unknown_request_id") from None
        except FeedbackRefused as e:
            headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
            type_ = {403: "permission_error", 429: "rate_limit_error"}.get(e.status, "invalid_request_error")
            raise ApiError(e.status, e.message, type_, param="request_id", code=e.code, headers=headers) from None
        return {"request_id": req.request_id, "stored": True, "status": status}
