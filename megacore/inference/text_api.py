"""Text in, text out: the two HTTP APIs' parameters as generation requests and back.

Framework-free translation used by ``megacore.inference.server``:

* Megatron's ``PUT /api``: :func:`megatron_requests` / :func:`megatron_response`.
  ``text`` is prompt + generation (including a stop token or newline, as Megatron
  returns it), ``segments`` the text of every token, ``logprobs`` the log probability of
  every token after the first (prompt and generated).
* OpenAI-style ``POST /v1/completions``: :func:`completion_requests` /
  :func:`completion_choice`; a stop string and what follows are cut from the text, as
  OpenAI does. :class:`StreamTextTracker` turns streamed tokens into text deltas that
  never show part of a stop string.
* OpenAI-style ``POST /v1/chat/completions``: :func:`chat_prompt` renders the messages
  with the tokenizer's chat template (a Hugging Face tokenizer carried by a converted
  checkpoint) and tokenizes the result without adding special tokens again; generation
  then runs as a completion of that prompt, and :func:`chat_choice` wraps its text as
  the assistant's message.

Parameters arrive as validated objects (the server's pydantic models; anything with
the attributes works). Errors are :class:`ApiError` naming the offending field.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from megacore.inference.inference_request import (
    GenerationRequest,
    GenerationResult,
    SequenceTooLongError,
)
from megacore.inference.sampling import SamplingParams

__all__ = ["ApiError", "megatron_requests", "megatron_response", "completion_requests",
           "completion_choice", "StreamTextTracker", "cut_at_stop", "chat_prompt",
           "chat_requests", "chat_choice"]


class ApiError(ValueError):
    """A request the API rejects: HTTP ``status`` and the offending field ``param``."""

    def __init__(self, message: str, param: Optional[str], status: int = 400):
        super().__init__(message)
        self.message, self.param, self.status = message, param, status


def _tokenize(tokenizer, text: str, param: str) -> List[int]:
    try:
        return list(tokenizer.tokenize(text))
    except Exception as error:  # noqa: BLE001 - any tokenizer failure is the input's fault
        raise ApiError(f"{param}: cannot tokenize the text: {error}", param) from error


def _checked(request_factory, validate, length_param: str,
             prompt_param: str) -> GenerationRequest:
    try:
        request = request_factory()
        validate(request)
    except SequenceTooLongError as error:
        raise ApiError(str(error), length_param) from error
    except ValueError as error:  # e.g. token ids outside the model's vocabulary
        raise ApiError(f"{prompt_param}: {error}", prompt_param) from error
    return request


def _sampling(**kwargs) -> SamplingParams:
    try:
        return SamplingParams(**kwargs)
    except ValueError as error:  # messages start with the field name
        raise ApiError(str(error), str(error).split()[0]) from error


# -- Megatron PUT /api --------------------------------------------------------------------
def megatron_requests(params, tokenizer, validate) -> List[GenerationRequest]:
    """One request per prompt of a ``PUT /api`` body.

    Args:
        params: ``prompts``, ``tokens_to_generate``, ``temperature``, ``top_k``, ``top_p``,
            ``top_p_decay``, ``top_p_bound``, ``logprobs``, ``add_BOS``, ``stop_on_eol``,
            ``stop_on_double_eol``, ``stop_token``, ``random_seed``.
        tokenizer: ``tokenize``, ``detokenize``, ``eod``.
        validate: raises for a request the model cannot run (length, token ids).
    """
    sampling = _sampling(
        temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        top_p_decay=params.top_p_decay, top_p_bound=params.top_p_bound,
        seed=None if params.random_seed < 0 else params.random_seed)
    stop_strings = tuple(s for s, on in (("\n", params.stop_on_eol),
                                         ("\n\n", params.stop_on_double_eol)) if on)
    stop_token = tokenizer.eod if params.stop_token is None else params.stop_token
    if not 0 <= stop_token < tokenizer.vocab_size:
        raise ApiError(f"stop_token {stop_token} is outside the vocabulary "
                       f"[0, {tokenizer.vocab_size})", "stop_token")
    requests = []
    for index, prompt in enumerate(params.prompts):
        tokens = _tokenize(tokenizer, prompt, "prompts") if prompt else []
        if params.add_BOS:
            tokens = [tokenizer.eod] + tokens
        if not tokens:
            raise ApiError(f"prompts[{index}] is empty; send add_BOS=true to generate from "
                           "nothing", "prompts")
        requests.append(_checked(
            lambda: GenerationRequest(tokens, params.tokens_to_generate, sampling,
                                      stop_token_ids=(stop_token,), stop_strings=stop_strings,
                                      return_prompt_logprobs=params.logprobs),
            validate, "tokens_to_generate", "prompts"))
    return requests


def megatron_response(results: Sequence[GenerationResult], tokenizer,
                      logprobs: bool) -> Dict[str, Any]:
    """``{"text", "segments", "logprobs", "tokens", "finish_reason"}``, one entry per prompt."""
    text, segments, lps = [], [], []
    for result in results:
        tokens = result.tokens
        text.append(tokenizer.detokenize(tokens))
        segments.append([tokenizer.detokenize([t]) for t in tokens])
        lps.append(list(result.prompt_logprobs or []) + list(result.generated_logprobs))
    return {"text": text, "segments": segments, "logprobs": lps if logprobs else None,
            "tokens": [r.tokens for r in results],
            "finish_reason": [r.finish_reason for r in results]}


# -- OpenAI-style POST /v1/completions ------------------------------------------------------
def stop_list(stop) -> List[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def completion_requests(params, tokenizer, validate) -> List[GenerationRequest]:
    """``n`` requests per prompt (prompt-major) of a completions body: ``prompt``,
    ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``,
    ``echo``. Choice ``j`` of a seeded request uses seed ``seed + j``."""
    prompts = [params.prompt] if isinstance(params.prompt, str) else list(params.prompt)
    if not prompts:
        raise ApiError("prompt must hold at least one string", "prompt")
    stops = stop_list(params.stop)
    top_logprobs = params.logprobs or 0
    requests = []
    for index, prompt in enumerate(prompts):
        tokens = _tokenize(tokenizer, prompt, "prompt") if prompt else []
        if not tokens:
            raise ApiError(f"prompt[{index}] is empty", "prompt")
        for j in range(params.n):
            seed = None if params.seed is None else params.seed + j
            sampling = _sampling(temperature=params.temperature, top_p=params.top_p, seed=seed)
            requests.append(_checked(
                lambda: GenerationRequest(
                    tokens, params.max_tokens, sampling, stop_token_ids=(tokenizer.eod,),
                    stop_strings=tuple(stops),
                    return_prompt_logprobs=params.echo and params.logprobs is not None,
                    top_logprobs=top_logprobs),
                validate, "max_tokens", "prompt"))
    return requests


def chat_prompt(messages: Sequence[Dict[str, str]], tokenizer) -> List[int]:
    """Token ids of a conversation rendered by the tokenizer's chat template, ending with
    the assistant's turn (``add_generation_prompt``)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError("this model's tokenizer has no chat template: use /v1/completions",
                       "messages")
    for index, message in enumerate(messages):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"),
                                                                      str):
            raise ApiError(f"messages[{index}] needs string 'role' and 'content'", "messages")
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
    except ValueError as e:
        raise ApiError(str(e), "messages") from e
    tokens = tokenizer.tokenize(text, add_special_tokens=False)
    if not tokens:
        raise ApiError("the rendered conversation is empty", "messages")
    return tokens


