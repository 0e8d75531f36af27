"""Megatron-LM's optimizer state in a legacy rank file <-> megacore's, matched by name.

Megatron's non-distributed optimizers save torch's own ``optimizer.state_dict()``, whose
per-param state is keyed by *position* (``state[i]``, ``param_groups[g]["params"]``), so
the names must be recovered from how megatron-core builds its groups (0.16.1,
``megatron/core/optimizer/__init__.py``: ``_get_param_groups``, ``get_megatron_optimizer``):

1. Params are visited chunk by chunk (virtual pipeline stages in order), each chunk in
   ``named_parameters()`` order, which is its ``state_dict()`` order without the
   ``_extra_state`` entries (every state-dict tensor of a GPTModel is a param).
2. A param goes to the group of its overrides: no weight decay (``wd_mult=0.0``) for
   names matching ``*.bias`` and for 1-D params, the default group otherwise
   (``--decoupled-lr`` adds groups of its own: refused here). Groups are sorted with the
   no-override (decay) group first; empty groups stay (their keys are gathered from all
   ranks).
3. ``get_megatron_optimizer`` builds one optimizer over the groups that are not
   ``is_expert_parallel`` and, when there are any, one over the expert-parallel groups;
   ``ChainedOptimizer.state_dict`` is that one dict, or a list ``[dense, expert]``. Params
   under ``.mlp.experts.`` are expert-parallel (``allreduce=False``) only when
   ``expert_model_parallel_size > 1`` (``tensor_parallel/layers.py``); at ep 1 they are
   ordinary dense params.
4. torch numbers params consecutively over the groups, so group ``g``'s ``params`` list
   pairs, in order, with the names that rules 1-3 put in ``g``.

Member forms: ``FP32Optimizer`` saves ``{"state", "param_groups"}``;
``Float16OptimizerWithFloat16Params`` (``--bf16``/``--fp16``) saves ``{"optimizer": that,
"grad_scaler", "fp32_from_fp16_params": [per group, the fp32 main copies of its
half-precision params in order]}``; the distributed optimizer saves only hyper-parameters
here and its moments in ``distrib_optim.pt`` (Megatron's flattened DDP buffers): read by
``megatron_dp_buckets`` (the legacy source routes it there).

torch_dist (``dist_checkpointing``): the non-distributed optimizer's
``sharded_state_dict`` names each param's state after the param's sharded key,
``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>`` (stacked and sharded like
the weight), and keeps the rest in ``common.pt``: ``optimizer`` (or, mixed precision,
``optimizer.optimizer``) ``{"state": {"common_step": step}, "param_groups": [...]}`` and
the grad scaler. Other optimizer keys (chained prefixes) are refused.

torch_dist from the distributed optimizer (``--use-distributed-optimizer``,
``distrib_optimizer.py``: ``DistributedOptimizer.sharded_state_dict``): ``common.pt``'s
``optimizer`` entry is ``{"optimizer": {"param_groups": [... "step": n]}, ["grad_scaler"],
"param_state_sharding_type": <type>}`` (the step is in every group, no ``state``). Of the
types, ``fully_reshardable`` (Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``)
gathers the dp shards into whole tensors shaped like the param,
``optimizer.state.<param|exp_avg|exp_avg_sq>.<model key>`` (``param``: the fp32 main
param), so it maps by name as above. ``dp_reshardable`` (Megatron-LM's default) stores
the flat DDP buckets and its groups in ShardedObjects (``common.pt`` holds only the type):
``megatron_dp_buckets``, routed by the torch_dist source. ``dp_zero_gather_scatter`` (one
pickled object per model-parallel rank), ``fully_sharded_model_space`` (flattened ranges,
no longer saved by megatron-core 0.16.1) and ``fsdp_dtensor`` (Megatron-FSDP's DTensors)
are refused, naming the type.

megacore's form (``megacore.optimizer.optimizer``) is keyed by ``"<chunk>/<name>"`` with
``main_param`` (the fp32 master copy; the weight itself for fp32 params) and Adam's
``exp_avg``, ``exp_avg_sq``, ``step`` per param, so each converts to the other exactly.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from megacore.checkpointing.conversion.manifest import ConversionError

__all__ = ["megatron_params", "megacore_optimizer_from_megatron",
           "megatron_optimizer_from_megacore", "UnsupportedOptimizerState",
           "dist_optimizer_entries", "dist_optimizer_common", "distributed_optimizer_common",
           "DP_RESHARDABLE",
           "megatron_dist_optimizer_common"]


class UnsupportedOptimizerState(ConversionError):
    """Megatron optimizer state of a kind megacore does not read (some distributed-optimizer
    layouts and torch_dist sharding types, decoupled learning rates): the converter notes
    it, loading it for training fails."""

_HALF = (torch.float16, torch.bfloat16)
_EXTRA_STATE = "_extra_state"
# Hyper-parameters carried into megacore's groups. The algorithm itself (Adam or AdamW,
# amsgrad, ...) is the run's choice (its flags), not the checkpoint's.
_GROUP_KEYS = ("lr", "weight_decay", "betas", "eps", "wd_mult", "lr_mult",
               "is_expert_parallel", "max_lr", "min_lr")

Param = Tuple[int, str, torch.Tensor]  # (chunk, Megatron name, weight)
_DIST_KEY = re.compile(r"^optimizer\.state\.(exp_avg_sq|exp_avg|fp32_param|param)\.(.+)$")
_DIST_FIELDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "fp32_param": "main_param",
                "param": "main_param"}
# DistributedOptimizer sharding types megacore reads: whole tensors named like the params
# (here), and the flat buckets (megatron_dp_buckets, routed by the torch_dist source).
DP_RESHARDABLE = "dp_reshardable"
_READ_SHARDING_TYPES = ("fully_reshardable", DP_RESHARDABLE)


def megatron_params(model_state_dicts: List[Dict[str, Any]]) -> List[Param]:
    """Every param of a rank file in Megatron's order (rule 1 of the module docstring)."""
    return [(c, name, value) for c, sd in enumerate(model_state_dicts)
            for name, value in sd.items()
            if not name.endswith(_EXTRA_STATE) and torch.is_tensor(value)]


