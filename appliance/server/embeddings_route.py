"""`POST /v1/embeddings`: the wire models, the serving step and the router.

The inputs are tokenized off the event loop and checked against the limits of [embeddings] (inputs
per request, tokens per input and per request: a 400 that says the numbers), then queued for the
embedder's thread, which embeds them together with other requests' (appliance/engines/embeddings.py).
The request holds a rate-limit slot of its key while it waits and is charged its tokens, like a
generating one. A bundle without an embedding model answers 404 here: nothing to serve.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from appliance.config import EmbeddingsConfig
from appliance.engines.embeddings import Embedder, Vectors
from appliance.engines.scheduler import QueueFull
from appliance.errors import EngineError
from appliance.server.protocol import JsonInt
from appliance.server.routes import API_ERRORS, admitted, require
from appliance.server.serving import ApiError

Text = Annotated[str, Field(min_length=1, max_length=1 << 20)]
TokenIds = Annotated[list[Annotated[int, JsonInt]], Field(min_length=1, max_length=1 << 16)]


class EmbeddingRequest(BaseModel):
    # as every request: nothing unknown passes unnamed. The example is the demo bundle's model.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "all-minilm-l6-v2", "input": ["When does the pharmacy open?", "Opening hours"], "encoding_format": "float"}]})

    input: Text | Annotated[list[Text], Field(min_length=1, max_length=1 << 16)] | TokenIds | Annotated[
        list[TokenIds], Field(min_length=1, max_length=1 << 16)] = Field(
        description="a text or a list of texts; token ids are refused (400): this model has its own tokenizer")
    model: Annotated[str, Field(min_length=1, max_length=256)]
    encoding_format: Literal["float", "base64"] = Field(default="float", description="base64: little-endian float32 bytes")
    dimensions: Annotated[int, Field(ge=1, le=1 << 16), JsonInt] | None = Field(
        default=None, description="only the model's own size; it is not shortened")
    user: Annotated[str, Field(max_length=256)] | None = None

    def texts(self) -> list[str] | None:
        """The inputs as texts; None when they came as token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(x, str) for x in self.input):
            return list(self.input)  # type: ignore[arg-type]
        return None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class EmbeddingService:
    """The embedding model behind its batcher, as the route uses it."""

    def __init__(self, config: EmbeddingsConfig, embedder: Embedder, chat_model_id: str) -> None:
        self.config, self.embedder, self.chat_model_id = config, embedder, chat_model_id

    @property
    def dimensions(self) -> int:
        assert self.embedder.model is not None, "the lifespan loads the model before the first request"
        return self.embedder.model.dimensions

    def _check_request(self, req: EmbeddingRequest) -> list[str]:
        c = self.config
        if req.model != c.id:
            what = "is the chat model; it does not embed" if req.model == self.chat_model_id else "is not served"
            raise ApiError(404, f"The model {req.model!r} {what}; the embedding model here is {c.id!r} (GET /v1/models lists them).",
                           param="model", code="model_not_found")
        if req.dimensions is not None and req.dimensions != self.dimensions:
            raise ApiError(400, f"dimensions is {req.dimensions}, but {c.id} makes {self.dimensions}-dimensional embeddings "
                                "and this server does not shorten them; leave dimensions out.",
                           param="dimensions", code="unsupported_parameter")
        texts = req.texts()
        if texts is None:
            raise ApiError(400, "input as token ids is not supported: the embedding model has a tokenizer of its own; send the texts.",
                           param="input", code="unsupported_parameter")
        if len(texts) > c.max_inputs:
            raise ApiError(400, f"The request has {len(texts)} inputs; this server embeds at most {c.max_inputs} per request. "
                                "Send them in several requests.", param="input", code="too_many_inputs")
        return texts

    def _check_tokens(self, tokens: list[list[int]]) -> int:
        c = self.config
        for i, ids in enumerate(tokens):
            if len(ids) > c.context_length:
                raise ApiError(400, f"input[{i}] has {len(ids)} tokens, and {c.id} reads at most {c.context_length}; "
                                    "split the text into shorter passages.", param="input", code="context_length_exceeded")
        total = sum(len(ids) for ids in tokens)
        if total > c.max_request_tokens:
            raise ApiError(400, f"The inputs have {total} tokens together; this server embeds at most {c.max_request_tokens} "
                                "per request. Send them in several requests.", param="input", code="too_many_tokens")
        return total

    async def _embed(self, tokens: list[list[int]]) -> Vectors:
        loop = asyncio.get_running_loop()
        result: asyncio.Future[Vectors] = loop.create_future()

        def done(out: Vectors | BaseException) -> None:
            def settle() -> None:
                if result.done():
                    return
                if isinstance(out, BaseException):
                    result.set_exception(out)
                else:
                    result.set_result(out)
            loop.call_soon_threadsafe(settle)

        try:
            self.embedder.submit(tokens, done)
        except QueueFull:
            raise ApiError(429, f"The server is busy: {self.embedder.waiting} inputs are waiting to be embedded. Retry in 1 s.",
                           type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineError as e:
            raise ApiError(503, e.message, type_="server_error", code="engine_unavailable") from None
        try:
            return await result
        except Exception as e:
            raise ApiError(500, f"The embedding model failed on this request: {e}", type_="server_error", code="engine_error") from None

    async def embed(self, req: EmbeddingRequest, request: Request) -> dict[str, Any]:
        texts = self._check_request(req)
        assert self.embedder.model is not None
        tokens = await anyio.to_thread.run_sync(self.embedder.model.tokenize, texts)
        total = self._check_tokens(tokens)
        lease = getattr(request.state, "lease", None)
        if lease is not None:
            lease.charge(total)
        request.state.tokens = (total, 0)
        request.state.request_id = f"embd-{uuid.uuid4().hex}"
        vectors = await self._embed(tokens)
        as_b64 = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if as_b64 else v.tolist()}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.config.id,
                "usage": {"prompt_tokens": total, "total_tokens": total}}


router = APIRouter(dependencies=[Depends(require("user"))], responses=API_ERRORS)


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, request: Request) -> Any:
    """Embeddings of a text or a list of texts, in input order, from the bundle's embedding model."""
    service: EmbeddingService | None = request.app.state.embeddings
    if service is None:
        raise ApiError(404, "This appliance's bundle carries no embedding model, so there is nothing to embed with; "
                            "install a bundle whose tier names one.", param="model", code="no_embedding_model")
    request.state.prompt = body.input
    async with admitted(request):
        out = await service.embed(body, request)
    return JSONResponse(out, headers={"X-Request-Id": request.state.request_id})
