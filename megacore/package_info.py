"""Version of megacore (semantic versioning: MAJOR.MINOR.PATCH).

Bump MINOR when the public API (tests/api_snapshot.json) gains names, MAJOR when it
loses or changes one, and update the snapshot in the same commit.
"""

MAJOR = 0
MINOR = 2
PATCH = 0
PRE_RELEASE = ""

__version__ = f"{MAJOR}.{MINOR}.{PATCH}{PRE_RELEASE}"
__package_name__ = "megacore"
__description__ = "Model-parallelism core library for transformer training"
__license__ = "MIT"

__all__ = ["__version__", "__package_name__", "__description__", "__license__",
           "MAJOR", "MINOR", "PATCH", "PRE_RELEASE"]
