"""Response bodies of the HTTP API, as pydantic models: the documented, versioned surface.

The handlers in :mod:`megacore.inference.server` build their responses as plain dicts
(fast, and the error paths need no model); these models describe those dicts for the
OpenAPI document that FastAPI produces (``GET /openapi.json``), which
``tools/api_snapshot.py`` pins in ``tests/snapshots/http.json``. A test validates real
responses against them with ``extra="forbid"``, so a field added to, renamed in or
removed from a response without changing its model here fails, and changing a model
fails the HTTP snapshot until the version and CHANGELOG follow.

Streaming (``"stream": true``) answers with server-sent events: each event is one line
``data: <JSON>`` and a blank line; the JSON is a :class:`CompletionStreamChunk` (or an
:class:`ErrorResponse` if generation fails midway), and the stream ends with the literal
event ``data: [DONE]`` (:data:`STREAM_END`).
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional

from pydantic import BaseModel, ConfigDict

__all__ = ["ErrorDetail", "ErrorResponse", "MegatronGenerateResponse", "CompletionLogprobs",
           "CompletionChoice", "CompletionUsage", "CompletionResponse", "CompletionStreamChunk",
           "HealthResponse", "ModelCard", "ModelList", "ChatTokenLogprob", "ChatContentLogprob",
           "ChatLogprobs", "ChatMessageOut", "ChatChoice", "ChatCompletionResponse",
           "ChatDelta", "ChatStreamChoice", "ChatCompletionStreamChunk", "STREAM_END",
           "STREAM_FORMAT"]

_EXACT = ConfigDict(extra="forbid")

STREAM_END = "data: [DONE]"
"""The last server-sent event of every stream."""

STREAM_FORMAT = {
    "media_type": "text/event-stream",
    "event": "data: <JSON>\\n\\n",
    "chunk_schema": "CompletionStreamChunk",
    "error_schema": "ErrorResponse",
    "end": STREAM_END,
}
"""How a streamed response is framed (pinned in the HTTP snapshot with the schemas)."""


class ErrorDetail(BaseModel):
    model_config = _EXACT
    message: str
    type: str
    param: Optional[str]


class ErrorResponse(BaseModel):
    """Every non-2xx answer: ``{"error": {"message", "type", "param"}}``."""

    model_config = _EXACT
    error: ErrorDetail


class MegatronGenerateResponse(BaseModel):
    """``PUT /api``: one entry per prompt in each list (Megatron's field names)."""

    model_config = _EXACT
    text: List[str]
    segments: List[List[str]]
    logprobs: Optional[List[List[float]]]
    tokens: List[List[int]]
    finish_reason: List[str]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy ``logprobs`` object; the first echoed prompt token has ``null``."""

    model_config = _EXACT
    tokens: List[str]
    token_logprobs: List[Optional[float]]
    top_logprobs: List[Optional[Dict[str, float]]]
    text_offset: List[int]


class CompletionChoice(BaseModel):
    model_config = _EXACT
    text: str
    index: int
    logprobs: Optional[CompletionLogprobs]
    finish_reason: Optional[str]


class CompletionUsage(BaseModel):
    model_config = _EXACT
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionStreamChunk(BaseModel):
    """One server-sent event of a streamed completion (no ``usage``)."""

    model_config = _EXACT
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: List[CompletionChoice]


class CompletionResponse(CompletionStreamChunk):
    """``POST /v1/completions`` without streaming: a chunk's fields and ``usage``."""

    usage: CompletionUsage


class HealthResponse(BaseModel):
    model_config = _EXACT
    status: str
    queued: int
    batches: int
    requests_in_progress: int


class ChatTokenLogprob(BaseModel):
    model_config = _EXACT
    token: str
    logprob: float
    bytes: List[int]


class ChatContentLogprob(ChatTokenLogprob):
    top_logprobs: List[ChatTokenLogprob]


class ChatLogprobs(BaseModel):
    model_config = _EXACT
    content: List[ChatContentLogprob]


class ChatMessageOut(BaseModel):
    model_config = _EXACT
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    model_config = _EXACT
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[str]


class ChatCompletionResponse(BaseModel):
    """``POST /v1/chat/completions`` without streaming."""

    model_config = _EXACT
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: List[ChatChoice]
    usage: CompletionUsage


class ChatDelta(BaseModel):
    model_config = _EXACT
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatStreamChoice(BaseModel):
    model_config = _EXACT
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: Optional[str]


class ChatCompletionStreamChunk(BaseModel):
    """One server-sent event of a streamed chat completion: the first per choice carries
    ``delta.role``, the last an empty delta and the ``finish_reason``."""

    model_config = _EXACT
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: List[ChatStreamChoice]


class ModelCard(BaseModel):
    model_config = _EXACT
    id: str
    object: Literal["model"]
    owned_by: str


class ModelList(BaseModel):
    model_config = _EXACT
    object: Literal["list"]
    data: List[ModelCard]
