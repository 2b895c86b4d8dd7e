"""The serving layer: turns API requests into engine submissions and engine events into responses."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from appliance.engines.chat_template import ChatTemplateError
from appliance.engines.scheduler import Delta, Engine, Finished, QueueFull, SamplingParams, Sequence
from appliance.errors import EngineError
from appliance.feedback_store import FeedbackRefused
from appliance.server import protocol as P
from appliance.server.limits import Lease
from appliance.server.metrics import Metrics

log = logging.getLogger("appliance.server")


class ApiError(Exception):
    """An expected failure, answered in the OpenAI error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One submitted request: its id, the engine sequence and the queue its events arrive on."""

    id: str
    seq: Sequence
    events: asyncio.Queue[Delta | Finished]
    started: float
    prompt_tokens: int
    model: str
    answered: bool = False


class _Relay:
    """Engine events onto the event loop with one wake-up per burst, not one per token.

    The engine thread calls `put` for every event of every sequence; the loop is woken only when
    nothing is pending yet, so a decode step that advances eight sequences costs one wake-up, and
    the loop thread takes the GIL and a core from the decode thread as seldom as possible.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[Delta | Finished], Delta | Finished]] = []

    def put(self, queue: asyncio.Queue[Delta | Finished], ev: Delta | Finished) -> None:
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

    def _submit(self, prefix: str, tokens: list[int], req: P._Sampling, max_tokens: int | None, lease: Lease | None = None) -> Job:
        use_adapter, model_name = self._choose(req.model)
        ctx = self.engine.context_length
        if len(tokens) >= ctx:
            raise ApiError(400, f"The prompt has {len(tokens)} tokens but the model's context holds {ctx} tokens; "
                                "shorten the prompt.", param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > ctx:
            raise ApiError(400, f"max_tokens is {max_tokens} but the model's context holds {ctx} tokens.",
                           param="max_tokens", code="context_length_exceeded")
        budget = ctx - len(tokens) if max_tokens is None else min(max_tokens, ctx - len(tokens))
        params = SamplingParams(max_tokens=budget, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stops(),
                                use_adapter=use_adapter, ignore_eos=req.ignore_eos)
        loop = asyncio.get_running_loop()
        if self._relay is None or self._relay.loop is not loop:
            self._relay = _Relay(loop)
        relay = self._relay
        events: asyncio.Queue[Delta | Finished] = asyncio.Queue()
        # A whole answer needs only its first text (time to first token) and the end; a stream needs every piece.
        text_sent = [False]

        def sink(ev: Delta | Finished) -> None:
            if isinstance(ev, Delta) and not req.stream:
                if text_sent[0]:
                    return
                text_sent[0] = True
            if isinstance(ev, Finished) and lease is not None:  # every sequence ends with one, cancelled ones too
                lease.charge(ev.completion_tokens)
                lease.release()
            relay.put(events, ev)

        try:
            seq = self.engine.submit(tokens, params, sink)
        except QueueFull:
            wait = 1 + self.engine.waiting // max(1, self.engine.max_batch)
            raise ApiError(429, f"The server is busy: {self.engine.waiting} requests are waiting. Retry in {wait} s.",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": str(wait)}) from None
        except EngineError as e:
            raise ApiError(503, e.message, type_="server_error", code="engine_unavailable") from None
        self.metrics.tokens_in.inc(len(tokens))
        if lease is not None:
            lease.handed_over = True
            lease.charge(len(tokens))
        return Job(f"{prefix}-{uuid.uuid4().hex}", seq, events, time.monotonic(), len(tokens), model_name)

    def _observe(self, job: Job, ev: Delta | Finished) -> None:
        if isinstance(ev, Delta) and not job.answered:
            self.metrics.ttft.observe(time.monotonic() - job.started)
            job.answered = True
        elif isinstance(ev, Finished):
            self.metrics.tokens_out.inc(ev.completion_tokens)

    async def _events(self, job: Job) -> AsyncIterator[Delta | Finished]:
        try:
            while True:
                ev = await job.events.get()
                self._observe(job, ev)
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            job.seq.cancel()  # no-op when it finished; frees the slot when the client went away

    async def _collect(self, job: Job, request: Request) -> Finished:
        """Wait for the whole answer; a client that hangs up cancels its sequence within about 0.5 s."""
        next_check = time.monotonic() + 0.5
        try:
            while True:
                try:
                    ev: Delta | Finished | None = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except TimeoutError:
                    ev = None
                # Deltas arrive many times a second, so look at the clock, not only at timeouts.
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + 0.5
                    if await request.is_disconnected():
                        job.seq.cancel()
                if ev is None:
                    continue
                self._observe(job, ev)
                if isinstance(ev, Finished):
                    return self._check(ev)
        finally:
            job.seq.cancel()

    @staticmethod
    def _check(fin: Finished) -> Finished:
        if fin.reason == "error":
            raise ApiError(500, f"The engine failed on this request: {fin.error}", type_="server_error", code="engine_error")
        return fin

    def _answered_by(self, fin: Finished) -> str:
        return f"{self.model_id}:{fin.adapter}" if fin.adapter else self.model_id

    @staticmethod
    def _usage(fin: Finished) -> dict[str, int]:
        return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
                "total_tokens": fin.prompt_tokens + fin.completion_tokens}

    async def _record(self, job_id: str, messages: list[dict[str, Any]], fin: Finished, key_id: str | None) -> None:
        if self.store is None or fin.reason not in ("stop", "length"):
            return
        try:
            await anyio.to_thread.run_sync(self.store.record_exchange, job_id, messages, fin.text, self.model_id, fin.adapter, key_id)
        except Exception:  # the answer was given; losing its feedback record is logged, not fatal
            log.exception("could not record exchange %s", job_id)

    @staticmethod
    def _note(request: Request, fin: Finished) -> None:
        request.state.tokens = (fin.prompt_tokens, fin.completion_tokens)

    # --- endpoints ------------------------------------------------------------------------------
    async def chat(self, req: P.ChatCompletionRequest, request: Request) -> Any:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        tokens = await self._prompt_tokens(lambda: self.engine.render_chat(messages))
        job = self._submit("chatcmpl", tokens, req, req.max_completion_tokens or req.max_tokens, _lease(request))
        request.state.request_id = job.id
        created = int(time.time())
        if not req.stream:
            fin = await self._collect(job, request)
            self._note(request, fin)
            await self._record(job.id, messages, fin, getattr(request.state, "key_id", None))
            return {"id": job.id, "object": "chat.completion", "created": created, "model": self._answered_by(fin),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": fin.text},
                                 "finish_reason": fin.reason, "logprobs": None}],
                    "usage": self._usage(fin), "system_fingerprint": fin.adapter}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None) -> str:
            return _sse({"id": job.id, "object": "chat.completion.chunk", "created": created, "model": job.model,
                         "system_fingerprint": None,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def body() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for ev in self._events(job):
                if isinstance(ev, Delta):
                    yield chunk({"content": ev.text}, None)
                    continue
                self._note(request, ev)
                if ev.reason == "error":
                    yield _sse(ApiError(500, f"The engine failed: {ev.error}", "server_error").body())
                    return
                await self._record(job.id, messages, ev, getattr(request.state, "key_id", None))
                yield chunk({}, ev.reason)
                if include_usage:
                    yield _sse({"id": job.id, "object": "chat.completion.chunk", "created": created,
                                "model": job.model, "choices": [], "usage": self._usage(ev)})
            yield "data: [DONE]\n\n"

        return _stream(body(), job.id)

    async def completion(self, req: P.CompletionRequest, request: Request) -> Any:
        tokens = await self._prompt_tokens(req.text())
        job = self._submit("cmpl", tokens, req, req.max_tokens, _lease(request))
        request.state.request_id = job.id
        created = int(time.time())
        if not req.stream:
            fin = await self._collect(job, request)
            self._note(request, fin)
            return {"id": job.id, "object": "text_completion", "created": created, "model": self._answered_by(fin),
                    "choices": [{"index": 0, "text": fin.text, "finish_reason": fin.reason, "logprobs": None}],
                    "usage": self._usage(fin)}

        def chunk(text: str, finish: str | None) -> str:
            return _sse({"id": job.id, "object": "text_completion", "created": created, "model": job.model,
                         "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]})

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def body() -> AsyncIterator[str]:
            async for ev in self._events(job):
                if isinstance(ev, Delta):
                    yield chunk(ev.text, None)
                    continue
                self._note(request, ev)
                if ev.reason == "error":
                    yield _sse(ApiError(500, f"The engine failed: {ev.error}", "server_error").body())
                    return
                yield chunk("", ev.reason)
                if include_usage:
                    yield _sse({"id": job.id, "object": "text_completion", "created": created, "model": job.model,
                                "choices": [], "usage": self._usage(ev)})
            yield "data: [DONE]\n\n"

        return _stream(body(), job.id)

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


def _lease(request: Request) -> Lease | None:
    """The rate-limit lease the route took for this request (none for requests that skip the limits)."""
    return getattr(request.state, "lease", None)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(body: AsyncIterator[str], request_id: str) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id})
