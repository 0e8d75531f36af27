"""One conversion, end to end: open the source, check names, write the target, check
the manifest.

:func:`convert_checkpoint` is what ``tools/checkpoint/convert.py`` calls (Megatron's
loader/saver plugin names: ``megacore`` and ``hf``). Order::

    open source (unknown names: stop) -> the names the model description implies must be
    exactly the source's (missing/unexpected: stop) -> saver pulls canonical tensors
    layer by layer and writes -> manifest: every source tensor consumed, every target
    entry written once (else: stop, non-zero exit in the tool)
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, List, Optional

from megacore.checkpointing.conversion.canonical import CanonicalSource
from megacore.checkpointing.conversion.hf_format import (
    HFSaver,
    HFSource,
    is_hf_checkpoint,
)
from megacore.checkpointing.conversion.manifest import ConversionError, Manifest
from megacore.checkpointing.conversion.megacore_format import (
    DistSaver,
    LegacySaver,
    open_megacore_source,
)
from megacore.checkpointing.conversion.megatron_format import (
    MegatronDistSaver,
    MegatronLegacySaver,
    is_megatron_checkpoint,
    open_megatron_source,
)
from megacore.checkpointing.conversion.streaming import MemoryMonitor, peak_rss_mb
from megacore.checkpointing.conversion.tensor_rules import (
    MegacoreLayout,
    expected_model_names,
)
from megacore.checkpointing.conversion.tokenizer_files import (
    TOKENIZER_SUBDIR,
    carry_checkpoint_tokenizer,
    copy_files,
    exported_tokenizer_files,
)

__all__ = ["convert_checkpoint", "ConversionReport", "open_source", "detect_loader",
           "LOADERS", "SAVERS"]

MEGATRON_ALIASES = ("megatron", "legacy", "core", "mcore")
"""Names of the Megatron-LM plugin (Megatron's own loader/saver names are accepted)."""
LOADERS = ("auto", "megacore", "hf") + MEGATRON_ALIASES
SAVERS = ("megacore", "hf") + MEGATRON_ALIASES


def _plugin(name: str) -> str:
    return "megatron" if name in MEGATRON_ALIASES else name


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        loader, saver: plugin names used.
        output: the written directory (iteration directory or HF directory).
        num_tensors: canonical model tensors converted.
        seconds: wall time.
        peak_anon_mb: peak anonymous resident memory during the conversion (sampled).
        peak_rss_mb: process peak RSS (includes memory-mapped checkpoint pages).
        largest_shard_mb: largest HF shard written (0 for megacore targets).
        notes: what the source held that was not converted (e.g. Megatron's optimizer).
    """

    loader: str
    saver: str
    output: str
    num_tensors: int
    seconds: float
    peak_anon_mb: float
    peak_rss_mb: float
    largest_shard_mb: float = 0.0
    notes: List[str] = dataclasses.field(default_factory=list)


def detect_loader(load_dir: str) -> str:
    """``"hf"`` for a directory with config.json and safetensors, ``"megatron"`` for a
    Megatron-LM checkpoint (``args`` stored), else ``"megacore"``."""
    if is_hf_checkpoint(load_dir):
        return "hf"
    return "megatron" if is_megatron_checkpoint(load_dir) else "megacore"


def open_source(loader: str, load_dir: str, manifest: Optional[Manifest] = None,
                true_vocab_size: Optional[int] = None,
                load_optimizer: bool = True, block_spec: Any = None) -> CanonicalSource:
    """Open ``load_dir`` with loader ``loader`` (``auto`` detects it); ``block_spec``:
    the decoder block spec of a megacore model with custom layers."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    loader = detect_loader(load_dir) if loader == "auto" else _plugin(loader)
    if block_spec is not None and loader != "megacore":
        raise ValueError(f"block_spec (a custom megacore layer spec) needs a megacore "
                         f"checkpoint; {load_dir} is read with the {loader!r} loader, whose "
                         "tensor names come from its own format")
    if loader == "hf":
        return HFSource(load_dir, manifest)
    if loader == "megatron":
        return open_megatron_source(load_dir, manifest, true_vocab_size=true_vocab_size,
                                    load_optimizer=load_optimizer)
    return open_megacore_source(load_dir, manifest, true_vocab_size=true_vocab_size,
                                load_optimizer=load_optimizer, block_spec=block_spec)


def _check_names(source: CanonicalSource) -> None:
    expected = expected_model_names(source.description)
    actual = source.model_names()
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise ConversionError(
            "the source tensors do not match its model configuration; nothing was written:"
            + (f"\n  missing ({len(missing)}): {missing[:20]}" if missing else "")
            + (f"\n  unexpected ({len(extra)}): {extra[:20]}" if extra else ""))


def _target_layout(source: CanonicalSource, tp: Optional[int], pp: Optional[int],
                   ep: Optional[int], vpp: Optional[int]) -> MegacoreLayout:
    src = getattr(source, "layout", None) or MegacoreLayout()
    pp = pp or src.pp
    same_pp = pp == src.pp
    return MegacoreLayout(tp=tp or src.tp, pp=pp, ep=ep or src.ep,
                          vpp=vpp if vpp and vpp > 1 else None,
                          first_stage_layers=src.first_stage_layers if same_pp else None,
                          last_stage_layers=src.last_stage_layers if same_pp else None)


def _carry_tokenizer(source: CanonicalSource, load_dir: str, save_dir: str, saver: str) -> None:
    """Copy the source's tokenizer files beside the target (``tokenizer_files``)."""
    hf_files = getattr(source, "tokenizer_files", None)
    if hf_files:  # a Hugging Face source: its files, into tokenizer/ of a megacore target
        copy_files(load_dir, hf_files,
                   save_dir if saver == "hf" else os.path.join(save_dir, TOKENIZER_SUBDIR))
    elif saver == "hf" and hf_files is None:
        exported_tokenizer_files(source.description.config_dict, load_dir, save_dir)
    elif saver == "megacore" and hf_files is None:  # a tokenizer kept inside the checkpoint
        carry_checkpoint_tokenizer(source.description.config_dict, load_dir, save_dir)


def _carries_optimizer(saver: str, save_optimizer: bool) -> bool:
    """Whether the target gets optimizer state: megacore and Megatron-LM targets
    (megatron-core's non-distributed optimizer state); Hugging Face has none."""
    return save_optimizer and saver != "hf"


def convert_checkpoint(*, load_dir: str, save_dir: str, loader: str = "auto",
                       saver: str = "megacore", ckpt_format: str = "torch_dist",
                       target_tensor_parallel_size: Optional[int] = None,
                       target_pipeline_parallel_size: Optional[int] = None,
                       target_expert_parallel_size: Optional[int] = None,
                       target_virtual_pipeline_parallel_size: Optional[int] = None,
                       true_vocab_size: Optional[int] = None,
                       hf_architecture: Optional[str] = None,
                       max_shard_size: int = 2 * 1024 ** 3, save_optimizer: bool = True,
                       progress: bool = True,
                       transformer_impl: str = "local",
                       block_spec: Any = None) -> ConversionReport:
    """Convert a checkpoint between megacore layouts/formats and Hugging Face.

    Args:
        load_dir: source (megacore save or iteration directory, or HF directory).
        save_dir: target directory (megacore: a save directory with a tracker).
        loader: ``auto``, ``megacore``, ``hf`` or ``megatron`` (aliases ``legacy``,
            ``core``, ``mcore``).
        saver: ``megacore``, ``hf`` or ``megatron`` (same aliases).
        ckpt_format: megacore or Megatron target format, ``torch`` or ``torch_dist``.
        target_tensor_parallel_size, target_pipeline_parallel_size,
        target_expert_parallel_size, target_virtual_pipeline_parallel_size: megacore
            target layout (default: the source's; 1 from Hugging Face).
        true_vocab_size: vocabulary rows without padding (when the source cannot tell).
        hf_architecture: HF class to write (default from the model).
        max_shard_size: bytes per HF shard.
        save_optimizer: carry optimizer state (megacore and Megatron-LM sources
            and targets of either format; Megatron's distributed-optimizer state, and
            MoE optimizer state for a Megatron torch_dist target, are reported in the
            notes, not carried).
        progress: progress bars on stderr.
        transformer_impl: Megatron legacy saver: ``local`` or ``transformer_engine``
            parameter names.
        block_spec: the decoder block spec of a megacore model built with custom layers
            (None: megacore's GPT spec); the converter reads the tensors and their tp
            splits from the model this spec builds (megacore sources only).

    Raises:
        ConversionError: unknown, missing or unused tensors, or a model the target cannot
            hold; the message lists them.
    """
    if saver not in SAVERS:
        raise ValueError(f"saver must be one of {SAVERS}, got {saver!r}")
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    saver = _plugin(saver)
    if ckpt_format not in ("torch", "torch_dist"):
        raise ValueError(f"ckpt_format must be torch or torch_dist, got {ckpt_format!r}")
    start = time.time()
    manifest = Manifest()
    used_loader = detect_loader(load_dir) if loader == "auto" else _plugin(loader)
    with MemoryMonitor() as monitor:
        source = open_source(used_loader, load_dir, manifest, true_vocab_size,
                             load_optimizer=_carries_optimizer(saver, save_optimizer),
                             block_spec=block_spec)
        try:
            _check_names(source)
            os.makedirs(save_dir, exist_ok=True)
            layout = _target_layout(source, target_tensor_parallel_size,
                                    target_pipeline_parallel_size, target_expert_parallel_size,
                                    target_virtual_pipeline_parallel_size)
            if saver == "hf":
                writer = HFSaver(save_dir, hf_architecture, max_shard_size, progress)
            elif saver == "megatron":
                cls = MegatronLegacySaver if ckpt_format == "torch" else MegatronDistSaver
                writer = cls(save_dir, layout, progress=progress,
                             transformer_impl=transformer_impl, save_optimizer=save_optimizer)
            else:
                cls = LegacySaver if ckpt_format == "torch" else DistSaver
                writer = cls(save_dir, layout, progress=progress, save_optimizer=save_optimizer)
            output = writer.save(source)
            _carry_tokenizer(source, load_dir, save_dir, saver)
            manifest.check()
        finally:
            source.close()
    return ConversionReport(loader=used_loader, saver=saver, output=output,
                            num_tensors=len(source.model_names()),
                            seconds=time.time() - start, peak_anon_mb=monitor.peak_anon_mb,
                            peak_rss_mb=peak_rss_mb(),
                            largest_shard_mb=getattr(writer, "largest_shard_bytes", 0) / 2 ** 20,
                            notes=list(source.notes) + list(getattr(writer, "notes", [])))
