"""megacore: model-parallelism core library for transformer training (PyTorch).

Layers, bottom up: ``device``, ``parallel_state`` -> ``tensor_parallel`` ->
``pipeline_parallel`` -> ``distributed`` -> ``optimizer`` -> ``transformer`` -> ``models``
-> ``checkpointing`` -> ``inference`` -> ``training``. Importing ``megacore`` imports
nothing heavy beyond torch; subpackages are imported on use.
"""

from megacore.package_info import __version__

__all__ = ["__version__"]
