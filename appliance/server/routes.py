"""Thin routers: each fetches its handler from app.state and documents every answer it can give."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from appliance import adapters, apikeys, audit
from appliance.server import protocol as P
from appliance.server.limits import Refused
from appliance.server.serving import ApiError

_bearer = HTTPBearer(auto_error=False, description="an API key from `appliance keys create`")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": P.ErrorResponse} for c in codes}


API_ERRORS = _errors(400, 401, 404, 413, 422, 429, 503)
ADMIN_ERRORS = _errors(401, 403, 413, 422, 503)
# Each server-sent event: `data:` holds one JSON chunk, the last one `[DONE]`.
STREAMED = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"], "description": "one server-sent event; the stream ends with data: [DONE]",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}}


def require(role: str) -> Any:
    async def check(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> apikeys.KeyRecord:  # noqa: B008
        if cred is None:
            raise ApiError(401, "This route needs an API key: send `Authorization: Bearer <key>`.", "authentication_error",
                           code="missing_api_key")
        try:
            record = request.app.state.keys.verify(cred.credentials)
        except apikeys.ApiKeyError as e:  # e.g. the service user cannot read the key file
            raise ApiError(503, f"{e.message} No key can be checked until that is fixed.", "server_error",
                           code="key_store_unavailable") from None
        if record is None:
            raise ApiError(401, "The API key is not valid (unknown or revoked).", "authentication_error", code="invalid_api_key")
        request.state.key_id = record.id
        request.state.key = record
        if role == "admin" and record.role != "admin":
            raise ApiError(403, "This route needs an admin key.", "permission_error", code="admin_required")
        return record

    return check


@contextlib.asynccontextmanager
async def admitted(request: Request) -> AsyncIterator[None]:
    """Hold one of the key's rate-limit slots for a generating request (429 with Retry-After when over
    a limit); the sequence's end frees it once submitted, this block's end otherwise."""
    lease = request.app.state.limiter.admit(request.state.key)
    if isinstance(lease, Refused):
        request.state.rate_limited = True
        raise ApiError(429, lease.message, "rate_limit_error", code=lease.code, headers={"Retry-After": str(lease.retry_after)})
    request.state.lease = lease
    try:
        yield
    finally:
        if not lease.handed_over:
            lease.release()


user = APIRouter(dependencies=[Depends(require("user"))], responses=API_ERRORS)
admin = APIRouter(prefix="/admin", dependencies=[Depends(require("admin"))], responses=ADMIN_ERRORS)
health = APIRouter(prefix="/health")


@user.post("/v1/chat/completions", responses={200: {"model": P.ChatCompletion, "content": STREAMED}})
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
    request.state.prompt = [m.model_dump() for m in body.messages]
    async with admitted(request):
        out = await request.app.state.serving.chat(body, request)
    return out if isinstance(out, Response) else JSONResponse(out, headers={"X-Request-Id": out["id"]})


@user.post("/v1/completions", responses={200: {"model": P.Completion, "content": STREAMED}})
async def completions(body: P.CompletionRequest, request: Request) -> Any:
    request.state.prompt = body.text()
    async with admitted(request):
        out = await request.app.state.serving.completion(body, request)
    return out if isinstance(out, Response) else JSONResponse(out)


@user.post("/generate", responses={200: {"model": P.GenerateResponse}})
async def generate(body: P.GenerateRequest, request: Request) -> Any:
    """The seed's endpoint, kept for old clients: a one-message chat, greedy."""
    request.state.prompt = body.prompt
    async with admitted(request):
        return JSONResponse(await request.app.state.serving.generate(body, request))


@user.get("/v1/models", response_model=P.ModelList)
async def models(request: Request) -> Any:
    st = request.app.state
    cards = [{"id": st.settings.model_id, "object": "model", "created": st.started_at, "owned_by": "appliance", "parent": None}]
    if st.engine.adapter_id:
        cards.append({"id": f"{st.settings.model_id}:{st.engine.adapter_id}", "object": "model", "created": st.started_at,
                      "owned_by": "appliance", "parent": st.settings.model_id})
    if st.embeddings is not None:  # POST /v1/embeddings
        cards.append({"id": st.embeddings.config.id, "object": "model", "created": st.started_at, "owned_by": "appliance", "parent": None})
    return {"object": "list", "data": cards}


