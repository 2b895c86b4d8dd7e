"""`create_app(settings, engine)`: the FastAPI app, its state on app.state, the engine owned by the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance import adapters
from appliance.apikeys import KeyCache
from appliance.config import EmbeddingsConfig, ServerConfig
from appliance.engines.scheduler import Engine, warm_up
from appliance.errors import ApplianceError
from appliance.paths import Layout
from appliance.server import chat_page, embeddings_route, routes, sd_notify
from appliance.server.limits import Limiter
from appliance.server.metrics import Metrics
from appliance.server.middleware import Gate
from appliance.server.serving import ApiError, Serving

log = logging.getLogger("appliance.server")


@dataclass(frozen=True)
class Settings:
    layout: Layout
    server: ServerConfig = field(default_factory=ServerConfig)
    model_id: str = "model"
    own_engine: bool = True  # close the engine at shutdown (tests share one engine between apps)
    watch_adapters: bool = True  # follow adapters/active by itself, about once a second
    feedback_db: Path | None = None  # default: <var>/data/feedback.sqlite3
    embeddings: EmbeddingsConfig | None = None  # [embeddings]: the bundle's embedding model, loaded at start
    gpus: tuple[int, ...] = ()  # [model] gpus (NVML indices): their memory and utilisation in /metrics

    @property
    def feedback_path(self) -> Path:
        return self.feedback_db or self.layout.data / "feedback.sqlite3"


class AdapterWatcher:
    """Notices a changed adapters/active link and asks the engine to swap between batches."""

    def __init__(self, layout: Layout, engine: Engine, seen: str | None) -> None:
        self.layout, self.engine, self.seen = layout, engine, seen

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            target = adapters.active_id(self.layout)
            if target != self.seen:
                self.seen = target
                adapter = await anyio.to_thread.run_sync(adapters.active_adapter, self.layout)
                log.info("adapters/active now %s; swapping between batches", target)
                self.engine.swap_adapter(adapter)


async def _watchdog(interval: float) -> None:
    # From the event loop on purpose: a wedged loop stops the pings and systemd restarts us.
    while True:
        sd_notify.notify("WATCHDOG=1")
        await asyncio.sleep(interval)


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, type_, param, code).body(), status_code=status, headers=headers)


_TYPE_TAGS = {"int", "str", "float", "bool", "list", "dict", "none", "literal"}


def _is_tag(part: str) -> bool:
    return "-" in part or "[" in part or part.lower() in _TYPE_TAGS


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errs = e.errors()
        refused = next((x for x in errs if x.get("type") in ("extra_forbidden", "unsupported_parameter")), None)
        if refused is not None:
            field_ = (refused.get("ctx") or {}).get("field") or ".".join(
                str(x) for x in refused.get("loc", ()) if x != "body" and not (isinstance(x, str) and _is_tag(x)))
            return _error(400, f"The request field {field_!r} is not supported by this server; nothing was generated. "
                          "Leave it out (docs/operations.md lists every field the API accepts).",
                          param=field_, code="unsupported_parameter")
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        # Drop pydantic's union-branch tags ("constrained-str", "function-before[...]", "int"): the
        # client wants the field's path, not which of our types failed.
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not (isinstance(x, str) and _is_tag(x))]
        where = ".".join(loc) or "body"
        return _error(422, f"Invalid request: {where}: {first.get('msg')}.", param=where, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                      headers=dict(e.headers) if e.headers else None)

    @app.exception_handler(ApplianceError)
    async def domain_error(request: Request, e: ApplianceError) -> JSONResponse:
        # A domain error that escaped a route: its own status and type, its sentence and hint.
        if e.http_status >= 500:
            log.error("%s on %s: %s", type(e).__name__, request.url.path, e.message)
        return _error(e.http_status, f"{e.message} {e.hint}".strip() if e.hint else e.message, e.openai_type)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, "The server failed on this request; the journal has the details.", "server_error")


def _embeddings(settings: Settings, metrics: Metrics) -> embeddings_route.EmbeddingService | None:
    """The embedding model of [embeddings] behind its batcher (started by the lifespan), or None without one."""
    if settings.embeddings is None:
        return None
    from appliance.engines.embeddings import load_embedder

    embedder = load_embedder(settings.embeddings, settings.layout, metrics.embedded)
    metrics.bind_embedder(embedder)
    return embeddings_route.EmbeddingService(settings.embeddings, embedder, settings.model_id)


def create_app(settings: Settings, engine: Engine) -> FastAPI:
    metrics = Metrics()
    if settings.gpus:
        metrics.bind_gpus(settings.gpus)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from appliance.feedback_store import FeedbackStore

        st = app.state
        metrics.bind_engine(engine)
        if not engine.started:
            engine.start()
        if not st.ready:
            log.info("warm-up: %s", await anyio.to_thread.run_sync(warm_up, engine))
            st.ready = True
        metrics.show_adapter(engine.adapter_id)
        if st.embeddings is not None:
            st.embeddings.embedder.start()
            log.info("embedding model warm-up: %s", await anyio.to_thread.run_sync(st.embeddings.embedder.warm_up))
        st.serving.store = await anyio.to_thread.run_sync(FeedbackStore, settings.feedback_path)
        tasks = []
        if settings.watch_adapters:
            tasks.append(asyncio.create_task(st.watcher.run()))
        if (interval := sd_notify.watchdog_interval()) is not None:
            tasks.append(asyncio.create_task(_watchdog(interval)))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            st.serving.store.close()
            if st.embeddings is not None:
                await anyio.to_thread.run_sync(st.embeddings.embedder.close)
            if settings.own_engine:
                await anyio.to_thread.run_sync(engine.close)

    app = FastAPI(title="appliance", version="1", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.keys = KeyCache(settings.layout)
    app.state.limiter = Limiter(settings.server)  # per-key rate limits; tests set its clock
    app.state.serving = Serving(engine, settings.model_id, metrics, None)
    app.state.watcher = AdapterWatcher(settings.layout, engine, adapters.active_id(settings.layout))
    app.state.embeddings = _embeddings(settings, metrics)
    app.state.ready = False
    app.state.started_at = int(time.time())
    for r in (routes.user, embeddings_route.router, routes.admin, routes.health):
        app.include_router(r)
    chat_page.mount(app)  # /chat/: the staff chat page (its API calls need a key like any client's)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(routes.require("user"))])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    _install_error_handlers(app)
    app.add_middleware(Gate, layout=settings.layout, metrics=metrics, body_limit=settings.server.request_body_limit,
                       audit_prompts=settings.server.audit_prompts)
    return app
