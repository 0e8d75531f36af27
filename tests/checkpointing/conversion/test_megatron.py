"""Megatron-LM checkpoints in and out, against megatron-core 0.16.1 itself (test-only).

One 2-rank gloo run of megatron-core (``megatron_reference``) builds, on CPU, a GPT-2-style
model at tp 1, a Llama-style model (GQA, SwiGLU, RoPE, untied) at tp 2, the GPT-2 model
at pp 2 (tied embeddings: the last stage holds the output copy) and a Mixtral-style MoE
(4 experts, top-2) at ep 2, runs their forward passes (the references) and saves them as
Megatron-LM does: legacy rank files with local-spec names (GPT-2 and the MoE, with the
state of megatron-core's own optimizer after one step, for the MoE a dense and an expert
optimizer, and RNG states), with Transformer Engine's fused-norm names (Llama), and torch_dist
directories written by ``dist_checkpointing.save`` (GPT-2 tp 1, Llama tp 2).

Each converts to megacore (both formats) and to Hugging Face; megacore's ``GPTModel``
and ``transformers`` give megatron-core's logits. Converting back (megatron -> megacore
-> megatron, same layout and format) gives the original tensors bitwise, optimizer
state included (same param order, groups and moments), and a second
megatron-core run loads the written checkpoints (strict ``load_state_dict`` for legacy,
``dist_checkpointing.load`` for torch_dist) to the same logits. ``pretrain_gpt.py --load``
and the generation server take the Megatron checkpoints directly and agree with the
converted megacore ones.

Tolerances: megacore and megatron-core compute the same ops in the same order where the
layout is the same; across layouts (tp 2 -> 1) and against ``transformers`` (split vs
fused QKV, different softmax/GeLU kernels) float32 rounding remains: atol 2e-5, rtol 1e-4
as in ``test_hf``.
"""

import glob
import os

import pytest
import torch

from megacore.checkpointing import CheckpointError
from megacore.checkpointing.conversion import convert_checkpoint, open_source
from tests.checkpointing.conversion import fixtures as fx
from tests.multirank import run_distributed

pytest.importorskip("megatron.core")
transformers = pytest.importorskip("transformers")

from tests.checkpointing.conversion import megatron_reference as mr  # noqa: E402

TOL = dict(atol=2e-5, rtol=1e-4)

# name: (kind, format, tp, pp, ep)
CASES = {
    "gpt2_tp1_legacy": ("gpt2", "torch", 1, 1, 1),
    "gpt2_tp1_dist": ("gpt2", "torch_dist", 1, 1, 1),
    "llama_tp2_te": ("llama", "torch", 2, 1, 1),
    "llama_tp2_dist": ("llama", "torch_dist", 2, 1, 1),
    "gpt2_pp2": ("gpt2", "torch", 1, 2, 1),
    "mixtral_ep2": ("mixtral", "torch", 1, 1, 2),
}


def _write_megatron_checkpoints(root):
    """Rank body (2 ranks): every case's checkpoint and megatron-core's logits."""
    from megatron.core import parallel_state as mps

    mr.stub_for_cpu()
    rank, ids, refs = torch.distributed.get_rank(), mr.tokens(), {}
    # GPT-2 style, tp 1 (dp 2: rank 0 writes), legacy with optimizer + torch_dist.
    mr.init_parallel()
    model = mr.build_model("gpt2")
    optimizer, scheduler = mr.megatron_optimizer(model)  # one step: moments are not zero
    mr.train_step(model, optimizer, scheduler, 0)
    refs["gpt2"] = mr.logits(model, ids)
    if rank == 0:
        mr.save_legacy(f"{root}/gpt2_tp1_legacy", "gpt2", [model.state_dict()], 0, 0, 0,
                       1, 1, 1, optimizer=optimizer.state_dict(),
                       scheduler=scheduler.state_dict())
    mr.save_torch_dist(f"{root}/gpt2_tp1_dist", "gpt2", model, 1, 1, 1)
    # Llama style, tp 2: TE names (legacy) and torch_dist.
    mr.init_parallel(tp=2)
    model = mr.build_model("llama", tp=2)
    refs["llama"] = mr.logits(model, ids)
    mr.save_legacy(f"{root}/llama_tp2_te", "llama", [model.state_dict()], rank, 0, 0, 2, 1,
                   1, transformer_impl="transformer_engine")
    mr.save_torch_dist(f"{root}/llama_tp2_dist", "llama", model, 2, 1, 1)
    # GPT-2 style, pp 2.
    mr.init_parallel(pp=2)
    model = mr.build_model("gpt2", pp=2)
    out = mr.logits(model, ids)
    if out is not None:
        refs["gpt2_pp2"] = out
    mr.save_legacy(f"{root}/gpt2_pp2", "gpt2", [model.state_dict()], 0, rank, 0, 1, 2, 1)
    # Mixtral style, ep 2 (same tokens on both ranks, so the dense params' grads and
    # Adam state agree between the ranks), with a dense and an expert optimizer.
    mr.init_parallel(ep=2)
    model = mr.build_model("mixtral", ep=2)
    optimizer, scheduler = mr.megatron_optimizer(model)
    mr.train_step(model, optimizer, scheduler, 0)
    refs["mixtral"] = mr.logits(model, ids)
    mr.save_legacy(f"{root}/mixtral_ep2", "mixtral", [model.state_dict()], 0, 0, rank, 1, 1,
                   2, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict())
    mps.destroy_model_parallel()
    return refs


