"""The training loop: one function, explicit and readable top to bottom."""

from __future__ import annotations

import functools
import json
import os
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from torch import nn

from lmforge.config import Config, DistributedConfig, TrainConfig, config_hash, dump_yaml
from lmforge.data.loader import Prefetcher, StepPlan, step_data, to_device
from lmforge.data.prepare import PreparedData
from lmforge.engine.checkpoint import (
    is_deepspeed_engine,
    load_checkpoint,
    prune,
    remove_stale_temporaries,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmforge.engine.early_stopping import record_eval
from lmforge.engine.losses import count_targets, describe_loss, loss_step_for, resolve_loss_chunk_size
from lmforge.engine.optim import build_optimizer, build_scheduler, follow_schedule
from lmforge.engine.progress import TrainProgress
from lmforge.engine.sharding import (
    accelerate_sharding_off,
    check_deepspeed_batch,
    check_strategy,
    clip_sharded_grad_norm,
    consolidate,
    deepspeed_plugin,
    fsdp_settings,
    meta_copy,
    resolve_strategy,
    shard_model,
)
from lmforge.engine.signals import StopOnSignal
from lmforge.engine.state import TrainState
from lmforge.errors import UserError
from lmforge.eval.evaluate import describe, evaluate_split
from lmforge.eval.generation import HINTS_FILE, hints_of
from lmforge.tracking.base import Trackers
from lmforge.tracking.system import system_metrics

PAUSES = ("SIGTERM", "SIGINT", "SIGUSR1", "max_time")  # stops after which the run is meant to be resumed
EvalHook = Callable[[int, dict[str, float]], str | None]
"""Called with (step, validation metrics) after each evaluation past step 0; a stop reason it
returns (a sweep's pruner: "pruned") ends training there, without a checkpoint."""
LogHook = Callable[[int, dict[str, float]], str | None]
"""Called with (step, train metrics) after each train log point; a stop reason it returns (the
learning-rate range test's "diverged") ends training there."""


class NonFiniteLossError(UserError):
    """Too many consecutive steps with a NaN/inf loss or gradient norm."""


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision for train.precision: "no", "bf16" or "fp16".

    auto: bf16 on GPUs that support it, else fp16; on a CPU, bf16 where it computes bf16 natively
    (`cpu_has_native_bf16`), else fp32. bf16 autocast keeps fp32 master weights, and on this
    project's CPU benchmarks it reached the validation loss of fp32 per trained token (SFT 4.385
    against 4.386 after 150 steps, pretraining 5.766 against 5.765 after 50; bench/RESULTS.md,
    2026-12-02) at about twice the speed.

    Raises:
        UserError: fp16 without CUDA.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "no"
    if precision == "fp16" and not cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


