"""Checkpoint conversion: any megacore layout to any layout, and Hugging Face import/export.

Everything passes through *canonical* tensors (the single-process model's tensors under
global names, ``tensor_rules``; which tensors a model has and how each is split over tp
is read from the model itself built on the meta device, ``reference_model``, never
listed here): loaders merge shards into them on request
(``megacore_format``, ``hf_format``), savers cut them for the target, one layer or one
target file at a time. A :class:`Manifest` checks that every source tensor is consumed
and every target entry written exactly once. ``tools/checkpoint/convert.py`` is the
command line.
"""

from megacore.checkpointing.conversion.canonical import CanonicalSource, CommonState
from megacore.checkpointing.conversion.converter import (
    LOADERS,
    SAVERS,
    ConversionReport,
    convert_checkpoint,
    detect_loader,
    open_source,
)
from megacore.checkpointing.conversion.hf_format import HFSaver, HFSource, ShardWriter
from megacore.checkpointing.conversion.hf_mappings import (
    HF_ARCHITECTURES,
    MappingGroup,
    choose_architecture,
    description_from_hf_config,
    hf_config_from_description,
    mapping_groups,
)
from megacore.checkpointing.conversion.manifest import ConversionError, Manifest
from megacore.checkpointing.conversion.megacore_format import (
    DistSaver,
    DistSource,
    LegacySaver,
    LegacySource,
    open_megacore_source,
)
from megacore.checkpointing.conversion.megatron_format import (
    MegatronDistSaver,
    MegatronDistSource,
    MegatronLegacySaver,
    MegatronLegacySource,
    is_megatron_checkpoint,
    open_megatron_source,
)
from megacore.checkpointing.conversion.megatron_load import (
    load_megatron_checkpoint,
    megatron_run_config,
)
from megacore.checkpointing.conversion.model_description import (
    ACTIVATIONS,
    GPTDescription,
)
from megacore.checkpointing.conversion.tensor_rules import (
    MegacoreLayout,
    ShardRule,
    expected_model_names,
    merge_from_tp,
    shard_rule,
    split_for_tp,
)

__all__ = [
    "convert_checkpoint", "ConversionReport", "open_source", "detect_loader", "LOADERS",
    "SAVERS", "CanonicalSource", "CommonState", "GPTDescription", "ACTIVATIONS",
    "MegacoreLayout", "ShardRule", "shard_rule", "split_for_tp", "merge_from_tp",
    "expected_model_names", "Manifest", "ConversionError", "LegacySource", "DistSource",
    "LegacySaver", "DistSaver", "open_megacore_source", "HFSource", "HFSaver", "ShardWriter",
    "HF_ARCHITECTURES", "MappingGroup", "mapping_groups", "choose_architecture",
    "description_from_hf_config", "hf_config_from_description",
    "MegatronLegacySource", "MegatronDistSource", "MegatronLegacySaver", "MegatronDistSaver",
    "open_megatron_source", "is_megatron_checkpoint", "load_megatron_checkpoint",
    "megatron_run_config",
]
