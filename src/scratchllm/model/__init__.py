"""The model: layers, attention and the GPT itself."""

from scratchllm.model.attention import KVCache, MultiHeadAttention
from scratchllm.model.gpt import GPTModel, TransformerBlock
from scratchllm.model.layers import GELU, FeedForward, LayerNorm, RMSNorm

__all__ = [
    "GELU",
    "FeedForward",
    "GPTModel",
    "KVCache",
    "LayerNorm",
    "MultiHeadAttention",
    "RMSNorm",
    "TransformerBlock",
]
