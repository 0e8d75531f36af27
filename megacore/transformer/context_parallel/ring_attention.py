"""Ring attention: exact attention over a sequence split across context-parallel ranks.

Each cp rank holds ``s/cp`` tokens (two chunks, see
:mod:`megacore.transformer.context_parallel.sequence_split`) and the matching query, key
and value heads. Attention needs every key for every query, so key/value blocks travel
around the cp ring: at step ``i`` rank ``r`` holds the keys/values of rank
``(r - i) mod cp``, computes attention of its queries against them, and merges the
partial result with the online-softmax rule using per-block log-sum-exp (LSE)::

    lse = logaddexp(lse_a, lse_b)
    out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

The transfer of the next block is started before the current block is computed, so
communication overlaps compute where the backend allows. No rank ever holds more than
two key/value blocks (in backward also two key/value-gradient blocks); the explicit path
also holds one ``[s/cp, s/cp]`` score matrix per head, the fused path none.

Causal masking with the load-balanced split (Megatron / Transformer Engine). Let rank
``r`` hold chunks ``(r, 2cp-1-r)`` as query halves ``q0, q1`` and let the key/value block
come from rank ``src`` with halves ``k0, k1`` (chunks ``src, 2cp-1-src``):

* step 0 (``src == r``): the diagonal; local positions are increasing, so a plain causal
  mask on ``[s/cp, s/cp]`` is exact;
* ``src < r``: chunk ``src`` precedes both query chunks and chunk ``2cp-1-src`` follows
  both: all queries against ``k0`` only, no mask;
* ``src > r``: ``q0`` (chunk ``r``) precedes both key chunks and ``q1`` follows both: the
  second query half against all keys, no mask.

Every step but the diagonal therefore does half a block of unmasked work on every rank.

Each block runs on a fused attention kernel that returns its LSE (torch's fused CPU
kernel ``_scaled_dot_product_flash_attention_for_cpu``, the memory-efficient kernel on
CUDA), so cp adds no ``[s/cp, s/cp]`` score matrix: only the merged output and the
``[b, np, s/cp]`` LSE are kept. Backward calls the kernel's backward per block with the
*merged* output and LSE, which is exactly the block's share of the gradient
(flash-attention style: ``dS = P * (dP - rowsum(dO * O))`` with ``P`` from the global
LSE). The explicit block math below (the reference, and the path when attention dropout
is active, since no fused kernel takes an external dropout mask) does the same with
matmuls. Key/value blocks travel the ring again, and
the key/value gradients travel with them, each rank adding its contribution, until after
``cp`` hops they reach their owner.

Attention dropout (optional) uses a mask keyed by global coordinates
(:mod:`.keyed_dropout`), so backward regenerates each block's mask instead of storing it
and the result does not depend on the cp or tp layout; it runs on the explicit path.

Fused blocks compute in the input dtype (16-bit kernels accumulate in float32); merges
and the explicit block math run in float32. Grouped-query attention: the CPU kernel takes
``ng < np`` key/value heads natively; the CUDA kernel gets them expanded per block; the
explicit path stacks the ``g = np/ng`` query heads of a group along the row dim of one
matmul against their key/value head.

Value head dim different from the query/key head dim (multi-latent attention: keys are
``qk_head_dim + qk_pos_emb_head_dim`` wide, values ``v_head_dim``): key and value travel
as one packed unit and the fused kernels take one head size, so :func:`ring_attention`
zero-pads the narrower of (query and key) or value to the wider width on entry and slices
the output back to the value width. Zero key channels add nothing to the scores and zero
value channels give zero output channels, so the result and the gradients (the pad's
backward drops the padded channels) are exact; the cost is the padded channels' traffic
and flops (DeepSeek-V3: values 128 -> 192 wide, the key/value unit 20% larger).

Shapes: query ``[s/cp, b, np, hn]``, key/value ``[s/cp, b, ng, hn]``, output
``[s/cp, b, np, hn]`` (value and output ``hv`` wide where it differs from ``hn``);
inside: ``[b, ng, g, s/cp, hn]`` queries, ``[2, b, ng, s/cp, hn]`` packed key/value (the
unit sent around the ring).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore.transformer.context_parallel.keyed_dropout import (
    attention_dropout_keep_mask,
)
from megacore.transformer.context_parallel.sequence_split import (
    get_position_ids_on_cp_rank,
)

__all__ = ["RingBlock", "ring_block_plan", "ring_source_rank", "ring_attention",
           "RingAttentionFunction", "FusedRingAttentionFunction"]

_KV_TAG = 31
_DKV_TAG = 32


# --------------------------------------------------------------------------------------
# The schedule as data
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RingBlock:
    """What one ring step computes on one rank.

    Attributes:
        query: ``"all"`` local query rows or only the ``"second"`` half.
        key: ``"all"`` key/value rows of the visiting block or only the ``"first"`` half.
        causal: apply a causal mask inside the block (only the diagonal step).
    """

    query: str
    key: str
    causal: bool


def ring_source_rank(step: int, cp_rank: int, cp_size: int) -> int:
    """The cp rank whose key/value block ``cp_rank`` holds at ``step``."""
    return (cp_rank - step) % cp_size


def ring_block_plan(step: int, cp_rank: int, cp_size: int, causal: bool) -> RingBlock:
    """The block of work for ``(step, cp_rank)`` under the load-balanced split.

    Example, cp=2, causal: rank 0 computes ``(all, all, causal)`` then
    ``(second, all, no mask)``; rank 1 computes ``(all, all, causal)`` then
    ``(all, first, no mask)``.
    """
    if not causal:
        return RingBlock("all", "all", False)
    src = ring_source_rank(step, cp_rank, cp_size)
    if src == cp_rank:
        return RingBlock("all", "all", True)
    if src < cp_rank:
        return RingBlock("all", "first", False)
    return RingBlock("second", "all", False)


def _rows(which: str, seq: int) -> slice:
    return {"all": slice(0, seq), "first": slice(0, seq // 2),
            "second": slice(seq // 2, seq)}[which]


class _Dropout:
    """Attention dropout of one ring: the keep-mask of any block, from global coordinates.

    Args:
        p: drop probability (> 0).
        seed: equal on all ranks of the cp group.
        heads: global indices of the local query heads ``[np]`` (tp offset included).
        seq: local sequence length ``s/cp``.
        cp_size: ranks in the ring.
    """

    def __init__(self, p: float, seed: int, heads: torch.Tensor, seq: int, cp_size: int):
        self.p, self.seed, self.heads = p, seed, heads
        self.seq, self.cp_size = seq, cp_size

    def _positions(self, cp_rank: int) -> torch.Tensor:
        if self.cp_size == 1:
            return torch.arange(self.seq, device=self.heads.device)
        return get_position_ids_on_cp_rank(self.seq * self.cp_size, self.cp_size, cp_rank,
                                           self.heads.device)

    def keep(self, q_rank: int, kv_rank: int, rows: slice, cols: slice,
             grouped_shape) -> torch.Tensor:
        """Bool ``[b, ng, g, sq, sk]`` for queries of ``q_rank`` and keys of ``kv_rank``."""
        b, ng, g = grouped_shape[:3]
        mask = attention_dropout_keep_mask(self.seed, b, self.heads,
                                           self._positions(q_rank)[rows],
                                           self._positions(kv_rank)[cols], self.p)
        return mask.view(b, ng, g, mask.size(2), mask.size(3))  # [b, np, ..] -> grouped


# --------------------------------------------------------------------------------------
# Point-to-point ring
# --------------------------------------------------------------------------------------
class _Transfer:
    """An in-flight shift of one tensor around the ring; ``wait()`` returns what arrived."""

    def __init__(self, works, send: torch.Tensor, recv: torch.Tensor):
        self._works, self._send, self.recv = works, send, recv

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._send = None  # the send buffer may be freed only after the send completed
        return self.recv


class _Ring:
    """Send to the next cp rank, receive from the previous one."""

    def __init__(self, cp_group: dist.ProcessGroup):
        self.group = cp_group
        self.size = dist.get_world_size(cp_group)
        self.rank = dist.get_rank(cp_group)
        # P2POp takes global ranks.
        self.next = dist.get_global_rank(cp_group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(cp_group, (self.rank - 1) % self.size)

    def shift(self, send: torch.Tensor, tag: int) -> _Transfer:
        # gloo reads a strided tensor as if it were contiguous, silently (docs/ARCHITECTURE.md).
        if not send.is_contiguous():
            raise RuntimeError("ring attention sends contiguous tensors only; got strides "
                               f"{send.stride()} for shape {tuple(send.shape)}")
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, tag)]
        return _Transfer(dist.batch_isend_irecv(ops), send, recv)


# --------------------------------------------------------------------------------------
# Block math (float32)
# --------------------------------------------------------------------------------------
def _scores(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``q [b, ng, g, sq, hn]``, ``k [b, ng, sk, hn]`` -> scores ``[b, ng, g, sq, sk]``."""
    b, ng, g, sq, hn = q.shape
    sk = k.size(2)
    # [b, ng, g*sq, hn] @ [b, ng, hn, sk] -> [b, ng, g*sq, sk]: a group's heads share k.
    scores = torch.matmul(q.reshape(b, ng, g * sq, hn).float(), k.float().transpose(-1, -2))
    scores = scores.mul_(scale).view(b, ng, g, sq, sk)
    if causal:
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(1)
        scores.masked_fill_(mask, float("-inf"))
    return scores


