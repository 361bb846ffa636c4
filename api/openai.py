"""An OpenAI-compatible HTTP API over the client library (``swarm-peer api``): existing tools talk to the swarm.

    GET  /v1/models              the model this server generates with
    POST /v1/completions         {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"}
    POST /v1/chat/completions    {"model", "messages", ...}: the prompt is the tokenizer's chat template
    GET  /health                 200 when every block of the model is served; 503 with the missing spans
    GET  /metrics                Prometheus text format (``api.metrics``)
    GET  /                       the swarm's health page, with ``/api/v1/state`` behind it (``api.monitor``)

>>> client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
>>> client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)

``stream: true`` answers with server-sent events: ``data: {chunk}`` per piece of text, as soon as it is decoded, then
a chunk with the ``finish_reason`` and ``usage``, then ``data: [DONE]``. ``temperature`` 0 is greedy decoding and
gives exactly the client library's ``generate(do_sample=False)``; ``n`` must be 1.

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``:

    400 invalid_request_error     malformed JSON or fields, n != 1, max_tokens over --max-tokens
    400 context_length_exceeded   prompt over --max-prompt-tokens, or prompt + max_tokens over the model's context
    404 model_not_found           another model than the one served
    413 request_too_large         a body over --max-body-kb
    429 too_many_requests         --max-concurrent completions already generating
    503 swarm_unavailable         no chain of peers serves every block (or peers refused: busy)
    504 timeout                   the completion ran past --request-timeout

A client that disconnects mid-stream (or while waiting for a whole completion) stops its generation at the next
token, which closes its session on the peers and frees their cache. The server keeps serving after any of these.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

from swarm_peer.api.completions import Completion, Sampling
from swarm_peer.api.metrics import CONTENT_TYPE, ApiMetrics
from swarm_peer.dht import block_ranges, online_servers
from swarm_peer.errors import DeadlineError, PeerError, RoutingError, ValidationError
from swarm_peer.settings import ApiSettings

__all__ = ["create_app", "ApiError"]

logger = logging.getLogger(__name__)

COVERAGE_TTL = 5.0  # seconds a lookup of which blocks are served stays fresh
LOOKUP_TIMEOUT = 5.0  # seconds one such lookup may take
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error type and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type, code, param

    def response(self) -> JSONResponse:
        body = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class _Request(BaseModel):
    """Fields both endpoints take; unknown OpenAI fields (``user``, ``logprobs``: null, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 completion per request")
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"at most {MAX_STOPS} non-empty stop strings")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("exactly one prompt per request")
            return prompt[0]
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(part["text"] for part in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class _Coverage:
    """Which blocks of the model no ONLINE peer serves. Looked up once before the first answer; after that, a
    lookup older than ``COVERAGE_TTL`` seconds is answered as it is while a new one runs in the background, so no
    request waits on the DHT."""

    def __init__(self, dht, model_id: str, num_blocks: int):
        self.dht, self.model_id, self.num_blocks = dht, model_id, num_blocks
        self._missing: tuple[tuple[int, int], ...] | None = None
        self._at = -float("inf")
        self._lookup: asyncio.Task | None = None

    async def missing(self) -> tuple[tuple[int, int], ...]:
        """The uncovered [start, end) ranges; ``TimeoutError`` if the first lookup gets no answer."""
        if time.monotonic() - self._at > COVERAGE_TTL and (self._lookup is None or self._lookup.done()):
            self._lookup = asyncio.create_task(self._look_up())
        if self._missing is None:
            await asyncio.shield(self._lookup)
        return self._missing

    async def _look_up(self) -> None:
        try:
            servers = await asyncio.to_thread(
                online_servers, self.dht, self.model_id, range(self.num_blocks), timeout=LOOKUP_TIMEOUT
            )
        except TimeoutError:
            if self._missing is None:
                raise
            logger.debug("Looking up the served blocks timed out; keeping the last answer")
            return
        self._missing = block_ranges(block for block, peers in enumerate(servers) if not peers)
        self._at = time.monotonic()


class _Server:
    """The routes' state: the model, its tokenizer, the limits, the worker threads that generate."""

    def __init__(self, model, tokenizer, settings: ApiSettings, metrics: ApiMetrics):
        self.model, self.tokenizer, self.settings, self.metrics = model, tokenizer, settings, metrics
        self.names = {settings.name, model.model_id}
        self.context = model.config.max_position_embeddings
        self.coverage = _Coverage(model.swarm.dht, model.model_id, model.checkpoint.num_blocks)
        self.executor = ThreadPoolExecutor(settings.max_concurrent, thread_name_prefix="generate")
        self.generating = 0

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(
                404, f"the model {name!r} does not exist here; this server has {self.settings.name!r}",
                code="model_not_found", param="model",
            )  # fmt: skip

    def encode(self, body: CompletionRequest | ChatRequest):
        if isinstance(body, ChatRequest):
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            input_ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
        else:
            input_ids = self.tokenizer(body.prompt, return_tensors="pt")["input_ids"]
        if input_ids.shape[1] == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return input_ids

    def sampling(self, body: CompletionRequest | ChatRequest, prompt_tokens: int) -> Sampling:
        limit = self.settings.max_tokens
        if prompt_tokens > self.settings.max_prompt_tokens:
            raise ApiError(
                400, f"the prompt has {prompt_tokens} tokens; this server takes at most "
                f"{self.settings.max_prompt_tokens}", code="context_length_exceeded", param="messages",
            )  # fmt: skip
        asked = body.max_completion_tokens if isinstance(body, ChatRequest) else None
        asked = asked or body.max_tokens
        if asked is not None and asked > limit:
            raise ApiError(
                400, f"max_tokens is {asked}; this server generates at most {limit}", param="max_tokens"
            )
        left = self.context - prompt_tokens
        max_tokens = asked or min(limit, left)
        if max_tokens > left:
            raise ApiError(
                400, f"the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) exceed the context of "
                f"{self.context} tokens", code="context_length_exceeded", param="max_tokens",
            )  # fmt: skip
        return Sampling(max_tokens, body.temperature, body.top_p, tuple(body.stop or ()), body.seed)

    async def start(self, body: CompletionRequest | ChatRequest) -> Completion:
        """Checks the request, admits it, and starts generating; raises ``ApiError``."""
        self.check_model(body.model)
        input_ids = await asyncio.to_thread(self.encode, body)
        sampling = self.sampling(body, input_ids.shape[1])
        try:
            if missing := await self.coverage.missing():
                raise _unavailable(missing)
        except TimeoutError:
            logger.debug("Could not look up the served blocks; generating anyway", exc_info=True)
        if self.generating >= self.settings.max_concurrent:
            raise ApiError(
                429, f"{self.settings.max_concurrent} completions are generating (--max-concurrent); try again "
                "shortly", type="rate_limit_error", code="too_many_requests",
            )  # fmt: skip
        loop = asyncio.get_running_loop()
        completion = Completion(
            self.model,
            self.tokenizer,
            input_ids,
            sampling,
            loop,
            time.monotonic() + self.settings.request_timeout,
        )
        self.generating += 1
        self.metrics.in_flight.inc()
        self.metrics.kv_cache_tokens.inc(input_ids.shape[1] + sampling.max_tokens)
        received = time.perf_counter()
        future = loop.run_in_executor(self.executor, completion.run)
        future.add_done_callback(lambda _: self._finished(completion, received))
        return completion

    def _finished(self, completion: Completion, received: float) -> None:
        self.generating -= 1
        self.metrics.in_flight.dec()
        self.metrics.kv_cache_tokens.dec(completion.prompt_tokens + completion.sampling.max_tokens)
        self.metrics.observe_completion(received, completion.prompt_tokens, completion.token_times)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _unavailable(missing: tuple[tuple[int, int], ...]) -> ApiError:
    spans = ", ".join(f"{start}:{end}" for start, end in missing)
    return ApiError(
        503, f"the swarm does not serve every block of the model: no peer serves blocks {spans}",
        type="server_error", code="swarm_unavailable",
    )  # fmt: skip


def _failure(completion: Completion, timeout: float) -> ApiError | None:
    """The error a finished completion answers with, if it failed."""
    error = completion.error
    if completion.timed_out or isinstance(error, (DeadlineError, TimeoutError)):
        return ApiError(
            504, f"the completion took longer than {timeout:g} s (--request-timeout)",
            type="server_error", code="timeout",
        )  # fmt: skip
    if error is None:
        return None
    if isinstance(error, ValidationError):
        return ApiError(400, f"the swarm refused the request: {error}")
    if isinstance(error, (RoutingError, PeerError)):
        return ApiError(503, f"the swarm could not serve the request: {error}", type="server_error",
                        code="swarm_unavailable")  # fmt: skip
    logger.error("A completion failed", exc_info=error)
    return ApiError(
        500, f"internal error: {type(error).__name__}", type="server_error", code="internal_error"
    )


def _usage(completion: Completion) -> dict:
    tokens = len(completion.token_ids)
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": completion.prompt_tokens + tokens,
    }


