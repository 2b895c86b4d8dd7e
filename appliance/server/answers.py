"""What chat and completions send back: choices (one per sequence of `n`), tool calls, log-probabilities,
whole or streamed (server-sent events shaped like OpenAI's)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from appliance.engines.constraints import Constraint
from appliance.engines.scheduler import Delta, Finished, TokenLogprob
from appliance.server import protocol as P
from appliance.server import tools
from appliance.server.api_errors import ApiError
from appliance.server.limits import Lease
from appliance.server.tool_stream import ChoiceStream


def format_constraint(rf: P.ResponseFormat | None) -> Constraint | None:
    """What `response_format` asks the output to match (None: free text)."""
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object" or rf.json_schema is None or rf.json_schema.schema_ is None:
        return Constraint.of({"type": "object"})
    return Constraint.of(rf.json_schema.schema_, param="response_format.json_schema.schema")


def chat_logprobs(sv: Any, entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    def one(token: int, lp: float) -> dict[str, Any]:
        text = sv.piece(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]}


def completion_logprobs(sv: Any, entries: tuple[TokenLogprob, ...], offset: int = 0) -> dict[str, Any]:
    tokens = [sv.piece(e.token) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{sv.piece(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def _message(fin: Finished, plan: tools.ToolPlan) -> tuple[dict[str, Any], str]:
    """(assistant message, finish_reason) of one finished sequence."""
    content, calls = tools.parse(fin.text, plan)
    if calls:
        return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": content}, fin.reason


async def chat(sv: Any, req: P.ChatCompletionRequest, request: Request) -> Any:
    if problem := req.problem():
        raise ApiError(400, f"{problem[1][0].upper()}{problem[1][1:]}; nothing was generated.", param=problem[0])
    try:
        plan = tools.plan(req)
    except ValueError as e:
        raise ApiError(400, str(e), param="tool_choice") from None
    grammar = await sv.compile(plan.constraint or format_constraint(req.response_format))
    plain = [{"role": m.role, "content": m.text()} for m in req.messages]
    tokens = await sv._prompt_tokens(lambda: sv.engine.render_chat(plan.messages))
    job = sv._submit("chatcmpl", tokens, req, req.max_completion_tokens or req.max_tokens, _lease(request), grammar)
    request.state.request_id = job.id
    created = int(time.time())
    want_lp = req.top_count() is not None
    if not req.stream:
        fins = await sv.collect(job, request)
        sv.note(request, fins)
        await sv.record(job.id, plain, fins[0], getattr(request.state, "key_id", None))
        choices = []
        for i, fin in enumerate(fins):
            message, finish = _message(fin, plan)
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(sv, fin.logprobs) if want_lp else None})
        return {"id": job.id, "object": "chat.completion", "created": created, "model": sv.answered_by(fins[0]),
                "choices": choices, "usage": sv.usage(fins), "system_fingerprint": fins[0].adapter}
    return _stream(_chat_stream(sv, req, request, job, plan, plain, created), job.id)


async def _chat_stream(sv: Any, req: P.ChatCompletionRequest, request: Request, job: Any, plan: tools.ToolPlan,
                       plain: list[dict[str, Any]], created: int) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    want_lp = req.top_count() is not None

    def chunk(i: int, delta: dict[str, Any], finish: str | None, lp: Any = None) -> str:
        return _sse({"id": job.id, "object": "chat.completion.chunk", "created": created, "model": job.model,
                     "system_fingerprint": None, "choices": [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": lp}]})

    streams = [ChoiceStream(plan) for _ in job.seqs]
    for i in range(len(job.seqs)):
        yield chunk(i, {"role": "assistant", "content": ""}, None)
    async for i, ev in sv.events(job):
        if isinstance(ev, Delta):
            deltas, lp = streams[i].feed(ev.text), chat_logprobs(sv, ev.logprobs) if want_lp and ev.logprobs else None
            for k, delta in enumerate(deltas or ([{"content": ""}] if lp else [])):
                yield chunk(i, delta, None, lp if k == 0 else None)
            continue
        if ev.reason == "error":
            yield _sse(ApiError(500, f"The engine failed: {ev.error}", "server_error").body())
            return
        if i == 0:
            await sv.record(job.id, plain, ev, getattr(request.state, "key_id", None))
        message, finish = _message(ev, plan)
        for delta in streams[i].finish(message, finish):
            yield chunk(i, delta, None)
        yield chunk(i, {}, finish)
    fins = [job.finished[i] for i in range(len(job.seqs))]
    sv.note(request, fins)
    if include_usage:
        yield _sse({"id": job.id, "object": "chat.completion.chunk", "created": created, "model": job.model,
                    "choices": [], "usage": sv.usage(fins)})
    yield "data: [DONE]\n\n"


async def completion(sv: Any, req: P.CompletionRequest, request: Request) -> Any:
    if problem := req.problem():
        raise ApiError(400, f"{problem[1][0].upper()}{problem[1][1:]}; nothing was generated.", param=problem[0])
    tokens = await sv._prompt_tokens(req.text())
    job = sv._submit("cmpl", tokens, req, req.max_tokens, _lease(request))
    request.state.request_id = job.id
    created = int(time.time())
    want_lp = req.top_count() is not None
    if not req.stream:
        fins = await sv.collect(job, request)
        sv.note(request, fins)
        return {"id": job.id, "object": "text_completion", "created": created, "model": sv.answered_by(fins[0]),
                "choices": [{"index": i, "text": f.text, "finish_reason": f.reason,
                             "logprobs": completion_logprobs(sv, f.logprobs) if want_lp else None} for i, f in enumerate(fins)],
                "usage": sv.usage(fins)}
    return _stream(_completion_stream(sv, req, request, job, created), job.id)


async def _completion_stream(sv: Any, req: P.CompletionRequest, request: Request, job: Any, created: int) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    want_lp = req.top_count() is not None
    offsets = [0] * len(job.seqs)

    def chunk(i: int, text: str, finish: str | None, lp: Any = None) -> str:
        return _sse({"id": job.id, "object": "text_completion", "created": created, "model": job.model,
                     "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp}]})

    async for i, ev in sv.events(job):
        if isinstance(ev, Delta):
            lp = completion_logprobs(sv, ev.logprobs, offsets[i]) if want_lp else None
            offsets[i] += len(ev.text)
            yield chunk(i, ev.text, None, lp)
            continue
        if ev.reason == "error":
            yield _sse(ApiError(500, f"The engine failed: {ev.error}", "server_error").body())
            return
        yield chunk(i, "", ev.reason)
    fins = [job.finished[i] for i in range(len(job.seqs))]
    sv.note(request, fins)
    if include_usage:
        yield _sse({"id": job.id, "object": "text_completion", "created": created, "model": job.model,
                    "choices": [], "usage": sv.usage(fins)})
    yield "data: [DONE]\n\n"


def _lease(request: Request) -> Lease | None:
    """The rate-limit lease the route took for this request (none for requests that skip the limits)."""
    return getattr(request.state, "lease", None)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(body: AsyncIterator[str], request_id: str) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-Id": request_id})
