"""Fetch a model folder from the Hugging Face Hub (only what a conversion needs).

Needs internet and `huggingface_hub`. Without them the error says, in one line, how to bring the
folder in by hand and point `scratchllm convert --from DIR` at it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scratchllm.errors import InputError

# Short names for the checkpoints scratchllm runs; any "org/name" repository id works too.
ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "llama3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3.2-3b": "meta-llama/Llama-3.2-3B",
    "llama3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-0.6b-base": "Qwen/Qwen3-0.6B-Base",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-1.7b-base": "Qwen/Qwen3-1.7B-Base",
}

# Config, weights (single file or shards) and tokenizer: no TF/Flax/ONNX/GGUF copies.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
]


def resolve_repo(name: str) -> str:
    """A short name (see `ALIASES`) or an `org/name` repository id → the repository id."""
    if name in ALIASES:
        return ALIASES[name]
    if name.count("/") == 1 and all(name.split("/")):
        return name
    raise InputError(
        f"download {name!r}: not a known short name ({', '.join(ALIASES)}) nor an org/name "
        "repository id"
    )


def _offline_hint(repo: str) -> str:
    return (
        f"on a machine with internet run `hf download {repo} --local-dir DIR` (or `git clone "
        f"https://huggingface.co/{repo}`), copy DIR here and run "
        "`scratchllm convert --from DIR --out CKPT`"
    )


def download(name: str, out: str | Path | None = None, revision: str | None = None):
    """Download `name` into `out` (default `models/<name>`); return (repo id, folder)."""
    repo = resolve_repo(name)
    out = Path(out) if out is not None else Path("models") / repo.split("/")[-1]
    try:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InputError(
            f"download {repo}: huggingface_hub is not installed (pip install huggingface_hub); "
            + _offline_hint(repo)
        ) from None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    created = not out.exists()
    try:
        snapshot_download(
            repo_id=repo,
            revision=revision,
            local_dir=out,
            allow_patterns=ALLOW_PATTERNS,
            endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except BaseException as exc:
        if created and out.exists() and not _has_payload(out):
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, hf_errors.GatedRepoError):
            raise InputError(
                f"download {repo}: the repository is gated; accept its license on "
                f"https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN), "
                "then retry"
            ) from None
        if isinstance(exc, hf_errors.RepositoryNotFoundError):
            raise InputError(
                f"download {repo}: no such repository on {endpoint} (or it is private)"
            ) from None
        if isinstance(exc, hf_errors.RevisionNotFoundError):
            raise InputError(f"download {repo}: no revision {revision!r}") from None
        if isinstance(exc, hf_errors.OfflineModeIsEnabled) or os.environ.get("HF_HUB_OFFLINE"):
            raise InputError(
                f"download {repo}: cannot download, HF_HUB_OFFLINE is set; " + _offline_hint(repo)
            ) from None
        if isinstance(exc, (hf_errors.LocalEntryNotFoundError, OSError)) or _is_network(exc):
            raise InputError(
                f"download {repo}: cannot reach {endpoint} (offline?); " + _offline_hint(repo)
            ) from None
        raise
    if not (out / "config.json").exists():
        raise InputError(f"download {repo}: the repository has no config.json; not a model?")
    return repo, out


def _is_network(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectionError", "TimeoutException", "HTTPError"})


def _has_payload(folder: Path) -> bool:
    """Whether a failed download left files worth keeping (a later run resumes them)."""
    return any(p.is_file() for p in folder.iterdir() if p.name != ".cache")