@functools.cache  # the CPU does not change under a running process
def cpu_has_native_bf16() -> bool:
    """Whether this machine has no CUDA and its CPU has bf16 instructions (AVX512-BF16 or AMX, as
    /proc/cpuinfo names them), where bf16 autocast runs matmuls several times faster than fp32.
    False where /proc/cpuinfo cannot be read (off Linux)."""
    if torch.cuda.is_available():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def distributed_cpu() -> bool:
    """A job of several processes (torchrun, accelerate launch) on a machine without CUDA: they
    talk over gloo, which accelerate picks only when told the job is on CPU."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(
    precision: str,
    strategy: str = "single",
    distributed: DistributedConfig | None = None,
    train: TrainConfig | None = None,
) -> Accelerator:
    """accelerate's Accelerator for train.precision and a resolved distributed.strategy
    (engine.sharding.resolve_strategy): DeepSpeed through its plugin; FSDP is applied by lmforge
    (engine.sharding.shard_model), never by accelerate."""
    # accelerate keeps its settings in a process-wide singleton; clear it so that a second run
    # in the same process (tests, notebooks, sweeps) may use another precision.
    AcceleratorState._reset_state()
    plugin = deepspeed_plugin(distributed.deepspeed, train) if strategy == "deepspeed" and distributed else None
    cpu = distributed_cpu() and plugin is None  # accelerate turns DeepSpeed off when told cpu (it runs on gloo here)
    if plugin is not None:  # the engine steps the optimizer itself, and calls torch's renamed collectives
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        warnings.filterwarnings("ignore", message=r"`torch.distributed.\w+` is deprecated", category=FutureWarning)
    with accelerate_sharding_off():
        return Accelerator(mixed_precision=resolve_precision(precision), cpu=cpu, deepspeed_plugin=plugin)


def total_steps(cfg: TrainConfig, plan: StepPlan) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * plan.steps_per_epoch


@dataclass
class TrainResult:
    model: nn.Module
    """The trained model, unwrapped from any distributed wrapper."""
    state: TrainState
    checkpoint_dir: Path | None


@dataclass
class Loop:
    """The long-lived objects of one training run, handed to the helpers below."""

    config: Config
    data: PreparedData
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trackers: Trackers
    progress: TrainProgress
    state: TrainState
    checkpoint_dir: Path | None
    loss_chunk_size: int | None = None
    """What train.loss_chunk_size resolved to: evaluation scores targets the same way."""
    window_loss: torch.Tensor | None = None
    """Loss summed on device since the last log point: no host sync per step."""
    on_eval: EvalHook | None = None
    on_log: LogHook | None = None
    base: dict | None = None
    """An adapter run's base model record: its checkpoints hold the trainable weights only."""
    strategy: str = "single"
    """distributed.strategy as resolved (engine.sharding.resolve_strategy); fsdp writes sharded checkpoints."""
    last_step: int = 0
    """The run's final step: a stop reason from on_eval there changes nothing (the run is done)."""


