"""A GPT with MoE layers trains the same at ep=2 as at ep=1.

Two ranks (dp=2): each takes its own micro-batch (the same every step, so the loss must
fall); the model is wrapped in megacore's DDP (expert grads reduced over the
expert-data-parallel group, dense ones over dp), grads are finalized with
``finalize_model_grads`` and applied with plain SGD on ``main_grad``. Layer 1
is MoE and layer 2 dense (``moe_layer_freq=[1, 0]``), with aux loss and z-loss on. The
per-step losses (averaged over dp) at ep=2 with both dispatchers equal those at ep=1.

Tolerance: rtol 1e-5 on losses ~3.5 after 4 steps: the layouts sum the same grads in
different orders (~1e-7 per step), and SGD with lr 0.5 keeps that growth small.
"""

import torch
import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.distributed import DistributedDataParallel, finalize_model_grads
from megacore.distributed.distributed_data_parallel_config import DistributedDataParallelConfig
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer.moe import is_moe_layer, reduce_moe_metrics
from megacore.transformer.transformer_block import TransformerBlockSubmodules
from tests.multirank import run_distributed
from tests.transformer.moe.moe_testing import make_config

VOCAB, SEQ, BATCH, STEPS, LR = 32, 8, 2, 4, 0.5


def _block_spec(cfg):
    moe, dense = get_gpt_layer_local_spec(num_experts=cfg.num_moe_experts), \
        get_gpt_layer_local_spec()
    return TransformerBlockSubmodules(
        layer_specs=[moe if is_moe_layer(cfg, n) else dense for n in range(1, cfg.num_layers + 1)],
        layer_norm=dense.submodules.input_layernorm)


def _train(ep, dispatcher):
    ps.initialize_model_parallel(expert_model_parallel_size=ep)
    cfg = make_config(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                      moe_layer_freq=[1, 0], expert_model_parallel_size=ep,
                      moe_token_dispatcher_type=dispatcher, moe_aux_loss_coeff=1e-2,
                      moe_z_loss_coeff=1e-3, init_method_std=0.05)
    model_parallel_manual_seed(1234)
    gpt = GPTModel(cfg, _block_spec(cfg), vocab_size=VOCAB, max_sequence_length=SEQ)
    model = DistributedDataParallel(cfg, DistributedDataParallelConfig(), gpt)
    dp_rank = ps.get_data_parallel_rank()
    losses = []
    gen = torch.Generator().manual_seed(100 + dp_rank)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)  # one batch, overfit
    for _ in range(STEPS):
        model.zero_grad_buffer()
        loss = model(tokens[:, :-1], torch.arange(SEQ).expand(BATCH, SEQ), None,
                     labels=tokens[:, 1:]).mean()
        loss.backward()
        finalize_model_grads([model])
        with torch.no_grad():
            for param in model.parameters():
                param -= LR * param.main_grad
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / dist.get_world_size())
    metrics = reduce_moe_metrics([model])
    ps.destroy_model_parallel()
    return losses, metrics


def _ep_runs():
    return {(ep, d): _train(ep, d) for ep, d in ((1, "alltoall"), (2, "alltoall"),
                                                  (2, "allgather"))}


def test_gpt_with_moe_trains_the_same_at_ep2_as_at_ep1():
    results = run_distributed(_ep_runs, 2, timeout=180)
    base_losses, base_metrics = results[0][(1, "alltoall")]
    assert base_losses[-1] < base_losses[0]  # it trains
    assert base_metrics["moe/load_balancing_loss"] > 0
    for rank_result in results:
        for key, (losses, metrics) in rank_result.items():
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(base_losses),
                                       rtol=1e-5, atol=0, msg=str(key))
            assert abs(metrics["moe/load_balancing_loss"]
                       - base_metrics["moe/load_balancing_loss"]) < 1e-5, key