def _no_weight_decay(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".bias") or tensor.dim() == 1


def _is_expert(name: str, expert_parallel: bool) -> bool:
    return expert_parallel and ".mlp.experts." in name


def _member_parts(member: Any, where: str) -> Tuple[dict, Optional[list], Any]:
    """``(torch state dict, fp32_from_fp16_params or None, grad scaler state)``."""
    if not isinstance(member, dict):
        raise ConversionError(f"{where}: 'optimizer' holds a {type(member).__name__}, not a "
                              "Megatron optimizer state dict")
    if "state" in member and "param_groups" in member:
        return member, None, None
    inner = member.get("optimizer")
    if isinstance(inner, dict) and "state" not in inner:
        raise UnsupportedOptimizerState(
            f"{where}: saved by Megatron's distributed optimizer (--use-distributed-optimizer"
            "): its moments are in distrib_optim.pt as Megatron's flattened DDP buffers, "
            "which megacore does not read; resume with --no-load-optim, or re-save from "
            "Megatron-LM without the distributed optimizer")
    if isinstance(inner, dict) and "param_groups" in inner:
        return inner, member.get("fp32_from_fp16_params"), member.get("grad_scaler")
    raise ConversionError(f"{where}: unrecognized Megatron optimizer state (keys "
                          f"{sorted(member)[:6]})")


def _check_group(group: dict, where: str) -> None:
    if group.get("is_decoupled_lr") or float(group.get("lr_mult", 1.0)) != 1.0:
        raise UnsupportedOptimizerState(
            f"{where}: optimizer param groups with --decoupled-lr or an lr multiplier are "
            "not converted; resume with --no-load-optim")


