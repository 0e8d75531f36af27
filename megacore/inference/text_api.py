"""Text in, text out: the two HTTP APIs' parameters as generation requests and back.

Framework-free translation used by ``megacore.inference.server``:

* Megatron's ``PUT /api``: :func:`megatron_requests` / :func:`megatron_response`.
  ``text`` is prompt + generation (including a stop token or newline, as Megatron
  returns it), ``segments`` the text of every token, ``logprobs`` the log probability of
  every token after the first (prompt and generated).
* OpenAI-style ``POST /v1/completions``: :func:`prompt_token_lists` /
  :func:`completion_requests` / :func:`completion_choice`; a stop string and what
  follows are cut from the text, as OpenAI does.
* OpenAI-style ``POST /v1/chat/completions``: :func:`chat_prompt_tokens` (the
  tokenizer's chat template) / :func:`chat_requests` / :func:`chat_choice`.

:class:`StreamTextTracker` turns streamed tokens into text deltas that never show part
of a stop string.

Parameters arrive as validated objects (the server's pydantic models; anything with
the attributes works). Errors are :class:`ApiError` naming the offending field.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from megacore.inference.inference_request import (
    GenerationRequest,
    GenerationResult,
    SequenceTooLongError,
)
from megacore.inference.sampling import SamplingParams

__all__ = ["ApiError", "megatron_requests", "megatron_response", "prompt_token_lists",
           "completion_requests", "completion_choice", "choice_text", "chat_prompt_tokens",
           "chat_requests", "chat_choice", "StreamTextTracker", "cut_at_stop"]


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


def prompt_token_lists(prompt, tokenizer) -> List[List[int]]:
    """The prompts of a completions body as token ids, in any of OpenAI's four forms: a
    string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError("prompt must hold at least one prompt", "prompt")
    if all(isinstance(t, int) for t in prompt):  # one prompt as token ids
        prompt = [list(prompt)]
    out = []
    for index, item in enumerate(prompt):
        tokens = _tokenize(tokenizer, item, "prompt") if isinstance(item, str) else list(item)
        if not tokens:
            raise ApiError(f"prompt[{index}] is empty", "prompt")
        out.append(tokens)
    return out


def completion_requests(params, tokenizer, validate,
                        prompts: Optional[List[List[int]]] = None) -> List[GenerationRequest]:
    """``n`` requests per prompt (prompt-major) of a completions body: ``prompt``,
    ``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``logprobs``,
    ``echo``. Choice ``j`` of a seeded request uses seed ``seed + j``. ``prompts``: the
    prompts already as token ids (default: from ``params.prompt``)."""
    if prompts is None:
        prompts = prompt_token_lists(params.prompt, tokenizer)
    stops = stop_list(params.stop)
    top_logprobs = params.logprobs or 0
    requests = []
    for tokens in prompts:
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


def cut_at_stop(text: str, stops: Sequence[str]) -> Optional[int]:
    """Index of the earliest stop string in ``text`` (None if none occurs)."""
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def _tokens_before(tokenizer, tokens: List[int], limit: int) -> int:
    """How many leading ``tokens`` start before character ``limit`` of their text: the
    smallest m with ``len(detokenize(tokens[:m])) >= limit`` (binary search)."""
    low, high = 0, len(tokens)
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer.detokenize(tokens[:mid])) >= limit:
            high = mid
        else:
            low = mid + 1
    return low


def _logprobs_block(tokenizer, tokens: List[int], logprobs: List[Optional[float]],
                    tops: List[Optional[Dict[int, float]]]) -> Dict[str, Any]:
    """OpenAI's ``logprobs`` object: per token its text, log probability, most likely
    alternatives (``{text: log prob}``) and character offset (sum of the token texts)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for token, lp, top in zip(tokens, logprobs, tops):
        piece = tokenizer.detokenize([token])
        out["tokens"].append(piece)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else _top_by_text(tokenizer, top))
        out["text_offset"].append(offset)
        offset += len(piece)
    return out


def choice_text(result: GenerationResult, stop, tokenizer) -> Tuple[str, int]:
    """The generated text as a choice shows it, and how many generated tokens it covers:
    cut before the earliest stop string, without the end-of-document token that ended
    generation (that token is still counted: it has a log probability)."""
    generated = result.generated_tokens
    text = tokenizer.detokenize(generated)
    cut = cut_at_stop(text, stop_list(stop))
    if cut is not None:
        return text[:cut], _tokens_before(tokenizer, generated, cut)
    if generated and generated[-1] == tokenizer.eod and result.finish_reason == "stop":
        return tokenizer.detokenize(generated[:-1]), len(generated)
    return text, len(generated)


def _top_by_text(tokenizer, top: Dict[int, float]) -> Dict[str, float]:
    """``{token text: log prob}``; tokens with the same text (e.g. partial UTF-8 bytes
    shown as U+FFFD) keep the most likely one's value, so the maximum is preserved."""
    out: Dict[str, float] = {}
    for token, value in sorted(top.items(), key=lambda item: -item[1]):
        out.setdefault(tokenizer.detokenize([token]), value)
    return out


