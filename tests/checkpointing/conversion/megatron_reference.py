"""megatron-core 0.16.1 itself, on CPU, as the reference for the Megatron converter tests.

What megatron-core needs on a CPU-only torch (``shared/CPU_NOTES.md``), applied by
:func:`stub_for_cpu`: ``torch.cuda.current_device`` returns ``"cpu"`` (its scratch
buffers), the CUDA RNG tracker's ``fork`` is a null context (dropout is 0),
``torch.cuda.synchronize`` is a no-op, the MoE router's ``te_general_gemm`` (referenced
without Transformer Engine) is None, and ``dist_checkpointing``'s writer measures memory
without psutil and collects results on an in-process queue (its default spawns a
manager process); the rank process is marked non-daemonic so that it may fork the
writer's helper processes. Forward passes get an
explicit causal mask (the default one is built on ``cuda``).

Optimizer: megatron-core's own ``get_megatron_optimizer`` (torch AdamW inside
``FP32Optimizer`` wrappers, chained; apex and Transformer Engine are absent) and
``OptimizerParamScheduler``. The bare model carries the ``ddp_config`` a DDP-wrapped chunk
would, and the few scratch tensors the optimizer allocates with ``device="cuda"`` (the
fp32 loss scale, the grad-norm overflow buffer) are made on the CPU (:func:`cpu_tensors`);
gradient clipping is off (its check asserts CUDA tensors), the grad norm is still
computed and returned by ``step``. ``Float16OptimizerWithFloat16Params`` (bf16 models)
accepts params whose ``type()`` names a CUDA tensor: :func:`cuda_type_names`.

Distributed optimizer (``--use-distributed-optimizer``): megatron-core's own
``DistributedDataParallel`` (grad buffers on the CPU: ``current_device`` is stubbed) and
``DistributedOptimizer`` over gloo (:func:`megatron_distributed_optimizer`); its
``fully_reshardable`` save gathers the dp shards with ``Tensor.cuda()`` copies, which
:func:`cpu_tensor_moves` makes the identity.

Checkpoints are written as Megatron-LM's ``save_checkpoint`` writes them
(``megatron/training/checkpointing.py``: ``generate_state_dict``): legacy rank files
``{args, checkpoint_version: 3.0, iteration, model | model0.., optimizer,
opt_param_scheduler, rng_state, num_floating_point_operations_so_far}`` holding the
model's own ``state_dict()`` (``state_dict_for_save_checkpoint`` is the same for
GPTModel), and ``torch_dist`` directories through ``dist_checkpointing.save`` of the
model's ``sharded_state_dict()`` plus the common entries. ``args`` carries the fields
Megatron-LM's parser sets for these models (megatron-core ships without
``megatron.training``, so the Namespace is assembled here with Megatron's arg names),
including the ``AttnBackend`` enum member Megatron stores.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import random

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB_DIVISIBLE = 16
PADDED_VOCAB = 64          # 61 tokenizer ids padded to a multiple of 16 * tp (tp <= 4)
SEQ, BATCH = 8, 2
ITERATION = 7


def stub_for_cpu() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    mrandom.CudaRNGStatesTracker.fork = \
        lambda self, name="model-parallel-rng": contextlib.nullcontext()
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    fa._process_memory = lambda: 0
    # multirank's ranks are daemonic processes, which may not start children; megatron's
    # writer forks one per write bucket (they end before save returns).
    multiprocessing.current_process()._config.pop("daemon", None)
    # A synchronous save puts and gets its results in this process: a plain queue will do
    # (the default is a queue served by a spawned manager process).
    fa._results_queue = queue.Queue()


def init_parallel(tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    mps.initialize_model_parallel(tp, pp, expert_model_parallel_size=ep)


def _kind_fields(kind: str) -> dict:
    if kind == "gpt2":
        return dict(normalization="LayerNorm", position_embedding_type="learned_absolute",
                    add_bias_linear=True, swiglu=False, untie=False, num_query_groups=None,
                    ffn_hidden_size=64, num_experts=None)
    llama = dict(normalization="RMSNorm", position_embedding_type="rope",
                 add_bias_linear=False, swiglu=True, untie=True, num_query_groups=2,
                 ffn_hidden_size=48, num_experts=None)
    if kind == "llama":
        return llama
    return dict(llama, untie=False, num_experts=4)


def build_model(kind: str, tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 3):
    """This rank's megatron-core GPTModel (parallel state already initialized)."""
    from megatron.core import parallel_state as mps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    f = _kind_fields(kind)
    moe = {}
    if f["num_experts"]:
        moe = dict(num_moe_experts=f["num_experts"], moe_router_topk=2,
                   moe_token_dispatcher_type="allgather", moe_aux_loss_coeff=0.0)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4,
        num_query_groups=f["num_query_groups"], ffn_hidden_size=f["ffn_hidden_size"],
        normalization=f["normalization"], add_bias_linear=f["add_bias_linear"],
        gated_linear_unit=f["swiglu"], activation_func=F.silu if f["swiglu"] else F.gelu,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, sequence_parallel=False, pipeline_dtype=torch.float32,
        **moe)
    torch.manual_seed(seed)
    spec = get_gpt_layer_local_spec(num_experts=f["num_experts"],
                                    normalization=f["normalization"])
    # With tied embeddings and pp > 1 the constructor moves the shared weight to the GPU
    # and all-reduces it over the embedding group (the last stage's copy starts at 0):
    # keep it on the CPU, the all-reduce runs on gloo.
    with cpu_tensor_moves():
        model = GPTModel(config, spec, vocab_size=PADDED_VOCAB, max_sequence_length=SEQ,
                         pre_process=mps.is_pipeline_first_stage(),
                         post_process=mps.is_pipeline_last_stage(), parallel_output=False,
                         share_embeddings_and_output_weights=not f["untie"],
                         position_embedding_type=f["position_embedding_type"])
    with torch.no_grad():  # norms start at 1, biases at 0: perturb them
        for name, param in model.named_parameters():
            if param.dim() == 1 and "router" not in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def tokens(seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (BATCH, SEQ), generator=gen)


