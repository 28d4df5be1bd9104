"""`scratchllm convert`: import open weights into a checkpoint, or export one to Hugging Face."""

from __future__ import annotations

import argparse

HELP = "import GPT-2 / Llama 3 / Qwen3 weights, or export a checkpoint to Hugging Face format"
DESCRIPTION = """\
Convert between scratchllm checkpoints and Hugging Face model folders.

  import: a Hugging Face folder (config.json + model.safetensors / shards / pytorch_model.bin,
          GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM) or OpenAI's
          GPT-2 TensorFlow release (hparams.json + model.ckpt.*) -> a scratchllm checkpoint
  export: a scratchllm checkpoint -> config.json + model.safetensors + tokenizer files that
          transformers' from_pretrained loads (GPT-2, Llama or Qwen3 by the model's shape)

The direction follows the input (--format auto). Tensors stream one at a time, so memory stays
near the size of the largest tensor. A failed conversion leaves --out untouched.

examples:
  scratchllm convert --from models/gpt2 --out checkpoints/gpt2
  scratchllm convert --from models/Llama-3.2-1B-Instruct --out checkpoints/llama --dtype bfloat16
  scratchllm convert --from runs/my-run --out export/my-model --to hf
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DIR",
        help="a Hugging Face folder, a TensorFlow GPT-2 folder or a checkpoint",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the result")
    parser.add_argument(
        "--format",
        dest="fmt",
        default="auto",
        choices=["auto", "hf", "scratchllm", "tf"],
        help="format of --from (default: detect)",
    )
    parser.add_argument(
        "--to",
        choices=["hf", "scratchllm"],
        default=None,
        help="output format (default: the other one)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype to write (default: keep the source's)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="import with this tokenizer (bytes, gpt2:DIR, a folder) instead of the one in --from",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from scratchllm.hub.convert import convert

    result = convert(
        args.source,
        args.out,
        fmt=args.fmt,
        to=args.to,
        dtype=args.dtype,
        tokenizer=args.tokenizer,
        force=args.force,
    )
    dtype = str(result.dtype).removeprefix("torch.")
    size = f"{result.parameters / 1e6:.1f}M parameters, {result.config.n_layers} layers, {dtype}"
    if result.direction == "import":
        print(f"imported {result.architecture} ({size}) from {result.source}")
        print(f"wrote scratchllm checkpoint {result.out} (tokenizer: {result.tokenizer})")
        print(f'next: scratchllm generate --checkpoint {result.out} --prompt "Hello"')
    else:
        print(f"exported {result.source} as {result.architecture} ({size})")
        print(f"wrote {result.out}: load it with AutoModelForCausalLM.from_pretrained")
    return 0
