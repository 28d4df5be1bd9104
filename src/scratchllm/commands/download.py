"""`scratchllm download`: fetch a model folder from the Hugging Face Hub."""

from __future__ import annotations

import argparse

HELP = "download open weights (GPT-2, Llama 3.2, Qwen3, ...) from the Hugging Face Hub"
DESCRIPTION = """\
Download the files a conversion needs (config, safetensors, tokenizer) from the Hugging Face
Hub. NAME is a short name (see below) or a repository id such as Qwen/Qwen3-0.6B.
Needs internet and the huggingface_hub package; offline, fetch the folder on another machine
and point `scratchllm convert --from DIR` at it.

short names:
{aliases}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scratchllm.hub.download import ALIASES

    parser.description = DESCRIPTION.format(
        aliases="\n".join(f"  {k:24s} {v}" for k, v in ALIASES.items())
    )
    parser.add_argument("name", metavar="NAME", help="short name or Hub repository id")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="folder to download into (default: models/NAME)"
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit")


def run(args: argparse.Namespace) -> int:
    from scratchllm.hub.download import download

    repo, path = download(args.name, args.out, revision=args.revision)
    print(f"downloaded {repo} to {path}")
    print(f"next: scratchllm convert --from {path} --out {path}-scratchllm")
    return 0
