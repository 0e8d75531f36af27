"""What a generation call takes and returns, and the engine's own settings.

A :class:`GenerationRequest` is one prompt (token ids) with its own length budget,
sampling settings, stop conditions and log-probability options; a batch may mix any
requests. A :class:`GenerationResult` carries the generated tokens, their log
probabilities under the model (natural log of the softmax of the raw logits, i.e.
before temperature and filtering), optional prompt log probabilities and why generation
ended.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from megacore.inference.sampling import SamplingParams

__all__ = ["InferenceConfig", "GenerationRequest", "GenerationResult",
           "SequenceTooLongError", "MAX_TOP_LOGPROBS"]

MAX_TOP_LOGPROBS = 20
"""Most alternatives per position :attr:`GenerationRequest.top_logprobs` may ask for."""


class SequenceTooLongError(ValueError):
    """Prompt plus requested tokens exceed the model's maximum sequence length."""


@dataclasses.dataclass
class InferenceConfig:
    """Settings of a :class:`~megacore.inference.TextGenerationController`."""

    max_batch_size: int = 8
    """Most requests (rows) in one ``generate`` call; the server batches up to this."""

    max_sequence_length: Optional[int] = None
    """Longest prompt + generation; None uses the model's ``max_sequence_length``.
    Larger values than the model's are rejected."""

    use_kv_cache: bool = True
    """Keep keys/values of past tokens and feed one new token per step. False recomputes
    the whole sequence every step (the reference, and the benchmark baseline)."""

    vocab_size: Optional[int] = None
    """Number of real tokens (the tokenizer's vocabulary). Logits of the model's padding
    entries beyond it are never sampled. None: the model's vocabulary."""

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_sequence_length is not None and self.max_sequence_length < 2:
            raise ValueError(f"max_sequence_length must be >= 2, got "
                             f"{self.max_sequence_length}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")


@dataclasses.dataclass
class GenerationRequest:
    """One prompt and how to continue it."""

    prompt_tokens: List[int]
    """Token ids of the prompt (at least one)."""

    max_new_tokens: int
    """Tokens to generate at most (0: only score the prompt)."""

    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    """Temperature, top-k, top-p and seed."""

    stop_token_ids: Tuple[int, ...] = ()
    """Generation ends after producing any of these tokens (kept in the output)."""

    stop_strings: Tuple[str, ...] = ()
    """Generation ends once the detokenized generated text contains any of these (the
    token completing it is kept; callers cut the text, see ``GenerationResult``)."""

    return_prompt_logprobs: bool = False
    """Also return the log probability of every prompt token after the first."""

    top_logprobs: int = 0
    """Also return the ``top_logprobs`` most likely tokens and their log probabilities
    at every returned position (0: none; at most :data:`MAX_TOP_LOGPROBS`)."""

    def __post_init__(self):
        if len(self.prompt_tokens) < 1:
            raise ValueError("prompt_tokens must hold at least one token")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                             f"{self.top_logprobs}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop_strings must not contain an empty string")
        self.prompt_tokens = [int(t) for t in self.prompt_tokens]
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)

    @property
    def total_length(self) -> int:
        return len(self.prompt_tokens) + self.max_new_tokens


@dataclasses.dataclass
class GenerationResult:
    """The continuation of one request.

    Attributes:
        prompt_tokens: the request's prompt.
        generated_tokens: new tokens, including a stop token or the token that completed
            a stop string.
        generated_logprobs: log probability of each generated token.
        prompt_logprobs: log probability of prompt tokens 1..L-1 (None unless requested).
        generated_top_logprobs: per generated token, ``{token id: log prob}`` of the most
            likely tokens (None unless ``top_logprobs``).
        prompt_top_logprobs: the same for prompt tokens 1..L-1 (None unless both
            ``return_prompt_logprobs`` and ``top_logprobs``).
        finish_reason: ``"length"`` (budget used up), ``"stop"``, or ``"cancelled"`` (the
            caller went away, see ``TextGenerationController.generate``).
        stop_reason: the stop token id or stop string that ended generation, if any.
    """

    prompt_tokens: List[int]
    generated_tokens: List[int] = dataclasses.field(default_factory=list)
    generated_logprobs: List[float] = dataclasses.field(default_factory=list)
    prompt_logprobs: Optional[List[float]] = None
    generated_top_logprobs: Optional[List[Dict[int, float]]] = None
    prompt_top_logprobs: Optional[List[Dict[int, float]]] = None
    finish_reason: str = "length"
    stop_reason: Optional[object] = None

    @property
    def tokens(self) -> List[int]:
        """Prompt followed by the generated tokens."""
        return self.prompt_tokens + self.generated_tokens