def logits(model, ids: torch.Tensor):
    """Full fp32 logits ``[b, s, V]`` on the last pipeline stage (None elsewhere); stages
    pass ``[s, b, h]`` hidden states with send/recv."""
    from megatron.core import parallel_state as mps

    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    with torch.no_grad():
        if not mps.is_pipeline_first_stage():
            hidden = torch.empty(SEQ, BATCH, model.config.hidden_size)
            dist.recv(hidden, src=mps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, positions, mask)
        if not mps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=mps.get_pipeline_model_parallel_next_rank())
            return None
    return out.float()


def megatron_args(kind: str, tp: int = 1, pp: int = 1, ep: int = 1,
                  ckpt_format: str = "torch", transformer_impl: str = "local",
                  bf16: bool = False):
    """The ``args`` Megatron-LM's parser produces for this model (its arg names)."""
    from megatron.core.transformer.enums import AttnBackend

    f = _kind_fields(kind)
    ns = argparse.Namespace(
        num_layers=2, hidden_size=32, ffn_hidden_size=f["ffn_hidden_size"],
        num_attention_heads=4, group_query_attention=f["num_query_groups"] is not None,
        num_query_groups=f["num_query_groups"] or 1, kv_channels=8,
        max_position_embeddings=SEQ, seq_length=SEQ,
        position_embedding_type=f["position_embedding_type"],
        use_rotary_position_embeddings=False, rotary_base=10000, rotary_percent=1.0,
        rotary_interleaved=False, add_position_embedding=True,
        normalization=f["normalization"], norm_epsilon=1e-5, apply_layernorm_1p=False,
        add_bias_linear=f["add_bias_linear"], add_qkv_bias=False, swiglu=f["swiglu"],
        openai_gelu=False, squared_relu=False, qk_layernorm=False,
        untie_embeddings_and_output_weights=f["untie"],
        apply_residual_connection_post_layernorm=False, hidden_dropout=0.0,
        attention_dropout=0.0, tokenizer_type="NullTokenizer", vocab_size=60,
        make_vocab_size_divisible_by=VOCAB_DIVISIBLE, padded_vocab_size=PADDED_VOCAB,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=ep,
        expert_tensor_parallel_size=tp, num_experts=f["num_experts"],
        moe_router_topk=2, moe_ffn_hidden_size=f["ffn_hidden_size"] if f["num_experts"]
        else None, moe_layer_freq=1, moe_grouped_gemm=False,
        moe_router_load_balancing_type="aux_loss", moe_router_score_function="softmax",
        moe_router_pre_softmax=False, moe_token_dispatcher_type="allgather",
        params_dtype=torch.bfloat16 if bf16 else torch.float32, fp16=False, bf16=bf16,
        ckpt_format=ckpt_format,
        transformer_impl=transformer_impl, attention_backend=AttnBackend.auto,
        micro_batch_size=2, global_batch_size=4, lr=1e-3, train_iters=10,
        iteration=ITERATION, consumed_train_samples=ITERATION * 4)
    return ns


