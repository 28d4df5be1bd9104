"""`scratchllm convert`: import open weights into a checkpoint, or export one to Hugging Face."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = (
    "import GPT-2 / Llama 3 / Qwen3 weights, export a checkpoint to Hugging Face or GGUF, "
    "LoRA adapters to and from PEFT"
)
DESCRIPTION = """\
Convert between scratchllm checkpoints and Hugging Face model folders.

  import: a Hugging Face folder (config.json + model.safetensors / shards / pytorch_model.bin,
          GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, Qwen2ForCausalLM) or OpenAI's
          GPT-2 TensorFlow release (hparams.json + model.ckpt.*) -> a scratchllm checkpoint
  export: a scratchllm checkpoint -> config.json + model.safetensors + tokenizer files that
          transformers' from_pretrained loads (GPT-2, Llama or Qwen3 by the model's shape)
  gguf:   a scratchllm checkpoint -> one .gguf file for llama.cpp / Ollama / LM Studio
          (--to gguf --out model.gguf --dtype f32|f16|q8_0; --ollama adds a Modelfile beside it)
  peft:   a LoRA fine-tune (`finetune ... --lora-rank R`) -> a PEFT adapter folder
          (adapter_config.json + adapter_model.safetensors) for the --to hf export of its base:
          PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), DIR)
  adapter: --from CHECKPOINT --adapter PEFT_DIR -> a checkpoint of CHECKPOINT with the adapter:
          merged weights (what generate/chat load) plus the LoRA factors and lora.json, as a
          LoRA fine-tune saves them (--to peft exports them again); --merge: merged weights only.
          The adapter must fit CHECKPOINT's Hugging Face export (module names and shapes).

The direction follows the input (--format auto). Tensors stream one at a time, so memory stays
near the size of the largest tensor. A failed conversion leaves --out untouched.

examples:
  scratchllm convert --from models/gpt2 --out checkpoints/gpt2
  scratchllm convert --from models/Llama-3.2-1B-Instruct --out checkpoints/llama --dtype bfloat16
  scratchllm convert --from runs/my-run --out export/my-model --to hf
  scratchllm convert --from runs/my-run --to gguf --out export/model.gguf --dtype q8_0 --ollama
  scratchllm convert --from runs/my-lora-run --to peft --out export/my-adapter
  scratchllm convert --from checkpoints/base --adapter export/my-adapter --out checkpoints/tuned
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
        choices=["hf", "gguf", "peft", "scratchllm"],
        default=None,
        help="output format (default: the other one)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        metavar="DTYPE",
        help="weight dtype to write: auto, float32, bfloat16, float16; for --to gguf f32, f16 "
        "or q8_0 (default: keep the source's)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="SPEC",
        help="import with this tokenizer (bytes, gpt2:DIR, a folder) instead of the one in --from",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--ollama", action="store_true", help="with --to gguf: write an Ollama Modelfile beside it"
    )
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="DIR",
        help="import this PEFT LoRA adapter folder onto the --from checkpoint",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="with --adapter: write the merged weights only (no LoRA factors)",
    )