def _reference_kind(name):
    return "gpt2_pp2" if name == "gpt2_pp2" else CASES[name][0]


def _desc_dict(load_dir):
    source = open_source("megacore", load_dir)
    desc = source.description
    source.close()
    return {k: getattr(desc, k) for k in desc.__dataclass_fields__ if k != "config_dict"}


def _load_back(root, megacore_dirs):
    """Rank body (2 ranks): megatron-core loads the round-tripped checkpoints; megacore
    (tp 1, dp 2) loads the converted ones. Returns logits from rank 0."""
    from megacore.checkpointing import load_checkpoint
    from megacore.checkpointing.conversion import GPTDescription

    mr.stub_for_cpu()
    rank, ids, out = torch.distributed.get_rank(), mr.tokens(), {}
    mr.init_parallel()
    model = mr.build_model("gpt2", seed=99)
    mr.load_legacy_into(model, f"{root}/back/gpt2_tp1_legacy/iter_0000007/mp_rank_00/"
                        "model_optim_rng.pt")
    out["back/gpt2_tp1_legacy"] = mr.logits(model, ids)
    model = mr.build_model("gpt2", seed=98)
    mr.load_torch_dist_into(model, f"{root}/back/gpt2_tp1_dist/iter_0000007")
    out["back/gpt2_tp1_dist"] = mr.logits(model, ids)
    mr.init_parallel(tp=2)
    model = mr.build_model("llama", tp=2, seed=97)
    mr.load_torch_dist_into(model, f"{root}/back/llama_tp2_dist/iter_0000007")
    out["back/llama_tp2_dist"] = mr.logits(model, ids)
    mr.init_parallel(ep=2)
    model = mr.build_model("mixtral", ep=2, seed=96)
    mr.load_legacy_into(model, f"{root}/back/mixtral_ep2/iter_0000007/mp_rank_00_{rank:03d}/"
                        "model_optim_rng.pt")
    out["back/mixtral_ep2"] = mr.logits(model, ids)
    from megatron.core import parallel_state as mps

    mps.destroy_model_parallel()
    for name, (load_dir, desc_dict) in megacore_dirs.items():
        model = fx.build_model(GPTDescription(**desc_dict), 1, 1, 1, seed=5)
        load_checkpoint([model], None, None, load_dir=load_dir, no_load_rng=True,
                        no_load_optim=True)
        out[name] = fx.pipeline_logits(model, ids)
    return out if rank == 0 else None