def _block_forward(q, k, v, scale, causal, keep=None, p=0.0):
    """Partial attention of one block: ``(out [b, ng, g, sq, hn], lse [b, ng, g, sq])``.

    ``keep`` (bool ``[b, ng, g, sq, sk]``) applies dropout to the probabilities; the LSE
    stays that of the undropped scores, so blocks merge as without dropout.
    """
    b, ng, g, sq, hn = q.shape
    scores = _scores(q, k, scale, causal)
    # logsumexp by hand, in place: one [.., sq, sk] buffer (torch.logsumexp makes two
    # more). Every row has a finite max: the diagonal block always shows a query itself.
    row_max = scores.amax(dim=-1, keepdim=True)
    probs = scores.sub_(row_max).exp_()
    row_sum = probs.sum(dim=-1, keepdim=True)
    probs.div_(row_sum)
    lse = (row_max + row_sum.log()).squeeze(-1)
    if keep is not None:
        probs.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
    out = torch.matmul(probs.view(b, ng, g * sq, -1), v.float())  # [b, ng, g*sq, hn]
    return out.view(b, ng, g, sq, hn), lse


def _merge_into(out, lse, block_out, block_lse) -> None:
    """Online-softmax merge of a block result into ``out``/``lse`` views, in place."""
    new_lse = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - new_lse).unsqueeze(-1))
    out.add_(block_out * torch.exp(block_lse - new_lse).unsqueeze(-1))
    lse.copy_(new_lse)