@user.post("/v1/feedback", response_model=P.FeedbackAck, responses=_errors(403, 404, 409))
async def feedback(body: P.FeedbackRequest, request: Request) -> Any:
    """The key's one rating of its own exchange; a `user` key's correction is held for an admin
    unless [server] accept_corrections."""
    request.state.request_id = body.request_id
    server, key = request.app.state.settings.server, request.state.key
    hold = key.role != "admin" and not server.accept_corrections
    return await request.app.state.serving.feedback(body, key.id, hold, server.corrections_per_day)


@user.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    st = request.app.state
    st.metrics.show_adapter(st.engine.adapter_id)
    return Response(st.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@admin.post("/adapters/reload", response_model=P.AdapterState, responses=_errors(409))
async def reload_adapter(request: Request) -> Any:
    """Load whatever `adapters/active` points at now, between batches; 409 if it cannot be loaded."""
    st = request.app.state
    target = await anyio.to_thread.run_sync(adapters.active_adapter, st.settings.layout)
    st.watcher.seen = adapters.active_id(st.settings.layout)
    await anyio.to_thread.run_sync(st.engine.swap_adapter, target, 600.0)
    wanted = target.id if target else None
    if st.engine.adapter_id != wanted:
        raise ApiError(409, f"The adapter {wanted} could not be loaded ({st.engine.adapter_error}); "
                            f"the server keeps {st.engine.adapter_id or 'the base model'}.", code="adapter_load_failed")
    st.metrics.show_adapter(st.engine.adapter_id)
    return {"adapter": st.engine.adapter_id, "error": None}


@admin.get("/keys", response_model=list[P.KeyInfo])
async def list_keys(request: Request) -> Any:
    records = await anyio.to_thread.run_sync(apikeys.list_keys, request.app.state.settings.layout)
    return [{"id": r.id, "role": r.role, "created_at": r.created_at, "revoked_at": r.revoked_at} for r in records]


def _store(request: Request) -> Any:
    store = request.app.state.serving.store
    if store is None:
        raise ApiError(503, "The feedback store is not available.", "server_error")
    return store


@admin.get("/feedback", response_model=list[P.FeedbackItem], responses=_errors(400))
async def list_feedback(request: Request, status: Literal["held", "accepted", "rejected"] = "held") -> Any:
    """Ratings with `status`; held by default: what waits for an admin."""
    if unknown := sorted(set(request.query_params) - {"status"}):
        raise ApiError(400, f"The query parameter {unknown[0]!r} is not supported here; the one parameter is status.",
                       param=unknown[0], code="unsupported_parameter")
    return [ex.item() for ex in await anyio.to_thread.run_sync(_store(request).feedback, status)]


@admin.post("/feedback/{row}/{decision}", response_model=P.FeedbackItem, responses=_errors(404))
async def decide_feedback(row: int, decision: Literal["accept", "reject"], request: Request) -> Any:
    """Accept (the trainer will use it) or reject a held correction."""
    try:
        ex = await anyio.to_thread.run_sync(_store(request).decide, row, decision == "accept")
    except KeyError:
        raise ApiError(404, f"There is no held correction {row}; GET /admin/feedback lists them.", code="not_held") from None
    await anyio.to_thread.run_sync(audit.append, request.app.state.settings.layout, {
        "event": f"correction_{decision}ed", "feedback": row, "request_id": ex.request_id, "by": request.state.key_id})
    return ex.item()


@health.get("/live", response_model=P.Health)
async def live() -> Any:
    return {"status": "live"}


@health.get("/ready", response_model=P.Health, responses={503: {"model": P.Health}})
async def ready(request: Request) -> Any:
    """A bare status for anyone (probes, load balancers); the model, adapter and why an adapter failed
    only for an admin key, since that text can name paths on this host."""
    st = request.app.state
    body: dict[str, Any] = {"status": "ready" if st.ready else "loading"}
    if _is_admin(request):
        body.update(model=st.settings.model_id, adapter=st.engine.adapter_id if st.ready else None,
                    adapter_error=st.engine.adapter_error if st.ready else None)
    return JSONResponse(body, status_code=200 if st.ready else 503)


def _is_admin(request: Request) -> bool:
    # Read by hand, not through the bearer dependency: the route needs no key, and its schema says so.
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        return False
    try:
        record = request.app.state.keys.verify(presented.strip())
    except apikeys.ApiKeyError:
        return False
    return record is not None and record.role == "admin"
