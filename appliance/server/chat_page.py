"""The staff chat page at /chat/: static files shipped in the wheel (appliance/server/chat_page/).

The page is served without a key because it holds no data; every call it makes is an API call with
the key a person types in, like any other client's. Its responses carry a strict
Content-Security-Policy (this server's own script, style and API only; nothing inline, no framing),
so no text from the model could run as code even if it ever reached the page as markup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse, Response

PATH = "/chat/"
CSP = "; ".join((
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "img-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
))
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",  # revalidate: an upgraded release serves its own page at once
}
# URL under PATH -> (file in chat_page/, media type)
FILES = {
    "": ("index.html", "text/html; charset=utf-8"),
    "chat.js": ("chat.js", "text/javascript; charset=utf-8"),
    "chat.css": ("chat.css", "text/css; charset=utf-8"),
}
# Every route the page adds: served to anyone, so not audited as requests (server/middleware.py).
ROUTES = (*(PATH + url for url in FILES), "/", PATH.rstrip("/"))


def read(name: str) -> bytes:
    """One of the page's files, from the installed package (the wheel carries them as package data)."""
    return resources.files("appliance.server").joinpath("chat_page", name).read_bytes()


def _static(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


async def _to_page() -> RedirectResponse:
    return RedirectResponse(PATH, status_code=302)


def mount(app: FastAPI) -> None:
    """Add the page's routes to `app` (no key needed; left out of the OpenAPI schema)."""
    router = APIRouter(include_in_schema=False)
    for url, (name, media_type) in FILES.items():
        router.add_api_route(PATH + url, _static(read(name), media_type), methods=["GET"])
    for url in ROUTES[len(FILES):]:
        router.add_api_route(url, _to_page, methods=["GET"])
    app.include_router(router)