def train(
    model: nn.Module,
    data: PreparedData,
    config: Config,
    trackers: Trackers,
    console=None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    progress_factory=TrainProgress,
    on_eval: EvalHook | None = None,
    on_log: LogHook | None = None,
    schedule: Callable[[int], float] | None = None,
    base: dict | None = None,
) -> TrainResult:
    """Train `model` on `data.splits["train"]`, evaluating, checkpointing and stopping as configured.

    The loss of an optimizer step is the sum of token losses over all its micro-batches (and
    processes) divided by the number of target tokens in the whole step, so accumulation and
    uneven micro-batches change nothing: 1 x 8 equals 8 x 1.

    Resuming from a checkpoint restores weights, optimizer, scheduler, scaler, RNG and this
    state, and continues at the saved data position: the result equals an uninterrupted run.

    Args:
        on_eval: see `EvalHook` (a sweep reports each evaluation to its study there).
        on_log: see `LogHook`.
        schedule: the multiplier of train.lr at each optimizer step (0-based), instead of
            train.scheduler's (the range test's exponential sweep).
        base: an adapter run's base model record (`models.peft.base_record`): checkpoints then hold
            the trainable weights and the record, not the base's weights.
    """
    cfg = config.train
    strategy = resolve_strategy(config, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator, model, optimizer, skeleton = _prepare(model, config, strategy)
    train_set, pad_id, rank = data.splits["train"], data.tokenizer.pad_token_id, accelerator.process_index
    plan = StepPlan(len(train_set), cfg.micro_batch_size, cfg.grad_accum, accelerator.num_processes)
    steps = total_steps(cfg, plan)
    if schedule is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    else:
        scheduler = build_scheduler(optimizer, cfg, steps)
    sharded = skeleton is not None or accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    chunk_size = resolve_loss_chunk_size(cfg.loss_chunk_size, model, config.model.task, sharded or cfg.compile)
    loss_step = loss_step_for(config.model.task, chunk_size)
    loss_line = describe_loss(chunk_size, model, config.model.task)
    if console is not None and loss_line and accelerator.is_main_process:
        console.print(f"loss: {loss_line}", highlight=False)
    progress = progress_factory(steps, console, enabled=accelerator.is_main_process)
    state = TrainState(
        config_hash=config_hash(config), tracker_ids=trackers.ids(), world_size=accelerator.num_processes
    )
    loop = Loop(
        config, data, accelerator, model, optimizer, scheduler, trackers, progress, state, checkpoint_dir, chunk_size
    )
    loop.on_eval, loop.on_log, loop.last_step, loop.base, loop.strategy = on_eval, on_log, steps, base, strategy
    state = _start(loop, resume_from)

    model.train()
    loop.window_loss = torch.tensor(state.window_loss, device=accelerator.device)
    deadline = cfg.max_time and time.monotonic() + cfg.max_time
    progress.begin(state.step)
    pin = accelerator.device.type == "cuda"
    deepspeed = is_deepspeed_engine(model)  # DeepSpeed clips and steps inside its engine
    start = (state.epoch, state.step_in_epoch)  # with data.curriculum, the step decides until the curriculum ends
    ahead = step_data(train_set, plan, config, pad_id, start, rank, pin, step=state.step, total_steps=steps)
    with StopOnSignal() as signals, Prefetcher(ahead, config.data.prefetch) as upcoming:
        while state.step < steps and state.stop_reason is None:
            data = next(upcoming)  # step_data moves to the next epoch (and permutation) when one ends
            state.epoch, state.step_in_epoch, rows, batches = data.epoch, data.step_in_epoch, data.rows, data.batches
            loss_sum, targets, tokens = _forward_backward(model, batches, loss_step, accelerator, config.model.task)
            if deepspeed:
                grad_norm = _deepspeed_step(model, loss_sum)
            else:
                grad_norm = _clip(model, accelerator, cfg.max_grad_norm, skeleton is not None)
            lr = scheduler.get_last_lr()[0]
            finite = bool(torch.isfinite(torch.stack([loss_sum, grad_norm.float()])).all())  # one sync
            if (finite or accelerator.scaler is not None) and not deepspeed:  # fp16: the scaler skips inf steps
                optimizer.step()
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _count_step(loop, finite, loss_sum, targets, tokens, rows, grad_norm)

            last = state.step == steps
            if state.step % cfg.log_every == 0 or last:
                logged = _log_train(loop, lr, grad_norm, plan)
                state.stop_reason = loop.on_log(state.step, logged) if loop.on_log else None
            new_best = False
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or last:
                new_best = _evaluate(loop)
            state.stop_reason = state.stop_reason or _pause_reason(signals, deadline, accelerator)
            if last and state.stop_reason is None:
                state.stop_reason = "max_steps" if cfg.max_steps is not None else "epochs"
            if _should_save(loop, new_best):
                _save(loop)
    progress.close()
    if skeleton is not None and not deepspeed:  # the last checkpoint holds it: room for the gathered weights
        getattr(optimizer, "optimizer", optimizer).state.clear()
    return TrainResult(_trained_model(model, accelerator, skeleton), state, checkpoint_dir)


def _prepare(model: nn.Module, config: Config, strategy: str):
    """(accelerator, model, optimizer, skeleton) of a run: the model on its device, sharded under
    FSDP or wrapped by accelerate (DDP, DeepSpeed's engine), and its optimizer. skeleton: where the
    weights are sharded (FSDP, ZeRO-3), the model's shape from before, into which they are
    gathered at the end; else None."""
    check_strategy(strategy)
    check_deepspeed_batch(config, int(os.environ.get("WORLD_SIZE", "1")))  # (a job of torchrun or accelerate)
    cfg = config.train
    accelerator = make_accelerator(cfg.precision, strategy, config.distributed, cfg)
    model = model.to(accelerator.device)
    skeleton = None
    if strategy == "fsdp" and accelerator.num_processes > 1:
        skeleton = meta_copy(model)
        model = shard_model(model, fsdp_settings(config), accelerator.mixed_precision)
    elif strategy == "deepspeed" and accelerator.state.deepspeed_plugin.zero_stage == 3:
        skeleton = meta_copy(model)  # (accelerate's prepare partitions the weights)
    optimizer = build_optimizer(model, cfg)
    if cfg.compile:  # the compiled wrapper shares the parameters: the optimizer and checkpoints see the same
        model = torch.compile(model)
    if strategy == "fsdp" and skeleton is not None:
        return accelerator, model, accelerator.prepare(optimizer), skeleton  # (accelerate would add DDP)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, skeleton


def _clip(model: nn.Module, accelerator: Accelerator, max_norm: float | None, sharded: bool) -> torch.Tensor:
    """Clip the step's gradients to train.max_grad_norm (None: measure only); return their total norm."""
    if sharded:
        return clip_sharded_grad_norm(model, max_norm or float("inf"))
    return accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))


