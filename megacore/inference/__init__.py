"""Text generation: KV-cached decoding of tp/pp-split GPT models, sampling, REST server.

* :class:`TextGenerationController`: batched generation (collective over the ranks of a
  model replica): prompts of different lengths, greedy/temperature/top-k/top-p sampling
  with per-request seeds, log probabilities, stop tokens and strings.
* :class:`ModelRunner`: one forward through all pipeline stages with a KV cache.
* :class:`GenerationService` / :func:`follow_requests`: queue and batch requests on
  rank 0, replay them on the other ranks.
* ``megacore.inference.text_api``: the HTTP APIs' parameters as requests and back.
* ``megacore.inference.server`` (imported on demand; the only module importing a web
  framework): the FastAPI app and :func:`run_text_generation_server`.
"""

from megacore.inference.generation_service import (
    GenerationCancelled,
    GenerationService,
    QueueFullError,
    ServiceConfig,
    follow_requests,
)
from megacore.inference.inference_request import (
    MAX_TOP_LOGPROBS,
    GenerationRequest,
    GenerationResult,
    InferenceConfig,
    SequenceTooLongError,
)
from megacore.inference.model_runner import ModelRunner
from megacore.inference.sampling import (
    SamplingParams,
    filter_logits,
    make_generator,
    sample_next_tokens,
)
from megacore.inference.text_generation_controller import (
    CancelCheck,
    TextGenerationController,
    TokenCallback,
)

__all__ = [
    "CancelCheck",
    "GenerationCancelled",
    "GenerationService",
    "QueueFullError",
    "ServiceConfig",
    "follow_requests",
    "GenerationRequest",
    "GenerationResult",
    "InferenceConfig",
    "MAX_TOP_LOGPROBS",
    "ModelRunner",
    "SamplingParams",
    "SequenceTooLongError",
    "TextGenerationController",
    "TokenCallback",
    "filter_logits",
    "make_generator",
    "sample_next_tokens",
]
