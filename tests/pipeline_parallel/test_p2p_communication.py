"""Pipeline p2p on 2 gloo ranks: every combined exchange delivers the right tensor.

Each rank sends tensors whose values name the sender and the kind, so a swapped or
misrouted message shows up as a wrong value; p2p copies bytes, so equality is exact.
"""

import datetime
import time

import pytest
import torch

from megacore import parallel_state
from megacore.parallel_layout import ParallelLayout
from megacore.pipeline_parallel import p2p_communication as p2p
from tests.multirank import run_distributed
from tests.pipeline_parallel.toy_model import ToyConfig

SHAPE = (3, 2, 4)   # [s, b, h]


def _value(rank, kind, shape=SHAPE, dtype=torch.float32):
    base = {"activation": 100.0, "gradient": 200.0}[kind] + 10.0 * rank
    return (torch.arange(torch.Size(shape).numel(), dtype=torch.float32)
            .reshape(shape).add(base).to(dtype))


def _exchanges(batch_p2p_comm):
    """All combined calls between rank 0 (first stage) and rank 1 (last stage)."""
    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = ToyConfig(pipeline_model_parallel_size=2, hidden_size=SHAPE[-1],
                       batch_p2p_comm=batch_p2p_comm)
    act, grad = _value(rank, "activation"), _value(rank, "gradient")
    got = {}
    if rank == 0:
        p2p.send_forward(act, config)
        got["recv_forward_first"] = p2p.recv_forward(SHAPE, config)          # None
        got["fwd_bwd"] = p2p.send_forward_recv_backward(act, SHAPE, config)
        got["bwd"] = p2p.recv_backward(SHAPE, config)
    else:
        got["recv_forward"] = p2p.recv_forward(SHAPE, config)
        got["bwd_fwd"] = p2p.send_backward_recv_forward(grad, SHAPE, config)
        p2p.send_backward(grad, config)
    # pp=2: next and previous rank are the same peer; all four transfers in one exchange,
    # then the interleaved ring helpers (rank 1's "next" wraps to rank 0).
    comm = p2p.P2PCommunicator(config)
    got["all_four"] = comm.communicate(tensor_send_next=act, tensor_send_prev=grad,
                                       recv_prev=True, recv_next=True, tensor_shape=SHAPE)
    got["ring_fwd"] = p2p.send_forward_recv_forward(act, True, SHAPE, config)
    got["ring_bwd"] = p2p.send_backward_recv_backward(grad, True, SHAPE, config)
    got["requires_grad"] = got["all_four"][0].requires_grad
    return got


def _variable_and_dtype():
    rank = parallel_state.get_pipeline_model_parallel_rank()
    got = {}
    config = ToyConfig(pipeline_model_parallel_size=2, hidden_size=4, variable_seq_lengths=True)
    comm = p2p.P2PCommunicator(config)
    for seq in (5, 2):   # the receiver does not know the length in advance
        shape = (seq, 2, 4)
        if rank == 0:
            comm.communicate(tensor_send_next=_value(0, "activation", shape))
        else:
            got[seq] = comm.communicate(recv_prev=True)[0]
    bf16 = ToyConfig(pipeline_model_parallel_size=2, hidden_size=4, bf16=True,
                     params_dtype=torch.bfloat16)
    comm = p2p.P2PCommunicator(bf16)
    if rank == 0:
        comm.communicate(tensor_send_next=_value(0, "activation", dtype=torch.bfloat16))
    else:
        got["bf16"] = comm.communicate(recv_prev=True, tensor_shape=SHAPE)[0]
    return got


def _local_checks_and_timeout():
    rank = parallel_state.get_pipeline_model_parallel_rank()
    config = ToyConfig(pipeline_model_parallel_size=2, hidden_size=4)
    comm = p2p.P2PCommunicator(config, timeout=datetime.timedelta(seconds=1))
    errors = {}
    strided = torch.zeros(3, 2, 8)[..., ::2]   # [3, 2, 4] view with gaps
    for name, tensor in (("contiguous", strided),
                         ("dtype", torch.zeros(SHAPE, dtype=torch.float64)),
                         ("shape", torch.zeros(4, 2, 4))):
        try:
            comm.communicate(tensor_send_next=tensor, tensor_shape=SHAPE)
        except (AssertionError, TypeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    if rank == 1:
        try:
            comm.communicate(recv_prev=True, tensor_shape=SHAPE)   # rank 0 never sends
        except RuntimeError as error:
            errors["timeout"] = str(error)
    else:
        time.sleep(4)   # stay alive, silent, until rank 1's wait has expired
    return errors


def _run_all():
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    return {"batched": _exchanges(True), "unbatched": _exchanges(False),
            "variable": _variable_and_dtype(), "local": _local_checks_and_timeout()}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run_all, 2, timeout=60)