def _block_backward(q, k, v, dout, delta, lse, scale, causal, keep=None, p=0.0):
    """Gradients of one block from its recomputed probabilities (and dropout mask).

    Returns ``dq [b, ng, g, sq, hn]``, ``dk, dv [b, ng, sk, hn]`` (float32; dk/dv summed
    over the group's query heads).
    """
    b, ng, g, sq, hn = q.shape
    sk = k.size(2)
    probs = _scores(q, k, scale, causal).sub_(lse.unsqueeze(-1)).exp_()  # [b,ng,g,sq,sk]
    probs = probs.view(b, ng, g * sq, sk)
    dout = dout.reshape(b, ng, g * sq, hn).float()
    dprobs = torch.matmul(dout, v.float().transpose(-1, -2))           # [b, ng, g*sq, sk]
    if keep is None:
        dv = torch.matmul(probs.transpose(-1, -2), dout)               # [b, ng, sk, hn]
    else:
        # out = (P * Z / (1-p)) V with Z the keep-mask: dV uses the dropped P, and
        # dP = dO V^T * Z / (1-p).
        keep = keep.view(b, ng, g * sq, sk)
        dropped = probs.masked_fill(~keep, 0.0).mul_(1.0 / (1.0 - p))
        dv = torch.matmul(dropped.transpose(-1, -2), dout)
        del dropped
        dprobs.masked_fill_(~keep, 0.0).mul_(1.0 / (1.0 - p))
    # dS = P * (dP - rowsum(dO * O)), times the softmax scale for q and k.
    dscores = probs.mul_(dprobs.sub_(delta.reshape(b, ng, g * sq, 1))).mul_(scale)
    dq = torch.matmul(dscores, k.float()).view(b, ng, g, sq, hn)
    dk = torch.matmul(dscores.transpose(-1, -2), q.reshape(b, ng, g * sq, hn).float())
    return dq, dk, dv


