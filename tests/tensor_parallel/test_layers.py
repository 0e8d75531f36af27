"""Tensor-parallel layers equal their single-process twins (outputs and gathered grads).

Every case builds the unsplit reference from the same seed on each rank, runs the
parallel layer, and compares. Tolerance: fp32 with rtol 1e-5 / atol 1e-5, because a
sharded matmul sums its products in a different order (partial sums per rank, then an
all-reduce) than the single matmul; observed differences are ~1e-7.
"""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megacore import parallel_state as ps
from megacore.model_parallel_config import ModelParallelConfig
from megacore.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    all_gather_along_dim,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    vocab_parallel_cross_entropy,
)
from tests.multirank import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
S, B, H, N = 8, 2, 12, 16  # sequence, batch, in features, out features


def _init(std, w):
    return torch.nn.init.normal_(w, 0.0, std)


def _master(shape, seed, std=0.02):
    torch.manual_seed(seed)
    return _init(std, torch.empty(shape))


def _gather(t, dim):
    return all_gather_along_dim(t.detach().contiguous(), dim, ps.get_tensor_model_parallel_group())


def _column_case(cfg, gather_output, skip_bias_add):
    torch.manual_seed(11)
    layer = ColumnParallelLinear(H, N, config=cfg, init_method=functools.partial(_init, 0.02),
                                 bias=True, gather_output=gather_output,
                                 skip_bias_add=skip_bias_add)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(N, dtype=torch.float32).chunk(layer.tp_size)[layer.tp_rank])
    weight_ref = _master((N, H), 11).requires_grad_()
    bias_ref = torch.arange(N, dtype=torch.float32).requires_grad_()
    torch.manual_seed(5)
    x_ref = torch.randn(S, B, H, requires_grad=True)
    y_ref = F.linear(x_ref, weight_ref, bias_ref)
    (y_ref * torch.arange(N) / N).sum().backward()

    x = x_ref.detach().clone()
    if cfg.sequence_parallel:
        x = x.chunk(layer.tp_size)[layer.tp_rank].contiguous()
    x.requires_grad_()
    y, bias = layer(x)
    if skip_bias_add:
        y = y + bias
    if not gather_output:
        y = _gather_region(y)
    torch.testing.assert_close(y, y_ref, **TOL)
    (y * torch.arange(N) / N).sum().backward()
    x_grad = _gather(x.grad, 0) if cfg.sequence_parallel else x.grad
    torch.testing.assert_close(x_grad, x_ref.grad, **TOL)
    torch.testing.assert_close(_gather(layer.weight.grad, 0), weight_ref.grad, **TOL)
    torch.testing.assert_close(_gather(layer.bias.grad, 0), bias_ref.grad, **TOL)


def _gather_region(y):
    from megacore.tensor_parallel import gather_from_tensor_model_parallel_region
    return gather_from_tensor_model_parallel_region(y)


def _row_case(cfg, skip_bias_add):
    torch.manual_seed(12)
    layer = RowParallelLinear(N, H, config=cfg, init_method=functools.partial(_init, 0.02),
                              bias=True, input_is_parallel=True, skip_bias_add=skip_bias_add)
    with torch.no_grad():
        layer.bias.copy_(torch.linspace(-1, 1, H))
    weight_ref = _master((H, N), 12).requires_grad_()
    bias_ref = torch.linspace(-1, 1, H).requires_grad_()
    torch.manual_seed(6)
    x_ref = torch.randn(S, B, N, requires_grad=True)
    y_ref = F.linear(x_ref, weight_ref, bias_ref)
    (y_ref ** 2).sum().backward()

    tp, rank = layer.tp_size, layer.tp_rank
    x = x_ref.detach().chunk(tp, dim=-1)[rank].contiguous().requires_grad_()
    y, bias = layer(x)
    if skip_bias_add:
        y = y + bias
    y_full = gather_from_sequence_parallel_region(y, False) if cfg.sequence_parallel else y
    torch.testing.assert_close(y_full, y_ref, **TOL)
    (y_full ** 2).sum().backward()
    torch.testing.assert_close(_gather(x.grad, 2), x_ref.grad, **TOL)
    torch.testing.assert_close(_gather(layer.weight.grad, 1), weight_ref.grad, **TOL)
    bias_grad = layer.bias.grad.clone()
    if cfg.sequence_parallel:
        # Each rank saw s/tp tokens: the full bias grad is the sum (finalize_model_grads does this).
        assert layer.bias.sequence_parallel
        dist.all_reduce(bias_grad, group=ps.get_tensor_model_parallel_group())
    torch.testing.assert_close(bias_grad, bias_ref.grad, **TOL)


