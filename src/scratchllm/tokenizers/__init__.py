"""Text ↔ token ids: one interface and its implementations.

  base.py    the `Tokenizer` interface, `<|endoftext|>`, pre-tokenisation patterns
  bytes.py   `ByteTokenizer`: the 256 byte values plus `<|endoftext|>`; needs no files
  bpe.py     `BPETokenizer`: byte-level BPE through tiktoken (GPT-2's and trained vocabularies)
  hf.py      `HFTokenizer`: a Hugging Face `tokenizer.json`, its chat template and stop ids
  files.py   GPT-2 (`encoder.json` + `vocab.bpe`) and tiktoken rank files
  train.py   the BPE trainer (incremental pair counts, parallel pre-tokenisation)
  loader.py  `load_tokenizer(spec)`: the only module that imports the implementations

`Tokenizer.save(dir)` writes what `load_tokenizer(dir)` reads back, so a checkpoint carries its
tokenizer. The HF backend loads lazily (importing this package does not import `tokenizers`).
"""

from scratchllm.tokenizers.base import EOT, GPT2_PATTERN, GPT4_PATTERN, PATTERNS, Tokenizer
from scratchllm.tokenizers.bpe import BPETokenizer, gpt2_tokenizer
from scratchllm.tokenizers.bytes import ByteTokenizer
from scratchllm.tokenizers.loader import load_tokenizer

__all__ = [
    "EOT",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "gpt2_tokenizer",
    "load_tokenizer",
]