def _deepspeed_step(engine: nn.Module, loss_sum: torch.Tensor) -> torch.Tensor:
    """The DeepSpeed engine's optimizer step (it clips to gradient_clipping, steps and zeroes the
    gradients); the gradients' total norm before clipping, a 0-d float32 tensor. The processes first
    agree whether every loss is finite: a step with a non-finite loss is not taken (its gradients
    are dropped), as the loop skips one without DeepSpeed."""
    finite = torch.isfinite(loss_sum.detach()).to(torch.int32).reshape(1)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if not bool(finite.item()):
        engine.zero_grad()
        return torch.tensor(float("nan"))
    engine.step()
    norm = engine.get_global_grad_norm()
    return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).detach().cpu()


def _trained_model(model: nn.Module, accelerator: Accelerator, skeleton: nn.Module | None) -> nn.Module | None:
    """The plain trained model: unwrapped; under FSDP and ZeRO-3 gathered into `skeleton` on the main
    process (the others get None), for evaluation and final/."""
    if skeleton is None:
        return accelerator.unwrap_model(model, keep_torch_compile=False)
    trained = model if is_deepspeed_engine(model) else accelerator.unwrap_model(model, keep_torch_compile=False)
    return consolidate(trained, skeleton, accelerator.is_main_process)


def _start(loop: Loop, resume_from: Path | None) -> TrainState:
    """Restore a checkpoint, or evaluate the untrained model as a baseline; return the state."""
    if loop.checkpoint_dir is not None:
        remove_stale_temporaries(loop.checkpoint_dir)
    if resume_from is None:
        if loop.config.eval.at_start:
            _evaluate(loop)
        return loop.state
    accelerator = loop.accelerator
    model = (
        loop.model
        if is_deepspeed_engine(loop.model)
        else accelerator.unwrap_model(loop.model, keep_torch_compile=False)
    )
    loop.state = load_checkpoint(resume_from, model, loop.optimizer, loop.scheduler, accelerator.scaler)
    follow_schedule(loop.scheduler)  # a resume that changed train.max_steps trains on the new plan at once
    loop.state.world_size = accelerator.num_processes  # (check_resume_config kept the global batch)
    if loop.state.stop_reason != "early_stopping":
        loop.state.stop_reason = None  # a pause, or a finished run given more steps, goes on
    return loop.state


