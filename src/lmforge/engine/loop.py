"""The training loop: one function, explicit and readable top to bottom."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from lmforge.config import Config, TrainConfig
from lmforge.data.loader import IGNORE_INDEX, StepPlan, epoch_order, fetch
from lmforge.data.prepare import PreparedData
from lmforge.engine.losses import LOSS_STEPS, count_targets
from lmforge.engine.optim import build_optimizer, build_scheduler
from lmforge.engine.progress import TrainProgress
from lmforge.engine.state import TrainState
from lmforge.errors import UserError
from lmforge.eval.evaluate import evaluate
from lmforge.tracking.base import Trackers


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision for train.precision: "no", "bf16" or "fp16"."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if precision == "fp16" and not cuda:
        raise UserError("train.precision=fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def make_accelerator(precision: str) -> Accelerator:
    # accelerate keeps its settings in a process-wide singleton; clear it so that a second run
    # in the same process (tests, notebooks, sweeps) may use another precision.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=resolve_precision(precision))


def total_steps(cfg: TrainConfig, plan: StepPlan) -> int:
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * plan.steps_per_epoch


@dataclass
class TrainResult:
    model: nn.Module
    """The trained model, unwrapped from any distributed wrapper."""
    state: TrainState
    eval_history: list[dict[str, float]] = field(default_factory=list)
    """Validation metrics at every evaluation, each with its "step"."""


def train(
    model: nn.Module,
    data: PreparedData,
    config: Config,
    trackers: Trackers,
    progress_factory=TrainProgress,
    console=None,
) -> TrainResult:
    """Train `model` on `data.splits["train"]`, evaluating on validation as configured.

    The loss of an optimizer step is the sum of token losses over all its micro-batches (and
    processes) divided by the number of target tokens in the whole step, so accumulation and
    uneven micro-batches change nothing: 1 x 8 equals 8 x 1.
    """
    cfg = config.train
    accelerator = make_accelerator(cfg.precision)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    model = model.to(device)
    optimizer = build_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    train_set, pad_id = data.splits["train"], data.tokenizer.pad_token_id
    plan = StepPlan(len(train_set), cfg.micro_batch_size, cfg.grad_accum, world)
    steps = total_steps(cfg, plan)
    scheduler = build_scheduler(optimizer, cfg, steps)
    loss_step = LOSS_STEPS[config.model.task]
    eval_batch = config.eval.batch_size or cfg.micro_batch_size
    state, history = TrainState(), []
    progress = progress_factory(steps, console, enabled=accelerator.is_main_process)

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, data.splits["validation"], pad_id, eval_batch, config.eval.max_batches, accelerator)
        history.append({"step": state.step, **metrics})
        trackers.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, state.step)
        progress.message(
            f"eval @ step {state.step}: loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}  "
            f"token accuracy {metrics['token_accuracy']:.3f}"
        )
        return metrics

    if config.eval.at_start:
        run_eval()
    model.train()
    order = epoch_order(len(train_set), config.seed, state.epoch)
    window_loss = torch.zeros((), device=device)  # loss sum since the last log, on device: no sync
    window_targets = window_tokens = 0
    window_start = time.perf_counter()
    progress.begin(state.step)
    while state.step < steps:
        if state.step_in_epoch == plan.steps_per_epoch:  # next epoch, next permutation
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            order = epoch_order(len(train_set), config.seed, state.epoch)
        batches = [fetch(train_set, rows, pad_id) for rows in plan.step_rows(order, state.step_in_epoch, rank)]
        step_targets = sum(int(count_targets(b)) for b in batches)
        step_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        if world > 1:  # every process needs the step's total before its first backward
            counts = accelerator.reduce(torch.tensor([step_targets, step_tokens], device=device), "sum")
            step_targets, step_tokens = (int(c) for c in counts.tolist())

        for i, batch in enumerate(batches):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            # Gradients are synchronised across processes only after the last micro-batch.
            with accelerator.no_sync(model) if i < len(batches) - 1 else nullcontext():
                loss_sum, _ = loss_step(model, batch)
                # DDP averages gradients over processes; * world turns that back into a sum.
                accelerator.backward(loss_sum * world / step_targets)
            window_loss += loss_sum.detach()

        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: keep the schedule in place
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
        state.tokens_seen += step_tokens
        state.target_tokens_seen += step_targets
        window_targets += step_targets
        window_tokens += step_tokens

        if state.step % cfg.log_every == 0 or state.step == steps:
            if world > 1:
                window_loss = accelerator.reduce(window_loss, "sum")
            elapsed = time.perf_counter() - window_start
            metrics = {
                "train/loss": window_loss.item() / window_targets,
                "train/lr": lr,
                "train/tokens_per_sec": window_tokens / elapsed,
                "train/tokens_seen": state.tokens_seen,
                "train/epoch": state.epoch + state.step_in_epoch / plan.steps_per_epoch,
                "train/step_time": elapsed / (state.step % cfg.log_every or cfg.log_every),
            }
            if grad_norm is not None:
                metrics["train/grad_norm"] = float(grad_norm)
            trackers.log_metrics(metrics, state.step)
            progress.update(state.step, metrics)
            window_loss.zero_()
            window_targets = window_tokens = 0
            window_start = time.perf_counter()
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < steps:
            run_eval()
            window_start = time.perf_counter()  # evaluation time is not training throughput

    state.stop_reason = "max_steps" if cfg.max_steps is not None else "epochs"
    run_eval()
    progress.close()
    return TrainResult(accelerator.unwrap_model(model), state, history)