def _hf_logits(hf_dir, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _model_tensors(path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    keys = [k for k in state if k == "model" or k.startswith("model")]
    return {f"{k}/{n}": v for k in keys for n, v in state[k].items()
            if not n.endswith("_extra_state")}


def _dcp_tensors(iter_dir):
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(iter_dir).read_metadata().state_dict_metadata
    request = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
               for k, m in meta.items() if hasattr(m, "size")}
    dcp.load(request, checkpoint_id=iter_dir, no_dist=True)
    return request


def _assert_same_optimizer(path, twin):
    """megatron-core optimizer state dicts (with their param order) bitwise equal."""
    a, b = (torch.load(p, map_location="cpu", weights_only=False) for p in (path, twin))
    assert (a.get("optimizer") is None) == (b.get("optimizer") is None), twin
    if a.get("optimizer") is None:
        return
    members = [o if isinstance(o, list) else [o] for o in (a["optimizer"], b["optimizer"])]
    assert len(members[0]) == len(members[1]), twin  # [dense, expert] with ep > 1
    for mine, theirs in zip(*members):
        assert [g["params"] for g in mine["param_groups"]] == \
            [g["params"] for g in theirs["param_groups"]], twin
        for index, state in mine["state"].items():
            for field, value in state.items():
                assert torch.equal(value, theirs["state"][index][field]), (twin, index, field)
    assert a["opt_param_scheduler"] == b["opt_param_scheduler"]


def _assert_bitwise(original, back, fmt):
    if fmt == "torch":
        files = sorted(glob.glob(f"{original}/iter_*/mp_rank_*/model_optim_rng.pt"))
        assert files
        for path in files:
            twin = path.replace(original, back)
            a, b = _model_tensors(path), _model_tensors(twin)
            assert sorted(a) == sorted(b), path
            for key in a:
                assert torch.equal(a[key], b[key]), f"{path}: {key}"
            _assert_same_optimizer(path, twin)
    else:
        a = _dcp_tensors(f"{original}/iter_0000007")
        b = _dcp_tensors(f"{back}/iter_0000007")
        assert sorted(a) == sorted(b)
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_megatron_checkpoints_convert_with_megatron_core_logits(tmp_path):
    root = str(tmp_path)
    refs = run_distributed(_write_megatron_checkpoints, world_size=2, args=(root,),
                           timeout=240)
    ref = {**refs[0], **{"gpt2_pp2": refs[1]["gpt2_pp2"]}}
    ids = mr.tokens()
    megacore_dirs = {}
    for i, (name, (kind, fmt, tp, pp, ep)) in enumerate(CASES.items()):
        src = f"{root}/{name}"
        # megatron -> megacore (alternating formats), detected loader
        target_fmt = ("torch", "torch_dist")[i % 2]
        report = convert_checkpoint(load_dir=src, save_dir=f"{root}/mc/{name}",
                                    ckpt_format=target_fmt, target_tensor_parallel_size=1,
                                    target_pipeline_parallel_size=1,
                                    target_expert_parallel_size=1, progress=False)
        assert report.loader == "megatron"
        if name == "gpt2_tp1_legacy":  # the optimizer state is carried, RNG states not
            assert not any("optimizer" in n for n in report.notes)
            assert any("RNG states" in n and "not converted" in n for n in report.notes)
            assert open_source("megacore", f"{root}/mc/{name}").has_optimizer
        megacore_dirs[name] = (f"{root}/mc/{name}", _desc_dict(f"{root}/mc/{name}"))
        # megatron -> Hugging Face
        convert_checkpoint(load_dir=src, save_dir=f"{root}/hf/{name}", loader="mcore",
                           saver="hf", progress=False)
        torch.testing.assert_close(_hf_logits(f"{root}/hf/{name}", ids),
                                   ref[_reference_kind(name)], **TOL)
        # megatron -> megacore -> megatron, same layout and format: bitwise
        convert_checkpoint(load_dir=f"{root}/mc/{name}", save_dir=f"{root}/back/{name}",
                           saver="megatron", ckpt_format=fmt, target_tensor_parallel_size=tp,
                           target_pipeline_parallel_size=pp, target_expert_parallel_size=ep,
                           transformer_impl="transformer_engine" if name.endswith("_te")
                           else "local", progress=False)
        _assert_bitwise(src, f"{root}/back/{name}", fmt)
    out = run_distributed(_load_back, world_size=2, args=(root, megacore_dirs),
                          timeout=240)[0]
    for name in CASES:
        torch.testing.assert_close(out[name], ref[_reference_kind(name)], **TOL)
    for name in ("gpt2_tp1_legacy", "gpt2_tp1_dist", "llama_tp2_dist", "mixtral_ep2"):
        torch.testing.assert_close(out[f"back/{name}"], ref[CASES[name][0]], atol=0, rtol=0)
    _check_pretrain_resumes(tmp_path, f"{root}/llama_tp2_te", f"{root}/mc/llama_tp2_te")
    served = [run_distributed(_served_tokens, world_size=1, args=(d,), timeout=120)[0]
              for d in (f"{root}/mixtral_ep2", f"{root}/mc/mixtral_ep2")]
    assert served[0] == served[1] and len(served[0][0]) == 4


def _served_tokens(load_dir):
    """Rank body: the generation server's model (``--load`` only) greedily continues a
    prompt; returns the tokens and their log probabilities."""
    from megacore.inference import GenerationRequest, SamplingParams
    from tools import run_text_generation_server as tool

    run, args = tool.parse_serving_args(["--load", load_dir, "--max-batch-size", "1"])
    controller = tool.build_controller(run, args)
    result = controller.generate([GenerationRequest([5, 17, 3, 40], 4,
                                                    SamplingParams(temperature=0.0))])[0]
    return list(result.generated_tokens), [round(x, 5) for x in result.generated_logprobs]


def _check_pretrain_resumes(tmp_path, megatron_dir, megacore_dir):
    """``pretrain_gpt.py --load <Megatron checkpoint>`` (model from its args, TE names,
    saved at tp 2, here run at tp 1 x dp 2) continues from Megatron's iteration with
    exactly the losses of the same run from the converted megacore checkpoint."""
    import json
    import shlex

    from tests.training.test_pretrain_gpt import _run_pretrain

    runs = {}
    for name, load in (("megatron", megatron_dir), ("megacore", megacore_dir)):
        log = tmp_path / f"{name}.jsonl"
        argv = shlex.split(f"--load {load} --no-load-optim --no-load-rng --mock-data "
                           "--micro-batch-size 1 --global-batch-size 4 --lr 1e-3 "
                           f"--train-iters 9 --log-interval 1 --eval-iters 0 "
                           f"--hidden-dropout 0 --attention-dropout 0 --log-jsonl {log}")
        run_distributed(_run_pretrain, world_size=2, args=(argv,), timeout=240)
        with open(log) as f:
            runs[name] = [r for r in map(json.loads, f) if "lm_loss" in r]
    assert [r["iteration"] for r in runs["megatron"]] == [8, 9]
    assert [r["lm_loss"] for r in runs["megatron"]] == [r["lm_loss"] for r in runs["megacore"]]


def test_megatron_args_are_loaded_safely_and_bad_input_is_named(tmp_path):
    """``argparse.Namespace`` (and Megatron's enums, numpy RNG arrays) load with
    ``weights_only``; any other class is refused, naming the file; unsupported model
    settings name the arg."""
    import argparse

    from megacore.checkpointing.conversion.megatron_args import (
        MegatronEnumValue,
        description_from_args,
        load_megatron_file,
    )

    path = str(tmp_path / "f.pt")
    ns = mr.megatron_args("llama")
    torch.save({"args": ns, "rng": __import__("numpy").random.get_state()}, path)
    loaded = load_megatron_file(path)
    assert isinstance(loaded["args"], argparse.Namespace)
    backend = loaded["args"].attention_backend
    # megatron-core, once imported, allow-lists its own enums globally: then the real
    # class comes back; without it, our stand-in.
    assert backend.value == 5
    assert isinstance(backend, MegatronEnumValue) or type(backend).__name__ == "AttnBackend"
    torch.save({"args": ns, "evil": _Evil()}, path)
    with pytest.raises(CheckpointError, match="f.pt cannot be loaded safely"):
        load_megatron_file(path)
    ns.squared_relu = True
    with pytest.raises(CheckpointError, match="squared_relu=True"):
        description_from_args(ns, embedding_rows=64, where="x.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _save_megacore_gpt(root):
    fx.save_stepped(root, "gpt", 1, 1, 1)


def test_virtual_pipeline_layout_round_trip_and_errors(tmp_path):
    """megacore -> Megatron legacy at tp 2, pp 2, vpp 2 (``model0``/``model1`` in each
    rank file, args recording the layout and the padded vocabulary) -> megacore gives the
    same tensors, model and optimizer state, bitwise; a missing rank file fails with a
    message naming the file."""
    from megacore.checkpointing.conversion.megatron_args import load_megatron_file

    root = str(tmp_path)
    run_distributed(_save_megacore_gpt, world_size=1, args=(f"{root}/src",), timeout=120)
    report = convert_checkpoint(load_dir=f"{root}/src/torch", save_dir=f"{root}/meg",
                                saver="legacy", ckpt_format="torch",
                                target_tensor_parallel_size=2, target_pipeline_parallel_size=2,
                                target_virtual_pipeline_parallel_size=2, progress=False)
    files = sorted(glob.glob(f"{report.output}/mp_rank_*/model_optim_rng.pt"))
    assert [os.path.basename(os.path.dirname(f)) for f in files] == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    state = load_megatron_file(files[0])
    assert {"model0", "model1", "args", "checkpoint_version", "iteration"} <= set(state)
    args = state["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
            args.virtual_pipeline_model_parallel_size) == (2, 2, 2)
    assert args.padded_vocab_size == 256 and state["model0"][
        "embedding.word_embeddings.weight"].shape[0] == 128   # 61 -> 128 * tp
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 5
    convert_checkpoint(load_dir=f"{root}/meg", save_dir=f"{root}/back", loader="core",
                       saver="megacore", ckpt_format="torch_dist", true_vocab_size=61,
                       target_tensor_parallel_size=1, target_pipeline_parallel_size=1,
                       progress=False)
    original, back = open_source("megacore", f"{root}/src/torch"), open_source(
        "megacore", f"{root}/back")
    names = original.model_names()
    assert names == back.model_names()
    keys = [f"model/{n}" for n in names]
    keys += [f"optimizer/{f}/{n}" for n in names for f in original.optimizer_fields(n)]
    assert len(keys) > 2 * len(names)  # the optimizer went through Megatron's format
    a, b = original.read(keys, consume=False), back.read(keys, consume=False)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    os.remove(files[-1])
    with pytest.raises(CheckpointError, match="mp_rank_01_001/model_optim_rng.pt is missing"):
        convert_checkpoint(load_dir=f"{root}/meg", save_dir=f"{root}/x", saver="hf",
                           progress=False)