def _group_params(group: dict, params: List[Param], expert_parallel: bool,
                  where: str) -> List[Param]:
    """The params of one saved group (rules 2-4), checked against its size."""
    _check_group(group, where)
    no_wd = float(group.get("wd_mult", 1.0)) == 0.0
    expert = bool(group.get("is_expert_parallel", False))
    mine = [p for p in params if _no_weight_decay(p[1], p[2]) == no_wd
            and _is_expert(p[1], expert_parallel) == expert]
    if len(mine) != len(group["params"]):
        raise ConversionError(
            f"{where}: the optimizer state is for a different model: its param group "
            f"(wd_mult={group.get('wd_mult')}, expert={expert}) holds "
            f"{len(group['params'])} params, the model in the same file has {len(mine)}")
    return mine


def _param_entry(state: dict, weight: torch.Tensor, main: Optional[torch.Tensor],
                 name: str, where: str) -> Dict[str, torch.Tensor]:
    entry = {"main_param": (main if main is not None else weight).float()}
    for field, value in state.items():
        if not torch.is_tensor(value):
            continue
        if value.dim() and tuple(value.shape) != tuple(weight.shape):
            raise ConversionError(f"{where}: optimizer {field} of {name} has shape "
                                  f"{tuple(value.shape)}, the param {tuple(weight.shape)}: "
                                  "the optimizer state is for a different model")
        entry[field] = value
    return entry


def _member_to_megacore(member: Any, params: List[Param], rename: Callable[[str], str],
                        expert_parallel: bool, where: str) -> dict:
    torch_sd, fp32_groups, scaler = _member_parts(member, where)
    out_params, groups = {}, []
    for g, group in enumerate(torch_sd["param_groups"]):
        mains = iter(fp32_groups[g] if fp32_groups else [])
        for index, (chunk, name, weight) in zip(group["params"],
                                                _group_params(group, params,
                                                              expert_parallel, where)):
            main = next(mains, None) if weight.dtype in _HALF else None
            if weight.dtype in _HALF and main is None:
                raise ConversionError(f"{where}: no fp32 main copy of the half-precision "
                                      f"param {name} (fp32_from_fp16_params)")
            out_params[f"{chunk}/{rename(name)}"] = _param_entry(
                torch_sd["state"].get(index, {}), weight, main, name, where)
        groups.append({k: group[k] for k in _GROUP_KEYS if k in group})
    return {"param_groups": groups, "params": out_params, "grad_scaler": scaler}


def megacore_optimizer_from_megatron(opt_state: Any, model_state_dicts: List[Dict[str, Any]],
                                     rename: Callable[[str], str], expert_parallel: bool,
                                     where: str) -> dict:
    """megacore's optimizer state dict for one Megatron rank file (``rename``: Megatron
    param name -> megacore's; ``expert_parallel``: the checkpoint's ep > 1).

    Raises:
        ConversionError: naming ``where``, when the state does not fit the file's model;
            UnsupportedOptimizerState for optimizers megacore does not read.
    """
    members = list(opt_state) if isinstance(opt_state, (list, tuple)) else [opt_state]
    params = megatron_params(model_state_dicts)
    out = [_member_to_megacore(m, params, rename, expert_parallel, where) for m in members]
    covered = sum(len(m["params"]) for m in out)
    if covered != len(params):
        raise ConversionError(f"{where}: the optimizer state covers {covered} params, the "
                              f"model has {len(params)}: the state is for a different model")
    return out[0] if len(out) == 1 else {"optimizers": out}


# -- megacore -> Megatron ------------------------------------------------------------------
_TORCH_ADAM_DEFAULTS = {"amsgrad": False, "maximize": False, "foreach": None,
                        "capturable": False, "differentiable": False, "fused": None,
                        "decoupled_weight_decay": True}