class _Shape:
    """How one endpoint words its answers: a whole completion, and the chunks of a stream."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, object: str, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}], **extra}  # fmt: skip

    def whole(self, completion: Completion) -> dict:
        if self.chat:
            choice = {"message": {"role": "assistant", "content": completion.text}}
        else:
            choice = {"text": completion.text, "logprobs": None}
        choice["finish_reason"] = completion.finish_reason
        kind = "chat.completion" if self.chat else "text_completion"
        return self._envelope(kind, choice, usage=_usage(completion))

    def chunk(
        self, text: str | None = None, *, finish: str | None = None, role: bool = False, **extra
    ) -> str:
        if self.chat:
            delta = (
                {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            )
            choice, kind = {"delta": delta}, "chat.completion.chunk"
        else:
            choice, kind = {"text": text or "", "logprobs": None}, "text_completion"
        return _event(self._envelope(kind, {**choice, "finish_reason": finish}, **extra))


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(server: _Server, completion: Completion, shape: _Shape) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield shape.chunk(role=True)
        async for piece in completion.deltas():
            yield shape.chunk(piece)
        if (error := _failure(completion, server.settings.request_timeout)) is not None:
            server.metrics.errors.labels(error.code or error.type).inc()
            yield _event({"error": json.loads(error.response().body)["error"]})
        else:
            yield shape.chunk(finish=completion.finish_reason, usage=_usage(completion))
        yield _event("[DONE]")
    finally:
        completion.cancel()  # a client gone mid-stream: stop generating; its session on the peers closes


async def _whole(request: Request, completion: Completion) -> None:
    """Waits for the completion; stops it if the client disconnects meanwhile."""
    waiting = asyncio.ensure_future(completion.result())
    try:
        while not waiting.done():
            await asyncio.wait([waiting], timeout=0.5)
            if not waiting.done() and await request.is_disconnected():
                completion.cancel()
        await waiting
    finally:
        completion.cancel()


def create_app(model, tokenizer, settings: ApiSettings, *, monitor=None) -> FastAPI:
    """The API of ``model`` (a ``DistributedModelForCausalLM``); ``monitor``: a ``SwarmMonitor`` whose page is
    served at ``/``."""
    metrics = ApiMetrics()
    server = _Server(model, tokenizer, settings, metrics)
    app = FastAPI(title="swarm-peer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        metrics.errors.labels(error.code or error.type).inc()
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"] if part != "body")
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else first["msg"]
        return await _api_error(
            request, ApiError(400, f"{where}: {message}" if where else message, param=where)
        )

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception):
        logger.error("A request failed", exc_info=error)
        return await _api_error(request, ApiError(500, f"internal error: {type(error).__name__}",
                                                  type="server_error", code="internal_error"))  # fmt: skip

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        return await _api_error(request, ApiError(error.status_code, str(error.detail), code=None))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_kb * 1024):
            response = ApiError(413, f"the body is over {settings.max_body_kb} KiB (--max-body-kb)",
                                code="request_too_large").response()  # fmt: skip
            metrics.errors.labels("request_too_large").inc()
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": settings.name, "object": "model", "created": 0, "owned_by": "swarm-peer", "root": model.model_id}
        ]}  # fmt: skip

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        server.check_model(name)
        return {"id": settings.name, "object": "model", "created": 0, "owned_by": "swarm-peer"}

    async def _answer(request: Request, body: CompletionRequest | ChatRequest, chat: bool):
        completion = await server.start(body)
        shape = _Shape(chat, settings.name)
        if body.stream:
            return StreamingResponse(_stream(server, completion, shape), media_type="text/event-stream")
        await _whole(request, completion)
        if (error := _failure(completion, settings.request_timeout)) is not None:
            raise error
        return shape.whole(completion)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await _answer(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatRequest):
        return await _answer(request, body, chat=True)

    @app.get("/health")
    async def health():
        try:
            missing = await server.coverage.missing()
        except TimeoutError:
            return JSONResponse({"status": "unknown", "reason": "the DHT did not answer"}, status_code=503)
        body = {"model": settings.name, "model_id": model.model_id, "blocks": model.checkpoint.num_blocks}
        if missing:
            return JSONResponse({"status": "unhealthy", **body, "missing": [list(r) for r in missing]}, 503)
        return {"status": "ok", **body}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if monitor is not None:
        from swarm_peer.api.monitor import monitor_router

        app.include_router(monitor_router(monitor))
    return app
