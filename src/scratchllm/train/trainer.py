"""THE training loop. Pretraining and every fine-tuning task run through `Trainer`.

A task supplies batches, a loss and an evaluation (see `Task`); the trainer owns everything
else: AdamW (or Muon + AdamW) with decoupled weight decay on ≥2-D weights only, the schedule
and when to stop (`train/budget.py`: by steps or a time budget of training seconds, evaluation
not counted), gradient accumulation and clipping, optional bf16 autocast, periodic evaluation
with a text sample, `metrics.jsonl` + a loss-curve PNG, atomic checkpoints and `--resume`.

It also survives and scales: checkpoints hold everything an exact resume needs (weights, optimizer,
schedule step, training seconds, accumulation position, per-rank RNG, data position);
SIGINT/SIGTERM stop at the next step boundary with a save; a NaN/inf loss stops before any bad
weights are saved; under torchrun the model is wrapped in DDP or FSDP2 (see `train/distributed.py`)
and only rank 0 writes. Tokens/s, MFU (against the hardware's peak for the dtype) and peak memory
go to the callback and `metrics.jsonl`. The trainer never prints: it reports to a
`TrainerCallback`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from scratchllm.checkpoint import (
    link_checkpoint,
    load_state_dict,
    load_train_state,
    prune_checkpoints,
    recover_interrupted_save,
    save_checkpoint,
    update_meta,
)
from scratchllm.errors import CheckpointError
from scratchllm.model.gpt import GPTModel
from scratchllm.settings import SettingError
from scratchllm.tokenizers import Tokenizer
from scratchllm.train import distributed as D
from scratchllm.train.budget import NO_STEP_LIMIT, LRPlan
from scratchllm.train.guard import best_val_on_disk, judge_eval, keep_latest
from scratchllm.train.interfaces import Task, TrainingDiverged, TrainResult
from scratchllm.train.metrics import MetricsLog, plot_losses
from scratchllm.train.optim import build_optimizer
from scratchllm.train.parallelize import parallelize
from scratchllm.train.settings import TrainConfig
from scratchllm.train.state import (
    _rng_from_plain,
    _rng_to_plain,
    _StopRequest,
    rng_state,
    set_rng_state,
)
from scratchllm.train.throughput import Peak, cpu_has_native_bf16, hardware_peak, peak_memory_gib
from scratchllm.utils import parse_dtype, pick_device, seed_everything

log = logging.getLogger(__name__)

__all__ = ["Task", "Trainer", "TrainerCallback", "TrainingDiverged", "TrainResult"]


class TrainerCallback:
    """Hooks the trainer calls; the default does nothing."""

    def on_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_eval(self, trainer: Trainer, record: dict[str, Any], sample: str | None) -> None: ...

    def on_save(self, trainer: Trainer, path: Path) -> None: ...

    def on_end(self, trainer: Trainer, result: TrainResult) -> None: ...


class Trainer:
    """Runs `task` on `model` under `config`, writing everything into `out_dir`.

    `trainer.model` is always the plain module (what `evaluate`, `save` and generation use);
    `trainer.train_model` is what the training step calls: DDP/FSDP and torch.compile wrapped.
    """

    def __init__(
        self,
        model: GPTModel,
        task: Task,
        config: TrainConfig,
        out_dir: str | Path,
        tokenizer: Tokenizer,
        meta: dict[str, Any] | None = None,
        callback: TrainerCallback | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        config.validate()
        self.clock = clock  # times training steps (and so the budget); tests pass a fake one
        self.config = config
        self.device = pick_device(config.device)
        self.dist = D.DistInfo()
        if dist.is_initialized():
            local_rank = D.env_dist_info().local_rank
            self.dist = D.DistInfo(
                dist.get_rank(), local_rank, dist.get_world_size(), dist.get_backend()
            )
        if config.fsdp and not self.dist.enabled:
            log.warning("--fsdp has no effect in a single process; training unsharded")
        self.model = model.to(self.device)
        self.train_model: torch.nn.Module = parallelize(
            self.model,
            self.device,
            fsdp=config.fsdp,
            compile=config.compile,
            activation_checkpointing=config.activation_checkpointing,
            vocab_multiple=config.vocab_multiple,
        )
        # DDP's no_sync (reached through a torch.compile wrapper too); None for FSDP2 or 1 rank.
        self._ddp = self.train_model if hasattr(self.train_model, "no_sync") else None
        self.task = task
        self.out_dir = Path(out_dir)
        self.tokenizer = tokenizer
        self.meta = dict(meta or {})
        self.callback = callback or TrainerCallback()
        self.optimizer = build_optimizer(self.model, config, self.device)
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.step = 0
        self.tokens = 0
        self.best_val = math.inf
        self.total_steps = self._total_steps()
        self.plan = LRPlan.for_config(config, self.total_steps)
        self.train_seconds = 0.0  # inside training steps, over the whole run (resume included)
        self.autocast_dtype = parse_dtype(config.dtype)
        self.autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype != torch.float32
            else nullcontext()
        )
        bf16_cpu = self.device.type == "cpu" and self.autocast_dtype == torch.bfloat16
        if bf16_cpu and not cpu_has_native_bf16():
            log.warning(
                "bfloat16 on this CPU is emulated (no AVX512-BF16/AMX): expect it to be "
                "several times slower than --dtype float32"
            )
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.peak_flops: float | None = None  # per device, found at the start of fit()
        self.peak: Peak | None = None  # what `peak_flops` is: its dtype and source
        self._tb = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def _total_steps(self) -> int:
        per_epoch = max(1, self.task.steps_per_epoch() // self.config.grad_accum_steps)
        candidates = []
        if self.config.epochs is not None:
            candidates.append(max(1, math.ceil(self.config.epochs * per_epoch)))
        if self.config.max_steps is not None:
            candidates.append(self.config.max_steps)
        if not candidates and self.config.time_budget is not None:
            return NO_STEP_LIMIT  # the budget alone ends the run
        return min(candidates) if candidates else per_epoch

    def steps_per_epoch(self) -> int:
        return max(1, self.task.steps_per_epoch() // self.config.grad_accum_steps)

    # -- state ---------------------------------------------------------------------------------
    def _optimizer_state(self) -> tuple[str, dict[str, Any]]:
        if D.is_fsdp(self.model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return "fsdp-full", get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        return "plain", self.optimizer.state_dict()

    def train_state(self) -> dict[str, Any]:
        """Everything resume needs. Under torchrun every rank must call it (it gathers)."""
        optimizer_format, optimizer = self._optimizer_state()
        rng = rng_state()
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,  # what --resume leaves of a time budget
            "best_val": self.best_val,
            # Saves happen only between optimizer steps, so no micro-batch gradient is pending.
            "accum_position": 0,
            "optimizer": optimizer,
            "optimizer_format": optimizer_format,
            "task": self.task.state_dict(),
            "rng": rng,
            "world_size": self.dist.world_size,
            "train_config": dataclasses.asdict(self.config),
            "first_eval": self.first_eval,
        }
        if self.dist.enabled:
            ranks: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(ranks, _rng_to_plain(rng))
            state["rng_ranks"] = [_rng_from_plain(r) for r in ranks]
        return state

    def save(self) -> Path:
        """Write `checkpoint/` (the latest) and a `checkpoints/step-NNNNNN` snapshot, keeping
        the last `keep_last`. Under torchrun all ranks call it; rank 0 alone writes."""
        state = self.train_state()
        weights, files = self.checkpoint_files()
        if not self.is_main:
            return self.checkpoint_dir
        meta = {**self.meta, "step": self.step, "tokens": self.tokens}
        if self._public_eval():
            meta["eval"] = self._public_eval()  # the latest evaluation (updated after one runs)
        path = save_checkpoint(
            self.checkpoint_dir, self.model, self.tokenizer, meta, state, files, weights
        )
        if self.config.keep_last > 0:
            link_checkpoint(path, self._snapshot_dir(self.step))
            prune_checkpoints(self.out_dir / "checkpoints", self.config.keep_last)
        self.callback.on_save(self, path)
        return path

    def checkpoint_files(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, bytes] | None]:
        """Weights (None: the model's) and extra files a save writes; `resume_weights` reads
        them back (a LoRA fine-tune saves merged weights and adapters: finetune/checkpoints)."""
        return (D.full_state_dict(self.model) if D.is_fsdp(self.model) else None), None

    def resume_weights(self, path: Path) -> dict[str, torch.Tensor]:
        return load_state_dict(path)

    def _snapshot_dir(self, step: int) -> Path:
        return self.out_dir / "checkpoints" / f"step-{step:06d}"

    def resume(self) -> None:
        """Continue from `out_dir/checkpoint`: weights, optimizer, step, data position, RNG."""
        from scratchllm.checkpoint import load_weights_into, resolve_checkpoint_dir

        if self.is_main:
            recover_interrupted_save(self.checkpoint_dir)
        D.barrier()
        path = resolve_checkpoint_dir(self.checkpoint_dir)
        state = load_train_state(path)
        if state is None:
            raise SettingError("resume", f"{path} has no train_state.pt to resume from")
        if int(state.get("accum_position", 0)) != 0:
            raise CheckpointError(
                f"{path}: saved mid gradient-accumulation (position {state['accum_position']}); "
                "expected a checkpoint taken at an optimizer-step boundary"
            )
        weights = self.resume_weights(path)
        fsdp = D.is_fsdp(self.model)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            if self.model.config.tie_embeddings and "out_head.weight" not in weights:
                weights["out_head.weight"] = weights["tok_emb.weight"]
            opts = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, weights, options=opts)
        else:
            load_weights_into(self.model, weights, str(path / "model.safetensors"))
        saved_format = state.get("optimizer_format", "plain")
        if saved_format != ("fsdp-full" if fsdp else "plain"):
            raise CheckpointError(
                f"{path}: optimizer state was saved {'with' if saved_format != 'plain' else 'without'}"
                f" --fsdp; resume it the same way"
            )
        if fsdp:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=opts)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.task.load_state_dict(state["task"])
        ranks = state.get("rng_ranks")
        if ranks and len(ranks) == self.dist.world_size:
            set_rng_state(ranks[self.dist.rank])
        else:
            if self.dist.enabled or ranks:
                log.warning(
                    "resuming on %d rank(s) a run saved on %s: RNG streams restart from rank 0's",
                    self.dist.world_size,
                    state.get("world_size", 1),
                )
            set_rng_state(state["rng"])
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.best_val = min(float(state["best_val"]), best_val_on_disk(self.out_dir))
        self.first_eval = dict(state.get("first_eval", {}))
        if self.is_main:
            self.metrics.truncate_after(self.step)
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast:
                result = self.task.evaluate(self.model, self.config.eval_batches)
        finally:
            self.model.train()
        return result

    def _setup_observability(self) -> None:
        if self.config.measure_mfu and self.peak_flops is None:
            self.peak = hardware_peak(self.device, self.autocast_dtype)
            self.peak_flops = self.peak.flops
        if self.config.tensorboard and self.is_main and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SettingError(
                    "tensorboard", "needs the tensorboard package: pip install tensorboard"
                ) from None
            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))

    def _flops_per_token(self) -> float | None:
        fn = getattr(D.unwrap(self.model), "flops_per_token", None)
        return float(fn()) if callable(fn) else None

    def fit(self, resume: bool = False) -> TrainResult:
        cfg = self.config
        if resume:
            self.resume()
        else:
            # Each rank draws its own stream (dropout); rank 0 matches a single-process run.
            seed_everything(cfg.seed + self.dist.rank)
        self.model.train()
        self._setup_observability()
        flops_per_token = self._flops_per_token()
        self.callback.on_start(self)
        if self.step == 0 and not self.first_eval:
            self.first_eval = self._eval_and_log()
        if cfg.time_budget is not None:
            log.info("%s; %.1fs used so far", self.plan.describe(), self.train_seconds)
        start_time, start_tokens = self.clock(), self.tokens
        window_time, window_tokens = self.train_seconds, self.tokens
        stop = _StopRequest()
        stop.install()
        interrupted: str | None = None
        boundary: tuple[dict[str, Any], dict[str, Any]] | None = None
        try:
            while not self._done():
                if D.any_rank(stop.signal is not None, self.device):
                    interrupted = stop.signal or "SIGTERM"
                    log.warning(
                        "%s at step %d: saving a checkpoint and stopping", interrupted, self.step
                    )
                    self.save()
                    break
                step_start = self.clock()
                # What the state was at this step boundary: a Ctrl-C inside the step (after the
                # loader and the RNG have moved on) saves this, so resume redoes the whole step.
                boundary = (copy.deepcopy(self.task.state_dict()), rng_state())
                lr = self.plan.lr(self.step, self.train_seconds)
                for group in self.optimizer.param_groups:  # lr_scale: see train/optim.py
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                loss_sum = torch.zeros((), device=self.device)
                step_tokens = 0
                for micro in range(cfg.grad_accum_steps):
                    batch = self.task.next_batch()
                    last_micro = micro == cfg.grad_accum_steps - 1
                    # DDP: all-reduce gradients only on the last micro-batch of a step.
                    sync = nullcontext() if self._ddp is None or last_micro else self._ddp.no_sync()
                    with sync:
                        with self.autocast:
                            loss = self.task.loss(self.train_model, batch)
                        (loss / cfg.grad_accum_steps).backward()
                    loss_sum += loss.detach().float()
                    step_tokens += self.task.tokens_in(batch)
                loss_value, step_tokens = self._reduce_step(loss_sum, step_tokens)
                if not math.isfinite(loss_value):
                    self._diverged(f"loss became {loss_value}")
                grad_norm = None
                if cfg.grad_clip:
                    norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
                        norm = norm.full_tensor()
                    grad_norm = float(norm)
                    if not math.isfinite(grad_norm):
                        self._diverged(f"gradient norm became {grad_norm}")
                with stop.held():  # the update and the step counter move together
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.tokens += step_tokens
                    boundary = None
                # Only here does time count against the budget: evaluation and saves are outside.
                self.train_seconds += self.clock() - step_start
                last = self._done()
                if self.step % cfg.log_every == 0 or last:
                    record = self._train_record(
                        loss_value,
                        lr,
                        grad_norm,
                        self.train_seconds - window_time,
                        self.tokens - window_tokens,
                        self.clock() - start_time,
                        flops_per_token,
                    )
                    window_time, window_tokens = self.train_seconds, self.tokens
                    if self.is_main:
                        self.metrics.write(record)
                        self._tensorboard(record)
                    self.callback.on_step(self, record)
                if self.step % cfg.eval_every == 0 or last:
                    if self.is_main:  # a NaN evaluation puts this latest checkpoint back
                        keep_latest(self.out_dir)
                    self.save()  # before evaluating: a crash in evaluation loses nothing
                    self._eval_and_log()
                    self._after_eval_save()
                elif cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            if self.dist.enabled:  # other ranks may be mid-collective: no gathering save
                log.warning("interrupted at step %d on rank %d", self.step, self.dist.rank)
            else:
                log.warning(
                    "interrupted at step %d: saving a checkpoint before stopping", self.step
                )
                if boundary is not None:  # mid-step: back to the step's start, gradients dropped
                    self.task.load_state_dict(boundary[0])
                    set_rng_state(boundary[1])
                    self.optimizer.zero_grad(set_to_none=True)
                self.save()
            raise
        finally:
            stop.restore()
            if self._tb is not None:
                self._tb.flush()
        elapsed = self.clock() - start_time
        result = TrainResult(
            steps=self.step,
            tokens=self.tokens - start_tokens,
            seconds=elapsed,
            first_eval=self.first_eval,
            last_eval=self._public_eval(),
            checkpoint=self.checkpoint_dir,
            interrupted=interrupted,
        )
        self.callback.on_end(self, result)
        return result

    def _done(self) -> bool:
        """All steps taken or the time budget spent (on any rank: they stop together)."""
        done = self.plan.done(self.step, self.train_seconds)
        return D.any_rank(done, self.device) if self.config.time_budget is not None else done

    def _reduce_step(self, loss_sum: torch.Tensor, tokens: int) -> tuple[float, int]:
        """Mean micro-batch loss over all ranks and the tokens all ranks consumed."""
        n = self.config.grad_accum_steps
        if not self.dist.enabled:
            return float(loss_sum) / n, tokens
        packed = torch.stack(
            [
                loss_sum.double(),
                torch.tensor(float(tokens), dtype=torch.float64, device=loss_sum.device),
            ]
        )
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        return float(packed[0]) / (n * self.dist.world_size), int(packed[1])

    def _diverged(self, what: str, step: int | None = None) -> None:
        raise TrainingDiverged(
            f"{what} at step {step or self.step + 1}; stopping without saving these weights. The "
            f"last good checkpoint is in {self.checkpoint_dir} (try a lower --lr)"
        )

    def _train_record(
        self,
        loss: float,
        lr: float,
        grad_norm: float | None,
        seconds: float,
        tokens: int,
        elapsed: float,
        flops_per_token: float | None,
    ) -> dict[str, Any]:
        rate = tokens / max(seconds, 1e-9)
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "tokens": self.tokens,
            "loss": loss,
            "lr": lr,
            "tokens_per_s": rate,
            "elapsed_s": elapsed,
            "train_s": self.train_seconds,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if flops_per_token and self.peak_flops:
            # Per device: this rank's share of the global token rate against one device's peak.
            record["mfu"] = rate / self.dist.world_size * flops_per_token / self.peak_flops
        record["peak_mem_gib"] = peak_memory_gib(self.device)
        return record

    def _tensorboard(self, record: dict[str, Any]) -> None:
        if self._tb is None:
            return
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, int | float):
                self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _public_eval(self) -> dict[str, float]:
        return {k: v for k, v in self.last_eval.items() if k != "_step"}

    def _eval_and_log(self) -> dict[str, float]:
        # Evaluation and sampling must not move the training RNG streams: a run resumed from
        # the checkpoint saved just before an evaluation then continues bit for bit.
        saved_rng = rng_state()
        fsdp = D.is_fsdp(self.model)
        metrics: dict[str, float] = {}
        sample = None
        if self.is_main or fsdp:  # DDP ranks hold full copies: rank 0 alone evaluates
            metrics = self.evaluate()
            if self.config.sample_tokens > 0:
                self.model.eval()
                try:
                    sample = self.task.sample(self.model, self.config.sample_tokens)
                finally:
                    self.model.train()
        set_rng_state(saved_rng)
        record = {"kind": "eval", "step": self.step, "tokens": self.tokens, **metrics}
        if sample is not None:
            record["sample"] = sample
        self.last_eval = {**metrics, "_step": self.step}
        if not self.is_main:
            return metrics
        self.metrics.write(record)
        self._tensorboard(record)
        plot_losses(
            self.metrics.read(), self.out_dir / "loss.png", title=self.meta.get("title", "")
        )
        self.callback.on_eval(self, record, sample)
        return metrics

    def _after_eval_save(self) -> None:
        """Record the evaluation in the checkpoint just saved; copy it to best/ if it is. A NaN
        or infinite loss stops the run, the checkpoint before it the latest again (train/guard)."""
        metrics, snapshot = self._public_eval(), self._snapshot_dir(self.step)
        bad = judge_eval(self.out_dir, snapshot, metrics) if self.is_main else None
        if D.any_rank(bad is not None, self.device):
            self._diverged(f"evaluation {bad or 'loss is not finite'}", self.step)
        if not self.is_main:
            return
        update_meta([self.checkpoint_dir, snapshot], {"eval": metrics})  # those that exist
        val = metrics.get("val_loss")
        if val is not None and val < self.best_val:
            self.best_val = val
            link_checkpoint(self.checkpoint_dir, self.out_dir / "best")
