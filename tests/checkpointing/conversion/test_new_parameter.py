"""A parameter the converter has never heard of converts without a converter edit.

The converter reads tensor names, order and tp splits from the model itself
(``reference_model``, ``tensor_split``), so a custom layer spec whose MLP registers extra
parameters (a stride-2 column-parallel pair with bias, and a replicated scale) converts
tp 1 -> tp 2 -> tp 1 and through torch_dist bitwise, and the tp 2 checkpoint loads into
the custom model at tp 2 with the source's logits. The source is the Llama-style fixture
(one key/value group: k/v rows replicated at tp 2; SwiGLU fc1; untied embeddings).
"""

import dataclasses

import pytest
import torch

from megacore import device
from megacore import parallel_state as ps
from megacore.checkpointing import load_checkpoint, save_checkpoint
from megacore.checkpointing.conversion import ConversionError, convert_checkpoint
from megacore.checkpointing.conversion.reference_model import (
    build_model_tensors,
    single_rank_groups,
)
from megacore.models.gpt import GPTModel, get_gpt_decoder_block_spec
from megacore.tensor_parallel import ColumnParallelLinear, model_parallel_manual_seed
from megacore.transformer import TransformerConfig
from megacore.transformer.mlp import MLP
from megacore.transformer.spec_utils import ModuleSpec
from tests.checkpointing import toy_model as toy
from tests.checkpointing.conversion import fixtures as fx
from tests.checkpointing.conversion.test_layout_conversion import _assert_bitwise, _tensors
from tests.multirank import run_distributed


class ExtraGateMLP(MLP):
    """A gated MLP with two parameters megacore does not have: ``linear_extra``
    (column-parallel ``[2f, h]``, stride 2, with bias: a ``[gate2; shift]`` pair) and
    ``extra_scale`` (``[h]``, replicated)."""

    def __init__(self, config, submodules, **kwargs):
        super().__init__(config, submodules, **kwargs)
        ffn = config.ffn_hidden_size
        self.linear_extra = ColumnParallelLinear(
            config.hidden_size, 2 * ffn, config=config, init_method=config.init_method,
            bias=True, gather_output=False, stride=2, tp_group=self.tp_group)
        self.extra_scale = torch.nn.Parameter(
            torch.full((config.hidden_size,), 0.5, device=device.current_device()))

    def forward(self, hidden_states):
        intermediate, _ = self.linear_fc1(hidden_states)  # [s, b, 2f/tp]
        gate, up = intermediate.chunk(2, dim=-1)           # 2 x [s, b, f/tp]
        extra, _ = self.linear_extra(hidden_states)        # [s, b, 2f/tp]
        gate2, shift = extra.chunk(2, dim=-1)              # 2 x [s, b, f/tp]
        inner = self.activation_func(gate) * up * torch.sigmoid(gate2) + shift
        out, bias = self.linear_fc2(inner)                 # [s, b, h]
        return out * self.extra_scale, bias


def custom_spec(config):
    """megacore's decoder spec with every MLP replaced by :class:`ExtraGateMLP`."""
    block = get_gpt_decoder_block_spec(config)
    layers = [dataclasses.replace(layer, submodules=dataclasses.replace(
        layer.submodules, mlp=ModuleSpec(module=ExtraGateMLP,
                                         submodules=layer.submodules.mlp.submodules)))
              for layer in block.layer_specs]
    return dataclasses.replace(block, layer_specs=layers)


SPEC = custom_spec(TransformerConfig(**fx.description("llama").transformer_config_kwargs()))


def _build(tp: int, seed: int):
    desc = fx.description("llama")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, 1)
    kw = desc.transformer_config_kwargs()
    kw.update(hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=tp)
    config = TransformerConfig(**kw)
    model_parallel_manual_seed(seed)
    return GPTModel(config, SPEC, pre_process=True, post_process=True, parallel_output=False,
                    **desc.gpt_model_kwargs())


def _save_tp1(save_dir: str):
    model = _build(1, seed=1234)
    opt, sched = toy.build_optimizer([model])
    toy.fake_step([model], opt, sched)
    save_checkpoint(5, [model], opt, sched, save_dir=save_dir, ckpt_format="torch",
                    consumed_train_samples=40,
                    config_dict=fx.config_dict(fx.description("llama"), 1, 1, 1))
    return fx.pipeline_logits(model, fx.tokens())


def _load_logits(load_dir: str, tp: int):
    model = _build(tp, seed=99)
    opt, sched = toy.build_optimizer([model])
    load_checkpoint([model], opt, sched, load_dir=load_dir, no_load_rng=True)
    return fx.pipeline_logits(model, fx.tokens())


def _convert(src, dst, fmt, tp, **kw):
    return convert_checkpoint(load_dir=str(src), save_dir=str(dst), ckpt_format=fmt,
                              target_tensor_parallel_size=tp, progress=False, **kw)


def test_reference_model_reads_the_custom_parameters_splits():
    tensors = build_model_tensors(fx.description("llama"), SPEC)
    extra = tensors.splits["decoder.layers.0.mlp.linear_extra.weight"]
    assert (extra.tp_dim, extra.stride, extra.vocab, extra.expert) == (0, 2, False, False)
    assert tensors.splits["decoder.layers.0.mlp.linear_extra.bias"].stride == 2
    assert tensors.splits["decoder.layers.0.mlp.extra_scale"].tp_dim is None
    names = tensors.names
    assert names.index("decoder.layers.0.mlp.linear_fc2.weight") < \
        names.index("decoder.layers.0.mlp.linear_extra.weight") < \
        names.index("decoder.layers.1.input_layernorm.weight")


def test_reference_model_is_built_without_memory_inside_a_running_job():
    def rank_fn():
        with single_rank_groups() as pgs:
            assert pgs.size("tp") == 1 and pgs.size("dp") == 1
        tensors = build_model_tensors(fx.description("moe"))
        torch.distributed.barrier()  # the world is still usable afterwards
        return len(tensors.names)

    assert run_distributed(rank_fn, 2) == [54, 54]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_parameter")
    logits = run_distributed(_save_tp1, 1, args=(str(root / "tp1"),))[0]
    return root, logits


def test_new_parameter_round_trips_bitwise_and_loads_at_tp2(source):
    root, reference = source
    _convert(root / "tp1", root / "tp2", "torch", 2, block_spec=SPEC)
    _convert(root / "tp2", root / "back", "torch", 1, block_spec=SPEC)
    _assert_bitwise(_tensors(root / "tp1"), _tensors(root / "back"))
    _convert(root / "tp2", root / "dist", "torch_dist", 2, block_spec=SPEC)
    _convert(root / "dist", root / "back_dist", "torch", 1, block_spec=SPEC)
    _assert_bitwise(_tensors(root / "tp1"), _tensors(root / "back_dist"))
    logits = [r for r in run_distributed(_load_logits, 2, args=(str(root / "tp2"), 2))
              if r is not None][0]
    # tp 2 splits the hidden reductions in two partial sums: float32 rounding only.
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)


def test_without_the_spec_the_new_parameter_stops_the_conversion(source):
    root, _ = source
    with pytest.raises(ConversionError, match="linear_extra"):
        _convert(root / "tp1", root / "refused", "torch", 2)


def test_block_spec_with_a_non_megacore_loader_is_refused(source):
    root, _ = source
    with pytest.raises(ValueError, match="block_spec"):
        convert_checkpoint(load_dir=str(root / "tp1"), save_dir=str(root / "x"),
                           loader="megatron", block_spec=SPEC, progress=False)
