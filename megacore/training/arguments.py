"""Megatron-style command-line flags, generated from the config dataclasses.

The entry points of the command line; each job lives in its own module:

- :mod:`~megacore.training.megatron_flags`: the flag table (``FLAGS``), one row per flag
  naming the config field it sets;
- :mod:`~megacore.training.argument_parser`: the argparse parser generated from the table
  and the dataclasses, and the ``--yaml-cfg`` file (keys are field names or flag names;
  flags on the command line override it);
- :mod:`~megacore.training.saved_config`: a checkpoint's saved configuration merged into
  the flags (``--load``);
- :mod:`~megacore.training.flag_values`: the parsed values turned into the configs at once;
- :mod:`~megacore.training.config_checks`: the sizes derived across configs and the
  checks that reject every inconsistent combination before training, naming the flags
  (:class:`~megacore.training.flag_error.FlagError` carries them as data).

:func:`parse_args` runs them in that order and returns a :class:`RunConfig`; there is no
global ``args``. The command line is parsed once: what a later step needs (the
checkpoint of ``--load``) is read from the parsed values, so a ``--yaml-cfg`` setting
counts the same as a flag.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from megacore.training.argument_parser import (  # noqa: F401 - re-exported
    DEPRECATED_FLAGS,
    FlagValues,
    build_parser,
    read_flag_values,
)
from megacore.training.argument_parser import field_info as _field_info  # noqa: F401
from megacore.training.config_checks import (  # noqa: F401 - re-exported
    DerivedSizes,
    derive_sizes,
    parse_step_batch_size_schedule,
    validate_run_config,
)
from megacore.training.flag_error import ArgumentValidationError, FlagError
from megacore.training.flag_values import build_run_config, derive_notes
from megacore.training.flag_values import section_kwargs as _section_kwargs  # noqa: F401
from megacore.training.megatron_flags import (  # noqa: F401 - re-exported
    FLAG_KINDS,
    FLAGS,
    IMPLEMENTED,
    MAPPED,
    NEEDS,
    NO_EFFECT,
    SECTIONS,
    Flag,
)
from megacore.training.megatron_flags import flag_dest as _dest  # noqa: F401
from megacore.training.run_config import RunConfig, run_config_to_dict
from megacore.training.saved_config import (  # noqa: F401 - re-exported
    CHECKPOINT_MODEL_FLAGS,
    DEPRECATED_FIELDS,
    merge_checkpoint_config,
    model_flags_from_config,
    upgrade_saved_config,
)

__all__ = ["Flag", "FLAGS", "RunConfig", "ArgumentValidationError", "FlagError",
           "build_parser", "parse_args", "run_config_from_flags", "read_flag_values",
           "validate_run_config", "run_config_to_dict", "CHECKPOINT_MODEL_FLAGS",
           "model_flags_from_config"]


def parse_args(argv: Optional[Sequence[str]] = None, *, world_size: Optional[int] = None,
               extra_args_provider=None, ignore_unknown_args: bool = False,
               checkpoint_config: Optional[Dict[str, Any]] = None,
               checkpoint_path: str = "the checkpoint",
               for_inference: bool = False) -> RunConfig:
    """Parse flags (and ``--yaml-cfg``) into a validated :class:`RunConfig`.

    Args:
        argv: the flags (default ``sys.argv[1:]``). Unknown flags are an error.
        world_size: number of ranks (default: from ``torch.distributed`` or 1), needed to
            derive the data-parallel size and check the layout.
        extra_args_provider: ``parser -> parser`` adding a program's own flags.
        checkpoint_config: the run configuration saved in a checkpoint (``--load``). Its
            model and tokenizer settings (:data:`CHECKPOINT_MODEL_FLAGS`) fill flags not
            given; a flag given with a different value is an error naming both values.
        checkpoint_path: where ``checkpoint_config`` came from, for messages.
        for_inference: skip the checks that only matter for training (lr, duration, data).
    """
    flags = read_flag_values(argv, extra_args_provider=extra_args_provider,
                             ignore_unknown_args=ignore_unknown_args)
    return run_config_from_flags(flags, world_size=world_size,
                                 checkpoint_config=checkpoint_config,
                                 checkpoint_path=checkpoint_path, for_inference=for_inference)


def run_config_from_flags(flags: FlagValues, *, world_size: Optional[int] = None,
                          checkpoint_config: Optional[Dict[str, Any]] = None,
                          checkpoint_path: str = "the checkpoint",
                          for_inference: bool = False) -> RunConfig:
    """The validated :class:`RunConfig` of an already parsed command line
    (:func:`read_flag_values`); the arguments are :func:`parse_args`'s. A program that must
    read something named by a flag before building the configs (the checkpoint of
    ``--load``) parses once, reads ``flags.values``, then calls this."""
    values = flags.values
    notes: List[str] = []
    if checkpoint_config:
        values = merge_checkpoint_config(values, checkpoint_config, checkpoint_path, notes)
    run = build_run_config(values)
    run.yaml_cfg = flags.yaml_cfg
    run.notes.extend(notes + derive_notes(values))
    if world_size is None:
        world_size = (torch.distributed.get_world_size()
                      if torch.distributed.is_available() and torch.distributed.is_initialized()
                      else 1)
    validate_run_config(run, world_size, for_inference=for_inference)
    return run
