"""Tiny GPT models for the inference tests, built the same way in every layout.

``build_chunks`` makes this rank's model chunks for the current ``parallel_state`` grid
from one seed; weights do not depend on the layout
(``megacore.transformer.initialization``), so every layout computes the same function
as the single-process model. ``init_method_std`` is large (0.5) so that next-token
distributions are peaked and greedy choices are not near-ties that float rounding could
flip.
"""

import os
import tempfile

import torch.distributed as dist

from megacore import parallel_state as ps
from megacore.models.gpt import GPTModel, get_gpt_layer_local_spec, get_llama_layer_local_spec
from megacore.models.gpt import llama_config_kwargs
from megacore.tensor_parallel import model_parallel_manual_seed
from megacore.transformer import TransformerConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB_FILE = os.path.join(ROOT, "examples", "data", "vocab.json")
MERGE_FILE = os.path.join(ROOT, "examples", "data", "merges.txt")

KINDS = {
    # GPT: LayerNorm, GeLU, learned positions, tied output layer.
    "gpt": dict(cfg={}, model=dict(share_embeddings_and_output_weights=True)),
    # Llama: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied output layer.
    "llama": dict(cfg=llama_config_kwargs(num_query_groups=2),
                  model=dict(position_embedding_type="rope")),
}


def tiny_config(kind="gpt", tp=1, pp=1, vpp=None, layers=4):
    cfg = dict(num_layers=layers, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
               hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.5,
               tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
               virtual_pipeline_model_parallel_size=vpp)
    cfg.update(KINDS[kind]["cfg"])
    return TransformerConfig(**cfg)


def build_chunks(kind="gpt", vocab=61, max_seq=48, layers=4, seed=1234):
    """This rank's chunks for the current grid (call initialize_model_parallel first)."""
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    config = tiny_config(kind, tp, pp, vpp, layers)
    spec = get_gpt_layer_local_spec() if kind == "gpt" else get_llama_layer_local_spec()
    rank, chunks = ps.get_pipeline_model_parallel_rank(), []
    for c in range(vpp or 1):
        model_parallel_manual_seed(seed)
        chunks.append(GPTModel(
            config, spec, vocab, max_sequence_length=max_seq,
            pre_process=(rank == 0 and c == 0),
            post_process=(rank == pp - 1 and c == (vpp or 1) - 1),
            vp_stage=c if vpp else None, **KINDS[kind]["model"]))
    return chunks


def init_single_process():
    """A one-rank gloo world and default grid in this process (for in-process tests)."""
    store = tempfile.mktemp(prefix="megacore-inference-test-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ps.initialize_model_parallel()


def destroy_single_process():
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
