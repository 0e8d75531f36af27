"""HTTP text-generation server (FastAPI + uvicorn): the only module importing a web framework.

Endpoints:

* ``PUT /api`` — Megatron's API: ``{prompts, tokens_to_generate, temperature, top_k,
  top_p, top_p_decay, top_p_bound, logprobs, add_BOS, stop_on_eol, stop_on_double_eol,
  stop_token, random_seed, no_log}`` -> ``{text, segments, logprobs, tokens,
  finish_reason}`` (see ``megacore.inference.text_api``).
* ``POST /v1/completions`` — OpenAI-style: ``prompt``, ``max_tokens``, ``temperature``,
  ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``, ``echo``, ``stream`` (server-sent
  events ending in ``data: [DONE]``), ``model``.
* ``GET /v1/models``, ``GET /health``.

Unlike Megatron's server, an error is never a 200: a body that is not JSON is 400, an
unknown, missing or ill-typed field is 422, a value the model cannot serve (too long,
empty prompt, too many prompts) is 400, a body over the size limit 413, a full queue
503, an internal failure 500 — always ``{"error": {"message", "type", "param"}}`` with
``param`` naming the field. Every accepted field changes the output as documented.

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
from typing import Any, Dict, List, Optional, Union

import torch.distributed as dist
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from megacore.inference.generation_service import (
    GenerationService,
    QueueFullError,
    ServiceConfig,
    follow_requests,
)
from megacore.inference.text_api import (
    ApiError,
    StreamTextTracker,
    completion_choice,
    completion_requests,
    megatron_requests,
    megatron_response,
    stop_list,
)
from megacore.inference.text_generation_controller import TextGenerationController

__all__ = ["ServerConfig", "MegatronGenerateParams", "CompletionParams", "create_app",
           "run_text_generation_server"]

logger = logging.getLogger(__name__)

_MAX_SEED = 2**63 - 1


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

    def __post_init__(self):
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


class CompletionParams(BaseModel):
    """Body of ``POST /v1/completions`` (OpenAI's names and defaults)."""

    model_config = _STRICT

    prompt: Union[str, List[str]]
    model: Optional[str] = None
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=_MAX_SEED - 1024)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    stream: bool = False


# -- errors ----------------------------------------------------------------------------------
def _error(status: int, message: str, param: Optional[str],
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param}})


def _validation_error(error: ValidationError) -> JSONResponse:
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ())]
    param = loc[0] if loc else "body"
    where = ".".join(loc) if loc else "body"
    return _error(422, f"{where}: {first.get('msg', 'invalid value')}", param)


class _BodyTooLarge(Exception):
    pass