def _megatron_group(saved: Optional[dict], no_wd: bool, expert: bool) -> dict:
    """A Megatron param group (megatron-core's keys) from megacore's hyper-parameters."""
    base = dict(saved or {})
    group = {"is_expert_parallel": expert, "default_config": True,
             "wd_mult": 0.0 if no_wd else 1.0, "lr_mult": 1.0, "is_decoupled_lr": False,
             "max_lr": base.get("max_lr", base.get("lr", 0.0)),
             "min_lr": base.get("min_lr", 0.0), "lr": base.get("lr", 0.0),
             "betas": tuple(base.get("betas", (0.9, 0.999))), "eps": base.get("eps", 1e-8),
             "weight_decay": base.get("weight_decay", 0.0)}
    group.update(_TORCH_ADAM_DEFAULTS)
    return group


def megatron_optimizer_from_megacore(params: List[Param],
                                     fields: Dict[Tuple[int, str], Dict[str, Any]],
                                     groups: Dict[Tuple[bool, bool], Optional[dict]],
                                     half: bool, scaler: Any, expert_parallel: bool) -> Any:
    """The ``optimizer`` entry megatron-core's ``ChainedOptimizer.state_dict`` gives for
    one rank (rules 1-4): ``params`` in Megatron's order, ``fields[(chunk, name)]`` megacore's
    per-param state (``main_param`` and Adam fields), ``groups[(no_wd, expert)]`` the
    hyper-parameters, ``half``: a ``Float16OptimizerWithFloat16Params`` member,
    ``expert_parallel``: the target's ep > 1."""
    members = []
    for expert in (False, True):
        mine = [p for p in params if _is_expert(p[1], expert_parallel) == expert]
        if expert and not mine:
            continue
        torch_sd = {"state": {}, "param_groups": []}
        fp32_groups, index = [], 0
        for no_wd in (False, True):
            names = [p[:2] for p in mine if _no_weight_decay(p[1], p[2]) == no_wd]
            if expert and not names:
                continue  # megatron-core has an expert group only where some rank has params
            saved = groups.get((no_wd, expert)) or groups.get((no_wd, False))
            group = _megatron_group(saved, no_wd, expert)
            group["params"], mains = [], []
            for key in names:
                state = {k: v for k, v in fields[key].items() if k != "main_param"}
                if state:
                    torch_sd["state"][index] = state
                group["params"].append(index)
                mains.append(fields[key]["main_param"])
                index += 1
            torch_sd["param_groups"].append(group)
            fp32_groups.append(mains)
        member = torch_sd if not half else {"optimizer": torch_sd, "grad_scaler": scaler,
                                            "fp32_from_fp16_params": fp32_groups}
        if half and scaler is None:
            del member["grad_scaler"]
        members.append(member)
    return members[0] if len(members) == 1 else members



# -- torch_dist ----------------------------------------------------------------------------
def dist_optimizer_entries(keys: List[str], where: str) -> List[Tuple[str, str, str]]:
    """``(megacore field, model sharded key, checkpoint key)`` of Megatron torch_dist
    optimizer keys; raises UnsupportedOptimizerState for keys of another kind."""
    out, unknown = [], []
    for key in keys:
        match = _DIST_KEY.match(key)
        if match is None:
            unknown.append(key)
        else:
            out.append((_DIST_FIELDS[match.group(1)], match.group(2), key))
    if unknown:
        raise UnsupportedOptimizerState(
            f"{where}: Megatron torch_dist optimizer entries megacore does not read "
            f"(distributed optimizer or chained optimizers), e.g. {sorted(unknown)[:3]}; "
            "resume with --no-load-optim")
    return out


