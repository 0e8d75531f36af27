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
from megacore.training.evaluation import EvaluationResult, evaluate_language_model
from megacore.training.flops import num_floating_point_operations
from megacore.training.metrics_logger import MetricsLogger, format_log_line
from megacore.training.training import (
    TrainState,
    evaluate,
    get_model,
    get_optimizer_param_scheduler,
    initialize_distributed,
    pretrain,
    train_step,
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
    "pretrain",
    "TrainState",
    "initialize_distributed",
    "get_model",
    "get_optimizer_param_scheduler",
    "train_step",
    "evaluate",
    "EvaluationResult",
    "evaluate_language_model",
    "num_floating_point_operations",
    "MetricsLogger",
    "format_log_line",
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
