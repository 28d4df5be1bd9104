"""Pretraining (ch. 5): tokenize a corpus, build (or resume) a GPT and run the one `Trainer` on it.

`pretrain(PretrainOptions(...), callback)` is the recipe that `scratchllm pretrain`, the quickstart
and the benchmarks run. Progress goes to the `TrainerCallback` passed in (the CLI passes its
progress bar); under torchrun every rank calls it and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scratchllm.config import PRESETS, ModelConfig, resolve_model_config
from scratchllm.data.prepare import DataSettings
from scratchllm.errors import InputError
from scratchllm.settings import SettingError, project, setting
from scratchllm.tokenizers import Tokenizer, load_tokenizer
from scratchllm.train.settings import RunSettings, TrainConfig
from scratchllm.train.trainer import TrainerCallback

log = logging.getLogger(__name__)


@dataclass
class PretrainOptions(TrainConfig, RunSettings, DataSettings):
    """A pretraining run: data, model and tokenizer, plus every `TrainConfig` setting and the
    `DataSettings` of reading and tokenizing the inputs."""

    data: list[str] = setting(
        default_factory=lambda: ["builtin:python-docs"],
        help="a folder from `scratchllm data prepare`, or inputs: text, JSON lines (.gz/.zst), "
        "JSON, Parquet, datasets folders, globs, builtin:python-docs, hf:NAME; SPEC:W weighs one",
        metavar="PATH",
    )
    val_data: list[str] | None = setting(
        None,
        help="validation inputs (same forms as `data`; default: the tail `val_fraction` of it)",
        metavar="PATH",
    )
    model: str = setting(
        "gpt-micro", help="preset name (gpt-nano, gpt-micro, gpt2-small, ...) or a config JSON file"
    )
    tokenizer: str = setting("bytes", help="bytes | gpt2 | gpt2:DIR | a tokenizer directory")
    out: str = setting("runs/pretrain", help="run directory: checkpoint/, metrics.jsonl, loss.png")
    context_length: int | None = setting(
        None, help="tokens per window (default: the model's)", ge=1
    )
    dropout: float | None = setting(None, help="override the model's dropout rate", ge=0, lt=1)
    val_fraction: float = setting(0.1, help="tail of the corpus held out", ge=0, lt=1)
    sampling: str = setting("sliding", help="window sampling", choices=("sliding", "random"))
    stride: int | None = setting(None, help="sliding-window stride (default: context length)", ge=1)
    sample_prompt: str | None = setting(
        None, help="prompt for the sample printed at each evaluation"
    )
    eval_tasks: list[str] | None = setting(
        None,
        help="in-context tasks at each evaluation too (core or CORE task names, as `scratchllm "
        "evaluate`): CORE, each task's centred score and val_bpb go to the metrics",
        metavar="NAME",
    )
    eval_limit: int = setting(100, help="items per task at each evaluation (eval_tasks)", ge=1)
    recipe: str | None = setting(
        None,
        help="speedrun: pick model size, batch, learning rates and schedule for `time_budget` "
        "and this machine's measured speed; the settings you give win",
        choices=("speedrun",),
    )

    def validate(self) -> None:
        super().validate()
        if self.recipe is not None and self.time_budget is None and not self.resume:
            raise SettingError("recipe", f"{self.recipe} needs `time_budget` (e.g. 10m)")


def build_model_config(opts: PretrainOptions, tokenizer: Tokenizer) -> ModelConfig:
    """The model `opts.model` names, sized for `tokenizer` and `opts`' overrides."""
    try:
        config = resolve_model_config(opts.model)
    except SettingError:
        raise
    except InputError as exc:  # a config file that is missing or malformed
        raise SettingError("model", str(exc)) from None
    explicit_vocab = False
    if opts.model not in PRESETS:
        path = Path(opts.model)
        raw = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        explicit_vocab = "vocab_size" in raw
    changes: dict[str, Any] = {}
    if explicit_vocab:
        if tokenizer.vocab_size > config.vocab_size:
            raise SettingError(
                "tokenizer",
                f"{opts.tokenizer}: its {tokenizer.vocab_size} ids do not fit the "
                f"model's vocab_size {config.vocab_size} (from {opts.model})",
            )
    else:  # the vocabulary follows the tokenizer unless the config sets it
        changes["vocab_size"] = tokenizer.vocab_size
    if opts.context_length is not None:
        changes["context_length"] = opts.context_length
    if opts.dropout is not None:
        changes["drop_rate"] = opts.dropout
    try:
        return ModelConfig.from_dict({**config.to_dict(), **changes}, source=opts.model)
    except InputError as exc:
        raise SettingError("model", str(exc)) from None