# --------------------------------------------------------------------------------------
# Layout changes
# --------------------------------------------------------------------------------------
def _grouped_queries(x: torch.Tensor, ng: int) -> torch.Tensor:
    """``[s, b, np, hn] -> [b, np, s, hn] -> [b, ng, g, s, hn]`` (contiguous copy)."""
    s, b, np_, hn = x.shape
    return x.permute(1, 2, 0, 3).reshape(b, ng, np_ // ng, s, hn)


def _from_grouped_queries(x: torch.Tensor) -> torch.Tensor:
    """``[b, ng, g, s, hn] -> [b, np, s, hn] -> [s, b, np, hn]``."""
    b, ng, g, s, hn = x.shape
    return x.reshape(b, ng * g, s, hn).permute(2, 0, 1, 3).contiguous()


def _pack_kv(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``2 x [s, b, ng, hn] -> [2, b, ng, s, hn]`` contiguous: the unit sent on the ring."""
    return torch.stack((k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)))


# --------------------------------------------------------------------------------------
# Fused block kernels (attention of one block with its log-sum-exp)
# --------------------------------------------------------------------------------------
class _CpuFusedKernel:
    """torch's fused CPU attention: ``[b, np, sq, hn]`` queries, ``[b, ng, sk, hn]``
    keys/values (grouped-query natively); LSE ``[b, np, sq]`` float32."""

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q, k, v, causal):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, scale=self.scale)
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, scale=self.scale)


class _CudaEfficientKernel:
    """PyTorch's memory-efficient CUDA attention (any float dtype). Key/value heads are
    expanded to the query heads per block and their gradients summed back; the kernel's
    LSE is padded to a multiple of 32 rows, sliced here to ``[b, np, sq]``."""

    _LSE_ALIGN = 32

    def __init__(self, scale: float):
        self.scale = scale

    @staticmethod
    def _expand(x, heads):
        return x if x.size(1) == heads else x.repeat_interleave(heads // x.size(1), dim=1)

    def forward(self, q, k, v, causal):
        heads = q.size(1)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, self._expand(k, heads), self._expand(v, heads), None, True, 0.0, causal,
            scale=self.scale)
        return out, lse[..., :q.size(2)]

    def backward(self, dout, q, k, v, out, lse, causal):
        heads, sq = q.size(1), q.size(2)
        padded = -(-sq // self._LSE_ALIGN) * self._LSE_ALIGN
        lse = torch.nn.functional.pad(lse, (0, padded - sq)).contiguous()
        empty = torch.empty((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, self._expand(k, heads), self._expand(v, heads), None,
            out.contiguous(), lse, empty, empty, 0.0, [True, True, True, False], causal,
            scale=self.scale)
        if k.size(1) != heads:  # [b, np, sk, hn] -> sum over each group -> [b, ng, sk, hn]
            b, _, sk, hn = dk.shape
            dk = dk.view(b, k.size(1), -1, sk, hn).sum(2)
            dv = dv.view(b, k.size(1), -1, sk, hn).sum(2)
        return dq, dk, dv


def _fused_kernel(device_type: str, scale: float):
    return _CudaEfficientKernel(scale) if device_type == "cuda" else _CpuFusedKernel(scale)


def _ring_steps(ring: Optional[_Ring], kv, seq: int, causal: bool):
    """The ring walk every pass shares. Yields ``(step, block, rows, cols, kv)`` per step:
    the block plan, its query rows and key columns in this rank's ``seq`` rows, and the K/V
    block held at that step. The next block's transfer starts before the step is yielded
    (overlapping the caller's compute) and is waited for when the caller asks for the next
    step."""
    cp_size, cp_rank = (ring.size, ring.rank) if ring is not None else (1, 0)
    for step in range(cp_size):
        transfer = ring.shift(kv, _KV_TAG) if step + 1 < cp_size else None
        block = ring_block_plan(step, cp_rank, cp_size, causal)
        yield step, block, _rows(block.query, seq), _rows(block.key, seq), kv
        if transfer is not None:
            kv = transfer.wait()


def _fused_ring_forward(ring: Optional[_Ring], q4, kv, kernel, causal):
    """Ring on fused blocks: ``out [b, np, s, hn]`` and ``lse [b, np, s]`` (float32)."""
    out = lse = None
    for _, block, rows, cols, kv in _ring_steps(ring, kv, q4.size(2), causal):
        block_out, block_lse = kernel.forward(q4[..., rows, :], kv[0][..., cols, :],
                                              kv[1][..., cols, :], block.causal)
        if out is None:  # step 0 covers every query row
            out, lse = block_out.float(), block_lse.float()
        else:
            _merge_into(out[..., rows, :], lse[..., rows], block_out.float(), block_lse)
    return out, lse


def _fused_ring_backward(ring: Optional[_Ring], q4, kv, out4, lse, dout4, kernel, causal):
    """Returns ``dq [b, np, s, hn]`` and ``dkv [2, b, ng, s, hn]`` (float32)."""
    dq = torch.zeros(q4.shape, dtype=torch.float32, device=q4.device)
    dkv_transfer: Optional[_Transfer] = None
    dkv = None
    for _, block, rows, cols, kv in _ring_steps(ring, kv, q4.size(2), causal):
        # The merged output and LSE make the kernel's backward the block's exact share.
        block_dq, dk, dv = kernel.backward(
            dout4[..., rows, :], q4[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :],
            out4[..., rows, :], lse[..., rows].contiguous(), block.causal)
        dq[..., rows, :] += block_dq
        dkv, dkv_transfer = _pass_dkv(kv, dkv_transfer, ring, cols, dk, dv)
    if dkv_transfer is not None:
        dkv = dkv_transfer.wait()
    return dq, dkv


def _pass_dkv(kv, dkv_transfer, ring, cols, dk, dv):
    """Add this rank's share ``dk``/``dv`` to the visiting key/value block's gradient
    (accumulated by the ranks it already passed through) and send it on along the ring:
    after cp hops in total it is back with its owner. Returns ``(dkv, transfer)``."""
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device) \
        if dkv_transfer is None else dkv_transfer.wait()
    dkv[0][..., cols, :] += dk
    dkv[1][..., cols, :] += dv
    return dkv, (ring.shift(dkv, _DKV_TAG) if ring is not None else None)


class FusedRingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the ring on fused block kernels (no dropout); use
    :func:`ring_attention`."""

    @staticmethod
    def forward(ctx, query, key, value, cp_group, causal, softmax_scale):
        ring = _Ring(cp_group) if cp_group is not None and \
            dist.get_world_size(cp_group) > 1 else None
        kernel = _fused_kernel(query.device.type, softmax_scale)
        q4 = query.permute(1, 2, 0, 3)         # [b, np, s/cp, hn] (a view)
        kv = _pack_kv(key, value)              # [2, b, ng, s/cp, hn]
        out, lse = _fused_ring_forward(ring, q4, kv, kernel, causal)
        out = out.to(query.dtype)              # [b, np, s/cp, hn]
        ctx.save_for_backward(q4, kv, out, lse)
        ctx.ring, ctx.causal, ctx.kernel = ring, causal, kernel
        return out.permute(2, 0, 1, 3).contiguous()  # [s/cp, b, np, hn]

    @staticmethod
    def backward(ctx, grad_output):
        q4, kv, out, lse = ctx.saved_tensors
        dout4 = grad_output.permute(1, 2, 0, 3)  # [s, b, np, hn] -> [b, np, s, hn]
        dq, dkv = _fused_ring_backward(ctx.ring, q4, kv, out, lse, dout4, ctx.kernel,
                                       ctx.causal)
        # [b, np, s, hn] -> [s, b, np, hn]; [2, b, ng, s, hn] -> [s, b, ng, hn] each
        dq = dq.permute(2, 0, 1, 3).to(q4.dtype).contiguous()
        dk = dkv[0].permute(2, 0, 1, 3).to(kv.dtype).contiguous()
        dv = dkv[1].permute(2, 0, 1, 3).to(kv.dtype).contiguous()
        return (dq, dk, dv) + (None,) * 3


# --------------------------------------------------------------------------------------
# Forward and backward passes
# --------------------------------------------------------------------------------------
def _block_keep(dropout: Optional[_Dropout], step, cp_rank, cp_size, rows, cols, shape):
    if dropout is None:
        return None, 0.0
    src = ring_source_rank(step, cp_rank, cp_size)
    return dropout.keep(cp_rank, src, rows, cols, shape), dropout.p


def _ring_forward(ring: Optional[_Ring], q5, kv, scale, causal, dropout: Optional[_Dropout]):
    """Run the ring; returns ``out [b, ng, g, s, hn]`` and ``lse [b, ng, g, s]`` (fp32)."""
    cp_size, cp_rank = (ring.size, ring.rank) if ring is not None else (1, 0)
    out = lse = None
    for step, block, rows, cols, kv in _ring_steps(ring, kv, q5.size(3), causal):
        keep, p = _block_keep(dropout, step, cp_rank, cp_size, rows, cols, q5.shape)
        block_out, block_lse = _block_forward(q5[..., rows, :], kv[0][..., cols, :],
                                              kv[1][..., cols, :], scale, block.causal,
                                              keep, p)
        if out is None:  # step 0 covers every query row (the diagonal or a full block)
            out, lse = block_out, block_lse
        else:
            _merge_into(out[..., rows, :], lse[..., rows], block_out, block_lse)
    return out, lse


def _ring_backward(ring: Optional[_Ring], q5, kv, out5, lse, dout5, scale, causal,
                   dropout: Optional[_Dropout]):
    """Returns ``dq [b, ng, g, s, hn]`` and ``dkv [2, b, ng, s, hn]`` (fp32)."""
    cp_size, cp_rank = (ring.size, ring.rank) if ring is not None else (1, 0)
    delta = (dout5.float() * out5.float()).sum(-1)  # rowsum(dO * O): [b, ng, g, s]
    dq = torch.zeros(q5.shape, dtype=torch.float32, device=q5.device)
    dkv_transfer: Optional[_Transfer] = None
    dkv = None
    for step, block, rows, cols, kv in _ring_steps(ring, kv, q5.size(3), causal):
        keep, p = _block_keep(dropout, step, cp_rank, cp_size, rows, cols, q5.shape)
        block_dq, dk, dv = _block_backward(
            q5[..., rows, :], kv[0][..., cols, :], kv[1][..., cols, :],
            dout5[..., rows, :], delta[..., rows], lse[..., rows], scale, block.causal,
            keep, p)
        dq[..., rows, :] += block_dq
        dkv, dkv_transfer = _pass_dkv(kv, dkv_transfer, ring, cols, dk, dv)
    if dkv_transfer is not None:
        dkv = dkv_transfer.wait()
    return dq, dkv


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the ring; use :func:`ring_attention`."""

    @staticmethod
    def forward(ctx, query, key, value, cp_group, causal, softmax_scale, dropout_p,
                dropout_seed, head_offset):
        ring = _Ring(cp_group) if cp_group is not None and \
            dist.get_world_size(cp_group) > 1 else None
        dropout = None
        if dropout_p > 0.0:
            heads = torch.arange(query.size(2), device=query.device) + head_offset
            dropout = _Dropout(dropout_p, dropout_seed, heads, query.size(0),
                               ring.size if ring is not None else 1)
        ng = key.size(2)
        q5 = _grouped_queries(query, ng)       # [b, ng, g, s/cp, hn]
        kv = _pack_kv(key, value)              # [2, b, ng, s/cp, hn]
        out, lse = _ring_forward(ring, q5, kv, softmax_scale, causal, dropout)
        out = out.to(query.dtype)
        ctx.save_for_backward(q5, kv, out, lse)
        ctx.ring, ctx.causal, ctx.scale, ctx.dropout = ring, causal, softmax_scale, dropout
        ctx.dtypes = (query.dtype, key.dtype, value.dtype)
        return _from_grouped_queries(out)      # [s/cp, b, np, hn]

    @staticmethod
    def backward(ctx, grad_output):
        q5, kv, out5, lse = ctx.saved_tensors
        dout5 = _grouped_queries(grad_output, kv.size(2))
        dq, dkv = _ring_backward(ctx.ring, q5, kv, out5, lse, dout5, ctx.scale, ctx.causal,
                                 ctx.dropout)
        q_dtype, k_dtype, v_dtype = ctx.dtypes
        # [2, b, ng, s, hn] -> [s, b, ng, hn] each
        dk = dkv[0].permute(2, 0, 1, 3).to(k_dtype).contiguous()
        dv = dkv[1].permute(2, 0, 1, 3).to(v_dtype).contiguous()
        return (_from_grouped_queries(dq).to(q_dtype), dk, dv) + (None,) * 6


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   cp_group: Optional[dist.ProcessGroup], causal: bool = True,
                   softmax_scale: Optional[float] = None, dropout_p: float = 0.0,
                   dropout_seed: Optional[int] = None, head_offset: int = 0,
                   fused: bool = True) -> torch.Tensor:
    """Exact (causal) attention over a sequence split over ``cp_group`` in zigzag order.

    Args:
        query: ``[s/cp, b, np, hn]`` this rank's tokens (chunks ``r`` and ``2cp-1-r``).
        key: ``[s/cp, b, ng, hn]`` with ``ng`` dividing ``np`` (grouped-query attention:
            query head ``j`` uses key/value head ``j // (np/ng)``).
        value: like ``key``, or ``[s/cp, b, ng, hv]`` with its own head dim (padded to
            a common width inside, see the module docstring).
        cp_group: the context-parallel group; None or a group of one rank computes plain
            attention on the local tokens.
        causal: causal mask over global positions; False: every query sees every key.
        softmax_scale: score scale (default ``1/sqrt(hn)``).
        dropout_p: attention-probability dropout (0: none). The mask is a hash of global
            coordinates (:mod:`.keyed_dropout`): the same for every cp and tp layout, and
            recomputed in backward instead of stored.
        dropout_seed: key of the dropout mask; required when ``dropout_p > 0`` and equal
            on all ranks of ``cp_group`` (draw a fresh one per step and layer).
        head_offset: global index of the first local query head (``tp_rank * np/tp``), so
            the dropout mask does not depend on the tp layout either.
        fused: run each block on a fused kernel that returns its LSE (no ``[s/cp, s/cp]``
            scores); False, or ``dropout_p > 0``, runs the explicit float32 block math.

    Returns:
        ``[s/cp, b, np, hv]`` (``hv`` = value head dim) in ``query``'s dtype;
        differentiable in query, key, value.
    """
    cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
    _check_shapes(query, key, value, causal and cp_size > 1)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(query.size(-1))
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and dropout_seed is None:
        raise ValueError("dropout_p > 0 needs a dropout_seed equal on all cp ranks")
    value_dim = value.size(-1)
    query, key, value = _pad_to_common_head_dim(query, key, value)
    if fused and dropout_p == 0.0:
        out = FusedRingAttentionFunction.apply(query, key, value, cp_group, causal,
                                               softmax_scale)
    else:
        out = RingAttentionFunction.apply(query, key, value, cp_group, causal, softmax_scale,
                                          dropout_p, dropout_seed, head_offset)
    # [s/cp, b, np, max(hn, hv)] -> [s/cp, b, np, hv]: the padded channels are zero.
    return out if out.size(-1) == value_dim else out[..., :value_dim]


def _pad_to_common_head_dim(query, key, value):
    """Zero-pad query/key or value on the head dim to one width (module docstring):
    ``[s, b, n, hn]``, ``[s, b, ng, hn]``, ``[s, b, ng, hv]`` -> all ``max(hn, hv)``."""
    hn, hv = key.size(-1), value.size(-1)
    if hn < hv:  # zero query/key channels leave every score unchanged
        query, key = F.pad(query, (0, hv - hn)), F.pad(key, (0, hv - hn))
    elif hv < hn:  # zero value channels give zero output channels, sliced off
        value = F.pad(value, (0, hn - hv))
    return query, key, value


def _check_shapes(query, key, value, two_chunks: bool) -> None:
    if (query.dim(), key.dim(), value.dim()) != (4, 4, 4) or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"ring_attention expects query [s, b, np, hn], key [s, b, ng, hn] "
                         f"and value [s, b, ng, hv]; got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    s, b, np_, hn = query.shape
    if key.shape[0] != s or key.shape[1] != b or key.shape[3] != hn:
        raise ValueError(f"key/value {tuple(key.shape)} do not match query "
                         f"{tuple(query.shape)} in sequence, batch or head dim")
    if np_ % key.size(2):
        raise ValueError(f"query heads ({np_}) must be a multiple of key/value heads "
                         f"({key.size(2)})")
    if two_chunks and s % 2:
        raise ValueError(f"the local sequence ({s}) must hold two equal chunks "
                         "(use sequence_split with seq_len divisible by 2 * cp)")
