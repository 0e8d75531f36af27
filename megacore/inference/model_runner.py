"""Forward passes of a tp/pp/vpp-split ``GPTModel`` for generation, with a KV cache.

:class:`ModelRunner` runs one forward over tokens ``[b, s]`` at positions
``start .. start + s - 1`` through all pipeline stages and model chunks of this rank and
returns, on the last pipeline stage, the next-token logits of the real vocabulary
gathered over tensor-parallel ranks. With a :class:`StaticInferenceContext` each layer
stores the new keys/values at ``start`` and attends over everything cached so far, so
after a prefill the caller feeds one token per step.

Pipeline (forward only, one micro-batch)::

    stage 0 chunk 0 -> stage 1 chunk 0 -> ... -> stage p-1 chunk 0
      -> stage 0 chunk 1 -> ... -> stage p-1 chunk v-1 (logits)

Stages hand ``[s, b, h]`` activations to the next with
``megacore.pipeline_parallel.P2PCommunicator`` (the ring wraps for virtual stages);
every rank knows ``s`` and ``b`` because every rank runs the same generation loop.
:meth:`ModelRunner.broadcast_from_last_stage` then sends what the last stage decided
(sampled tokens) to every stage.

Shapes: ``b`` batch rows, ``s`` tokens in this pass, ``h`` hidden, ``V`` real vocabulary
(``V/tp`` per rank before the gather).
"""

from __future__ import annotations

import datetime
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from megacore.pipeline_parallel import P2PCommunicator
from megacore.tensor_parallel import gather_from_tensor_model_parallel_region
from megacore.transformer import StaticInferenceContext

__all__ = ["ModelRunner"]


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    # DDP-style wrappers keep the model in .module.
    while not hasattr(chunk, "decoder") and hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


class ModelRunner:
    """Runs the model chunks of this rank as one step of generation.

    Args:
        model_chunks: this rank's ``GPTModel`` chunks (one per virtual pipeline stage, in
            order), plain or wrapped in a module with ``.module``; a single module is
            accepted. They are put in eval mode.
        p2p_timeout: longest wait for a neighbouring stage (default: the p2p default).

    Raises:
        ValueError: for layouts generation does not support (sequence parallelism splits
            the one-token decode steps; context parallelism splits the sequence).
    """

    def __init__(self, model_chunks, *, p2p_timeout: Optional[datetime.timedelta] = None):
        if isinstance(model_chunks, torch.nn.Module):
            model_chunks = [model_chunks]
        self.chunks: List[torch.nn.Module] = [_unwrap(c).eval() for c in model_chunks]
        first = self.chunks[0]
        self.config = first.config
        if self.config.sequence_parallel and first.tp_size > 1:
            raise ValueError("generation needs sequence_parallel=False (a one-token decode "
                             "step cannot be split over tensor-parallel ranks); rebuild the "
                             "model with --sequence-parallel off for serving")
        if first.cp_size > 1:  # the model's cp group, the size its layers split by
            raise ValueError("generation does not support context_parallel_size > 1")
        pg = first.pg_collection
        self.tp_group, self.pp_group = pg.tp, pg.pp
        pp_ranks = dist.get_process_group_ranks(self.pp_group)
        self.pp_size = len(pp_ranks)
        self.pp_rank = pp_ranks.index(dist.get_rank())
        self.last_stage_rank = pp_ranks[-1]  # global rank, for broadcasts over pp
        self.is_last_stage = self.pp_rank == self.pp_size - 1
        self.comm = P2PCommunicator(self.config, pp_group=self.pp_group,
                                    timeout=p2p_timeout) if self.pp_size > 1 else None
        self.model_vocab_size: int = first.vocab_size
        self.max_sequence_length: int = first.max_sequence_length

    @property
    def device(self) -> torch.device:
        return next(self.chunks[0].parameters()).device

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start: int,
                context: Optional[StaticInferenceContext]) -> Optional[torch.Tensor]:
        """Logits ``[b, s, V_model]`` (float32, gathered over tp) of tokens ``[b, s]`` at
        positions ``start..start+s-1``; None on stages other than the last.

        With ``context`` the keys/values of positions ``< start`` must already be cached
        (``context.sequence_len_offset`` is set to ``start`` here); without it
        ``start`` must be 0 and ``tokens`` the whole sequence.
        """
        if context is None and start != 0:
            raise ValueError("without a KV cache every forward starts at position 0")
        if start + tokens.size(1) > self.max_sequence_length:
            raise ValueError(f"positions up to {start + tokens.size(1)} exceed the model's "
                             f"max_sequence_length {self.max_sequence_length}")
        if context is not None:
            context.sequence_len_offset = start
        b, s = tokens.shape
        positions = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        shape = (s, b, self.config.hidden_size)  # activations between stages: [s, b, h]
        output = None
        for index, chunk in enumerate(self.chunks):
            if not chunk.pre_process:
                chunk.set_input_tensor(self.comm.communicate(recv_prev=True, tensor_shape=shape)[0])
            output = chunk(tokens if chunk.pre_process else None, positions, None,
                           inference_context=context)
            is_final = self.is_last_stage and index == len(self.chunks) - 1
            if not is_final:
                self.comm.communicate(tensor_send_next=output.contiguous(), tensor_shape=shape)
        if not self.is_last_stage:
            return None
        return self._full_vocab_logits(output)

    def _full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        chunk = self.chunks[-1]
        if chunk.parallel_output and chunk.tp_size > 1:
            # [b, s, V/tp] -> all-gather last dim -> [b, s, V_padded]
            logits = gather_from_tensor_model_parallel_region(logits.contiguous(), self.tp_group)
        return logits[..., :self.model_vocab_size].float()

    def broadcast_from_last_stage(self, tensor: Optional[torch.Tensor], shape: Sequence[int],
                                  dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` of the last pipeline stage, on every stage (collective over pp)."""
        if self.pp_size == 1:
            return tensor
        if self.is_last_stage:
            buffer = tensor.to(dtype).contiguous()  # gloo: contiguous memory only
        else:
            buffer = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        dist.broadcast(buffer, src=self.last_stage_rank, group=self.pp_group)
        return buffer

    def new_context(self, batch_size: int, sequence_length: int) -> StaticInferenceContext:
        """An empty KV cache for ``batch_size`` rows and ``sequence_length`` positions."""
        return StaticInferenceContext(max_batch_size=batch_size,
                                      max_sequence_length=sequence_length)
