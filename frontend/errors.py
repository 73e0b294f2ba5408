"""The error types every layer raises.

The command line turns a ``BitpassError`` into one line on stderr and its
``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BitpassError(Exception):
    """A failure the user can act on; ``str(err)`` is a one-line message."""

    exit_code = 1


class UsageError(BitpassError):
    """The request itself is wrong (bad option, unknown pass, mismatched data): exit 2."""

    exit_code = 2


class ModelLoadError(BitpassError):
    """The model file is missing, truncated, not ONNX, or unsafe to load."""


class DataError(UsageError):
    """Calibration or evaluation data does not fit the model's inputs."""


class UnsupportedOperatorError(BitpassError):
    """A node uses an operator that no backend can run."""