def run(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.hub.convert import convert

    if args.to == "gguf":
        return _run_gguf(args)
    if args.to == "peft" or args.adapter is not None:
        return _run_peft(args)
    if args.merge:
        raise InputError("--merge: only with --adapter")
    if args.ollama:
        raise InputError("--ollama: only with --to gguf")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {args.dtype!r}: expected auto, float32, bfloat16 or float16")

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
        if args.tokenizer is not None:
            print(
                f"warning: --tokenizer {args.tokenizer} is ignored on export "
                "(the checkpoint's own tokenizer is written)",
                file=sys.stderr,
            )
        print(f"exported {result.source} as {result.architecture} ({size})")
        print(f"wrote {result.out}: load it with AutoModelForCausalLM.from_pretrained")
    return 0


def _run_gguf(args: argparse.Namespace) -> int:
    from scratchllm.errors import InputError
    from scratchllm.hub.convert import detect_format
    from scratchllm.hub.gguf import export_gguf, parse_gguf_dtype

    parse_gguf_dtype(args.dtype)  # a bad --dtype is refused before anything is read
    if args.tokenizer is not None:
        raise InputError(
            "--tokenizer: not used with --to gguf (the checkpoint's tokenizer goes in)"
        )
    fmt = detect_format(args.source) if args.fmt == "auto" else args.fmt
    if fmt != "scratchllm":
        raise InputError(
            f"--from {args.source}: --to gguf exports a scratchllm checkpoint; import this "
            "folder first (scratchllm convert --from DIR --out CHECKPOINT)"
        )
    _check_gguf_out(Path(args.source), Path(args.out))
    result = export_gguf(
        args.source, args.out, dtype=args.dtype, force=args.force, ollama=args.ollama
    )
    size = f"{result.parameters / 1e6:.1f}M parameters, {result.config.n_layers} layers"
    print(f"exported {result.source} as GGUF {result.architecture} ({size}, {result.dtype})")
    print(f"wrote {result.out} ({result.tensors} tensors, tokenizer: {result.tokenizer})")
    if result.modelfile is not None:
        print(f"wrote {result.modelfile}: ollama create NAME -f {result.modelfile}")
    else:
        print(f'next: llama-cli -m {result.out} -p "Hello"')
    return 0


def _check_gguf_out(source: Path, out: Path) -> None:
    """Refuse an --out that is or holds --from, or replaces a file inside it."""
    from scratchllm.errors import InputError

    src, dst = source.resolve(), out.resolve()
    if dst == src or src.is_relative_to(dst):
        raise InputError(f"--out {out}: is or holds --from {source}; expected a .gguf file")
    if dst.exists() and dst.is_relative_to(src):
        raise InputError(f"--out {out}: would replace a file of --from {source}")


def _run_peft(args: argparse.Namespace) -> int:
    """--to peft (export a LoRA run's adapter) or --adapter (import one onto --from)."""
    from scratchllm.errors import InputError
    from scratchllm.hub.convert import detect_format
    from scratchllm.hub.peft import export_peft, import_peft

    if args.to == "peft" and args.adapter is not None:
        raise InputError("--adapter: imports an adapter, --to peft exports one; pass one of them")
    if args.adapter is None and args.merge:
        raise InputError("--merge: only with --adapter")
    for flag, given in (("--dtype", args.dtype != "auto"), ("--tokenizer", args.tokenizer),
                        ("--ollama", args.ollama)):  # fmt: skip
        if given:
            raise InputError(f"{flag}: not used with LoRA adapters (--to peft, --adapter)")
    fmt = detect_format(args.source) if args.fmt == "auto" else args.fmt
    if fmt != "scratchllm":
        raise InputError(
            f"--from {args.source}: expected a scratchllm checkpoint or run; import this "
            "folder first (scratchllm convert --from DIR --out CHECKPOINT)"
        )
    if args.adapter is None:
        r = export_peft(args.source, args.out, force=args.force)
        print(f"exported the LoRA adapter of {r.source} (rank {r.rank}, alpha {r.alpha:g}, "
              f"{r.layers} layers) for {r.architecture}")  # fmt: skip
        print(f"wrote {r.out}: target_modules {', '.join(r.target_modules)}")
        print(f"next: scratchllm convert --from BASE --to hf --out BASE_HF, then "
              f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF), "
              f"'{r.out}')")  # fmt: skip
        return 0
    r = import_peft(args.source, args.adapter, args.out, merge=args.merge, force=args.force)
    for note in r.notes:
        print(f"warning: {note}", file=sys.stderr)
    what = "merged weights" if r.merged else f"merged weights + LoRA factors (rank {r.rank})"
    print(f"imported the PEFT adapter {r.source} ({', '.join(r.target_modules)}) onto "
          f"{args.source}: {r.layers} layers")  # fmt: skip
    print(f"wrote scratchllm checkpoint {r.out} ({what})")
    return 0