def chat_requests(params, tokenizer, validate) -> List[GenerationRequest]:
    """``n`` requests for a chat body: ``messages``, ``max_tokens``, ``temperature``,
    ``top_p``, ``n``, ``stop``, ``seed`` (choice ``j`` of a seeded request: ``seed + j``)."""
    tokens = chat_prompt(params.messages, tokenizer)
    requests = []
    for j in range(params.n):
        seed = None if params.seed is None else params.seed + j
        sampling = _sampling(temperature=params.temperature, top_p=params.top_p, seed=seed)
        requests.append(_checked(
            lambda: GenerationRequest(tokens, params.max_tokens, sampling,
                                      stop_token_ids=(tokenizer.eod,),
                                      stop_strings=tuple(stop_list(params.stop))),
            validate, "max_tokens", "messages"))
    return requests


def chat_choice(choice: Dict[str, Any]) -> Dict[str, Any]:
    """A completion choice as a chat choice: the text is the assistant's message."""
    return {"index": choice["index"], "finish_reason": choice["finish_reason"],
            "message": {"role": "assistant", "content": choice["text"]}}


def cut_at_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest stop string in ``text`` (None if none occurs)."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def _logprobs_block(tokenizer, tokens: List[int], logprobs: List[Optional[float]],
                    tops: List[Optional[Dict[int, float]]], limit: int,
                    offset: int) -> Dict[str, Any]:
    """OpenAI's ``logprobs`` object for tokens whose text starts before ``limit``."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, top in zip(tokens, logprobs, tops):
        if offset >= limit:
            break
        piece = tokenizer.detokenize([token])
        out["tokens"].append(piece)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else
                                   {tokenizer.detokenize([t]): v for t, v in top.items()})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def completion_choice(result: GenerationResult, index: int, params,
                      tokenizer) -> Dict[str, Any]:
    """One entry of ``choices``: text (echoed prompt first if ``echo``), logprobs and
    ``finish_reason`` (``"stop"`` for a stop string or the end-of-document token)."""
    completion = tokenizer.detokenize(result.generated_tokens)
    cut = cut_at_stop(completion, stop_list(params.stop))
    if cut is not None:
        completion = completion[:cut]
    elif result.generated_tokens and result.generated_tokens[-1] == tokenizer.eod \
            and result.finish_reason == "stop":
        completion = tokenizer.detokenize(result.generated_tokens[:-1])
    prompt_text = tokenizer.detokenize(result.prompt_tokens) if params.echo else ""
    choice = {"text": prompt_text + completion, "index": index, "logprobs": None,
              "finish_reason": result.finish_reason}
    if params.logprobs is not None:
        tokens, lps, tops = [], [], []
        if params.echo:
            tokens += result.prompt_tokens
            lps += [None] + list(result.prompt_logprobs)
            tops += [None] + list(result.prompt_top_logprobs or [{}] * len(result.prompt_logprobs))
        tokens += result.generated_tokens
        lps += list(result.generated_logprobs)
        tops += list(result.generated_top_logprobs or [{}] * len(result.generated_tokens))
        choice["logprobs"] = _logprobs_block(tokenizer, tokens, lps, tops,
                                             len(prompt_text) + len(completion), 0)
    return choice


class StreamTextTracker:
    """Text deltas of one streamed choice.

    :meth:`push` takes each new token and returns the text that is now safe to send:
    text that could still become the start of a stop string, or that ends in an
    incomplete UTF-8 character, is held back until :meth:`finish`.
    """

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.tokens: List[int] = []
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self.tokenizer.detokenize(self.tokens)
        cut = cut_at_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = len(text) - hold
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(text[:safe])

    def finish(self, final_text: str) -> str:
        """The rest of the choice's final (already cut) text."""
        return self._emit(final_text)

    def _emit(self, text: str) -> str:
        delta = text[self.sent:] if len(text) > self.sent else ""
        self.sent = max(self.sent, len(text))
        return delta
