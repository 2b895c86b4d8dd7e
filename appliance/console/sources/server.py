"""HTTP client for the appliance's own server: health, metrics, models, adapter reload, streamed chat.

Synchronous httpx, called only from worker threads. A server that does not answer is a normal state
(`ServerDown`), shown as "down" on the dashboard, never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

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
    def __init__(self, base_url: str, key: Callable[[], str | None], transport: Any = None, timeout: float = 2.0) -> None:
        import httpx  # here, not at module level: it is not needed to paint the first screen

        self.base_url = base_url
        self._key = key
        self._httpx = httpx
        self._client = httpx.Client(base_url=base_url, transport=transport, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    def _headers(self) -> dict[str, str]:
        key = self._key()
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _request(self, method: str, path: str, auth: bool = True, **kw: Any) -> Any:
        try:
            r = self._client.request(method, path, headers=self._headers() if auth else {}, **kw)
        except self._httpx.HTTPError as e:
            raise ServerDown(f"The server at {self.base_url} does not answer ({type(e).__name__}).") from None
        return r

    @staticmethod
    def _raise_for(r: Any, what: str) -> None:
        if r.status_code < 400:
            return
        try:
            msg = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = r.text[:200] or r.reason_phrase
        raise ServerRefused(f"The server refused {what} ({r.status_code}): {msg}")

    def health(self) -> Health:
        try:
            r = self._request("GET", "/health/ready", auth=False)
        except ServerDown as e:
            return Health("down", detail=e.message)
        try:
            body = r.json()
        except ValueError:
            body = {}
        status = str(body.get("status") or ("ready" if r.status_code == 200 else f"HTTP {r.status_code}"))
        return Health(status, body.get("model"), body.get("adapter"))

    def metrics(self) -> str:
        r = self._request("GET", "/metrics")
        self._raise_for(r, "/metrics")
        return str(r.text)

    def models(self) -> list[str]:
        r = self._request("GET", "/v1/models")
        self._raise_for(r, "/v1/models")
        return [str(m["id"]) for m in r.json().get("data", [])]

    def reload_adapter(self) -> str | None:
        r = self._request("POST", "/admin/adapters/reload", timeout=600.0)
        self._raise_for(r, "the adapter reload")
        return r.json().get("adapter")

    def chat_stream(self, messages: list[dict[str, str]], model: str | None, max_tokens: int = 256) -> Iterator[str]:
        """Yield the answer's text as the server streams it (SSE chunks until `data: [DONE]`)."""
        body: dict[str, Any] = {"messages": messages, "stream": True, "max_tokens": max_tokens}
        if model:
            body["model"] = model
        try:
            with self._client.stream("POST", "/v1/chat/completions", json=body, headers=self._headers(), timeout=600.0) as r:
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
