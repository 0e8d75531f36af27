"""Data for pre-training: Megatron-compatible ``.bin``/``.idx`` datasets, GPT samples,
blending, and the index helpers.

Everything that needs ``torch`` (the datasets returning tensors) is imported on first
use, so ``tools/preprocess_data.py`` and its worker processes only pay for numpy.
"""

import importlib

__all__ = [
    "BlendedDataset",
    "BlendedMegatronDatasetBuilder",
    "BlendedMegatronDatasetConfig",
    "GPTDataset",
    "GPTDatasetConfig",
    "IndexedDataset",
    "IndexedDatasetBuilder",
    "IndexedDatasetError",
    "MockGPTDataset",
    "MockGPTLowLevelDataset",
    "Split",
    "get_blend_from_list",
    "optimal_dtype",
    "parse_and_normalize_split",
]

_HOME = {
    "BlendedDataset": "blended_dataset",
    "BlendedMegatronDatasetBuilder": "blended_megatron_dataset_builder",
    "BlendedMegatronDatasetConfig": "blended_megatron_dataset_config",
    "GPTDataset": "gpt_dataset",
    "GPTDatasetConfig": "gpt_dataset",
    "IndexedDataset": "indexed_dataset",
    "IndexedDatasetBuilder": "indexed_dataset",
    "IndexedDatasetError": "indexed_dataset",
    "MockGPTDataset": "mock_dataset",
    "MockGPTLowLevelDataset": "mock_dataset",
    "Split": "split_and_blend",
    "get_blend_from_list": "split_and_blend",
    "optimal_dtype": "indexed_dataset",
    "parse_and_normalize_split": "split_and_blend",
}


def __getattr__(name):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
