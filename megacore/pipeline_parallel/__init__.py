"""Pipeline parallelism: p2p exchange between stages, schedules, layer split.

``get_forward_backward_func()`` picks the schedule (none, 1F1B, interleaved 1F1B) for the
current grid, and ``config.pipeline_schedule`` makes it zero-bubble (ZB-H1, or ZBV's V
over two chunks); :mod:`.schedule_plan` computes each rank's order of operations as data
and simulates all stages together; :mod:`.layer_split` says which layers a stage builds;
:class:`TrainingHooks` carries the training loop's hooks into every schedule.
"""

from megacore.pipeline_parallel.layer_split import (
    get_layer_offset_and_count,
    pipeline_layer_counts,
    virtual_stages_from_layers_per_stage,
)
from megacore.pipeline_parallel.p2p_communication import (
    DEFAULT_P2P_TIMEOUT,
    P2PCommunicator,
    get_tensor_shape,
)
from megacore.pipeline_parallel.schedule_plan import (
    ScheduleError,
    Step,
    build_plan,
    simulate,
)
from megacore.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)
from megacore.pipeline_parallel.training_hooks import TrainingHooks

__all__ = [
    "get_forward_backward_func",
    "TrainingHooks",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_without_interleaving",
    "forward_backward_pipelining_with_interleaving",
    "P2PCommunicator",
    "DEFAULT_P2P_TIMEOUT",
    "get_tensor_shape",
    "Step",
    "ScheduleError",
    "build_plan",
    "simulate",
    "get_layer_offset_and_count",
    "pipeline_layer_counts",
    "virtual_stages_from_layers_per_stage",
]
