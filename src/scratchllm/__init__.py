"""scratchllm: a GPT-style language model built from its parts, and its whole life.

The short public API; everything else is one import away in its package (see docs/design.md).
"""

from importlib.metadata import PackageNotFoundError, version

from scratchllm.checkpoint import load_checkpoint, save_checkpoint
from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError, InputError, ScratchLLMError
from scratchllm.inference.generate import generate, generate_text
from scratchllm.model import GPTModel, MultiHeadAttention, TransformerBlock
from scratchllm.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

try:  # the version is declared once, in pyproject.toml
    __version__ = version("scratchllm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BPETokenizer",
    "ByteTokenizer",
    "CheckpointError",
    "GPTModel",
    "InputError",
    "ModelConfig",
    "MultiHeadAttention",
    "ScratchLLMError",
    "Tokenizer",
    "TransformerBlock",
    "generate",
    "generate_text",
    "load_checkpoint",
    "load_tokenizer",
    "save_checkpoint",
]
