"""Point-to-point exchange of activations and gradients between pipeline stages.

Activations flow forward (stage ``r`` sends its output to ``r + 1``, the *next* rank)
and gradients flow backward (``r + 1`` sends the gradient of that output back to the
*previous* rank). With interleaving the ring wraps: the last rank's chunk ``c`` feeds the
first rank's chunk ``c + 1``.

Every exchange is one call to :meth:`P2PCommunicator.communicate` that posts all its
sends and receives together and then waits for all of them. Neighbouring ranks call it
with matching halves (``send_forward_recv_backward`` on stage ``r`` meets
``send_backward_recv_forward`` on ``r + 1``), so neither blocks the other:

* ``config.batch_p2p_comm=True``: one ``batch_isend_irecv`` (one NCCL group).
* otherwise: individual ``isend`` / ``irecv``, even ranks posting sends first and odd
  ranks receives first (NCCL needs that order without a group; gloo does not care).

Activation and gradient messages carry different tags and are posted activation-first on
both ends, so with ``pp=2`` (next and previous rank are the same peer) the two messages
on one link cannot be swapped.

A wait that takes longer than ``timeout`` (default :data:`DEFAULT_P2P_TIMEOUT`) raises
``RuntimeError`` naming this rank, the peer and the operation, instead of hanging.

Shapes: every tensor is ``[s, b, h]`` with ``s = seq_length / cp`` (``/ tp`` too under
sequence parallelism), ``b = micro_batch_size`` and ``h = hidden_size``, agreed up front
(:func:`get_tensor_shape`); with ``config.variable_seq_lengths`` each message is preceded
by its shape (an int64 ``[3]`` tensor).
"""

from __future__ import annotations

import datetime
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megacore import device, parallel_state
from megacore.model_parallel_config import ModelParallelConfig
from megacore.parallel_layout import ParallelLayout

__all__ = [
    "DEFAULT_P2P_TIMEOUT",
    "P2PCommunicator",
    "PendingSends",
    "get_tensor_shape",
    "recv_forward",
    "recv_backward",
    "send_forward",
    "send_backward",
    "send_forward_recv_backward",
    "send_backward_recv_forward",
    "send_forward_recv_forward",
    "send_backward_recv_backward",
    "send_forward_backward_recv_forward_backward",
]

DEFAULT_P2P_TIMEOUT = datetime.timedelta(minutes=10)
"""How long one exchange may wait before failing. Generous: the peer may be running a
whole forward pass, the first step's warm-up or a data-loader stall meanwhile."""

Shape = Tuple[int, ...]

# Message tags: data and shape messages for each direction of the pipeline.
_TAG_ACTIVATION, _TAG_GRADIENT, _TAG_ACTIVATION_SHAPE, _TAG_GRADIENT_SHAPE = 0, 1, 2, 3