async def _read_json(request: Request, limit: int) -> Any:
    """The parsed body; raises ApiError (400) or _BodyTooLarge (413)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BodyTooLarge()
    body = bytearray()
    async for chunk in request.stream():
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
                  config: ServerConfig) -> None:
    if tokens > config.max_tokens_to_generate:
        raise ApiError(f"{param} {tokens} exceeds this server's limit "
                       f"{config.max_tokens_to_generate}", param)
    if n_rows > service.max_batch_size:
        raise ApiError(f"the request needs {n_rows} sequences; this server runs at most "
                       f"{service.max_batch_size} per request (--max-batch-size)",
                       "prompts" if param == "tokens_to_generate" else "n")


# -- the app ---------------------------------------------------------------------------------
def _guarded(handler):
    """Turn every failure of ``handler`` into a JSON error response (never a crash)."""
    async def endpoint(self, request: Request):
        try:
            return await handler(self, request)
        except _BodyTooLarge:
            return _error(413, f"request body exceeds {self.config.max_request_bytes} bytes",
                          "body")
        except ValidationError as error:
            return _validation_error(error)
        except ApiError as error:
            return _error(error.status, error.message, error.param)
        except QueueFullError as error:
            return _error(503, str(error), None, "overloaded")
        except Exception as error:  # noqa: BLE001 - any other failure is ours: 500
            logger.exception("request failed")
            return _error(500, f"internal error: {type(error).__name__}: {error}", None,
                          "internal_error")

    endpoint.__name__ = handler.__name__
    return endpoint


class _Handlers:
    """The endpoints, bound to one service, tokenizer and config."""

    def __init__(self, service: GenerationService, tokenizer, config: ServerConfig):
        self.service, self.tokenizer, self.config = service, tokenizer, config
        self.validate = service.controller.validate_request

    async def _parse(self, request: Request, model):
        return model.model_validate(await _read_json(request, self.config.max_request_bytes))

    async def _run(self, requests, on_token=None):
        return await asyncio.wrap_future(self.service.submit(requests, on_token))

    @_guarded
    async def megatron_api(self, request: Request):
        params = await self._parse(request, MegatronGenerateParams)
        _check_limits(params.tokens_to_generate, len(params.prompts), "tokens_to_generate",
                      self.service, self.config)
        requests = megatron_requests(params, self.tokenizer, self.validate)
        if not params.no_log:
            logger.info("PUT /api: %d prompts, %d tokens", len(requests),
                        params.tokens_to_generate)
        results = await self._run(requests)
        return JSONResponse(megatron_response(results, self.tokenizer, params.logprobs))

    @_guarded
    async def completions(self, request: Request):
        params = await self._parse(request, CompletionParams)
        self._check_completion(params)
        requests = completion_requests(params, self.tokenizer, self.validate)
        header = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                  "created": int(time.time()), "model": self.config.model_name}
        if params.stream:
            return _stream(self.service, requests, params, self.tokenizer, header)
        results = await self._run(requests)
        choices = [completion_choice(r, i, params, self.tokenizer)
                   for i, r in enumerate(results)]
        prompt_tokens = sum(len(r.prompt_tokens) for r in results[::params.n])
        generated = sum(len(r.generated_tokens) for r in results)
        return JSONResponse({**header, "choices": choices, "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated}})

    def _check_completion(self, params: CompletionParams) -> None:
        if params.model is not None and params.model != self.config.model_name:
            raise ApiError(f"model {params.model!r} is not served here (this server "
                           f"serves {self.config.model_name!r})", "model", 404)
        stops = stop_list(params.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError("stop takes up to 4 non-empty strings", "stop")
        if params.stream and params.logprobs is not None:
            raise ApiError("logprobs cannot be combined with stream", "logprobs")
        n_prompts = 1 if isinstance(params.prompt, str) else len(params.prompt)
        _check_limits(params.max_tokens, n_prompts * params.n, "max_tokens", self.service,
                      self.config)

    async def health(self):
        return {"status": "ok", "queued": self.service.queued(),
                "batches": self.service.batches_run}

    async def models(self):
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model",
                                            "owned_by": "megacore"}]}


def create_app(service: GenerationService, tokenizer,
               config: Optional[ServerConfig] = None) -> FastAPI:
    """The FastAPI app serving ``service`` (which must be started)."""
    handlers = _Handlers(service, tokenizer, config or ServerConfig())
    app = FastAPI(title="megacore text generation", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_api_route("/api", handlers.megatron_api, methods=["PUT"])
    app.add_api_route("/v1/completions", handlers.completions, methods=["POST"])
    app.add_api_route("/health", handlers.health, methods=["GET"])
    app.add_api_route("/v1/models", handlers.models, methods=["GET"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # Unknown paths (404) and wrong methods (405), in the same error format.
        return _error(error.status_code, f"{request.method} {request.url.path}: "
                      f"{error.detail}", None)

    return app


def _stream(service: GenerationService, requests, params, tokenizer,
            header: Dict[str, Any]) -> StreamingResponse:
    """Server-sent events: one chunk per text delta, a final chunk per choice with its
    ``finish_reason``, then ``data: [DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    trackers = [StreamTextTracker(tokenizer, stop_list(params.stop)) for _ in requests]

    def on_token(row: int, token: int, logprob: float) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("token", row, token))

    future = service.submit(requests, on_token)
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait,
                                                                 ("done", None, None)))

    def chunk(index: int, text: str, finish: Optional[str]) -> str:
        body = {**header, "choices": [{"text": text, "index": index, "logprobs": None,
                                       "finish_reason": finish}]}
        return f"data: {json.dumps(body)}\n\n"

    async def body():
        if params.echo:
            for i, request in enumerate(requests):
                yield chunk(i, tokenizer.detokenize(request.prompt_tokens), None)
        while True:
            kind, row, token = await events.get()
            if kind == "done":
                break
            delta = trackers[row].push(token)
            if delta:
                yield chunk(row, delta, None)
        error = future.exception()
        if error is not None:
            err = {"error": {"message": f"internal error: {error}", "type": "internal_error",
                             "param": None}}
            yield f"data: {json.dumps(err)}\n\n"
        else:
            for i, result in enumerate(future.result()):
                final = completion_choice(result, i, _WithoutEcho(params), tokenizer)
                rest = trackers[i].finish(final["text"])
                if rest:
                    yield chunk(i, rest, None)
                yield chunk(i, "", result.finish_reason)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


class _WithoutEcho:
    """View of the completion params with ``echo`` off (the prompt was streamed first)."""

    def __init__(self, params):
        self._params = params

    def __getattr__(self, name):
        return False if name == "echo" else getattr(self._params, name)


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