def _evaluate(loop: Loop) -> bool:
    """Evaluate on validation, log, update best/early stopping; True if this is a new best."""
    config, state = loop.config, loop.state
    metrics = evaluate_split(
        loop.model, loop.data, "validation", config, loop.accelerator, loss_chunk_size=loop.loss_chunk_size
    )
    state.eval_history.append({"step": state.step, **metrics})
    loop.trackers.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, state.step)
    loop.progress.message(f"eval @ step {state.step}: {describe(metrics)}")
    loop.progress.restart_clock()  # evaluation time is not training throughput
    if state.step == 0:
        return False  # the untrained baseline is not a candidate for the best model
    stopping = config.train.early_stopping
    watch = stopping.metric.removeprefix("eval/") if stopping else "loss"
    direction, min_delta = (stopping.direction, stopping.min_delta) if stopping else ("min", 0.0)
    new_best = record_eval(state, metrics[watch], direction, min_delta)
    if stopping and state.evals_without_improvement >= stopping.patience:
        state.stop_reason = "early_stopping"
        loop.progress.message(
            f"early stopping at step {state.step}: {stopping.metric} has not improved for "
            f"{stopping.patience} evaluations; best {state.best_metric:.4f} at step {state.best_step}"
        )
        best = {"early_stopping/best_step": state.best_step, "early_stopping/best": state.best_metric}
        loop.trackers.log_metrics(best, state.step)
    reason = loop.on_eval(state.step, metrics) if loop.on_eval is not None and state.stop_reason is None else None
    if reason and state.step < loop.last_step:  # (at the last step the run is complete: nothing to stop)
        state.stop_reason = reason
        loop.progress.message(f"{reason} at step {state.step}")
    return new_best


def _should_save(loop: Loop, new_best: bool) -> bool:
    cfg, state = loop.config.train, loop.state
    if state.stop_reason == "pruned":  # never resumed, never the final model
        return False
    if cfg.save_every and state.step % cfg.save_every == 0:
        return True
    if state.stop_reason is not None:  # the end, a pause, or early stopping
        return True
    # restoring the best weights at the end needs them on disk
    return new_best and cfg.early_stopping is not None and cfg.early_stopping.restore_best


def _save(loop: Loop) -> None:
    """Checkpoint the run (the main process; under FSDP every process writes its shards), then drop
    checkpoints beyond keep_last but the best."""
    state, cfg = loop.state, loop.config.train
    state.window_loss = float(loop.window_loss)
    state.metrics_lines = loop.trackers.position()
    state.tracker_ids = loop.trackers.ids()  # a backend that was down at the start may have started since
    main = loop.accelerator.is_main_process
    sharded = loop.strategy in ("fsdp", "deepspeed")
    if loop.checkpoint_dir is None or (not main and not sharded):
        return
    model = loop.accelerator.unwrap_model(loop.model, keep_torch_compile=False)
    files = {HINTS_FILE: json.dumps(hints_of(loop.data, loop.config), ensure_ascii=False)}
    if sharded:  # every process writes its shards
        checkpoint = save_sharded_checkpoint(
            loop.checkpoint_dir,
            state,
            loop.model if loop.strategy == "deepspeed" else model,
            loop.optimizer,
            loop.scheduler,
            dump_yaml(loop.config),
            main,
            loop.accelerator.num_processes,
            tokenizer=loop.data.tokenizer,
            files=files,
            base=loop.base,
            strategy=loop.strategy,
        )
        if not main:
            return
    else:
        checkpoint = save_checkpoint(
            loop.checkpoint_dir,
            state,
            model,
            loop.optimizer,
            loop.scheduler,
            loop.accelerator.scaler,
            dump_yaml(loop.config),
            tokenizer=loop.data.tokenizer,
            files=files,
            base=loop.base,
        )
    loop.trackers.log_checkpoint(checkpoint.path)  # complete on disk: the mirror may copy it
    prune(loop.checkpoint_dir, cfg.keep_last, {state.best_step} if state.best_step is not None else set())


def _count_step(loop: Loop, finite: bool, loss_sum, targets: int, tokens: int, rows, grad_norm) -> None:
    state = loop.state
    state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
    state.tokens_seen += tokens
    state.target_tokens_seen += targets
    state.window_tokens += tokens
    if finite:
        state.bad_steps_in_a_row = 0
        state.window_targets += targets
        loop.window_loss += loss_sum
        return
    # No update was made: weights and optimizer state stay as they were before this step.
    state.skipped_steps += 1
    state.bad_steps_in_a_row += 1
    limit = loop.config.train.max_bad_steps
    if state.bad_steps_in_a_row >= limit:
        example_ids = sorted(int(i) for r in rows for i in r)
        raise NonFiniteLossError(
            f"step {state.step}: loss {float(loss_sum)} / gradient norm {float(grad_norm)} is not finite for "
            f"{limit} steps in a row (train.max_bad_steps={limit}); no update was made on those steps. "
            f"Training rows of this step: {example_ids}. Lower train.lr, keep train.max_grad_norm set, "
            "use fp32 or bf16, or inspect those rows"
        )


