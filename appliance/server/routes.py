"""Thin routers: each fetches its handler from app.state and documents every answer it can give."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from appliance import adapters, apikeys
from appliance.server import protocol as P
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
        if role == "admin" and record.role != "admin":
            raise ApiError(403, "This route needs an admin key.", "permission_error", code="admin_required")
        return record

    return check


user = APIRouter(dependencies=[Depends(require("user"))], responses=API_ERRORS)
admin = APIRouter(prefix="/admin", dependencies=[Depends(require("admin"))], responses=ADMIN_ERRORS)
health = APIRouter(prefix="/health")


@user.post("/v1/chat/completions", responses={200: {"model": P.ChatCompletion, "content": STREAMED}})
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
    request.state.prompt = [m.model_dump() for m in body.messages]
    out = await request.app.state.serving.chat(body, request)
    return out if isinstance(out, Response) else JSONResponse(out, headers={"X-Request-Id": out["id"]})


@user.post("/v1/completions", responses={200: {"model": P.Completion, "content": STREAMED}})
async def completions(body: P.CompletionRequest, request: Request) -> Any:
    request.state.prompt = body.text()
    out = await request.app.state.serving.completion(body, request)
    return out if isinstance(out, Response) else JSONResponse(out)


@user.post("/generate", responses={200: {"model": P.GenerateResponse}})
async def generate(body: P.GenerateRequest, request: Request) -> Any:
    """The seed's endpoint, kept for old clients: a one-message chat, greedy."""
    request.state.prompt = body.prompt
    return JSONResponse(await request.app.state.serving.generate(body, request))


@user.get("/v1/models", response_model=P.ModelList)
async def models(request: Request) -> Any:
    st = request.app.state
    cards = [{"id": st.settings.model_id, "object": "model", "created": st.started_at, "owned_by": "appliance", "parent": None}]
    if st.engine.adapter_id:
        cards.append({"id": f"{st.settings.model_id}:{st.engine.adapter_id}", "object": "model", "created": st.started_at,
                      "owned_by": "appliance", "parent": st.settings.model_id})
    return {"object": "list", "data": cards}


@user.post("/v1/feedback", response_model=P.FeedbackAck, responses=_errors(404))
async def feedback(body: P.FeedbackRequest, request: Request) -> Any:
    request.state.request_id = body.request_id
    return await request.app.state.serving.feedback(body)


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


@health.get("/live", response_model=P.Health)
async def live() -> Any:
    return {"status": "live"}


@health.get("/ready", response_model=P.Health, responses={503: {"model": P.Health}})
async def ready(request: Request) -> Any:
    st = request.app.state
    if not st.ready:
        return JSONResponse({"status": "loading", "model": st.settings.model_id, "adapter": None}, status_code=503)
    return {"status": "ready", "model": st.settings.model_id, "adapter": st.engine.adapter_id,
            "adapter_error": st.engine.adapter_error}
