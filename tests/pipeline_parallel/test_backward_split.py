"""B/W split of a stage's backward (zero-bubble schedules) equals the whole backward.

B must give the input gradient and leave every parameter's ``.grad`` untouched; W must
then produce exactly the gradients of one ``backward()``. Checked on a graph with the
hard cases (a parameter used twice, one used after the input path ends, layer norm), on
a first stage (no input: all of it in W), on GPT stages with tp=2 (the tensor-parallel
linear computes one half per phase; with and without sequence parallelism, and under
full activation recompute, whose weight grads come in B), and the error for a Python
autograd function that takes a parameter but ignores the phase.

Tolerance: the split runs the same kernels on the same values as one backward, summing
a gradient's contributions possibly in another order: rtol 1e-6 / atol 1e-7 (fp32).
"""

import pytest
import torch

from megacore import parallel_state as ps
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.pipeline_parallel.backward_split import SplitBackward
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from tests.multirank import run_distributed

TOL = dict(rtol=1e-6, atol=1e-7)


class _Tricky(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1, self.norm, self.lin2 = (torch.nn.Linear(6, 6), torch.nn.LayerNorm(6),
                                           torch.nn.Linear(6, 6))
        self.scale = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        h = self.lin1(x)
        h = self.norm(h) + h
        # lin1.weight reused off the input path; scale only multiplies the end.
        return self.lin2(h).tanh() * self.lin1.weight.sum() * self.scale


def _whole(model, x, grad):
    out = model(x)
    params = list(model.parameters())
    got = torch.autograd.grad(out, ([x] if x.requires_grad else []) + params, grad)
    return got


def test_split_equals_whole_backward_and_defers_all_weight_grads():
    torch.manual_seed(0)
    model = _Tricky()
    x = torch.randn(3, 6, requires_grad=True)
    grad = torch.randn(3, 6)
    ref = _whole(model, x, grad)
    split = SplitBackward(model(x), grad, x)
    dx = split.backward_input()
    assert all(p.grad is None for p in model.parameters()), "B touched a weight"
    torch.testing.assert_close(dx, ref[0], **TOL)
    split.backward_weight()
    for p, r in zip(model.parameters(), ref[1:]):
        torch.testing.assert_close(p.grad, r, **TOL)
    with pytest.raises(AssertionError, match="backward_weight called"):
        split.backward_weight()


def test_first_stage_runs_everything_in_w():
    torch.manual_seed(0)
    model = _Tricky()
    x = torch.randn(3, 6)
    ref = _whole(model, x, torch.ones(3, 6))
    split = SplitBackward(model(x), None, None)
    assert split.backward_input() is None
    assert all(p.grad is None for p in model.parameters())
    split.backward_weight()
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, **TOL)


class _Opaque(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g * w, (g * x).sum(0)


def test_unknown_function_taking_a_parameter_is_refused():
    w = torch.nn.Parameter(torch.ones(4))
    x = torch.randn(2, 4, requires_grad=True)
    split = SplitBackward(_Opaque.apply(x, w).sum(), None, x)
    with pytest.raises(RuntimeError, match="_OpaqueBackward.*--pipeline-schedule 1f1b"):
        split.backward_input()


def _gpt_stage_split(cases):
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    out = []
    for case in cases:
        config = TransformerConfig(
            num_layers=2, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
            hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=2,
            sequence_parallel=case["sp"], pipeline_model_parallel_size=1,
            recompute_granularity=case.get("recompute"),
            recompute_method="uniform" if case.get("recompute") else None,
            recompute_num_layers=1 if case.get("recompute") else None)
        model_parallel_manual_seed(1234)
        # A middle stage: no embedding, no output layer; input [s(/tp), b, h].
        model = GPTModel(config, get_gpt_layer_local_spec(), 32, max_sequence_length=8,
                         pre_process=False, post_process=False)
        seq = 8 // 2 if case["sp"] else 8
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(seq, 2, 16, generator=gen)
        grad = torch.randn(seq, 2, 16, generator=gen)
        positions = torch.arange(8).expand(2, 8)

        def run(inp):
            model.set_input_tensor(inp)
            return model(None, positions, None)

        x1 = x.clone().requires_grad_()
        run(x1).backward(grad)
        ref = [x1.grad] + [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        x2 = x.clone().requires_grad_()
        split = SplitBackward(run(x2), grad, x2)
        dx = split.backward_input()
        in_b = [n for n, p in model.named_parameters() if p.grad is not None]
        split.backward_weight()
        out.append({"ref": ref, "got": [dx] + [p.grad for p in model.parameters()],
                    "grads_in_b": in_b})
    return out


def test_gpt_stage_split_with_tensor_parallel_linears():
    cases = [{"sp": False}, {"sp": True}, {"sp": True, "recompute": "full"}]
    for rank_result in run_distributed(_gpt_stage_split, 2, args=(cases,), timeout=120):
        for case, result in zip(cases, rank_result):
            for got, ref in zip(result["got"], result["ref"]):
                torch.testing.assert_close(got, ref, **TOL, msg=str(case))
            if case.get("recompute"):
                # Recomputed layers compute their weight grads in their (B) backward.
                assert result["grads_in_b"], case
            else:
                assert result["grads_in_b"] == [], case
