"""Pipeline (pp=2) x data parallel training through the 1F1B schedule, DDP,
finalize_model_grads and the megacore optimizers equals single-process training.

The model ties its word embedding (first stage) to its output weight (last stage), both
marked ``shared_embedding=True``: finalize_model_grads must sum their grads over the
embedding group and the grad norm must count the tied weight once. Distributed optimizer
off and on. fp32, rtol/atol 1e-5: only the order of fp32 sums differs.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from megacore import parallel_state
from megacore.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    build_training_hooks,
)
from megacore.optimizer import OptimizerConfig, get_megatron_optimizer
from megacore.pipeline_parallel.schedules import get_forward_backward_func
from tests.multirank import run_distributed
from tests.pipeline_parallel.toy_model import VOCAB, ToyBlock, ToyConfig, make_batches

HIDDEN, LAYERS, SEQ, MBS, MICROBATCHES, STEPS = 8, 2, 3, 2, 2, 2
LR, WD, CLIP = 0.02, 0.1, 0.5
TOL = dict(rtol=1e-5, atol=1e-5)


def _master(seed=3):
    g = torch.Generator().manual_seed(seed)
    out = {"embedding.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.5}
    for i in range(LAYERS):
        out[f"layers.{i}.linear.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.3
        out[f"layers.{i}.linear.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    return out


class TiedStage(torch.nn.Module):
    """Layers ``first .. first + count - 1``; embedding on the first stage, output layer
    (tied to the embedding) on the last."""

    def __init__(self, master, config, first, count, pre_process, post_process):
        super().__init__()
        self.config, self.first = config, first
        self.pre_process, self.post_process = pre_process, post_process
        self.layers = torch.nn.ModuleList(ToyBlock(HIDDEN) for _ in range(count))
        for i, layer in enumerate(self.layers):
            layer.linear.weight.data.copy_(master[f"layers.{first + i}.linear.weight"])
            layer.linear.bias.data.copy_(master[f"layers.{first + i}.linear.bias"])
        self.embedding = self.output_weight = None
        if pre_process:
            self.embedding = torch.nn.Embedding(VOCAB, HIDDEN)
            self.embedding.weight.data.copy_(master["embedding.weight"])
            self.embedding.weight.shared_embedding = True
        if post_process and pre_process:
            self.output_weight = self.embedding.weight  # same tensor: truly tied
        elif post_process:
            self.output_weight = torch.nn.Parameter(master["embedding.weight"].clone())
            self.output_weight.shared_embedding = True
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, tokens):
        x = self.embedding(tokens) if self.pre_process else self.input_tensor  # [s, b, h]
        for layer in self.layers:
            x = layer(x)
        return F.linear(x, self.output_weight) if self.post_process else x  # [s, b, V]

    def full_named_params(self):
        out = {}
        for name, p in self.named_parameters():
            if name.startswith("layers."):
                _, i, rest = name.split(".", 2)
                name = f"layers.{self.first + int(i)}.{rest}"
            elif name == "output_weight":
                name = "embedding.weight"
            out[name] = p.detach().clone()
        return out


def _loss(labels, logits):
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))  # [s*b, V]
    return loss, {"lm loss": loss.detach()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"]), functools.partial(_loss, batch["labels"])


def _no_decay(name, param):
    return name.endswith(".bias") or param.dim() == 1


def _reference(master, steps):
    config = ToyConfig(hidden_size=HIDDEN)
    model = TiedStage(master, config, 0, LAYERS, True, True)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in params.items() if not _no_decay(n, p)], "weight_decay": WD},
         {"params": [p for n, p in params.items() if _no_decay(n, p)], "weight_decay": 0.0}],
        lr=LR)
    norms = []
    for batches in steps:
        opt.zero_grad()
        for batch in batches:
            (_loss(batch["labels"], model(batch["tokens"]))[0] / len(batches)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
    return model.full_named_params(), norms


def _pipeline_train(master, steps, use_distributed_optimizer):
    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    config = ToyConfig(hidden_size=HIDDEN, pipeline_model_parallel_size=2)
    per_stage = LAYERS // 2
    stage = TiedStage(master, config, pp_rank * per_stage, per_stage, pp_rank == 0, pp_rank == 1)
    model = DistributedDataParallel(
        config, DistributedDataParallelConfig(use_distributed_optimizer=use_distributed_optimizer),
        stage)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(lr=LR, weight_decay=WD, clip_grad=CLIP,
                        use_distributed_optimizer=use_distributed_optimizer), [model],
        no_weight_decay_cond=_no_decay)
    hooks = build_training_hooks(model, optimizer)
    norms = []
    for batches in steps:
        mine = batches[dp_rank * MICROBATCHES:(dp_rank + 1) * MICROBATCHES]
        model.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=_forward_step, data_iterator=iter(mine),
                                    model=[model], num_microbatches=MICROBATCHES,
                                    seq_length=SEQ, micro_batch_size=MBS, hooks=hooks)
        ok, norm, _ = optimizer.step()
        assert ok
        norms.append(norm)
    return pp_rank, stage.full_named_params(), norms


@pytest.mark.parametrize("dp", [1, 2])
def test_pipeline_and_data_parallel_match_single_process(dp):
    master = _master()
    steps = [make_batches(dp * MICROBATCHES, SEQ, MBS, seed=10 + k) for k in range(STEPS)]
    ref_params, ref_norms = _reference(master, [s for s in steps])
    for use_distributed_optimizer in (False, True):
        results = run_distributed(_pipeline_train, 2 * dp,
                                  args=(master, steps, use_distributed_optimizer))
        for pp_rank, params, norms in results:
            for name, value in params.items():
                torch.testing.assert_close(value, ref_params[name], **TOL,
                                           msg=f"dist={use_distributed_optimizer} {name}")
            torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), **TOL)
    assert min(ref_norms) > CLIP  # clipping is active, so the norm matters
