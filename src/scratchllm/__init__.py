"""scratchllm: a GPT-style language model built from its parts, and its whole life."""

from scratchllm.config import ModelConfig
from scratchllm.errors import CheckpointError, InputError, ScratchLLMError
from scratchllm.model import GPTModel, MultiHeadAttention, TransformerBlock
from scratchllm.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__version__ = "0.1.0"

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
    "load_tokenizer",
]