def _rng_state() -> list:
    """Megatron-LM's ``get_rng_state`` on a CPU build (no CUDA generator, empty tracker)."""
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(0),
             "rng_tracker_states": {}}]


def _sharded_rng_state():
    """Megatron-LM's ``get_rng_state`` for torch_dist: the list as a ShardedObject over
    the (pp, tp) grid, data-parallel copies as replicas."""
    from megatron.core import parallel_state as mps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", _rng_state(),
                         (mps.get_pipeline_model_parallel_world_size(),
                          mps.get_tensor_model_parallel_world_size()),
                         (mps.get_pipeline_model_parallel_rank(),
                          mps.get_tensor_model_parallel_rank()),
                         replica_id=mps.get_data_parallel_rank(with_context_parallel=True))


@contextlib.contextmanager
def cpu_tensors():
    """Factory calls with ``device="cuda"`` make CPU tensors (megatron-core's optimizer
    scratch tensors; see the module docstring)."""
    saved = {name: getattr(torch, name) for name in ("tensor", "zeros", "empty", "ones")}

    def on_cpu(factory):
        def make(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)
        return make

    for name, factory in saved.items():
        setattr(torch, name, on_cpu(factory))
    try:
        yield
    finally:
        for name, factory in saved.items():
            setattr(torch, name, factory)


@contextlib.contextmanager
def cuda_type_names():
    """``Tensor.type()`` names CPU tensors as CUDA ones: megatron-core's
    ``Float16OptimizerWithFloat16Params`` accepts params whose ``type()`` is
    ``torch.cuda.BFloat16Tensor`` (or Half, Float) only."""
    original = torch.Tensor.type
    names = {torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float16: "torch.cuda.HalfTensor",
             torch.float32: "torch.cuda.FloatTensor"}

    def type_name(self, *args, **kwargs):
        if args or kwargs or self.dtype not in names:
            return original(self, *args, **kwargs)
        return names[self.dtype]

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original


LR, MIN_LR, WEIGHT_DECAY = 1e-2, 1e-3, 0.1
SCHEDULE = dict(init_lr=0.0, max_lr=LR, min_lr=MIN_LR, lr_warmup_steps=2, lr_decay_steps=10,
                lr_decay_style="linear", start_wd=WEIGHT_DECAY, end_wd=WEIGHT_DECAY,
                wd_incr_steps=10, wd_incr_style="constant")
"""The schedule of the training tests: warm-up and linear decay, so resuming needs the
scheduler's step count (one scheduler step per iteration)."""


def megatron_optimizer(model, bf16: bool = False):
    """megatron-core's optimizer (AdamW, weight decay 0.1, no clipping) and scheduler;
    ``bf16``: the model's params are bf16, so ``Float16OptimizerWithFloat16Params``."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    model.ddp_config = DistributedDataParallelConfig()
    config = OptimizerConfig(optimizer="adam", lr=LR, min_lr=MIN_LR,
                             weight_decay=WEIGHT_DECAY, clip_grad=0.0, bf16=bf16)
    with cpu_tensors(), cuda_type_names():
        optimizer = get_megatron_optimizer(config, [model])
    return optimizer, OptimizerParamScheduler(optimizer, **SCHEDULE)


def megatron_distributed_optimizer(model, bucket_size=None, bf16: bool = False):
    """``(ddp, optimizer, scheduler)``: ``model`` wrapped in megatron-core's DDP with the
    distributed optimizer (fp32 grad buffers, dp shards of the main params and moments),
    as Megatron-LM builds them for ``--use-distributed-optimizer``; ``bucket_size``
    (elements): several buckets, as ``--overlap-grad-reduce --ddp-bucket-size`` give;
    ``bf16``: the model's params are bf16 (fp32 main params in the optimizer)."""
    from megatron.core.distributed import (DistributedDataParallel,
                                           DistributedDataParallelConfig)
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True,
                                               grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=bucket_size is not None,
                                               bucket_size=bucket_size)
    with cpu_tensors():
        ddp = DistributedDataParallel(model.config, ddp_config, model)
    config = OptimizerConfig(optimizer="adam", lr=LR, min_lr=MIN_LR,
                             weight_decay=WEIGHT_DECAY, clip_grad=0.0,
                             use_distributed_optimizer=True, bf16=bf16)
    with cpu_tensors(), cuda_type_names():
        optimizer = get_megatron_optimizer(config, [ddp])
    return ddp, optimizer, OptimizerParamScheduler(optimizer, **SCHEDULE)