def _log_train(loop: Loop, lr: float, grad_norm: torch.Tensor, plan: StepPlan) -> dict[str, float]:
    state, accelerator, log_every = loop.state, loop.accelerator, loop.config.train.log_every
    loss = accelerator.reduce(loop.window_loss, "sum") if accelerator.num_processes > 1 else loop.window_loss
    metrics = {
        "train/loss": loss.item() / state.window_targets if state.window_targets else float("nan"),
        "train/lr": lr,
        "train/grad_norm": float(grad_norm),
        "train/tokens_per_sec": state.window_tokens / loop.progress.clock(),
        "train/step_time": loop.progress.clock() / (state.step % log_every or log_every),
        "train/tokens_seen": state.tokens_seen,
        "train/epoch": state.epoch + state.step_in_epoch / plan.steps_per_epoch,
    }
    if state.skipped_steps:
        metrics["train/skipped_steps"] = state.skipped_steps
    if loop.config.tracking.system_metrics:
        metrics.update(system_metrics(accelerator.device))
    loop.trackers.log_metrics(metrics, state.step)
    loop.progress.update(state.step, metrics)
    loop.window_loss.zero_()
    state.window_targets = state.window_tokens = 0
    loop.progress.restart_clock()
    return metrics


def _pause_reason(signals: StopOnSignal, deadline: float | None, accelerator: Accelerator) -> str | None:
    """Why the run pauses after this step (a signal, train.max_time), or None. The processes of a job
    agree: one process that got a signal or reached its deadline pauses them all at this step (each
    pausing alone would leave the others waiting at the next collective). The job's steps read the
    host back already (`_forward_backward`'s totals); this adds one small reduction to each."""
    reason = signals.requested or ("max_time" if deadline and time.monotonic() >= deadline else None)
    if accelerator.num_processes == 1:
        return reason
    code = torch.tensor([PAUSES.index(reason) + 1 if reason in PAUSES else 0], device=accelerator.device)
    agreed = int(accelerator.reduce(code, "max").item())
    return PAUSES[agreed - 1] if agreed else None


def _forward_backward(model, batches, loss_step, accelerator, task: str) -> tuple[torch.Tensor, int, int]:
    """Accumulate gradients of one optimizer step; return (loss sum, targets, input tokens)."""
    world, device = accelerator.num_processes, accelerator.device
    targets = sum(int(count_targets(b, task)) for b in batches)
    tokens = sum(int(b["num_tokens"]) for b in batches)
    if world > 1:  # every process needs the step's totals before its first backward
        counts = accelerator.reduce(torch.tensor([targets, tokens], device=device), "sum")
        targets, tokens = (int(c) for c in counts.tolist())
    loss_total = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        # Gradients are synchronised across processes only after the last micro-batch.
        with accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext():
            # the model's forward is autocast already; the loss too, for a chunked loss's head
            with accelerator.autocast():
                loss_sum, _ = loss_step(model, batch)
            # DDP (and ZeRO) average gradients over processes; * world turns that back into a sum.
            scaled = loss_sum * world / targets
            if is_deepspeed_engine(model):  # the engine accumulates: told which backward ends the step
                model.set_gradient_accumulation_boundary(i == len(batches) - 1)
                model.backward(scaled, scale_wrt_gas=False)  # (the loss is this step's share already)
            else:
                accelerator.backward(scaled)
        loss_total += loss_sum.detach()
    return loss_total, targets, tokens