def _tokens(opts: PretrainOptions, specs: list[str], tokenizer: Tokenizer, out: Path, info) -> Any:
    """The shards of `specs` (`.tokens`: the ids, read across shards by memory map): a prepared
    folder as it is, else inputs tokenized into shards under OUT/data (by rank 0; a killed
    run's tokenizing resumes)."""
    from scratchllm.data.prepare import ShardSet, is_prepared, prepare_shards
    from scratchllm.data.shards import corpus_key
    from scratchllm.train import distributed as D

    if len(specs) == 1 and is_prepared(specs[0]):
        shard_set = ShardSet(specs[0])
        if shard_set.fingerprint != tokenizer.fingerprint():
            made = shard_set.index["tokenizer"].get("name")
            raise SettingError(
                "data",
                f"{specs[0]} was prepared with tokenizer {made} ({shard_set.fingerprint}), not "
                f"{opts.tokenizer} ({tokenizer.fingerprint()}); prepare it with this `tokenizer`",
            )
        return shard_set
    options: dict[str, Any] = dict(fmt=opts.format, text_field=opts.text_field, seed=opts.seed)
    key = corpus_key(specs, tokenizer, opts.strip_gutenberg, **options)
    folder = out / "data" / f"shards-{key}"
    if info.is_main:
        prepare_shards(
            specs,
            tokenizer,
            folder,
            shard_tokens=opts.shard_tokens,
            workers=opts.workers,
            strip_gutenberg=opts.strip_gutenberg,
            overwrite=True,  # a cache: the key names what it holds
            **options,
        )
    D.barrier()  # the other ranks read what rank 0 wrote
    return ShardSet(folder)


def data_report(opts: PretrainOptions, specs: list[str], shard_set: Any) -> dict[str, Any]:
    """What the header says of `specs`: the files read, documents and tokens, and (with
    `strip_gutenberg`) how much of the plain-text files' text the stripping removed."""
    from scratchllm.data import formats
    from scratchllm.data.prepare import is_prepared

    report: dict[str, Any] = {
        "inputs": specs,
        "documents": shard_set.documents,
        "tokens": len(shard_set.tokens),
        "prepared": len(specs) == 1 and is_prepared(specs[0]),
    }
    if report["prepared"]:
        return report
    sources = [s for spec in formats.resolve(specs, opts.format) for s in spec.sources]
    report["files"] = sum(s.path is not None for s in sources)  # builtin and hub: not files
    if opts.strip_gutenberg:
        from scratchllm.data.corpus import read_text_file

        texts = [s.path for s in sources if s.kind == "text" and s.path is not None]
        removed = stripped = 0
        for path in texts:  # read twice: the stripping is measured, not guessed
            full = len(read_text_file(path).encode("utf-8"))
            cut = full - len(read_text_file(path, strip_gutenberg=True).encode("utf-8"))
            removed, stripped = removed + cut, stripped + (cut > 0)
        report["gutenberg"] = {"files": len(texts), "stripped": stripped, "bytes": removed}
    return report


def _saved_model(out: Path) -> tuple[ModelConfig, Tokenizer, int]:
    """The run's model config and tokenizer, without its weights: `Trainer.resume` reads those
    (once) together with the optimizer state."""
    from scratchllm.checkpoint import read_checkpoint_config

    config, tokenizer, meta = read_checkpoint_config(out)
    return config, tokenizer, int(meta.get("step", 0))


def pretrain(
    opts: PretrainOptions,
    callback: TrainerCallback | None = None,
    on_header: Callable[[dict[str, Any]], None] | None = None,
    explicit: Collection[str] | None = None,
) -> dict[str, Any]:
    """Run pretraining; returns a summary (steps, tokens, seconds, evaluations, checkpoint, ...).

    `callback` receives the trainer's progress (None: nothing is reported); `on_header(info)`,
    before the first step, what the run is about to do (`data`, `val_data`, `train_tokens`,
    `val_tokens`, `split`, `model`, `parameters`, `device`, `dtype`, `world_size`,
    `resume_step`, `recipe`: what `opts.recipe` picked and why). `explicit` names the settings
    the user gave, which a recipe keeps (None: those that differ from their defaults). Under
    torchrun (RANK/WORLD_SIZE set) every rank runs this; rank 0 alone
    writes and reports."""
    from scratchllm.train import distributed as D
    from scratchllm.utils import pick_device

    opts.validate()
    # Under torchrun: join the process group; each rank trains on its own GPU / data part.
    info = D.env_dist_info()
    device = D.device_for_rank(pick_device(opts.device), info)
    info = D.init_distributed(device)
    try:
        reasons = None
        if opts.recipe is not None and not opts.resume:  # resumed: run.json holds its choice
            opts, reasons = _apply_recipe(opts, device, info, explicit)
        return _pretrain(opts, callback, Path(opts.out), device, info, on_header, reasons)
    finally:
        D.cleanup()


def _apply_recipe(
    opts: PretrainOptions, device, info, explicit: Collection[str] | None
) -> tuple[PretrainOptions, list[str]]:
    """`opts` with `opts.recipe`'s choices (rank 0 calibrates; the other ranks take its pick)."""
    import torch.distributed as dist

    from scratchllm.fs import file_in_the_way
    from scratchllm.train.recipe import apply_recipe

    out = Path(opts.out)
    if (blocker := file_in_the_way(out)) is not None:  # the recipe writes its model there
        raise SettingError("out", f"{out}: {blocker} is a file; expected a folder")
    if (out / "checkpoint" / "train_state.pt").exists():
        raise SettingError(
            "out", f"{out} already holds a run; pass `resume` to continue it or pick a new `out`"
        )
    picked: list[Any] = [None]
    if info.is_main:
        vocab = load_tokenizer(opts.tokenizer).vocab_size
        opts, choice = apply_recipe(opts, vocab, device, explicit)
        picked = [(opts, choice.reasons)]
    if dist.is_initialized():
        dist.broadcast_object_list(picked, src=0)
    opts, reasons = picked[0]
    opts.validate()
    return opts, reasons


