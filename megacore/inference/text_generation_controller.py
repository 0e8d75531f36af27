"""The generation loop: prompts of different lengths, KV cache, sampling, stop conditions.

Prompts of different lengths share a batch without padding masks (Megatron's approach):
tokens are right-aligned on nothing, i.e. every row starts at position 0, and the loop
advances one position ``cur`` for the whole batch::

    prefill:  positions 0 .. m-1 (m = shortest prompt), one forward
    step:     position cur-1 only (with the KV cache), predicting position cur
              row still inside its prompt (cur < L_i): the prompt token is kept
              row past its prompt: the sampled token is written at cur

Causal attention means a row never sees positions after its own current one, so each
row computes exactly what it would compute alone (only the float rounding of batched
matmuls differs), and greedy text is the same alone and in any batch.

Each step the last pipeline stage picks every row's token (sampling with the row's own
generator, see ``sampling``), its log probability, its top alternatives and whether a
stop condition fired, and broadcasts that packet ``[b, 3 + 2k]`` (float64: token,
log prob, stop flag, k top ids, k top log probs) to all stages; every rank then updates
the same per-row state, so all ranks agree on the tokens and on when to stop.

All ranks of a model replica must call :meth:`TextGenerationController.generate` with
the same requests (the server broadcasts them).
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megacore.inference.inference_request import (
    GenerationRequest,
    GenerationResult,
    InferenceConfig,
    SequenceTooLongError,
)
from megacore.inference.model_runner import ModelRunner
from megacore.inference.sampling import make_generator, sample_next_tokens

__all__ = ["TextGenerationController", "TokenCallback", "CancelCheck"]

TokenCallback = Callable[[int, int, float], None]
"""``on_token(row, token_id, logprob)``: called on every rank for each generated token."""

CancelCheck = Callable[[], Sequence[int]]
"""``cancelled()``: the rows (request indices) whose caller has gone away; generation of
those rows ends before the next step (``finish_reason`` ``"cancelled"``)."""

_TOKEN, _LOGPROB, _STOP = 0, 1, 2  # packet columns; top ids and log probs follow


@dataclasses.dataclass
class _Row:
    """Generation state of one request (identical on every rank)."""

    request: GenerationRequest
    result: GenerationResult
    generator: Optional[torch.Generator]
    last_position: int  # the last position whose prediction this row needs
    done: bool = False

    @property
    def prompt_length(self) -> int:
        return len(self.request.prompt_tokens)


def _last_needed_position(request: GenerationRequest) -> int:
    length = len(request.prompt_tokens)
    if request.max_new_tokens > 0:
        return length + request.max_new_tokens - 1
    return length - 1 if request.return_prompt_logprobs else 0


class TextGenerationController:
    """Generates tokens for batches of :class:`GenerationRequest` (collective call).

    Args:
        model_chunks: this rank's model chunks (see :class:`ModelRunner`).
        config: batch size, length limit, KV cache and vocabulary settings.
        detokenize: ids -> text, needed only for ``stop_strings``.
    """

    def __init__(self, model_chunks, config: Optional[InferenceConfig] = None, *,
                 detokenize: Optional[Callable[[Sequence[int]], str]] = None):
        self.config = config or InferenceConfig()
        self.runner = ModelRunner(model_chunks)
        self.detokenize = detokenize
        model_max = self.runner.max_sequence_length
        if self.config.max_sequence_length is not None \
                and self.config.max_sequence_length > model_max:
            raise ValueError(f"max_sequence_length {self.config.max_sequence_length} exceeds "
                             f"the model's max_sequence_length {model_max}")
        self.max_sequence_length = self.config.max_sequence_length or model_max
        self.vocab_size = min(self.config.vocab_size or self.runner.model_vocab_size,
                              self.runner.model_vocab_size)
        self.replica_group = self.runner.chunks[0].pg_collection.mp  # tp x pp of a replica
        self._context = None
        self.steps_run = 0
        """Forward steps run since construction (prefill and decode steps alike); lets a
        caller see that generation is (or is no longer) running."""

    # -- validation ---------------------------------------------------------------------
    def validate(self, requests: Sequence[GenerationRequest]) -> None:
        """Raise ``ValueError`` (``SequenceTooLongError`` for length) on a bad batch."""
        if not requests:
            raise ValueError("generate needs at least one request")
        if len(requests) > self.config.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size "
                             f"{self.config.max_batch_size}")
        for index, request in enumerate(requests):
            self.validate_request(request, index)

    def validate_request(self, request: GenerationRequest, index: int = 0) -> None:
        """Check one request's length and token ids against this model."""
        if request.total_length > self.max_sequence_length:
            raise SequenceTooLongError(
                f"request {index}: prompt ({len(request.prompt_tokens)} tokens) + "
                f"max_new_tokens ({request.max_new_tokens}) = {request.total_length} exceeds "
                f"the maximum sequence length {self.max_sequence_length}")
        bad = [t for t in request.prompt_tokens + list(request.stop_token_ids)
               if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"request {index}: token ids {bad[:5]} are outside the "
                             f"vocabulary [0, {self.vocab_size})")
        if request.stop_strings and self.detokenize is None:
            raise ValueError("stop_strings need a detokenize function")

    # -- the loop -----------------------------------------------------------------------
    def generate(self, requests: Sequence[GenerationRequest],
                 on_token: Optional[TokenCallback] = None,
                 cancelled: Optional[CancelCheck] = None) -> List[GenerationResult]:
        """Continue every request; results in request order (on every rank).

        ``cancelled`` is polled before every step; with more than one rank in the model
        replica every rank must pass one (or none) alike, since the cancelled rows are
        agreed on with a collective (the ranks other than the caller's pass
        ``lambda: ()``).
        """
        self.validate(requests)
        rows = self._init_rows(requests)
        b = len(rows)
        total = max(r.request.total_length for r in rows)
        shortest = min(r.prompt_length for r in rows)
        tokens = torch.zeros(b, total, dtype=torch.long, device=self.runner.device)
        for i, row in enumerate(rows):
            tokens[i, :row.prompt_length] = torch.tensor(row.request.prompt_tokens)
        context = self._kv_context(b, total) if self.config.use_kv_cache else None
        k = max(r.request.top_logprobs for r in rows)
        prev, cur = 0, shortest
        while not all(row.done for row in rows):
            if cancelled is not None:
                self._cancel_rows(rows, cancelled)
                if all(row.done for row in rows):
                    break
            start = prev if context is not None else 0
            logits = self.runner.forward(tokens[:, start:cur], start, context)  # [b, n, V]
            self.steps_run += 1
            if prev == 0:
                self._prefill_prompt_logprobs(rows, tokens, logits, cur, k)
            if not all(row.done for row in rows):  # e.g. only prompt log probs were wanted
                self._step(rows, tokens, logits, cur, k, on_token)
            prev, cur = cur, cur + 1
        return [row.result for row in rows]

    def _cancel_rows(self, rows: List[_Row], cancelled: CancelCheck) -> None:
        """Mark the cancelled rows done (agreed over the replica)."""
        flags = torch.zeros(len(rows), dtype=torch.int32, device=self.runner.device)
        for index in cancelled():
            flags[index] = 1
        if dist.get_world_size(self.replica_group) > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.replica_group)
        newly = [row for row, flag in zip(rows, flags.tolist()) if flag and not row.done]
        for row in newly:
            row.done = True
            row.result.finish_reason = "cancelled"

    def _init_rows(self, requests: Sequence[GenerationRequest]) -> List[_Row]:
        seeds = self._agreed_seeds(requests)
        rows = []
        for request, seed in zip(requests, seeds):
            sampling = dataclasses.replace(request.sampling, seed=seed)
            want_top = request.top_logprobs > 0
            result = GenerationResult(
                prompt_tokens=list(request.prompt_tokens),
                prompt_logprobs=[] if request.return_prompt_logprobs else None,
                generated_top_logprobs=[] if want_top else None,
                prompt_top_logprobs=[] if want_top and request.return_prompt_logprobs else None)
            last = _last_needed_position(request)
            rows.append(_Row(request, result, make_generator(sampling), last, done=last < 1))
        return rows

    def _agreed_seeds(self, requests: Sequence[GenerationRequest]) -> List[int]:
        """Requests without a seed get a random one, the same on every rank of the
        replica (tp ranks of the last stage must draw the same tokens)."""
        seeds = [r.sampling.seed if r.sampling.seed is not None else secrets.randbelow(2**62)
                 for r in requests]
        if all(r.sampling.seed is not None for r in requests) \
                or dist.get_world_size(self.replica_group) == 1:
            return seeds
        buffer = torch.tensor(seeds, dtype=torch.int64, device=self.runner.device)
        src = dist.get_process_group_ranks(self.replica_group)[0]
        dist.broadcast(buffer, src=src, group=self.replica_group)
        return [int(s) for s in buffer.tolist()]

    def _kv_context(self, batch: int, length: int):
        """Reuse the cache buffers when they are large enough (rows and positions)."""
        ctx = self._context
        if ctx is None or ctx.max_batch_size < batch or ctx.max_sequence_length < length:
            ctx = self._context = self.runner.new_context(
                max(batch, ctx.max_batch_size if ctx else 0),
                max(length, ctx.max_sequence_length if ctx else 0))
        ctx.reset()
        return ctx

    # -- prompt log probabilities of the prefill ----------------------------------------
    def _prefill_prompt_logprobs(self, rows: List[_Row], tokens: torch.Tensor,
                                 logits: Optional[torch.Tensor], cur: int, k: int) -> None:
        """Log probs of prompt positions 1..cur-1 (all inside every prompt)."""
        wanted = any(r.request.return_prompt_logprobs for r in rows)
        if wanted and cur > 1:
            b, n = len(rows), cur - 1
            packet = None
            if logits is not None:
                logp = self._log_softmax(logits[:, :n])                    # [b, n, V]
                targets = tokens[:, 1:cur]                                  # [b, n]
                chosen = logp.gather(-1, targets.unsqueeze(-1))             # [b, n, 1]
                packet = torch.cat([chosen] + self._top(logp, k), dim=-1)  # [b, n, 1+2k]
            packet = self.runner.broadcast_from_last_stage(packet, (b, n, 1 + 2 * k),
                                                           torch.float64).cpu()
            for i, row in enumerate(rows):
                if row.request.return_prompt_logprobs:
                    for j in range(n):
                        self._record(row, packet[i, j], 0, 1, row.result.prompt_logprobs,
                                     row.result.prompt_top_logprobs)
        for row in rows:  # rows that only needed prompt log probs of these positions
            if row.last_position <= cur - 1:
                row.done = True

    # -- one position -------------------------------------------------------------------
    def _step(self, rows: List[_Row], tokens: torch.Tensor, logits: Optional[torch.Tensor],
              cur: int, k: int, on_token: Optional[TokenCallback]) -> None:
        b = len(rows)
        packet = None
        if logits is not None:
            packet = self._decide(rows, tokens, logits[:, -1], cur, k)
        packet = self.runner.broadcast_from_last_stage(packet, (b, 3 + 2 * k),
                                                       torch.float64).cpu()
        for i, row in enumerate(rows):
            if row.done:
                continue
            token = int(packet[i, _TOKEN])
            result = row.result
            if cur < row.prompt_length:  # forced prompt token
                if row.request.return_prompt_logprobs:
                    self._record(row, packet[i], _LOGPROB, 3, result.prompt_logprobs,
                                 result.prompt_top_logprobs)
            else:
                tokens[i, cur] = token
                result.generated_tokens.append(token)
                self._record(row, packet[i], _LOGPROB, 3, result.generated_logprobs,
                             result.generated_top_logprobs)
                if on_token is not None:
                    on_token(i, token, float(packet[i, _LOGPROB]))
                if packet[i, _STOP] > 0:
                    result.finish_reason = "stop"
                    result.stop_reason = self._stop_reason(row)
                    row.done = True
            if cur >= row.last_position:
                row.done = True

    def _decide(self, rows: List[_Row], tokens: torch.Tensor, last_logits: torch.Tensor,
                cur: int, k: int) -> torch.Tensor:
        """Last stage: the packet ``[b, 3 + 2k]`` for position ``cur``."""
        logits = last_logits[:, :self.vocab_size]                           # [b, V]
        sampling_rows = [i for i, r in enumerate(rows)
                         if not r.done and cur >= r.prompt_length]
        chosen = tokens[:, cur].clone()
        stop = torch.zeros(len(rows), dtype=torch.float64, device=logits.device)
        if sampling_rows:
            picked = sample_next_tokens(
                logits[sampling_rows], [rows[i].request.sampling for i in sampling_rows],
                [rows[i].generator for i in sampling_rows],
                [len(rows[i].result.generated_tokens) for i in sampling_rows])
            for i, token in zip(sampling_rows, picked):
                chosen[i] = token
                stop[i] = float(self._stops(rows[i], token))
        logp = self._log_softmax(logits)                                   # [b, V]
        chosen_lp = logp.gather(-1, chosen.unsqueeze(-1))                  # [b, 1]
        columns = [chosen.double().unsqueeze(-1), chosen_lp, stop.unsqueeze(-1)]
        return torch.cat(columns + self._top(logp, k), dim=-1)            # [b, 3 + 2k]

    # -- helpers ------------------------------------------------------------------------
    def _log_softmax(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(logits[..., :self.vocab_size].double(), dim=-1)

    @staticmethod
    def _top(logp: torch.Tensor, k: int) -> List[torch.Tensor]:
        if k == 0:
            return []
        top = torch.topk(logp, min(k, logp.size(-1)), dim=-1)
        return [top.indices.double(), top.values]

    def _record(self, row: _Row, entry: torch.Tensor, lp_col: int, top_col: int,
                logprobs: List[float], tops: Optional[List[Dict[int, float]]]) -> None:
        logprobs.append(float(entry[lp_col]))
        if tops is not None:
            n, k = row.request.top_logprobs, (entry.numel() - top_col) // 2
            ids, values = entry[top_col:top_col + k], entry[top_col + k:top_col + 2 * k]
            tops.append({int(ids[j]): float(values[j]) for j in range(min(n, k))})

    def _stops(self, row: _Row, token: int) -> bool:
        request = row.request
        if token in request.stop_token_ids:
            return True
        if not request.stop_strings:
            return False
        # A stop string completed by this token lies in the text of the last few tokens
        # (each token is at least one byte, a character at most four).
        window = 4 * max(len(s) for s in request.stop_strings) + 8
        text = self.detokenize((row.result.generated_tokens + [token])[-window:])
        return any(s in text for s in request.stop_strings)

    def _stop_reason(self, row: _Row):
        token = row.result.generated_tokens[-1]
        if token in row.request.stop_token_ids:
            return token
        text = self.detokenize(row.result.generated_tokens)
        found = [(text.find(s), s) for s in row.request.stop_strings if s in text]
        return min(found)[1] if found else None
