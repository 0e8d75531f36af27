"""Compiled dataset index helpers (pybind11), built at install time by ``setup.py``.

The functions live in the extension module ``megacore_cpp._helpers`` (source:
``helpers.cpp``). They follow Megatron-LM's ``helpers_cpp`` semantics, described in
``shared/FORMATS.md`` section 4. Use them through :mod:`megacore.datasets.helpers`, which
picks the int32/int64 variant and falls back to numpy when this extension is missing.
"""

from megacore_cpp._helpers import (
    build_blending_indices,
    build_exhaustive_blending_indices,
    build_sample_idx_int32,
    build_sample_idx_int64,
)

__all__ = [
    "build_blending_indices",
    "build_exhaustive_blending_indices",
    "build_sample_idx_int32",
    "build_sample_idx_int64",
]
