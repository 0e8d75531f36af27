#!/usr/bin/env python
"""Convert checkpoints: any megacore layout/format to any other, and Hugging Face.

examples (Megatron's command line):

    # change the layout (tp2 x pp2 -> tp1 x pp4), legacy per-rank files
    python tools/checkpoint/convert.py --model-type GPT --loader megacore --saver megacore \\
        --load-dir ckpt_tp2pp2 --save-dir ckpt_tp1pp4 --ckpt-format torch \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4

    # megacore -> Hugging Face (loader detected; architecture from the model)
    python tools/checkpoint/convert.py --model-type GPT --saver hf --load-dir ckpt \\
        --save-dir hf_out

    # Hugging Face (Llama) -> megacore at tp 2
    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver megacore \\
        --load-dir hf_llama --save-dir ckpt --target-tensor-parallel-size 2

    # Megatron-LM (legacy or torch_dist) -> megacore, and back (Transformer Engine names)
    python tools/checkpoint/convert.py --model-type GPT --loader megatron --saver megacore \\
        --load-dir megatron_ckpt --save-dir ckpt
    python tools/checkpoint/convert.py --model-type GPT --saver mcore --load-dir ckpt \\
        --save-dir megatron_ckpt --ckpt-format torch --saver-transformer-impl transformer_engine

Loaders: megacore (legacy torch or torch_dist, detected), hf
(architecture from config.json), megatron (Megatron-LM, either layout; aliases
legacy, core, mcore); --loader may be omitted (detected). Savers:
megacore (--ckpt-format torch|torch_dist, optimizer state carried), hf,
megatron (same aliases and formats). Optimizer state: megatron-core's
non-distributed optimizer state is read from and written to both Megatron layouts,
matched by parameter name; the distributed optimizer's state is not read, and a MoE
torch_dist Megatron target gets no optimizer state (both reported as notes). RNG
states are per rank and are not converted: resume a converted checkpoint with
--no-load-rng (Megatron-LM too); pretrain_gpt.py --load <Megatron checkpoint>
restores Megatron's RNG states itself.
Exit status: 0 done, 2 the conversion stopped (unknown/missing tensors, listed).
"""

import argparse
import sys

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"`` or a byte count."""
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number):]
    if unit not in _UNITS or not number:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 512MiB, 1000000)")
    return int(float(number) * _UNITS[unit])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert megacore and Hugging Face checkpoints.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", required=True, choices=["GPT"],
                   help="model family (Megatron's flag; GPT covers GPT-2, Llama, Mistral, Mixtral)")
    from megacore.checkpointing.conversion.converter import LOADERS, SAVERS

    p.add_argument("--loader", default="auto", choices=list(LOADERS),
                   help="source format (default: auto, detected from --load-dir); megatron "
                        "(aliases legacy, core, mcore) reads Megatron-LM checkpoints")
    p.add_argument("--saver", required=True, choices=list(SAVERS),
                   help="target format: a megacore checkpoint, a Hugging Face model directory, "
                        "or a Megatron-LM checkpoint (megatron, aliases legacy/core/mcore)")
    p.add_argument("--load-dir", required=True,
                   help="source: a megacore save directory (or iter_XXXXXXX) or an HF model "
                        "directory")
    p.add_argument("--save-dir", required=True,
                   help="target directory (created when missing)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="megacore saver: tp degree of the output (default: the source's, 1 "
                        "from HF)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="megacore saver: pp degree of the output (default: the source's, 1 "
                        "from HF)")
    p.add_argument("--target-expert-parallel-size", type=int, default=None,
                   help="megacore saver: ep degree of the output, MoE models (default: the "
                        "source's, 1 from HF)")
    p.add_argument("--target-num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="megacore saver: virtual pipeline stages per pp rank (default: the "
                        "source's, none from HF)")
    p.add_argument("--ckpt-format", default="torch_dist", choices=["torch", "torch_dist"],
                   help="megacore or Megatron saver: legacy per-rank files (torch) or the "
                        "layout-free distributed format (default: torch_dist)")
    p.add_argument("--saver-transformer-impl", default="local",
                   choices=["local", "transformer_engine"],
                   help="Megatron legacy saver: parameter names of megatron-core's local spec "
                        "or of Transformer Engine (fused norms, Megatron-LM's default)")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="vocabulary without padding, when the checkpoint cannot tell "
                        "(padding rows are dropped for HF)")
    p.add_argument("--hf-architecture", default=None,
                   help="HF saver: GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, "
                        "MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, "
                        "Qwen3MoeForCausalLM or DeepseekV3ForCausalLM (default: from the "
                        "model)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"),
                   help="HF saver: bytes per safetensors shard, e.g. 5GB or 512MiB "
                        "(default: 2GB)")
    p.add_argument("--no-optimizer", action="store_true",
                   help="megacore and megatron savers: drop the optimizer state "
                        "(weights only)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megacore.checkpointing import CheckpointError
    from megacore.checkpointing.conversion import convert_checkpoint

    try:
        report = convert_checkpoint(
            load_dir=args.load_dir, save_dir=args.save_dir, loader=args.loader,
            saver=args.saver, ckpt_format=args.ckpt_format,
            target_tensor_parallel_size=args.target_tensor_parallel_size,
            target_pipeline_parallel_size=args.target_pipeline_parallel_size,
            target_expert_parallel_size=args.target_expert_parallel_size,
            target_virtual_pipeline_parallel_size=args.target_num_virtual_stages_per_pipeline_rank,
            true_vocab_size=args.true_vocab_size, hf_architecture=args.hf_architecture,
            max_shard_size=args.max_shard_size, save_optimizer=not args.no_optimizer,
            progress=not args.no_progress, transformer_impl=args.saver_transformer_impl)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"converted {report.num_tensors} tensors ({report.loader} -> {report.saver}) into "
          f"{report.output} in {report.seconds:.1f}s; peak anonymous memory "
          f"{report.peak_anon_mb:.0f} MiB, peak RSS {report.peak_rss_mb:.0f} MiB"
          + (f", largest shard {report.largest_shard_mb:.1f} MiB"
             if report.largest_shard_mb else ""))
    for note in report.notes:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
