"""HTTP client for the appliance's own server: health, metrics, models, adapter reload, streamed chat.

Synchronous httpx, called only from worker threads. A server that does not answer is a normal state
(`ServerDown`), shown as "down" on the dashboard, never a crash.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from appliance.errors import ApplianceError


class ServerDown(ApplianceError):
    default_hint = "Start it (`systemctl start appliance-server`, or `appliance serve`) and watch the Logs screen."


class ServerRefused(ApplianceError):
    """The server answered with an error (OpenAI error shape)."""


@dataclass(frozen=True)
class Health:
    status: str  # ready | loading | down
    model: str | None = None
    adapter: str | None = None
    detail: str = ""


class ServerClient:
    def __init__(self, base_url: str, key: Callable[[], str | None], transport: Any = None, timeout: float = 2.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context` (appliance.tls.client_context) for an https `base_url`: it trusts the configured certificate."""
        self.base_url = base_url
        self._ssl = ssl_context
        self._key = key
        self._transport = transport
        self._timeout = timeout
        self._hx: Any = None
        self._conn: http.client.HTTPConnection | None = None

    def _client(self) -> Any:
        if self._hx is None:
            import httpx  # here, not at module level: ~0.2 s that the first paint does not need

            self._httpx = httpx
            self._hx = httpx.Client(base_url=self.base_url, transport=self._transport, timeout=self._timeout, trust_env=False,
                                    verify=self._ssl or True)
        return self._hx

    def close(self) -> None:
        if self._hx is not None:
            self._hx.close()
        if self._conn is not None:
            self._conn.close()

    def _get(self, path: str, auth: bool) -> tuple[int, str]:
        """The once-a-second polls: over the stdlib's http.client (kept alive) unless a transport is injected."""
        headers = self._headers() if auth else {}
        if self._transport is not None:
            r = self._request("GET", path, auth=auth)
            return r.status_code, r.text
        url = urlsplit(self.base_url)
        for attempt in (1, 2):  # a kept-alive connection the server closed is retried once on a new one
            if self._conn is None:
                host = url.hostname or "127.0.0.1"
                self._conn = (http.client.HTTPSConnection(host, url.port or 443, timeout=self._timeout, context=self._ssl)
                              if url.scheme == "https" else http.client.HTTPConnection(host, url.port or 80, timeout=self._timeout))
            try:
                self._conn.request("GET", path, headers=headers)
                resp = self._conn.getresponse()
                return resp.status, resp.read().decode("utf-8", "replace")
            except (OSError, http.client.HTTPException) as e:
                self._conn.close()
                self._conn = None
                if attempt == 2 or isinstance(e, ConnectionRefusedError | TimeoutError | socket.gaierror):
                    raise ServerDown(f"The server at {self.base_url} does not answer ({type(e).__name__}).") from None
        raise AssertionError("unreachable")

    def _headers(self) -> dict[str, str]:
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, method: str, path: str, auth: bool = True, **kw: Any) -> Any:
        client = self._client()
        try:
            r = client.request(method, path, headers=self._headers() if auth else {}, **kw)
        except self._httpx.HTTPError as e:
            raise ServerDown(f"The server at {self.base_url} does not answer ({type(e).__name__}).") from None
        return r

    @staticmethod
    def _raise_for(r: Any, what: str) -> None:
        if r.status_code < 400:
            return
        ServerClient._refused(r.status_code, r.text, what)

    @staticmethod
    def _refused(status: int, body: str, what: str) -> None:
        try:
            msg = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = body[:200] or f"HTTP {status}"
        raise ServerRefused(f"The server refused {what} ({status}): {msg}")

    def health(self) -> Health:
        try:
            code, text = self._get("/health/ready", auth=True)  # the console's admin key: the model and adapter too
        except ServerDown as e:
            return Health("down", detail=e.message)
        try:
            body = json.loads(text)
            body = body if isinstance(body, dict) else {}
        except ValueError:
            body = {}
        status = str(body.get("status") or ("ready" if code == 200 else f"HTTP {code}"))
        return Health(status, body.get("model"), body.get("adapter"))

    def metrics(self) -> str:
        code, text = self._get("/metrics", auth=True)
        if code >= 400:
            self._refused(code, text, "/metrics")
        return text

    def models(self) -> list[str]:
        r = self._request("GET", "/v1/models")
        self._raise_for(r, "/v1/models")
        return [str(m["id"]) for m in r.json().get("data", [])]

    def reload_adapter(self) -> str | None:
        r = self._request("POST", "/admin/adapters/reload", timeout=600.0)
        self._raise_for(r, "the adapter reload")
        return r.json().get("adapter")

    def held_feedback(self) -> list[dict[str, Any]]:
        """Corrections from `user` keys that wait for an admin (GET /admin/feedback)."""
        r = self._request("GET", "/admin/feedback", params={"status": "held"})
        self._raise_for(r, "the list of held corrections")
        return list(r.json())

    def decide_feedback(self, feedback_id: int, accept: bool) -> dict[str, Any]:
        r = self._request("POST", f"/admin/feedback/{int(feedback_id)}/{'accept' if accept else 'reject'}")
        self._raise_for(r, f"the decision on correction {feedback_id}")
        return dict(r.json())

    def chat_stream(self, messages: list[dict[str, str]], model: str | None, max_tokens: int = 256,
                    temperature: float = 1.0) -> Iterator[str]:
        """Yield the answer's text as the server streams it (SSE chunks until `data: [DONE]`)."""
        body: dict[str, Any] = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": temperature}
        if model:
            body["model"] = model
        try:
            with self._client().stream("POST", "/v1/chat/completions", json=body, headers=self._headers(), timeout=600.0) as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise_for(r, "the chat request")
                for line in r.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise ServerRefused(f"The server stopped the answer: {chunk['error'].get('message', chunk['error'])}")
                    for choice in chunk.get("choices", []):
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except self._httpx.HTTPError as e:
            raise ServerDown(f"The server at {self.base_url} does not answer ({type(e).__name__}).") from None
