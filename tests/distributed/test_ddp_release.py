"""A dropped DistributedDataParallel is freed, with the process groups it holds.

Its grad hooks live in C++ on each param, out of sight of Python's garbage collector; a
strong reference from them to the wrapper made an uncollectable cycle that kept the model
and its groups (and their gloo threads) alive until interpreter exit, where those still
joinable threads could abort the process ("terminate called without an active
exception").
"""

import gc
import weakref

import torch

from megacore import parallel_state
from megacore.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megacore.model_parallel_config import ModelParallelConfig
from tests.multirank import run_distributed


def _train_drop_and_collect():
    parallel_state.initialize_model_parallel()
    model = DistributedDataParallel(ModelParallelConfig(), DistributedDataParallelConfig(),
                                    torch.nn.Linear(4, 3))
    model(torch.ones(2, 4)).sum().backward()  # the hooks fire: they still work
    grads_accumulated = bool(model.module.weight.main_grad.abs().sum() > 0)
    ref = weakref.ref(model)
    del model
    gc.collect()
    return grads_accumulated, ref() is None


def test_dropped_ddp_is_garbage_collected():
    assert run_distributed(_train_drop_and_collect, 1) == [(True, True)]
