"""Data: raw text corpora, token files on disk, and the batch loaders that feed training."""

from scratchllm.data.corpus import (
    BUILTIN_CORPORA,
    read_text_file,
    resolve_paths,
    strip_gutenberg_boilerplate,
)
from scratchllm.data.formats import iter_documents
from scratchllm.data.loader import BatchLoader, SlidingWindowDataset, split_tokens
from scratchllm.data.shards import TokenFile, token_file_for, tokenize_corpus, write_token_file

__all__ = [
    "BUILTIN_CORPORA",
    "BatchLoader",
    "SlidingWindowDataset",
    "TokenFile",
    "iter_documents",
    "read_text_file",
    "resolve_paths",
    "split_tokens",
    "strip_gutenberg_boilerplate",
    "token_file_for",
    "tokenize_corpus",
    "write_token_file",
]