def dist_optimizer_common(common_optimizer: Any, where: str) -> Tuple[torch.Tensor, dict]:
    """``(step, megacore optimizer member without params)`` from ``common.pt``'s
    ``optimizer`` entry of a torch_dist checkpoint."""
    if not isinstance(common_optimizer, dict):
        raise UnsupportedOptimizerState(f"{where}: common.pt's optimizer entry is a "
                                        f"{type(common_optimizer).__name__}; resume with "
                                        "--no-load-optim")
    inner = common_optimizer.get("optimizer", common_optimizer)
    if "param_state_sharding_type" in common_optimizer:
        return _distributed_common(common_optimizer, where)
    state, groups = inner.get("state") or {}, inner.get("param_groups") or []
    if "common_step" not in state or not groups:
        raise UnsupportedOptimizerState(f"{where}: common.pt's optimizer entry has no "
                                        "common_step or param groups (keys "
                                        f"{sorted(common_optimizer)[:6]}); resume with "
                                        "--no-load-optim")
    return _step_and_member(state["common_step"], groups, common_optimizer, where)


def _step_and_member(step: Any, groups: list, common_optimizer: dict,
                     where: str) -> Tuple[torch.Tensor, dict]:
    for group in groups:
        _check_group(group, where)
    step = torch.as_tensor(step, dtype=torch.float32).reshape(())
    return step, {"param_groups": [{k: g[k] for k in _GROUP_KEYS if k in g} for g in groups],
                  "grad_scaler": common_optimizer.get("grad_scaler")}


def _distributed_common(common_optimizer: dict, where: str) -> Tuple[torch.Tensor, dict]:
    """:func:`dist_optimizer_common` for the distributed optimizer's
    ``fully_reshardable`` type (``dp_reshardable`` keeps its groups in its own entries:
    the torch_dist source reads them before calling here); other types are refused."""
    sharding = common_optimizer["param_state_sharding_type"]
    if sharding not in _READ_SHARDING_TYPES or sharding == DP_RESHARDABLE:
        raise UnsupportedOptimizerState(
            f"{where}: saved by Megatron's distributed optimizer with sharding type "
            f"{sharding!r}, which megacore does not read here (it reads "
            f"{', '.join(_READ_SHARDING_TYPES)} in torch_dist); resume with "
            "--no-load-optim, or re-save from Megatron-LM with its default sharding or "
            "--dist-ckpt-optim-fully-reshardable")
    return distributed_optimizer_common(common_optimizer, where)


def distributed_optimizer_common(state: dict, where: str) -> Tuple[torch.Tensor, dict]:
    """``(step, megacore optimizer member without params)`` of megatron-core's
    ``DistributedOptimizer.state_dict()`` (``{"optimizer": {"param_groups"},
    ["grad_scaler"]}``): the step is every group's ``step``."""
    inner = state.get("optimizer")
    groups = inner.get("param_groups") if isinstance(inner, dict) else None
    steps = {float(g["step"]) for g in groups or [] if g.get("step") is not None}
    if len(steps) != 1:
        raise ConversionError(f"{where}: the distributed optimizer's param groups hold "
                              f"steps {sorted(steps)}, expected one common step")
    return _step_and_member(steps.pop(), groups, state, where)


def megatron_dist_optimizer_common(optimizer_common: Dict[str, Dict[str, Any]],
                                   step: torch.Tensor, half: bool) -> dict:
    """``common.pt``'s ``optimizer`` entry of a dense model's torch_dist checkpoint (what
    megatron-core's ``sharded_state_dict`` leaves outside the tensors): the common step
    and the decay and no-decay param groups (their ``params`` are filled at load)."""
    saved = {}
    for member in optimizer_common.values():
        for group in member["param_groups"].values():
            saved[float(group.get("wd_mult", 1.0)) == 0.0] = group
    inner = {"state": {"common_step": step.clone()},
             "param_groups": [_megatron_group(saved.get(no_wd), no_wd, False)
                              for no_wd in (False, True)]}
    if not half:
        return inner
    scaler = next((m.get("grad_scaler") for m in optimizer_common.values()
                   if m.get("grad_scaler") is not None), None)
    out = {"optimizer": inner}  # fp32_from_fp16_params: all sharded (fp32_param keys)
    if scaler is not None:
        out["grad_scaler"] = scaler
    return out