def ddp_train_step(ddp, optimizer, scheduler, step: int):
    """:func:`train_step` through megatron-core's DDP: the grads are reduced (and, with
    the distributed optimizer, the updated params all-gathered) by megatron-core."""
    ids, labels = batch(step)
    loss = token_loss(ddp(ids, *causal_inputs()), labels)
    loss.backward()
    ddp.finish_grad_sync()
    with cpu_tensors(), cuda_type_names():
        ok, grad_norm, _ = optimizer.step()
    assert ok
    optimizer.zero_grad()
    ddp.zero_grad_buffer()
    scheduler.step(increment=1)
    return loss.item(), float(grad_norm)


def distributed_adam_state_by_name(model, optimizer) -> dict:
    """``{param name: {range, exp_avg, exp_avg_sq, main_param, step}}`` of this dp rank's
    shards in megatron-core's distributed optimizer (through its own
    ``_get_main_param_and_optimizer_states``); ``range``: the ``(start, end)`` slice of the
    flattened param the shard holds. Params without a shard on this rank are absent."""
    out = {}
    for member in optimizer.chained_optimizers:
        for gbuf_range_maps in member.gbuf_ranges:
            for bucket_maps in gbuf_range_maps.values():
                for bucket_map in bucket_maps:
                    for param, ranges in bucket_map["param_map"].items():
                        out[_param_name(model, param)] = _shard_state(member, param, ranges)
    return out


def _param_name(model, param) -> str:
    return next(name for name, p in model.named_parameters() if p is param)


def _shard_state(member, param, ranges) -> dict:
    tensors = member._get_main_param_and_optimizer_states(param)
    return {"range": (ranges["param"].start, ranges["param"].end),
            "main_param": tensors["param"].detach().clone(),
            "exp_avg": tensors["exp_avg"].clone(), "exp_avg_sq": tensors["exp_avg_sq"].clone(),
            "step": tensors["step"].clone()}