def _pretrain(
    opts: PretrainOptions, callback, out: Path, device, info, on_header, reasons=None
) -> dict[str, Any]:
    import torch

    from scratchllm.data.loader import split_tokens
    from scratchllm.fs import atomic_write_text, file_in_the_way
    from scratchllm.model.gpt import GPTModel
    from scratchllm.train import distributed as D
    from scratchllm.train.tasks import LMTask
    from scratchllm.train.trainer import Trainer
    from scratchllm.utils import seed_everything

    if (blocker := file_in_the_way(out)) is not None:  # before tokenizing, not at the save
        raise SettingError("out", f"{out}: {blocker} is a file; expected a folder")
    resume_step = None
    if opts.resume:
        config, tokenizer, resume_step = _saved_model(out)
    else:
        if (out / "checkpoint" / "train_state.pt").exists():
            raise SettingError(
                "out",
                f"{out} already holds a run; pass `resume` to continue it or pick a new `out`",
            )
        tokenizer = load_tokenizer(opts.tokenizer)
        config = build_model_config(opts, tokenizer)
        # Same seed on every rank: FSDP does not broadcast, so all ranks must build equal weights.
        seed_everything(opts.seed)
    model = GPTModel(config)
    extra_eval = None
    if opts.eval_tasks:  # its task files are read and checked before any tokenizing
        from scratchllm.evaluate.training import TrainingEvaluation

        try:
            extra_eval = TrainingEvaluation(
                tokenizer, config.vocab_size, opts.eval_tasks, opts.eval_limit
            )
        except InputError as exc:
            raise SettingError("eval_tasks", str(exc)) from None
    D.barrier()  # every rank has checked the run directory before rank 0 writes into it
    # Rank 0 tokenizes (and caches); the other ranks then read its shards.
    shards = _tokens(opts, opts.data, tokenizer, out, info)
    val_shards = _tokens(opts, opts.val_data, tokenizer, out, info) if opts.val_data else None
    if val_shards is not None:  # its own inputs: all of `data` trains
        train_tokens, val_tokens = shards.tokens, val_shards.tokens
    else:
        train_tokens, val_tokens = split_tokens(shards.tokens, opts.val_fraction)
    task = LMTask(
        train_tokens,
        val_tokens if opts.val_data or opts.val_fraction > 0 else None,
        tokenizer,
        opts.batch_size,
        config.context_length,
        device=device,
        seed=opts.seed,
        mode=opts.sampling,
        stride=opts.stride,
        sample_prompt=opts.sample_prompt,
        rank=info.rank,
        world_size=info.world_size,
        extra_eval=extra_eval,
    )
    # Neither a step count, epochs nor a time budget: one pass over the data.
    unbounded = opts.max_steps is None and opts.epochs is None and opts.time_budget is None
    epochs = 1.0 if unbounded else opts.epochs
    train_config = project(opts, TrainConfig, device=str(device), epochs=epochs)
    meta = {"title": f"{config.name} on {', '.join(opts.data)}"[:80], "data": opts.data}
    if not info.is_main or callback is None:
        callback = TrainerCallback()  # one progress report, from rank 0
    trainer = Trainer(model, task, train_config, out, tokenizer, meta, callback)
    if info.is_main:
        atomic_write_text(out / "run.json", json.dumps(dataclasses.asdict(opts), indent=2) + "\n")
    log.info("model %s: %s parameters", config.name, f"{model.num_parameters():,}")
    if on_header is not None and info.is_main:
        has_val = opts.val_data or opts.val_fraction > 0
        on_header(
            {
                "data": data_report(opts, opts.data, shards),
                "val_data": data_report(opts, opts.val_data, val_shards) if val_shards else None,
                "train_tokens": len(train_tokens),
                "val_tokens": len(val_tokens) if has_val else 0,
                "split": "val_data" if opts.val_data else opts.val_fraction,
                "model": config.name,
                "parameters": model.num_parameters(),
                "device": str(device),
                "dtype": opts.dtype,
                "world_size": info.world_size,
                "resume_step": resume_step,
                "time_budget": opts.time_budget,
                "recipe": (opts.recipe, reasons) if reasons is not None else None,
            }
        )
    torch.manual_seed(opts.seed)
    result = trainer.fit(resume=opts.resume)
    return {
        "step": trainer.step,
        "interrupted": result.interrupted,
        "world_size": info.world_size,
        "rank": info.rank,
        "steps": result.steps,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "first_eval": result.first_eval,
        "last_eval": result.last_eval,
        "checkpoint": str(result.checkpoint),
        "parameters": model.num_parameters(),
        "ppl": math.exp(min(result.last_eval.get("val_loss", 0.0), 50.0)),
    }
