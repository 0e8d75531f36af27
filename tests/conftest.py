"""Suite-wide settings: one intra-op thread, device selection, GPU marker."""

import os

# Forked ranks hang on their first matmul if the parent already ran a multi-threaded op
# (docs/ARCHITECTURE.md, "gloo on CPU"), and 2-core machines gain nothing from more
# threads in tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# The first torch.optim optimizer in a process imports torch._dynamo (~3-5 s). Pay it once
# here so that every forked rank inherits it instead of paying it again.
torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])


def pytest_addoption(parser):
    parser.addoption("--device", choices=["cpu", "cuda"], default=None,
                     help="run multi-rank tests on cpu/gloo (default) or cuda/nccl; "
                          "same as MEGACORE_TEST_DEVICE")


def pytest_configure(config):
    chosen = config.getoption("--device")
    if chosen:
        os.environ["MEGACORE_TEST_DEVICE"] = chosen


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MEGACORE_TEST_DEVICE", "cpu") == "cuda" and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: run with --device cuda on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
