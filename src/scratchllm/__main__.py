"""`python -m scratchllm` (and `torchrun -m scratchllm`) runs the CLI."""

from scratchllm.cli import entry

entry()
