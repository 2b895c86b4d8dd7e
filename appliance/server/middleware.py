"""ASGI middleware around every request: body cap (413), metrics, and one audit line per request
(requests no key took, sampled: at most one line a minute per reason, with the count).

Pure ASGI rather than BaseHTTPMiddleware, so streamed answers pass through without buffering.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from typing import Any

import anyio

from appliance import audit
from appliance.paths import Layout
from appliance.server import chat_page
from appliance.server.metrics import Metrics

log = logging.getLogger("appliance.server")
Scope = dict[str, Any]
# Probes poll these every few seconds; auditing them would bury the requests that matter.
UNAUDITED = ("/health/live", "/health/ready", *chat_page.ROUTES)  # open to anyone: counted in metrics, not logged


def _error_body(status: int, message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class Gate:
    def __init__(self, app: Any, *, layout: Layout, metrics: Metrics, body_limit: int, audit_prompts: bool) -> None:
        self.app, self.layout, self.metrics = app, layout, metrics
        self.body_limit, self.audit_prompts = body_limit, audit_prompts
        self.sampler = audit.Sampler()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        scope.setdefault("state", {})
        status = {"code": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            replay = await self._read_body(scope, receive)
            if replay is None:
                await self._reply(send_wrapper, 413, _error_body(
                    413, f"The request body is larger than the limit of {self.body_limit} bytes.", "invalid_request_error", "body_too_large"))
            else:
                await self.app(scope, replay, send_wrapper)
        finally:
            await self._account(scope, status["code"], time.monotonic() - t0)

    async def _read_body(self, scope: Scope, receive: Any) -> Any:
        """Read the whole body up to the cap; return a receive() that replays it, or None if too big."""
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.body_limit:
                        return None
                except ValueError:
                    pass
        chunks: list[bytes | None] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                chunks.append(None)
                break
            body = message.get("body", b"")
            size += len(body)
            if size > self.body_limit:
                return None
            chunks.append(body)
            more = message.get("more_body", False)
        data = b"".join(c for c in chunks if c is not None)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # after the body: wait for the client's disconnect

        return replay

    @staticmethod
    async def _reply(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _account(self, scope: Scope, status: int, seconds: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "unmatched"  # bounded label set: route templates only
        self.metrics.requests.labels(path, str(status)).inc()
        self.metrics.latency.labels(path).observe(seconds)
        if path in UNAUDITED:
            return
        state = scope.get("state", {})
        reason = "unknown_path" if path == "unmatched" else "unauthenticated" if state.get("key_id") is None else None
        if reason is None and state.get("rate_limited"):
            reason = "rate_limited"  # a key over its limits (server/limits.py): a flood of 429s is counted, not logged each
        if reason is not None:  # no key took it: counted, and sampled into the log, since a flood must not fsync a line each
            self.metrics.rejected.labels(reason).inc()
            sampled = self.sampler.note(reason, method=scope.get("method"), status=status)
            if sampled is not None:
                await self._append(sampled)
            return
        tokens = state.get("tokens") or (0, 0)
        record: dict[str, Any] = {
            "event": "request", "key_id": state.get("key_id"), "method": scope.get("method"), "route": path,
            "status": status, "prompt_tokens": tokens[0], "completion_tokens": tokens[1],
            "latency_ms": round(seconds * 1000, 1), "request_id": state.get("request_id"),
        }
        if self.audit_prompts and state.get("prompt") is not None:
            record["prompt"] = state["prompt"]
        await self._append(record)

    async def _append(self, record: dict[str, Any]) -> None:
        try:
            # The server never moves the anchor, whoever runs it: what it writes is what the anchor guards.
            await anyio.to_thread.run_sync(functools.partial(audit.append, self.layout, record, anchor=False))
        except Exception:  # an unwritable audit log is loud in the journal, but the answer was already sent
            log.exception("could not append to the audit log")