def _mlp_case(cfg):
    """Column -> GeLU -> Row, the Megatron MLP: one all-reduce (or RS+AG) per direction."""
    torch.manual_seed(13)
    fc1 = ColumnParallelLinear(H, N, config=cfg, init_method=functools.partial(_init, 0.1),
                               bias=False)
    fc2 = RowParallelLinear(N, H, config=cfg, init_method=functools.partial(_init, 0.1),
                            bias=False, input_is_parallel=True)
    torch.manual_seed(13)
    w1 = _init(0.1, torch.empty(N, H)).requires_grad_()
    w2 = _init(0.1, torch.empty(H, N)).requires_grad_()
    torch.manual_seed(7)
    x_ref = torch.randn(S, B, H, requires_grad=True)
    y_ref = F.linear(F.gelu(F.linear(x_ref, w1)), w2)
    y_ref.pow(2).mean().backward()

    x = x_ref.detach()
    if cfg.sequence_parallel:
        x = scatter_to_sequence_parallel_region(x)
    x = x.clone().requires_grad_()
    y = fc2(F.gelu(fc1(x)[0]))[0]
    y_full = gather_from_sequence_parallel_region(y, False) if cfg.sequence_parallel else y
    torch.testing.assert_close(y_full, y_ref, **TOL)
    y_full.pow(2).mean().backward()
    x_grad = _gather(x.grad, 0) if cfg.sequence_parallel else x.grad
    torch.testing.assert_close(x_grad, x_ref.grad, **TOL)
    torch.testing.assert_close(_gather(fc1.weight.grad, 0), w1.grad, **TOL)
    torch.testing.assert_close(_gather(fc2.weight.grad, 1), w2.grad, **TOL)


def _embedding_case(cfg, vocab=32):
    torch.manual_seed(14)
    emb = VocabParallelEmbedding(vocab, H, init_method=functools.partial(_init, 1.0), config=cfg,
                                 reduce_scatter_embeddings=cfg.sequence_parallel)
    table = _master((vocab, H), 14, std=1.0).requires_grad_()
    torch.manual_seed(8)
    ids = torch.randint(0, vocab, (B, S))
    ref = F.embedding(ids, table)  # [b, s, h]
    ref.pow(2).sum().backward()
    if cfg.sequence_parallel:
        out = emb(ids.t().contiguous())                         # [s/tp, b, h]
        out_full = gather_from_sequence_parallel_region(out, False).transpose(0, 1)
    else:
        out_full = emb(ids)
    torch.testing.assert_close(out_full, ref, **TOL)
    out_full.pow(2).sum().backward()
    torch.testing.assert_close(_gather(emb.weight.grad, 0), table.grad, **TOL)


def _cross_entropy_case(vocab, padded, smoothing):
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    torch.manual_seed(15)
    logits_ref = torch.randn(S, B, vocab, requires_grad=True)
    target = torch.randint(0, vocab, (S, B))
    eps = smoothing * vocab / (vocab - 1) if smoothing else 0.0
    loss_ref = F.cross_entropy(logits_ref.view(-1, vocab), target.view(-1), reduction="none",
                               label_smoothing=eps).view(S, B)
    (loss_ref * torch.linspace(0.5, 1.5, S * B).view(S, B)).sum().backward()

    full = torch.cat([logits_ref.detach(), torch.randn(S, B, padded - vocab) * 50], dim=-1)
    local = full.chunk(tp, dim=-1)[rank].contiguous().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, smoothing, vocab_size=vocab)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    (loss * torch.linspace(0.5, 1.5, S * B).view(S, B)).sum().backward()
    grad = _gather(local.grad, 2)
    torch.testing.assert_close(grad[..., :vocab], logits_ref.grad, **TOL)
    assert torch.all(grad[..., vocab:] == 0), "padded vocabulary columns must get no gradient"


def _all_layer_cases(tp):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    sp_options = [False, True] if tp > 1 else [False]
    for sp in sp_options:
        cfg = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp)
        for gather_output, skip in [(False, False), (False, True)] + ([] if sp else [(True, False)]):
            _column_case(cfg, gather_output, skip)
        for skip in (False, True):
            _row_case(cfg, skip)
        _mlp_case(cfg)
        _embedding_case(cfg)
    for vocab, padded, smoothing in [(32, 32, 0.0), (32, 32, 0.1), (29, 32, 0.0), (29, 32, 0.2)]:
        _cross_entropy_case(vocab, padded, smoothing)
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layers_match_single_process(tp):
    assert run_distributed(_all_layer_cases, tp, args=(tp,)) == [True] * tp


def _uneven_errors():
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    cfg = ModelParallelConfig(tensor_model_parallel_size=2)
    messages = []
    for build in (lambda: ColumnParallelLinear(4, 5, config=cfg, init_method=torch.nn.init.zeros_),
                  lambda: RowParallelLinear(5, 4, config=cfg, init_method=torch.nn.init.zeros_,
                                            bias=False, input_is_parallel=True),
                  lambda: VocabParallelEmbedding(31, 4, init_method=torch.nn.init.zeros_,
                                                 config=cfg)):
        try:
            build()
        except ValueError as e:
            messages.append(str(e))
    return messages


def test_indivisible_sizes_are_rejected_with_names():
    messages = run_distributed(_uneven_errors, 2)[0]
    assert len(messages) == 3
    assert "ColumnParallelLinear output_size (5)" in messages[0]
    assert "RowParallelLinear input_size (5)" in messages[1]
    assert "pad the vocabulary" in messages[2]


def test_sequence_parallel_requires_tp():
    with pytest.raises(ValueError, match="sequence_parallel=True needs tensor_model_parallel_size"):
        ModelParallelConfig(sequence_parallel=True)
