"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded draws.

Every row of a batch has its own :class:`SamplingParams` and its own ``torch.Generator``,
so a request draws the same tokens whether it runs alone or inside a batch of other
requests (the draws of one row never consume another row's random stream).

Each draw takes exactly one uniform number from the row's generator and inverts the
cumulative distribution of the filtered probabilities (sorted by descending
probability). One number per token keeps the stream aligned across batch compositions,
and a draw only changes when it lands within rounding distance of a bucket edge.

Shapes: ``logits`` ``[b, V]`` (float32 or wider; ``V`` real vocabulary entries), one
:class:`SamplingParams` and one generator per row.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import List, Optional, Sequence

import torch

__all__ = ["SamplingParams", "make_generator", "sample_next_tokens", "filter_logits"]

_MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token."""

    temperature: float = 1.0
    """Logits are divided by this before softmax. 0 means greedy (argmax); larger values
    flatten the distribution. At most 100 (Megatron's bound)."""

    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens; 0 keeps all, 1 is greedy."""

    top_p: float = 0.0
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability
    reaches ``top_p``; 0 (or 1) keeps all. Applied after ``top_k``."""

    top_p_decay: float = 0.0
    """Megatron's top-p decay: after each generated token ``top_p *= top_p_decay``
    (0: no decay). Lets generation start diverse and become more focused."""

    top_p_bound: float = 0.0
    """Lower bound of the decayed ``top_p`` (0: none)."""

    seed: Optional[int] = None
    """Seed of this request's generator; None draws a fresh random seed. The same seed
    and prompt give the same tokens, alone or batched."""

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.top_p_decay <= 1.0:
            raise ValueError(f"top_p_decay must be in [0, 1], got {self.top_p_decay}")
        if not 0.0 <= self.top_p_bound <= 1.0:
            raise ValueError(f"top_p_bound must be in [0, 1], got {self.top_p_bound}")
        if (self.top_p_decay > 0.0 or self.top_p_bound > 0.0) and self.top_p == 0.0:
            raise ValueError("top_p_decay and top_p_bound need top_p > 0")
        if self.seed is not None and not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def top_p_at(self, step: int) -> float:
        """``top_p`` for the ``step``-th generated token (0-based), after Megatron's decay."""
        top_p = self.top_p
        if self.top_p_decay > 0.0:
            top_p = top_p * self.top_p_decay ** step
            if self.top_p_bound > 0.0:
                top_p = max(top_p, self.top_p_bound)
        return top_p


def make_generator(params: SamplingParams) -> torch.Generator:
    """A CPU generator seeded from ``params.seed`` (or from the OS when it is None).

    CPU generators make the draws identical on every device and every rank that holds
    the same seed.
    """
    seed = params.seed if params.seed is not None else secrets.randbelow(_MAX_SEED)
    return torch.Generator(device="cpu").manual_seed(seed)


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int,
                  top_p: float) -> torch.Tensor:
    """Temperature-scaled logits ``[V]`` with filtered-out entries set to ``-inf``."""
    logits = logits / temperature
    vocab = logits.numel()
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p. The most
        # likely token is always kept, also when a decayed top_p underflows to 0 in the
        # logits' dtype (0 >= 0 would drop it).
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _draw(logits: torch.Tensor, generator: torch.Generator) -> int:
    """Inverse-CDF draw with one uniform from ``generator``; ``logits`` ``[V]`` filtered."""
    probs = torch.softmax(logits.double(), dim=-1)
    probs, order = torch.sort(probs, descending=True)
    cdf = torch.cumsum(probs, dim=-1)
    u = torch.rand((), generator=generator, dtype=torch.float64).to(cdf.device)
    index = int(torch.searchsorted(cdf, u * cdf[-1], right=True).clamp(max=cdf.numel() - 1))
    return int(order[index])


def sample_next_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                       generators: Sequence[torch.Generator],
                       steps: Sequence[int]) -> List[int]:
    """One token per row.

    Args:
        logits: ``[b, V]`` next-token logits of the real vocabulary.
        params: sampling settings per row.
        generators: random stream per row (only sampled rows draw from theirs).
        steps: how many tokens each row has generated so far (for ``top_p_decay``).

    Returns:
        The chosen token id of each row.
    """
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (p, gen, step) in enumerate(zip(params, generators, steps)):
        if p.greedy:
            tokens.append(int(greedy[row]))
            continue
        filtered = filter_logits(logits[row].float(), p.temperature, p.top_k, p.top_p_at(step))
        tokens.append(_draw(filtered, gen))
    return tokens
