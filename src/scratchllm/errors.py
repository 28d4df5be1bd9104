"""Typed errors. The CLI maps `InputError` to exit code 2 with a one-line message."""

from __future__ import annotations


class ScratchLLMError(Exception):
    """Base class for every error scratchllm raises on purpose."""


class InputError(ScratchLLMError):
    """Bad input from the user: a file, a field, a shape or a value that is not what was expected.

    The message is one line that names the input and what was expected.
    """


class CheckpointError(InputError):
    """A checkpoint directory is missing files or holds corrupt ones."""