@pytest.mark.parametrize("mode", ["batched", "unbatched"])
def test_combined_exchanges_pair_up(results, mode):
    r0, r1 = results[0][mode], results[1][mode]
    assert r0["recv_forward_first"] is None, "the first stage receives no activation"
    torch.testing.assert_close(r1["recv_forward"], _value(0, "activation"), rtol=0, atol=0)
    torch.testing.assert_close(r0["fwd_bwd"], _value(1, "gradient"), rtol=0, atol=0)
    torch.testing.assert_close(r1["bwd_fwd"], _value(0, "activation"), rtol=0, atol=0)
    torch.testing.assert_close(r0["bwd"], _value(1, "gradient"), rtol=0, atol=0)
    for rank, r in ((0, r0), (1, r1)):
        peer = 1 - rank
        act, grad = r["all_four"]
        torch.testing.assert_close(act, _value(peer, "activation"), rtol=0, atol=0)
        torch.testing.assert_close(grad, _value(peer, "gradient"), rtol=0, atol=0)
        torch.testing.assert_close(r["ring_fwd"], _value(peer, "activation"), rtol=0, atol=0)
        torch.testing.assert_close(r["ring_bwd"], _value(peer, "gradient"), rtol=0, atol=0)
        assert r["requires_grad"], "received activations must be differentiable"


def test_variable_lengths_and_pipeline_dtype(results):
    got = results[1]["variable"]
    for seq in (5, 2):
        torch.testing.assert_close(got[seq], _value(0, "activation", (seq, 2, 4)), rtol=0, atol=0)
    assert got["bf16"].dtype == torch.bfloat16
    torch.testing.assert_close(got["bf16"], _value(0, "activation", dtype=torch.bfloat16),
                               rtol=0, atol=0)


def test_bad_sends_fail_locally(results):
    for rank in (0, 1):
        errors = results[rank]["local"]
        assert errors["contiguous"].startswith("AssertionError")
        assert "contiguous" in errors["contiguous"]
        assert errors["dtype"].startswith("TypeError") and "pipeline_dtype" in errors["dtype"]
        assert errors["shape"].startswith("ValueError")
        assert "variable_seq_lengths" in errors["shape"]


def test_stuck_peer_raises_naming_rank_peer_and_operation(results):
    errors = results[1]["local"]
    message = errors["timeout"]
    assert "on rank 1" in message and "peer rank 0" in message
    assert "receive activation from previous" in message
    assert "limit 1s" in message
    # gloo's own timeout fired (not the connection closing when rank 0 exits after 4 s).
    assert "Timed out" in message


# ---- shapes: pure ------------------------------------------------------------------------
def test_tensor_shape_divides_sequence_by_cp_and_by_tp_under_sequence_parallel():
    def shape(tp=1, cp=1, sp=False):
        config = ToyConfig(hidden_size=8, tensor_model_parallel_size=tp, sequence_parallel=sp,
                           context_parallel_size=cp)
        return p2p.get_tensor_shape(seq_length=16, micro_batch_size=2, config=config,
                                    layout=ParallelLayout.from_degrees(tp=tp, cp=cp))

    assert shape() == (16, 2, 8)
    assert shape(cp=2) == (8, 2, 8)
    assert shape(tp=4) == (16, 2, 8)   # activations replicated
    assert shape(tp=2, sp=True, cp=2) == (4, 2, 8)
    with pytest.raises(ValueError, match="--context-parallel-size"):
        shape(cp=3)
    with pytest.raises(ValueError, match="hidden_size"):
        p2p.get_tensor_shape(seq_length=16, micro_batch_size=2, config=ToyConfig(hidden_size=None),
                             layout=ParallelLayout(world_size=1))


def test_tensor_shape_takes_degrees_from_the_layout_not_the_config():
    # The groups are the truth: a config claiming tp=2, cp=1 under a tp=4, cp=2 layout
    # gets the layout's split (16 / (2 * 4) = 2), as the parallel layers do.
    config = ToyConfig(hidden_size=8, tensor_model_parallel_size=2, sequence_parallel=True)
    layout = ParallelLayout.from_degrees(tp=4, cp=2)
    assert p2p.get_tensor_shape(seq_length=16, micro_batch_size=2, config=config,
                                layout=layout) == (2, 2, 8)
