"""Open weights: import GPT-2, Llama 3 and Qwen3 checkpoints, export back, download.

- `convert(source, out, ...)`: a Hugging Face folder (or OpenAI's GPT-2 TensorFlow release) →
  a scratchllm checkpoint, or a scratchllm checkpoint → a Hugging Face folder.
- `import_hf`, `export_hf`, `detect_format`: the two directions and the format sniffing.
- `HFTokenizer`: tokenizer.json behind scratchllm's `Tokenizer` interface, with chat templates.
- `download(name, out)`: fetch a model folder from the Hugging Face Hub (needs internet).

The modules: `convert` (the two directions), `families` (config.json ⇄ `ModelConfig`),
`names` (one tensor name map per family; export is its inverse), `tensors` (safetensors,
pytorch_model.bin and shard reading, streamed safetensors writing), `tf` (OpenAI's GPT-2
TensorFlow checkpoints), `download`.

Names resolve lazily so that `import scratchllm.tokenizers.hf` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "convert": "scratchllm.hub.convert",
    "import_hf": "scratchllm.hub.convert",
    "export_hf": "scratchllm.hub.convert",
    "detect_format": "scratchllm.hub.convert",
    "ConvertResult": "scratchllm.hub.convert",
    "HFTokenizer": "scratchllm.tokenizers.hf",
    "download": "scratchllm.hub.download",
    "resolve_repo": "scratchllm.hub.download",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'scratchllm.hub' has no attribute {name!r}")
