"""Where each param sits in Megatron's distributed-optimizer buckets (torch_dist
``dp_reshardable``, legacy ``distrib_optim.pt``), and its state read from them.

Megatron-LM's default torch_dist form of ``--use-distributed-optimizer`` state (megatron-core
0.16.1, ``DistributedOptimizer.sharded_param_state_dp_reshardable``) stores, per
model-parallel rank ``g`` (``dp_group_idx_<g>``, the rank in the tp x pp group), per grad
buffer ``i`` and bucket ``j``, one flat tensor per field::

    optimizer.distributed.dp_group_idx_<g>.gbuf_idx_<i>.dtype_<(param, grad dtype)>.bucket_idx_<j>.<param|exp_avg|exp_avg_sq>

of the bucket's unpadded size: the whole bucket across the dp ranks, params and the
padding between them (``param``: the fp32 main params). The layout is megatron-core's
``_ParamAndGradBuffer`` (``distributed/param_and_grad_buffer.py``) with the distributed
optimizer: the rank's params in reverse ``named_parameters()`` order, each starting at a
multiple of 64 elements; a bucket closes after its last param (its unpadded size) and is
padded to ``lcm(dp, 128)``, so offsets relative to the bucket start keep the 64-element
alignment. The bucket sizes are read from the checkpoint (they depend on
``--ddp-bucket-size`` and ``--overlap-grad-reduce``), which fixes where each bucket ends.

Legacy checkpoints keep the same layout in ``distrib_optim.pt`` next to each rank file
(``get_parameter_state_dp_zero``): per buffer, one tensor per field over all its buckets
with the padding between buckets dropped, and only the total size.

Worked example: params ``a`` (100 elements), ``b`` (30), ``c`` (64) in
``named_parameters()`` order, one bucket: reversed ``c``, ``b``, ``a``: ``c`` at [0, 64),
``b`` at [64, 94), ``a`` at [128, 228) (94 padded to 128); the bucket's unpadded size is
228. With bucket sizes ``[94, 100]`` instead: ``c``, ``b`` in bucket 0, ``a`` at [0, 100)
of bucket 1.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Dict, List, Tuple

import torch

from megacore.checkpointing.conversion.manifest import ConversionError
from megacore.checkpointing.conversion.megatron_optimizer import (
    UnsupportedOptimizerState,
    distributed_optimizer_common,
)

__all__ = ["bucket_ranges", "dp_bucket_keys", "DP_BUCKET_FIELDS", "dp_group_object_key",
           "assemble_dp_field", "DISTRIB_OPTIM_FILENAME", "is_distributed_optimizer_state",
           "megacore_optimizer_from_distrib_optim"]

_BUCKET_KEY = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)"
                         r"\.dtype_(.+)\.bucket_idx_(\d+)\.(param|exp_avg_sq|exp_avg)$")
DP_BUCKET_FIELDS = {"main_param": "param", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
"""megacore's optimizer field -> the bucket tensor's suffix."""

_PARAM_ALIGNMENT = 64  # elements: 128-byte aligned starts for >= 16-bit params


def _pad(index: int, multiple: int) -> int:
    return -(-index // multiple) * multiple


def bucket_ranges(params: List[Tuple[str, int]], bucket_sizes: List[int],
                  where: str) -> Dict[str, Tuple[int, int, int]]:
    """``{name: (bucket, start, end)}`` of ``params`` (``(name, numel)`` in
    ``named_parameters()`` order) in buckets of the given unpadded sizes.

    Raises:
        ConversionError: naming ``where``, when the params do not fill the buckets
            exactly (the checkpoint is for another model or layout).
    """
    out, bucket, start = {}, 0, 0
    for name, numel in reversed(params):
        if bucket >= len(bucket_sizes):
            raise ConversionError(f"{where}: the distributed optimizer's buckets end before "
                                  f"param {name}: the state is for a different model")
        start = _pad(start, _PARAM_ALIGNMENT)
        out[name] = (bucket, start, start + numel)
        start += numel
        if start == bucket_sizes[bucket]:
            bucket, start = bucket + 1, 0
        elif start > bucket_sizes[bucket]:
            raise ConversionError(f"{where}: param {name} overruns distributed-optimizer "
                                  f"bucket {bucket} ({bucket_sizes[bucket]} elements): the "
                                  "state is for a different model")
    if bucket != len(bucket_sizes):
        raise ConversionError(f"{where}: the params fill {bucket} of the distributed "
                              f"optimizer's {len(bucket_sizes)} buckets: the state is for a "
                              "different model")
    return out


def dp_bucket_keys(keys: List[str], model_parallel_size: int,
                   where: str) -> Dict[int, List[str]]:
    """``{model-parallel rank: [bucket key prefix, by bucket index]}`` of the
    ``dp_reshardable`` tensor keys (each prefix + ``.<field>`` holds one field).

    Raises:
        UnsupportedOptimizerState: naming ``where`` and the key, for several grad buffers
            (mixed param dtypes, expert-parallel or virtual-stage buffers: not read) or
            keys of another form; ConversionError for a rank or field missing.
    """
    prefixes: Dict[int, Dict[int, str]] = {}
    seen = set()
    for key in keys:
        match = _BUCKET_KEY.match(key)
        if match is None or match.group(2) != "0":
            raise UnsupportedOptimizerState(
                f"{where}: distributed-optimizer entry {key} is not a bucket of the single "
                "grad buffer megacore reads (several buffers come from mixed param dtypes, "
                "expert parallelism or virtual pipeline stages); resume with --no-load-optim")
        g, j = int(match.group(1)), int(match.group(4))
        prefixes.setdefault(g, {})[j] = key[:-len(match.group(5)) - 1]
        seen.add(key)
    out = {}
    for g in range(model_parallel_size):
        buckets = prefixes.get(g, {})
        if not buckets or sorted(buckets) != list(range(len(buckets))):
            raise ConversionError(f"{where}: the distributed optimizer's buckets of "
                                  f"model-parallel rank {g} are missing or incomplete")
        out[g] = [buckets[j] for j in range(len(buckets))]
        missing = [f"{p}.{f}" for p in out[g] for f in DP_BUCKET_FIELDS.values()
                   if f"{p}.{f}" not in seen]
        if missing:
            raise ConversionError(f"{where}: distributed-optimizer tensors missing: "
                                  f"{missing[:3]}")
    return out


def dp_group_object_key(entry: str) -> str:
    """The ShardedObject key of rank 0's ``DistributedOptimizer.state_dict()`` entry
    (``optimizer``: the param groups and step, ``grad_scaler``): every model-parallel
    rank saves the same hyper-parameters."""
    return f"optimizer.distributed.dp_group_idx_0.{entry}"


def assemble_dp_field(suffix: str, order: List[Tuple[str, str]],
                      local_shapes: List[Dict[str, Tuple[int, ...]]],
                      prefixes: Dict[int, List[str]], bucket_sizes: Dict[int, List[int]],
                      load: Callable[[str], torch.Tensor],
                      merge: Callable[[str, List[torch.Tensor]], torch.Tensor],
                      where: str) -> Dict[str, torch.Tensor]:
    """One field (bucket ``suffix``) of every param, as whole canonical tensors.

    ``order``: ``(Megatron name, canonical name)`` in ``named_parameters()`` order;
    ``local_shapes[t]``: each canonical param's shape on tp rank ``t`` (model-parallel
    rank ``t`` at pp 1); ``load(key)``: a bucket tensor; ``merge(name, shards)``: the tp
    shards -> the canonical tensor."""
    shards: Dict[str, List[torch.Tensor]] = {name: [] for _, name in order}
    for t, shapes in enumerate(local_shapes):
        params = [(megatron, math.prod(shapes[name])) for megatron, name in order]
        ranges = bucket_ranges(params, bucket_sizes[t], where)
        for megatron, name in order:
            bucket, start, end = ranges[megatron]
            flat = load(f"{prefixes[t][bucket]}.{suffix}")
            shards[name].append(flat[start:end].view(shapes[name]))
    return {name: merge(name, parts) for name, parts in shards.items()}


# -- legacy distrib_optim.pt -----------------------------------------------------------------
DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"


def is_distributed_optimizer_state(opt_state: Any) -> bool:
    """Whether a legacy rank file's ``optimizer`` entry is megatron-core's
    ``DistributedOptimizer.state_dict()`` (param groups only; the per-param state is in
    ``distrib_optim.pt``)."""
    inner = opt_state.get("optimizer") if isinstance(opt_state, dict) else None
    return isinstance(inner, dict) and "state" not in inner and "param_groups" in inner


def megacore_optimizer_from_distrib_optim(opt_state: dict, param_state: Any,
                                          params: List[Tuple[int, str, torch.Tensor]],
                                          rename: Callable[[str], str], where: str) -> dict:
    """megacore's optimizer state dict of one legacy rank file of the distributed
    optimizer: ``opt_state`` its ``optimizer`` entry, ``param_state`` its
    ``distrib_optim.pt`` (``DistributedOptimizer.get_parameter_state_dp_zero``: per grad
    buffer and dtype, ``param``/``exp_avg``/``exp_avg_sq`` over the whole buffer with the
    padding between buckets dropped), ``params`` the rank's ``(chunk, Megatron name,
    local weight)`` in Megatron's order.

    The file records only the buffer's total unpadded size, not the bucket sizes, so the
    layout is walked as one bucket; several buckets give the same offsets exactly when
    every bucket ends on a 64-element boundary (a bucket ending elsewhere makes the walk
    longer than the buffer): otherwise refused."""
    world = _single_buffer(param_state, params, where)
    step, member = distributed_optimizer_common(opt_state, where)
    layout = [(name, weight.numel()) for _, name, weight in params]
    try:
        ranges = bucket_ranges(layout, [int(world["numel_unpadded"])], where)
    except ConversionError as exc:
        raise UnsupportedOptimizerState(
            f"{where}: {DISTRIB_OPTIM_FILENAME} does not match the model as one bucket "
            f"({exc}); it was saved with several DDP buckets (--overlap-grad-reduce), whose "
            "sizes the file does not record; resume with --no-load-optim") from exc
    out = {}
    for chunk, name, weight in params:
        _, start, end = ranges[name]
        entry = {field: world[suffix][start:end].view(weight.shape).clone()
                 for field, suffix in DP_BUCKET_FIELDS.items()}
        if not torch.equal(entry["main_param"].to(weight.dtype), weight):
            # megatron-core copies the main params into the model after every step.
            raise ConversionError(f"{where}: the main param of {name} in "
                                  f"{DISTRIB_OPTIM_FILENAME} does not match the weight: "
                                  "the file is for another model or layout")
        entry["step"] = step.clone()
        out[f"{chunk}/{rename(name)}"] = entry
    return dict(member, params=out)


def _single_buffer(param_state: Any, params: list, where: str) -> Dict[str, Any]:
    """The one grad buffer's world tensors of a ``distrib_optim.pt``; several buffers,
    chained optimizers (a list) or virtual stages are refused."""
    buffers = [k for k in param_state if isinstance(k, int)] \
        if isinstance(param_state, dict) else None
    chunks = {chunk for chunk, _, _ in params}
    if buffers != [0] or len(param_state[0]) != 1 or chunks != {0}:
        raise UnsupportedOptimizerState(
            f"{where}: {DISTRIB_OPTIM_FILENAME} holds several grad buffers or optimizers "
            "(mixed param dtypes, expert parallelism or virtual pipeline stages), which "
            "megacore does not read; resume with --no-load-optim")
    return next(iter(param_state[0].values()))
