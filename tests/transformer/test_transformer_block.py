"""Layout-independent initialization over pipeline stages, and activation recompute.

* A model split over pipeline stages (even, uneven, interleaved) holds exactly the
  single-process weights for its layers (bitwise: same draws), including the tied output
  layer on the last stage.
* Recompute (full uniform/block, selective; distributed saved activations) gives
  bitwise-equal loss and gradients with dropout on, at tp=2 with and without sequence
  parallelism: the recompute replays the same random streams and the same arithmetic.
"""

import pytest
import torch
import torch.distributed as dist

from megacore import device
from megacore import parallel_state as ps
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from tests.multirank import run_distributed

VOCAB, SEQ, BATCH = 48, 8, 2


# -- layout-independent init over pipeline stages ------------------------------------------
def _config(**kw):
    base = dict(num_layers=4, hidden_size=16, num_attention_heads=2, hidden_dropout=0.0,
                attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _global_weights(model):
    """Parameters keyed by global layer number, so stages can be compared to one model."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        for name, p in layer.named_parameters():
            out[f"layer{layer.layer_number}.{name}"] = p.detach().cpu()
    for name, p in model.named_parameters():
        if not name.startswith("decoder.layers."):
            out[name] = p.detach().cpu()
    return out


def _pipeline_weights(pp, vpp, first, last, tied):
    ps.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp)
    config = _config(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                     num_layers_in_first_pipeline_stage=first,
                     num_layers_in_last_pipeline_stage=last)
    model_parallel_manual_seed(5)
    weights = {}
    for v in range(vpp or 1):
        if vpp:
            ps.set_virtual_pipeline_model_parallel_rank(v)
        model = GPTModel(config, get_gpt_layer_local_spec(), VOCAB, 16,
                         pre_process=ps.is_pipeline_first_stage(),
                         post_process=ps.is_pipeline_last_stage(),
                         share_embeddings_and_output_weights=tied, vp_stage=v if vpp else None)
        weights.update(_global_weights(model))
    return weights


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stages_hold_single_process_weights(tied):
    ref = run_distributed(_pipeline_weights, 1, args=(1, None, None, None, tied))[0]
    layouts = [(2, None, None, None), (2, None, 1, None), (2, 2, None, None)]
    for pp, vpp, first, last in layouts:
        stages = run_distributed(_pipeline_weights, pp, args=(pp, vpp, first, last, tied))
        merged = {}
        for stage in stages:
            for name, w in stage.items():
                if name == "output_layer.weight" and tied:
                    # The last stage's tied copy must equal the first stage's table.
                    torch.testing.assert_close(
                        w, ref["embedding.word_embeddings.weight"], rtol=0, atol=0)
                    continue
                assert name not in merged, f"{name} built on two stages"
                merged[name] = w
        assert merged.keys() == ref.keys(), (pp, vpp, first)
        for name, w in ref.items():
            torch.testing.assert_close(merged[name], w, rtol=0, atol=0,
                                       msg=f"pp={pp} vpp={vpp} first={first}: {name}")


# -- recompute ------------------------------------------------------------------------------
RECOMPUTE = [
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    dict(recompute_granularity="selective"),
]


def _loss_and_grads(sequence_parallel, dropout_seed=77, **recompute):
    tp = ps.get_tensor_model_parallel_world_size()
    config = _config(num_layers=3, tensor_model_parallel_size=tp,
                     sequence_parallel=sequence_parallel, hidden_dropout=0.1,
                     attention_dropout=0.2, **recompute)
    model_parallel_manual_seed(5)
    model = GPTModel(config, get_gpt_layer_local_spec(), VOCAB, 16)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(device.current_device())
    pos = torch.arange(SEQ, device=ids.device).expand(BATCH, SEQ)
    model_parallel_manual_seed(dropout_seed)
    loss = model(ids, pos, None, labels=ids)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _recompute_cases():
    ps.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    cases = [(sp, rc) for sp in (False, True) for rc in RECOMPUTE]
    cases.append((False, dict(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1, distribute_saved_activations=True)))
    for sp, rc in cases:
        base_loss, base_grads = _loss_and_grads(sp)
        loss, grads = _loss_and_grads(sp, **rc)
        assert torch.equal(loss, base_loss), (sp, rc)
        for name in base_grads:
            assert torch.equal(grads[name], base_grads[name]), (sp, rc, name)
    # Guard: dropout is active, so the bitwise check would catch unreplayed masks.
    other, _ = _loss_and_grads(False, dropout_seed=78)
    assert not torch.equal(other, base_loss)
    return len(cases)


def test_recompute_is_bitwise_equal_with_dropout():
    assert run_distributed(_recompute_cases, 2, timeout=180) == [9, 9]


# -- the config must describe the groups it is built on ------------------------------------
def _build_with_mismatched_config():
    """Groups with tp=1 (dp=2), a config claiming tp=2: building the model must refuse."""
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        GPTModel(_config(tensor_model_parallel_size=2), get_gpt_layer_local_spec(), VOCAB, SEQ)
    except ValueError as e:
        return str(e)
    return "built"


def test_config_disagreeing_with_the_groups_is_refused_naming_both_values():
    messages = run_distributed(_build_with_mismatched_config, 2)
    for message in messages:
        assert message.startswith("building TransformerBlock: the config and the process "
                                  "groups disagree"), message
        assert ("--tensor-model-parallel-size (config.tensor_model_parallel_size) is 2 in "
                "the model config but 1 in the process groups") in message
