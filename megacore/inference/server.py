"""HTTP text-generation server (FastAPI + uvicorn): the only module importing a web framework.

Endpoints:

* ``PUT /api`` — Megatron's API: ``{prompts, tokens_to_generate, temperature, top_k,
  top_p, top_p_decay, top_p_bound, logprobs, add_BOS, stop_on_eol, stop_on_double_eol,
  stop_token, random_seed, no_log}`` -> ``{text, segments, logprobs, tokens,
  finish_reason}`` (see ``megacore.inference.text_api``).
* ``POST /v1/completions`` — OpenAI's completions: ``prompt`` (a string, a list of
  strings, a list of token ids or a list of token-id lists), ``max_tokens`` (0 with
  ``echo`` scores the prompt), ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``,
  ``logprobs`` (0-5 alternatives per token; with ``echo`` the prompt's tokens too, the
  first one ``null``), ``echo``, ``stream`` (server-sent events ending in
  ``data: [DONE]``), ``model``; ``suffix`` is refused (400).
* ``POST /v1/chat/completions`` — OpenAI's chat completions (plain and streamed): the
  ``messages`` are rendered with the chat template of the model's Hugging Face tokenizer
  (400 if it has none), ``max_tokens``/``max_completion_tokens``, ``temperature``,
  ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``/``top_logprobs``, ``stream``.
* ``GET /v1/models``, ``GET /health``.

Unlike Megatron's server, an error is never a 200: a body that is not JSON is 400, an
unknown, missing or ill-typed field is 422, a value the model cannot serve (too long,
empty prompt, too many prompts) is 400, a body over the size limit 413, a body that
does not arrive within ``request_read_timeout_s`` 408 (and the connection is closed), a
full queue or more than ``max_concurrent_requests`` requests in progress 503, an
internal failure 500 — always ``{"error": {"message", "type", "param"}}`` with ``param``
naming the field. Every accepted field changes the output as documented.

Tokenizing and detokenizing run in worker threads, so a long prompt never stalls the
event loop (``/health`` answers meanwhile). A client that disconnects (streaming or
waiting for its answer) cancels its generation, logged at info.

Requests are queued and batched by :class:`~megacore.inference.GenerationService`; the
app only validates, tokenizes and formats. :func:`run_text_generation_server` runs the
whole thing on every rank (rank 0 serves HTTP, the others follow).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import time
import uuid
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Union

import torch.distributed as dist
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from megacore.inference import api_schema as schema
from megacore.inference.generation_service import (
    GenerationCancelled,
    GenerationService,
    QueueFullError,
    ServiceConfig,
    follow_requests,
)
from megacore.inference.inference_request import (
    MAX_TOP_LOGPROBS,
    GenerationRequest,
    GenerationResult,
)
from megacore.inference.text_api import (
    ApiError,
    StreamTextTracker,
    chat_choice,
    chat_prompt_tokens,
    chat_requests,
    choice_text,
    completion_choice,
    completion_requests,
    megatron_requests,
    megatron_response,
    prompt_token_lists,
    stop_list,
)
from megacore.inference.text_generation_controller import TextGenerationController
from megacore.package_info import __version__

__all__ = ["ServerConfig", "MegatronGenerateParams", "CompletionParams", "ChatMessage",
           "ChatContentPart", "ChatCompletionParams", "create_app",
           "run_text_generation_server"]

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1
_DISCONNECT_POLL_S = 0.05  # how often a waiting request checks that its client is there


@dataclasses.dataclass
class ServerConfig:
    """HTTP settings."""

    host: str = "127.0.0.1"
    """Address to bind; the loopback default keeps the server private to this machine."""

    port: int = 5000
    """TCP port (0: any free port)."""

    max_request_bytes: int = 1 << 20
    """Largest accepted request body; larger bodies get 413 before being parsed."""

    max_tokens_to_generate: int = 4096
    """Largest ``tokens_to_generate`` / ``max_tokens`` of one request."""

    model_name: str = "megacore-gpt"
    """Name reported by ``/v1/models`` and accepted in the ``model`` field."""

    max_concurrent_requests: int = 64
    """Generation requests in progress at once (a stream counts until it ends); more get
    503 at once. Bounds what slow clients can pile up. 0: no limit."""

    request_read_timeout_s: float = 30.0
    """A request body must arrive completely within this many seconds; a stalled upload
    gets 408 and its connection is closed."""

    def __post_init__(self):
        if self.max_concurrent_requests < 0:
            raise ValueError(f"max_concurrent_requests must be >= 0, got "
                             f"{self.max_concurrent_requests}")
        if not self.request_read_timeout_s > 0:
            raise ValueError(f"request_read_timeout_s must be > 0, got "
                             f"{self.request_read_timeout_s}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.max_tokens_to_generate < 1:
            raise ValueError(f"max_tokens_to_generate must be >= 1, got "
                             f"{self.max_tokens_to_generate}")


# -- request bodies ------------------------------------------------------------------------
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class MegatronGenerateParams(BaseModel):
    """Body of ``PUT /api`` (Megatron's names and defaults)."""

    model_config = _STRICT

    prompts: List[str] = Field(min_length=1)
    tokens_to_generate: int = Field(64, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0, le=2**31 - 1)
    top_p: float = Field(0.0, ge=0.0, le=1.0)
    top_p_decay: float = Field(0.0, ge=0.0, le=1.0)
    top_p_bound: float = Field(0.0, ge=0.0, le=1.0)
    logprobs: bool = False
    add_BOS: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    stop_token: Optional[int] = Field(None, ge=0)
    random_seed: int = Field(-1, ge=-1, le=_MAX_SEED)
    no_log: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by the two OpenAI bodies."""

    model_config = _STRICT

    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=_MAX_SEED - 1024)
    stream: bool = False


class CompletionParams(_SamplingFields):
    """Body of ``POST /v1/completions`` (OpenAI's names and defaults). ``prompt`` takes
    each of OpenAI's forms: a string, a list of strings, a list of token ids, or a list
    of token-id lists (what lm-evaluation-harness sends by default)."""

    prompt: Union[str, List[str], List[int], List[List[int]]]
    max_tokens: int = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None


class ChatContentPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = _STRICT

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[ChatContentPart]]
    name: Optional[str] = None


class ChatCompletionParams(_SamplingFields):
    """Body of ``POST /v1/chat/completions`` (OpenAI's names and defaults).
    ``max_completion_tokens`` is OpenAI's newer name of ``max_tokens``; without either a
    reply may fill the model's context (up to the server's ``max_tokens_to_generate``)."""

    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


# -- errors ----------------------------------------------------------------------------------
def _error(status: int, message: str, param: Optional[str],
           kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param}})


def _validation_error(error: ValidationError) -> JSONResponse:
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = loc[0] if loc else "body"
    where = ".".join(loc) if loc else "body"
    return _error(422, f"{where}: {first.get('msg', 'invalid value')}", param)


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


async def _read_json(request: Request, limit: int, timeout_s: float) -> Any:
    """The parsed body; raises ApiError (400), _BodyTooLarge (413) or _BodyTimeout (the
    whole body did not arrive within ``timeout_s``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge()
    body = bytearray()
    deadline = time.monotonic() + timeout_s
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), deadline - time.monotonic())
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError as error:
            raise _BodyTimeout() from error
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge()
    try:
        return json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise ApiError(f"request body is not valid JSON: {error}", "body") from error


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_limits(tokens: int, n_rows: int, param: str, service: GenerationService,
                  config: ServerConfig, rows_param: str) -> None:
    if tokens > config.max_tokens_to_generate:
        raise ApiError(f"{param} {tokens} exceeds this server's limit "
                       f"{config.max_tokens_to_generate}", param)
    if n_rows > service.max_batch_size:
        raise ApiError(f"the request needs {n_rows} sequences; this server runs at most "
                       f"{service.max_batch_size} per request (--max-batch-size)", rows_param)


def _check_openai_fields(params: _SamplingFields, config: ServerConfig) -> None:
    if params.model is not None and params.model != config.model_name:
        raise ApiError(f"model {params.model!r} is not served here (this server "
                       f"serves {config.model_name!r})", "model", 404)
    stops = stop_list(params.stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError("stop takes up to 4 non-empty strings", "stop")
    if params.stream and params.logprobs not in (None, False):
        raise ApiError("logprobs cannot be combined with stream", "logprobs")


# -- concurrency -----------------------------------------------------------------------------
class _Slots:
    """Counts requests in flight (a stream until it ends); None: no limit."""

    def __init__(self, limit: Optional[int]):
        self.limit, self.used = limit, 0

    def acquire(self) -> bool:  # called on the event loop only: no lock needed
        if self.limit is not None and self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        self.used -= 1


class _EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` callbacks run however the stream ends; a
    client that goes away is logged at info, never as an error."""

    def __init__(self, body, on_close: List[Callable[[], None]]):
        super().__init__(body, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # how Starlette reports it under ASGI 2.4 servers
            logger.info("client disconnected from a stream")
        finally:
            for callback in self.on_close:
                callback()


# -- the app ---------------------------------------------------------------------------------
def _guarded(handler):
    """Turn every failure of ``handler`` into a JSON error response (never a crash), and
    answer 503 beyond ``max_concurrent_requests``."""
    async def respond(self, request: Request):
        try:
            return await handler(self, request)
        except _BodyTooLarge:
            return _error(413, f"request body exceeds {self.config.max_request_bytes} bytes",
                          "body")
        except _BodyTimeout:
            return _error(408, f"the request body did not arrive within "
                          f"{self.config.request_read_timeout_s:g} s", "body",
                          headers={"Connection": "close"})
        except ValidationError as error:
            return _validation_error(error)
        except ApiError as error:
            return _error(error.status, error.message, error.param)
        except QueueFullError as error:
            return _error(503, str(error), None, "overloaded")
        except GenerationCancelled:  # its client went away: nobody reads this answer
            return _error(499, "the client closed the request", None, "cancelled")
        except Exception as error:  # noqa: BLE001 - any other failure is ours: 500
            logger.exception("request failed")
            return _error(500, f"internal error: {type(error).__name__}: {error}", None,
                          "internal_error")

    async def endpoint(self, request: Request):
        if not self.slots.acquire():
            return _error(503, f"{self.slots.limit} requests are in progress (the limit, "
                          "--max-concurrent-requests); retry later", None, "overloaded")
        response = None
        try:
            response = await respond(self, request)
            return response
        finally:
            if isinstance(response, _EventStream):
                response.on_close.append(self.slots.release)  # held until the stream ends
            else:
                self.slots.release()

    endpoint.__name__ = handler.__name__
    return endpoint


class _Handlers:
    """The endpoints, bound to one service, tokenizer and config."""

    def __init__(self, service: GenerationService, tokenizer, config: ServerConfig):
        self.service, self.tokenizer, self.config = service, tokenizer, config
        self.validate = service.controller.validate_request
        self.slots = _Slots(config.max_concurrent_requests or None)

    async def _parse(self, request: Request, model):
        body = await _read_json(request, self.config.max_request_bytes,
                                self.config.request_read_timeout_s)
        return model.model_validate(body)

    async def _run(self, requests, request: Request):
        """Results of ``requests``; a client that disconnects meanwhile cancels them."""
        future = self.service.submit(requests)
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, future))
        try:
            return await asyncio.wrap_future(future)
        finally:
            watcher.cancel()

    async def _cancel_on_disconnect(self, request: Request, future) -> None:
        while not future.done():
            if await request.is_disconnected():
                if self.service.cancel(future):
                    logger.info("client went away: cancelled the generation of its request")
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    def _header(self, kind: str, prefix: str) -> Dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": self.config.model_name}

    @_guarded
    async def megatron_api(self, request: Request):
        params = await self._parse(request, MegatronGenerateParams)
        _check_limits(params.tokens_to_generate, len(params.prompts), "tokens_to_generate",
                      self.service, self.config, "prompts")
        # Tokenizing a long prompt takes a while: off the event loop, which keeps serving.
        requests = await asyncio.to_thread(megatron_requests, params, self.tokenizer,
                                           self.validate)
        if not params.no_log:
            logger.info("PUT /api: %d prompts, %d tokens", len(requests),
                        params.tokens_to_generate)
        results = await self._run(requests, request)
        return JSONResponse(await asyncio.to_thread(megatron_response, results,
                                                    self.tokenizer, params.logprobs))

    @_guarded
    async def completions(self, request: Request):
        params = await self._parse(request, CompletionParams)
        _check_openai_fields(params, self.config)
        if params.suffix:
            raise ApiError("suffix is not supported: this server completes prompts only "
                           "at their end", "suffix")
        prompts = await asyncio.to_thread(prompt_token_lists, params.prompt, self.tokenizer)
        _check_limits(params.max_tokens, len(prompts) * params.n, "max_tokens", self.service,
                      self.config, "n")
        requests = completion_requests(params, self.tokenizer, self.validate, prompts)
        header = self._header("text_completion", "cmpl")
        if params.stream:
            return self._stream(requests, header, _CompletionChunks(params, self.tokenizer))
        results = await self._run(requests, request)
        choices = await asyncio.to_thread(
            lambda: [completion_choice(r, i, params, self.tokenizer)
                     for i, r in enumerate(results)])
        return JSONResponse({**header, "choices": choices,
                             "usage": _usage(results[::params.n], results)})

    @_guarded
    async def chat_completions(self, request: Request):
        params = await self._parse(request, ChatCompletionParams)
        _check_openai_fields(params, self.config)
        if params.top_logprobs and not params.logprobs:
            raise ApiError("top_logprobs needs logprobs: true", "top_logprobs")
        tokens = await asyncio.to_thread(chat_prompt_tokens, params.messages, self.tokenizer)
        max_tokens = _chat_max_tokens(params, len(tokens), self.service, self.config)
        _check_limits(max_tokens, params.n, "max_tokens", self.service, self.config, "n")
        requests = chat_requests(params, tokens, max_tokens, self.tokenizer, self.validate)
        header = self._header("chat.completion", "chatcmpl")
        if params.stream:
            header["object"] = "chat.completion.chunk"
            return self._stream(requests, header, _ChatChunks(params, self.tokenizer))
        results = await self._run(requests, request)
        choices = await asyncio.to_thread(
            lambda: [chat_choice(r, i, params, self.tokenizer) for i, r in enumerate(results)])
        return JSONResponse({**header, "choices": choices,
                             "usage": _usage(results[:1], results)})

    def _stream(self, requests, header: Dict[str, Any], chunks: "_Chunks") -> _EventStream:
        """Server-sent events: an opening chunk per choice, one chunk per text delta, a
        final chunk per choice with its ``finish_reason``, then ``data: [DONE]``. A client
        that goes away cancels the generation (its rows stop at the next step)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stops = stop_list(chunks.params.stop)
        trackers = [StreamTextTracker(self.tokenizer, stops) for _ in requests]

        def post(item) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                pass

        future = self.service.submit(requests, lambda row, token, lp: post(("token", row,
                                                                            token)))
        future.add_done_callback(lambda f: post(("done", None, None)))

        def event(body: Dict[str, Any]) -> str:
            return f"data: {json.dumps({**header, **body})}\n\n"

        async def body():
            for i, request in enumerate(requests):
                opening = chunks.opening(i, request)
                if opening is not None:
                    yield event(opening)
            while True:
                kind, row, token = await events.get()
                if kind == "done":
                    break
                delta = trackers[row].push(token)
                if delta:
                    yield event(chunks.delta(row, delta, None))
            if future.exception() is not None:
                error = future.exception()
                yield "data: " + json.dumps({"error": {
                    "message": f"internal error: {error}", "type": "internal_error",
                    "param": None}}) + "\n\n"
            else:
                for i, result in enumerate(future.result()):
                    rest = trackers[i].finish(chunks.final_text(result))
                    if rest:
                        yield event(chunks.delta(i, rest, None))
                    yield event(chunks.delta(i, None, result.finish_reason))
            yield "data: [DONE]\n\n"

        def cancel() -> None:
            if self.service.cancel(future):
                logger.info("client went away: cancelled the generation of %d sequences",
                            len(requests))

        return _EventStream(body(), on_close=[cancel])

    async def health(self):
        return {"status": "ok", "queued": self.service.queued(),
                "batches": self.service.batches_run,
                "requests_in_progress": self.slots.used}

    async def models(self):
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                            "owned_by": "megacore"}]}


def _usage(prompts: Sequence[GenerationResult], results: Sequence[GenerationResult]):
    prompt_tokens = sum(len(r.prompt_tokens) for r in prompts)
    generated = sum(len(r.generated_tokens) for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}


def _chat_max_tokens(params: ChatCompletionParams, prompt_length: int,
                     service: GenerationService, config: ServerConfig) -> int:
    for value in (params.max_completion_tokens, params.max_tokens):
        if value is not None:
            return value
    room = service.controller.max_sequence_length - prompt_length
    return max(0, min(room, config.max_tokens_to_generate))


class _Chunks:
    """How one API spells its stream chunks."""

    def __init__(self, params, tokenizer):
        self.params, self.tokenizer = params, tokenizer

    def opening(self, index: int, request: GenerationRequest) -> Optional[Dict[str, Any]]:
        raise NotImplementedError

    def delta(self, index: int, text: Optional[str], finish: Optional[str]) -> Dict[str, Any]:
        raise NotImplementedError

    def final_text(self, result: GenerationResult) -> str:
        return choice_text(result, self.params.stop, self.tokenizer)[0]


class _CompletionChunks(_Chunks):
    def opening(self, index, request):
        if not self.params.echo:
            return None
        return self.delta(index, self.tokenizer.detokenize(request.prompt_tokens), None)

    def delta(self, index, text, finish):
        return {"choices": [{"text": text or "", "index": index, "logprobs": None,
                             "finish_reason": finish}]}


class _ChatChunks(_Chunks):
    def opening(self, index, request):
        return {"choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}]}

    def delta(self, index, text, finish):
        return {"choices": [{"index": index, "delta": {} if text is None else {"content": text},
                             "logprobs": None, "finish_reason": finish}]}


def create_app(service: GenerationService, tokenizer,
               config: Optional[ServerConfig] = None) -> FastAPI:
    """The FastAPI app serving ``service`` (which must be started)."""
    handlers = _Handlers(service, tokenizer, config or ServerConfig())
    app = FastAPI(title="megacore text generation", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url="/openapi.json")
    _route(app, "/api", "PUT", handlers.megatron_api, MegatronGenerateParams,
           schema.MegatronGenerateResponse)
    _route(app, "/v1/completions", "POST", handlers.completions, CompletionParams,
           schema.CompletionResponse, stream=schema.CompletionStreamChunk)
    _route(app, "/v1/chat/completions", "POST", handlers.chat_completions,
           ChatCompletionParams, schema.ChatCompletionResponse,
           stream=schema.ChatCompletionStreamChunk)
    _route(app, "/health", "GET", handlers.health, None, schema.HealthResponse)
    _route(app, "/v1/models", "GET", handlers.models, None, schema.ModelList)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # Unknown paths (404) and wrong methods (405), in the same error format.
        return _error(error.status_code, f"{request.method} {request.url.path}: "
                      f"{error.detail}", None)

    return app


def _route(app: FastAPI, path: str, method: str, endpoint, body, response,
           stream=None) -> None:
    """Add a route; its request body and responses go into the OpenAPI document.

    The handlers read and validate the body themselves (to answer every error in one
    format), so FastAPI is told the body schema through ``openapi_extra`` instead of a
    typed parameter.
    """
    extra: Dict[str, Any] = {"responses": {"default": {
        "description": "any error", "content": {"application/json": {
            "schema": schema.ErrorResponse.model_json_schema()}}}}}
    if body is not None:
        extra["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": body.model_json_schema()}}}
    if stream is not None:
        extra["responses"]["200"] = {"description": "JSON, or with stream=true "
                                     "server-sent events", "content": {"text/event-stream": {
                                         "schema": stream.model_json_schema(),
                                         "x-stream-format": schema.STREAM_FORMAT}}}
    app.add_api_route(path, endpoint, methods=[method], response_model=response,
                      openapi_extra=extra)




# -- running on every rank ---------------------------------------------------------------
def run_text_generation_server(controller: TextGenerationController, tokenizer,
                               config: Optional[ServerConfig] = None,
                               service_config: Optional[ServiceConfig] = None) -> None:
    """Serve on global rank 0 until interrupted; other ranks follow rank 0's batches.

    Call on every rank with the same controller settings.
    """
    config = config or ServerConfig()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        follow_requests(controller)
        return
    # Bind before announcing: "serving on" is printed only once a client can connect, and
    # a port in use fails here, before the model waits for requests that cannot come.
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.create_server((config.host, config.port), family=family)
    service = GenerationService(controller, service_config).start()
    try:
        app = create_app(service, tokenizer, config)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", limit_concurrency=None,
                                               timeout_keep_alive=5))
        host, port = sock.getsockname()[:2]
        logger.info("serving on http://%s:%s", host, port)
        server.run(sockets=[sock])
    finally:
        service.stop()
        sock.close()