@contextlib.contextmanager
def cpu_tensor_moves():
    """``Tensor.cuda()`` returns the tensor itself (megatron-core's dp gathers)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def batch(step: int):
    """Tokens and next-token labels ``[b, s]`` of training iteration ``step``."""
    ids = tokens(seed=100 + step)
    return ids, torch.roll(ids, -1, dims=1)


def causal_inputs():
    positions = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    return positions, torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``[b, s, V]`` logits (the same formula for both libraries)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def train_step(model, optimizer, scheduler, step: int):
    """One iteration (pp 1): mean token cross entropy of the full logits, backward,
    optimizer and scheduler step. Returns ``(loss, grad norm)``."""
    ids, labels = batch(step)
    loss = token_loss(model(ids, *causal_inputs()), labels)
    loss.backward()
    with cpu_tensors(), cuda_type_names():
        ok, grad_norm, _ = optimizer.step()
    assert ok
    optimizer.zero_grad()
    scheduler.step(increment=1)
    return loss.item(), float(grad_norm)


def adam_state_by_name(model, optimizer) -> dict:
    """``{param name: {exp_avg, exp_avg_sq, step[, main_param]}}`` of megatron-core's
    optimizer (this rank's shards), read through the param objects (a half-precision
    param's ``main_param`` attribute is its fp32 copy): independent of any order rule."""
    by_main = {getattr(param, "main_param", param): (name, param)
               for name, param in model.named_parameters()}
    out = {}
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        for main, state in member.optimizer.state.items():
            name, param = by_main[main]
            out[name] = {k: v.clone() for k, v in state.items()}
            if main is not param:
                out[name]["main_param"] = main.detach().clone()
    return out


def te_names(state_dict: dict) -> dict:
    """The same weights under Transformer Engine's fused-norm names (what Megatron-LM's
    default TE spec saves): input_layernorm into linear_qkv, pre_mlp_layernorm into
    linear_fc1 (dense MLPs), plus TE's core-attention extra state."""
    out = {}
    for name, value in state_dict.items():
        qkv = ".self_attention.linear_qkv.layer_norm_"
        new = name.replace(".input_layernorm.weight", qkv + "weight")
        new = new.replace(".input_layernorm.bias", qkv + "bias")
        if ".mlp.experts." not in name and ".mlp.router" not in name:
            new = new.replace(".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight")
            new = new.replace(".pre_mlp_layernorm.bias", ".mlp.linear_fc1.layer_norm_bias")
        out[new] = value
        if new.endswith("self_attention.linear_qkv._extra_state"):
            out[new.replace("linear_qkv", "core_attention")] = torch.zeros(0, dtype=torch.uint8)
    return out


def save_legacy(save_dir: str, kind: str, model_state_dicts, tp_rank: int, pp_rank: int,
                ep_rank: int, tp: int, pp: int, ep: int, *, optimizer=None, scheduler=None,
                transformer_impl: str = "local", release: bool = False,
                bf16: bool = False) -> None:
    """One rank's ``model_optim_rng.pt`` as Megatron-LM's ``save_checkpoint`` writes it
    (``model_state_dicts``: one per virtual stage) and the tracker file."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + \
        (f"_{ep_rank:03d}" if ep > 1 else "")
    sub = "release" if release else f"iter_{ITERATION:07d}"
    path = os.path.join(save_dir, sub, name, "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state = {"args": megatron_args(kind, tp, pp, ep, "torch", transformer_impl, bf16),
             "checkpoint_version": 3.0, "iteration": ITERATION,
             "num_floating_point_operations_so_far": 123.0}
    for i, sd in enumerate(model_state_dicts):
        sd = te_names(sd) if transformer_impl == "transformer_engine" else sd
        state["model" if len(model_state_dicts) == 1 else f"model{i}"] = sd
    state["optimizer"] = optimizer
    state["opt_param_scheduler"] = scheduler
    state["rng_state"] = _rng_state()
    torch.save(state, path)
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release" if release else str(ITERATION))


def save_torch_dist(save_dir: str, kind: str, model, tp: int, pp: int, ep: int, *,
                    optimizer=None, scheduler=None, metadata=None,
                    bf16: bool = False) -> None:
    """A ``torch_dist`` checkpoint through megatron-core's ``dist_checkpointing.save``
    (collective over the ranks that hold the model); with ``optimizer``, its
    ``sharded_state_dict`` of the model's and the scheduler state, as Megatron-LM's
    ``generate_state_dict`` adds them; ``metadata``: Megatron-LM's sharded state dict
    metadata (``distrib_optim_sharding_type`` for the distributed optimizer)."""
    from megatron.core import dist_checkpointing

    iter_dir = os.path.join(save_dir, f"iter_{ITERATION:07d}")
    if dist.get_rank() == 0:
        os.makedirs(iter_dir, exist_ok=True)
    dist.barrier()
    state = {"model": model.sharded_state_dict(),
             "args": megatron_args(kind, tp, pp, ep, "torch_dist", bf16=bf16),
             "checkpoint_version": 3.0, "iteration": ITERATION,
             "num_floating_point_operations_so_far": 123.0}
    if optimizer is not None:
        with cpu_tensor_moves():
            state["optimizer"] = optimizer.sharded_state_dict(state["model"],
                                                              metadata=metadata)
        state["opt_param_scheduler"] = scheduler.state_dict()
        state["rng_state"] = _sharded_rng_state()
    dist_checkpointing.save(state, iter_dir)
    if dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(ITERATION))
    dist.barrier()


def save_legacy_distributed(save_dir: str, kind: str, model, optimizer, scheduler,
                            tp: int, bf16: bool = False) -> None:
    """A legacy checkpoint of the distributed optimizer as Megatron-LM's
    ``save_checkpoint`` writes it (collective over the ranks): dp rank 0 of each tp rank
    writes the rank file (the optimizer entry: ``state_dict()``, param groups only), then
    ``save_parameter_state`` gathers the dp shards into ``distrib_optim.pt`` beside it."""
    from megatron.core import parallel_state as mps

    tp_rank = mps.get_tensor_model_parallel_rank()
    if mps.get_data_parallel_rank() == 0:
        save_legacy(save_dir, kind, [model.state_dict()], tp_rank, 0, 0, tp, 1, 1,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    bf16=bf16)
    dist.barrier()
    optimizer.save_parameter_state(os.path.join(
        save_dir, f"iter_{ITERATION:07d}", f"mp_rank_{tp_rank:02d}", "distrib_optim.pt"))
    dist.barrier()


def load_legacy_into(model, path: str) -> None:
    """What Megatron-LM's ``load_checkpoint`` does with a rank file (strict)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"], strict=True)


def load_torch_dist_into(model, iter_dir: str) -> None:
    from megatron.core import dist_checkpointing

    # common.pt holds args; megatron-core reads it with torch.load's default weights_only,
    # so the Namespace must be allow-listed (for Megatron's own checkpoints as for ours).
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
    model.load_state_dict(loaded["model"], strict=True)