def get_tensor_shape(*, seq_length: int, micro_batch_size: int,
                     config: ModelParallelConfig,
                     layout: Optional[ParallelLayout] = None) -> Shape:
    """Shape of the tensors exchanged between stages: ``[s, b, h]``.

    ``s`` is ``seq_length / cp`` and, under sequence parallelism, further ``/ tp``.
    ``h`` is ``config.hidden_size`` (a ``TransformerConfig`` field). The degrees come from
    ``layout`` (default: the layout of ``parallel_state``'s groups), the same source the
    parallel layers split by, never from the config's degree fields.

    Raises:
        ValueError: when the sequence does not split or the config has no hidden size.
    """
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        raise ValueError("pipeline tensor shapes need config.hidden_size (use a config "
                         "with a hidden_size field, e.g. TransformerConfig)")
    if layout is None:
        layout = parallel_state.get_process_group_collection().layout
    cp, tp = layout.context_parallel_size, layout.tensor_model_parallel_size
    divisor = cp * (tp if config.sequence_parallel else 1)
    if seq_length % divisor:
        raise ValueError(
            f"--seq-length {seq_length} must be divisible by --context-parallel-size ({cp})"
            + (f" x --tensor-model-parallel-size ({tp}) under --sequence-parallel"
               if config.sequence_parallel else ""))
    return (seq_length // divisor, micro_batch_size, hidden)


class P2PCommunicator:
    """Sends and receives between this rank and its pipeline neighbours.

    Args:
        config: supplies ``pipeline_dtype``, ``batch_p2p_comm`` and
            ``variable_seq_lengths``.
        pp_group: pipeline group (default: ``parallel_state``'s, resolved here once).
        timeout: longest wait of one exchange (default :data:`DEFAULT_P2P_TIMEOUT`).
    """

    def __init__(self, config: ModelParallelConfig, *,
                 pp_group: Optional[dist.ProcessGroup] = None,
                 timeout: Optional[datetime.timedelta] = None):
        self.config = config
        self.group = pp_group if pp_group is not None else (
            parallel_state.get_pipeline_model_parallel_group())
        ranks = dist.get_process_group_ranks(self.group)
        self.pp_size = len(ranks)
        self.pp_rank = dist.get_group_rank(self.group, dist.get_rank())
        self.next_rank = ranks[(self.pp_rank + 1) % self.pp_size]
        self.prev_rank = ranks[(self.pp_rank - 1) % self.pp_size]
        self.timeout = timeout or DEFAULT_P2P_TIMEOUT

    # -- public -------------------------------------------------------------------------
    def communicate(self, *, tensor_send_next: Optional[torch.Tensor] = None,
                    tensor_send_prev: Optional[torch.Tensor] = None,
                    recv_prev: bool = False, recv_next: bool = False,
                    tensor_shape: Optional[Sequence[int]] = None
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Post the given sends and receives together, wait for all, return what arrived.

        Args:
            tensor_send_next: activation ``[s, b, h]`` for the next stage.
            tensor_send_prev: gradient ``[s, b, h]`` for the previous stage.
            recv_prev: receive an activation from the previous stage.
            recv_next: receive a gradient from the next stage.
            tensor_shape: shape of received tensors (ignored with variable_seq_lengths).

        Returns:
            ``(tensor_recv_prev, tensor_recv_next)``; the activation comes back with
            ``requires_grad=True`` so the receiving stage can return its gradient.
        """
        for what, tensor in (("activation", tensor_send_next), ("gradient", tensor_send_prev)):
            if tensor is not None:
                self._check_send(what, tensor, tensor_shape)
        shape_prev = shape_next = tensor_shape
        if self.config.variable_seq_lengths:
            shape_prev, shape_next = self._exchange_shapes(
                tensor_send_next, tensor_send_prev, recv_prev, recv_next)
        elif (recv_prev or recv_next) and tensor_shape is None:
            raise ValueError("tensor_shape is required unless config.variable_seq_lengths")
        recv_prev_t = self._empty(shape_prev, requires_grad=True) if recv_prev else None
        recv_next_t = self._empty(shape_next) if recv_next else None
        self._exchange([("send", tensor_send_next, self.next_rank, _TAG_ACTIVATION),
                        ("recv", recv_prev_t, self.prev_rank, _TAG_ACTIVATION),
                        ("send", tensor_send_prev, self.prev_rank, _TAG_GRADIENT),
                        ("recv", recv_next_t, self.next_rank, _TAG_GRADIENT)])
        return recv_prev_t, recv_next_t

    def communicate_eager_sends(self, *, tensor_send_next: Optional[torch.Tensor] = None,
                                tensor_send_prev: Optional[torch.Tensor] = None,
                                recv_prev: bool = False, recv_next: bool = False,
                                tensor_shape: Optional[Sequence[int]] = None,
                                pending_sends: Optional["PendingSends"] = None
                                ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                           "PendingSends"]:
        """Like :meth:`communicate`, but without waiting for this call's sends.

        Waits for the receives and for ``pending_sends`` (the previous call's sends), and
        returns this call's sends still in flight: the caller waits for them at its next
        exchange (or with ``PendingSends.wait()``) and must keep the sent tensors alive
        until then. The zero-bubble schedule computes while its outputs travel. Needs
        fixed shapes (no ``variable_seq_lengths``: the shape messages would block).
        """
        if self.config.variable_seq_lengths:
            raise ValueError("eager sends (--pipeline-schedule zb-h1) need fixed sequence "
                             "lengths; unset variable_seq_lengths")
        for what, tensor in (("activation", tensor_send_next), ("gradient", tensor_send_prev)):
            if tensor is not None:
                self._check_send(what, tensor, tensor_shape)
        if (recv_prev or recv_next) and tensor_shape is None:
            raise ValueError("tensor_shape is required for a receive")
        recv_prev_t = self._empty(tensor_shape, requires_grad=True) if recv_prev else None
        recv_next_t = self._empty(tensor_shape) if recv_next else None
        sends = [op for op in (("send", tensor_send_next, self.next_rank, _TAG_ACTIVATION),
                               ("send", tensor_send_prev, self.prev_rank, _TAG_GRADIENT))
                 if op[1] is not None]
        recvs = [op for op in (("recv", recv_prev_t, self.prev_rank, _TAG_ACTIVATION),
                               ("recv", recv_next_t, self.next_rank, _TAG_GRADIENT))
                 if op[1] is not None]
        send_works = self._post(sends)
        recv_works = self._post(recvs)
        if pending_sends is not None:
            pending_sends.wait()
        self._wait(recv_works, recvs)
        return recv_prev_t, recv_next_t, PendingSends(self, send_works, sends)

    def communicate_directed(self, *, sends: Sequence[Tuple[torch.Tensor, bool, str]],
                             recvs: Sequence[Tuple[bool, str]],
                             tensor_shape: Sequence[int]
                             ) -> Tuple[List[torch.Tensor], "PendingSends"]:
        """Post sends and receives whose direction is given per message; wait only for
        the receives.

        ZBV's second chunk runs the V backwards: its activations go to the *previous*
        rank and its gradients to the *next*, so direction and kind are independent here.

        Args:
            sends: ``(tensor, to_next, kind)`` with kind ``"activation"`` or ``"gradient"``.
            recvs: ``(from_next, kind)``; activations come back with ``requires_grad``.
            tensor_shape: shape of every tensor (fixed lengths only).

        Returns:
            The received tensors in ``recvs`` order, and the sends still in flight (wait
            for them with ``PendingSends.wait()``; keep the tensors alive until then).
        """
        if self.config.variable_seq_lengths:
            raise ValueError("--pipeline-schedule zbv needs fixed sequence lengths; unset "
                             "variable_seq_lengths")
        tags = {"activation": _TAG_ACTIVATION, "gradient": _TAG_GRADIENT}
        send_ops = []
        for tensor, to_next, kind in sends:
            self._check_send(kind, tensor, tensor_shape)
            send_ops.append(("send", tensor, self.next_rank if to_next else self.prev_rank,
                             tags[kind]))
        recv_ops = [("recv", self._empty(tensor_shape, requires_grad=kind == "activation"),
                     self.next_rank if from_next else self.prev_rank, tags[kind])
                    for from_next, kind in recvs]
        send_works = self._post(send_ops)
        self._wait(self._post(recv_ops), recv_ops)
        return [op[1] for op in recv_ops], PendingSends(self, send_works, send_ops)

    # -- helpers ------------------------------------------------------------------------
    def _post(self, ops: List[Tuple[str, Optional[torch.Tensor], int, int]]) -> list:
        """Post ``(kind, tensor, peer, tag)`` ops one by one; return their works."""
        return [(dist.isend if kind == "send" else dist.irecv)(tensor, peer, self.group, tag)
                for kind, tensor, peer, tag in ops]

    def _check_send(self, what: str, tensor: torch.Tensor,
                    tensor_shape: Optional[Sequence[int]]) -> None:
        # gloo reads non-contiguous memory as if it were contiguous: silent corruption.
        assert tensor.is_contiguous(), f"pipeline {what} to send must be contiguous"
        if tensor.dtype != self.config.pipeline_dtype:
            raise TypeError(f"pipeline {what} has dtype {tensor.dtype} but "
                            f"config.pipeline_dtype is {self.config.pipeline_dtype}")
        if (not self.config.variable_seq_lengths and tensor_shape is not None
                and tuple(tensor.shape) != tuple(tensor_shape)):
            raise ValueError(f"pipeline {what} has shape {tuple(tensor.shape)} but the stages "
                             f"agreed on {tuple(tensor_shape)} (seq_length, micro_batch_size, "
                             "hidden_size); set config.variable_seq_lengths=True if it varies")

    def _empty(self, shape: Sequence[int], requires_grad: bool = False) -> torch.Tensor:
        return torch.empty(tuple(shape), dtype=self.config.pipeline_dtype,
                           device=device.current_device(), requires_grad=requires_grad)

    def _exchange_shapes(self, send_next, send_prev, recv_prev, recv_next):
        """Send each outgoing tensor's shape ahead of it; return the incoming shapes."""
        def shape_of(t):
            return None if t is None else torch.tensor(t.shape, dtype=torch.int64,
                                                       device=device.current_device())

        def holder(flag):
            if not flag:
                return None
            return torch.empty(3, dtype=torch.int64, device=device.current_device())

        got_prev, got_next = holder(recv_prev), holder(recv_next)
        self._exchange([("send", shape_of(send_next), self.next_rank, _TAG_ACTIVATION_SHAPE),
                        ("recv", got_prev, self.prev_rank, _TAG_ACTIVATION_SHAPE),
                        ("send", shape_of(send_prev), self.prev_rank, _TAG_GRADIENT_SHAPE),
                        ("recv", got_next, self.next_rank, _TAG_GRADIENT_SHAPE)])
        as_shape = (lambda t: None if t is None else tuple(int(x) for x in t.tolist()))
        return as_shape(got_prev), as_shape(got_next)

    def _exchange(self, ops: List[Tuple[str, Optional[torch.Tensor], int, int]]) -> None:
        """Post ``(kind, tensor, peer, tag)`` ops (None tensors skipped), then wait for all."""
        ops = [op for op in ops if op[1] is not None]
        if not ops:
            return
        if self.config.batch_p2p_comm:
            p2p = [dist.P2POp(dist.isend if kind == "send" else dist.irecv, tensor, peer,
                              self.group, tag) for kind, tensor, peer, tag in ops]
            works = dist.batch_isend_irecv(p2p)
        else:
            # Without a group NCCL blocks on the first unmatched op: even ranks send
            # first, odd ranks receive first, so each neighbour pair meets.
            send_first = self.pp_rank % 2 == 0
            ops = sorted(ops, key=lambda op: (op[0] == "send") != send_first)
            works = [(dist.isend if kind == "send" else dist.irecv)(tensor, peer, self.group, tag)
                     for kind, tensor, peer, tag in ops]
        self._wait(works, ops)

    def _wait(self, works, ops) -> None:
        deadline = datetime.datetime.now() + self.timeout
        for i, work in enumerate(works):
            # A coalesced batch may return fewer handles than ops: then name them all.
            pending = [ops[i]] if len(works) == len(ops) else ops
            # A zero timeout means 'wait forever' to c10d: never pass less than 1 ms.
            remaining = max(deadline - datetime.datetime.now(),
                            datetime.timedelta(milliseconds=1))
            try:
                work.wait(timeout=remaining)
            except Exception as error:  # noqa: BLE001 - backends raise various types
                raise RuntimeError(self._describe_failure(pending, error)) from error

    def _describe_failure(self, ops, error: Exception) -> str:
        names = {(_TAG_ACTIVATION, "send"): "send activation to next",
                 (_TAG_ACTIVATION, "recv"): "receive activation from previous",
                 (_TAG_GRADIENT, "send"): "send gradient to previous",
                 (_TAG_GRADIENT, "recv"): "receive gradient from next",
                 (_TAG_ACTIVATION_SHAPE, "send"): "send activation shape to next",
                 (_TAG_ACTIVATION_SHAPE, "recv"): "receive activation shape from previous",
                 (_TAG_GRADIENT_SHAPE, "send"): "send gradient shape to previous",
                 (_TAG_GRADIENT_SHAPE, "recv"): "receive gradient shape from next"}
        what = "; ".join(f"{names[(tag, kind)]} (peer rank {peer})"
                         for kind, _, peer, tag in ops)
        return (f"pipeline p2p failed or timed out (limit {self.timeout.total_seconds():g}s) "
                f"on rank {dist.get_rank()} (pipeline rank {self.pp_rank} of {self.pp_size}) "
                f"during: {what}. The peer is probably stuck, dead, or running a different "
                f"schedule. Backend said: {error}")


class PendingSends:
    """Sends posted by :meth:`P2PCommunicator.communicate_eager_sends`, not yet waited
    for; holds the sent tensors so their memory lives until the sends complete."""

    def __init__(self, comm: P2PCommunicator, works: list, ops: list):
        self.comm, self.works, self.ops = comm, works, ops

    @property
    def tensors(self) -> List[torch.Tensor]:
        return [op[1] for op in self.ops]

    def completed(self) -> bool:
        """Whether every send has completed (without waiting)."""
        return all(work.is_completed() for work in self.works)

    def wait(self) -> None:
        if self.works:
            self.comm._wait(self.works, self.ops)
        self.works, self.ops = [], []


# --------------------------------------------------------------------------------------
# Megatron-named helpers on the default grid; they skip the pipeline's ends themselves
# (virtual-stage aware through parallel_state).
# --------------------------------------------------------------------------------------
def _communicator(config: ModelParallelConfig, timeout=None) -> P2PCommunicator:
    return P2PCommunicator(config, timeout=timeout)


def _first() -> bool:
    return parallel_state.is_pipeline_first_stage()


def _last() -> bool:
    return parallel_state.is_pipeline_last_stage()


def recv_forward(tensor_shape: Shape, config: ModelParallelConfig,
                 timeout=None) -> Optional[torch.Tensor]:
    """Activation from the previous stage (None on the first stage)."""
    if _first():
        return None
    return _communicator(config, timeout).communicate(recv_prev=True,
                                                      tensor_shape=tensor_shape)[0]


def recv_backward(tensor_shape: Shape, config: ModelParallelConfig,
                  timeout=None) -> Optional[torch.Tensor]:
    """Gradient of this stage's output from the next stage (None on the last stage)."""
    if _last():
        return None
    return _communicator(config, timeout).communicate(recv_next=True,
                                                      tensor_shape=tensor_shape)[1]


def send_forward(output_tensor: torch.Tensor, config: ModelParallelConfig, timeout=None) -> None:
    """Activation to the next stage (nothing on the last stage)."""
    if not _last():
        _communicator(config, timeout).communicate(tensor_send_next=output_tensor)


def send_backward(input_tensor_grad: torch.Tensor, config: ModelParallelConfig,
                  timeout=None) -> None:
    """Gradient of this stage's input to the previous stage (nothing on the first)."""
    if not _first():
        _communicator(config, timeout).communicate(tensor_send_prev=input_tensor_grad)


def send_forward_recv_backward(output_tensor: torch.Tensor, tensor_shape: Shape,
                               config: ModelParallelConfig, timeout=None
                               ) -> Optional[torch.Tensor]:
    """Send the activation forward and receive its gradient back, as one exchange."""
    if _last():
        return None
    return _communicator(config, timeout).communicate(
        tensor_send_next=output_tensor, recv_next=True, tensor_shape=tensor_shape)[1]


def send_backward_recv_forward(input_tensor_grad: torch.Tensor, tensor_shape: Shape,
                               config: ModelParallelConfig, timeout=None
                               ) -> Optional[torch.Tensor]:
    """Send a gradient back and receive the next activation, as one exchange."""
    if _first():
        return None
    return _communicator(config, timeout).communicate(
        tensor_send_prev=input_tensor_grad, recv_prev=True, tensor_shape=tensor_shape)[0]


def send_forward_recv_forward(output_tensor: Optional[torch.Tensor], recv_prev: bool,
                              tensor_shape: Shape, config: ModelParallelConfig,
                              timeout=None) -> Optional[torch.Tensor]:
    """Interleaved warm-up: send an activation on and receive the next one, as one exchange."""
    return _communicator(config, timeout).communicate(
        tensor_send_next=output_tensor, recv_prev=recv_prev, tensor_shape=tensor_shape)[0]


def send_backward_recv_backward(input_tensor_grad: Optional[torch.Tensor], recv_next: bool,
                                tensor_shape: Shape, config: ModelParallelConfig,
                                timeout=None) -> Optional[torch.Tensor]:
    """Interleaved cool-down: send a gradient back and receive the next one."""
    return _communicator(config, timeout).communicate(
        tensor_send_prev=input_tensor_grad, recv_next=recv_next, tensor_shape=tensor_shape)[1]


def send_forward_backward_recv_forward_backward(
        output_tensor: Optional[torch.Tensor], input_tensor_grad: Optional[torch.Tensor],
        recv_prev: bool, recv_next: bool, tensor_shape: Shape, config: ModelParallelConfig,
        timeout=None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Interleaved steady state: all four transfers as one exchange."""
    return _communicator(config, timeout).communicate(
        tensor_send_next=output_tensor, tensor_send_prev=input_tensor_grad,
        recv_prev=recv_prev, recv_next=recv_next, tensor_shape=tensor_shape)
