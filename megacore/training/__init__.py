"""Training: Megatron-style flags turned into configs, and the pretrain loop."""

from megacore.training.arguments import (
    FLAGS,
    ArgumentValidationError,
    Flag,
    RunConfig,
    build_parser,
    parse_args,
    run_config_to_dict,
    validate_run_config,
)
from megacore.training.training_config import (
    CheckpointArgs,
    DataArgs,
    GPTModelArgs,
    LoggingArgs,
    SchedulerArgs,
    TrainingArgs,
)

__all__ = [
    "FLAGS",
    "Flag",
    "RunConfig",
    "ArgumentValidationError",
    "build_parser",
    "parse_args",
    "validate_run_config",
    "run_config_to_dict",
    "GPTModelArgs",
    "DataArgs",
    "TrainingArgs",
    "SchedulerArgs",
    "LoggingArgs",
    "CheckpointArgs",
]