def completion_choice(result: GenerationResult, index: int, params,
                      tokenizer) -> Dict[str, Any]:
    """One entry of ``choices``: text (echoed prompt first if ``echo``), logprobs and
    ``finish_reason`` (``"stop"`` for a stop string or the end-of-document token).

    ``logprobs`` covers every echoed prompt token (the first one's log probability is
    ``null``: nothing precedes it) and the generated tokens up to a stop string; the
    end-of-document token that ended a choice is listed although its text is not in
    ``text`` (log-likelihood clients such as lm-evaluation-harness count on one entry per
    token)."""
    generated = result.generated_tokens
    completion, kept = choice_text(result, params.stop, tokenizer)
    prompt_text = tokenizer.detokenize(result.prompt_tokens) if params.echo else ""
    choice = {"text": prompt_text + completion, "index": index, "logprobs": None,
              "finish_reason": result.finish_reason}
    if params.logprobs is not None:
        tokens, lps, tops = [], [], []
        if params.echo:
            n = len(result.prompt_logprobs)
            tokens += result.prompt_tokens
            lps += [None] + list(result.prompt_logprobs)
            tops += [None] + list(result.prompt_top_logprobs or [{}] * n)
        tokens += generated[:kept]
        lps += list(result.generated_logprobs[:kept])
        tops += list(result.generated_top_logprobs or [{}] * len(generated))[:kept]
        choice["logprobs"] = _logprobs_block(tokenizer, tokens, lps, tops)
    return choice


# -- OpenAI-style POST /v1/chat/completions -------------------------------------------------
def _message_dict(message) -> Dict[str, Any]:
    """A validated message as the chat template sees it; text parts are joined with a
    newline."""
    content = message.content
    if not isinstance(content, str):
        content = "\n".join(part.text for part in content)
    out = {"role": message.role, "content": content}
    if message.name is not None:
        out["name"] = message.name
    return out


def chat_prompt_tokens(messages, tokenizer) -> List[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template and the
    assistant's turn opened (``add_generation_prompt``)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError("this model has no chat template: its tokenizer (a Hugging Face "
                       "tokenizer directory with chat_template.jinja or a chat_template in "
                       "tokenizer_config.json) defines none; use /v1/completions", "messages")
    try:
        tokens = tokenizer.apply_chat_template([_message_dict(m) for m in messages],
                                               add_generation_prompt=True, tokenize=True)
    except ValueError as error:  # ChatTemplateError: the template refused the messages
        raise ApiError(f"messages: {error}", "messages") from error
    if not tokens:
        raise ApiError("messages render to an empty prompt", "messages")
    return tokens


def chat_requests(params, tokens: List[int], max_tokens: int, tokenizer,
                  validate) -> List[GenerationRequest]:
    """``n`` requests continuing the rendered conversation ``tokens``."""
    stops = tuple(stop_list(params.stop))
    top = (params.top_logprobs or 0) if params.logprobs else 0
    requests = []
    for j in range(params.n):
        seed = None if params.seed is None else params.seed + j
        sampling = _sampling(temperature=params.temperature, top_p=params.top_p, seed=seed)
        requests.append(_checked(
            lambda: GenerationRequest(tokens, max_tokens, sampling,
                                      stop_token_ids=(tokenizer.eod,), stop_strings=stops,
                                      top_logprobs=top),
            validate, "max_tokens", "messages"))
    return requests


def _chat_logprobs(result: GenerationResult, kept: int, tokenizer) -> Dict[str, Any]:
    def entry(token: int, logprob: float) -> Dict[str, Any]:
        text = tokenizer.detokenize([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    tops = result.generated_top_logprobs or [{}] * kept
    content = []
    for token, logprob, top in zip(result.generated_tokens[:kept],
                                   result.generated_logprobs, tops):
        item = entry(token, logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in
                                sorted(top.items(), key=lambda kv: -kv[1])]
        content.append(item)
    return {"content": content}


def chat_choice(result: GenerationResult, index: int, params, tokenizer) -> Dict[str, Any]:
    """One entry of a chat completion's ``choices``: the assistant ``message``,
    ``logprobs`` (if asked) and ``finish_reason``."""
    text, kept = choice_text(result, params.stop, tokenizer)
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": _chat_logprobs(result, kept, tokenizer) if params.logprobs else None,
            "finish_reason": result.finish_reason}


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
