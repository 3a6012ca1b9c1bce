"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks", section 3.3; as fastai's `lr_find`): train for a few steps while the learning rate grows
exponentially, and read a good learning rate off the loss curve.

It runs the real training step, through `engine.loop.train` itself (same loss, packing,
accumulation, precision, LoRA and frozen parameters), and puts everything back afterwards: the
trainable weights and every buffer, the Python, NumPy, torch and CUDA random generators; the
optimizer, the scheduler and the data position are the range test's own and are dropped. A run
that follows is identical to one that never ran it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from lmforge.config import Config, LrFindConfig
from lmforge.data.prepare import PreparedData
from lmforge.engine.checkpoint import capture_rng, restore_rng

RESULT_FILE = "lr_find.json"
MIN_FALL = 0.005
"""The least fall of the smoothed loss (a share of its first value) that the curve must show for
its suggestions to mean anything."""
INTERRUPTS = ("SIGINT", "SIGTERM", "SIGUSR1")


class RangeTestInterrupted(KeyboardInterrupt):
    """A signal stopped the range test: its curve is cut short and is never used."""


PLOT_FILE = "lr_find.png"
SUGGESTIONS = ("valley", "steepest", "minimum")


@dataclass
class LrFindResult:
    lrs: list[float]
    """The learning rate of each step of the test."""
    losses: list[float]
    """Each step's training loss (mean over its target tokens); NaN where it was not finite."""
    smoothed: list[float]
    """The bias-corrected exponential moving average of `losses` (weight `smoothing` on the past)."""
    suggestions: dict[str, float]
    """valley, steepest and minimum (see `suggest`)."""
    stopped: str
    """completed, or diverged at a step (the smoothed loss passed diverge_factor x its lowest)."""
    settings: dict = field(default_factory=dict)
    """The train.lr_find settings the test ran with."""

    def flat(self) -> str | None:
        """Why the curve says nothing (its smoothed loss never fell by MIN_FALL of its first value),
        with what to change; None when it fell."""
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if len(finite) >= 2 and min(finite) <= finite[0] * (1 - MIN_FALL):
            return None
        low = f"{min(finite):.4f}" if finite else "nan"
        return (
            f"the smoothed loss never fell by {MIN_FALL:.1%} ({finite[0] if finite else float('nan'):.4f} at "
            f"{self.lrs[0]:.1e}, lowest {low}, up to lr {self.lrs[-1]:.1e}): the curve says nothing; raise "
            "train.lr_find.end_lr or num_steps (or lower start_lr if it diverged at once)"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, directory: Path) -> list[Path]:
        """lr_find.json and lr_find.png (the curve, log-scaled learning rates, the suggestions
        marked) in `directory`; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        data = directory / RESULT_FILE
        data.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")
        plot = directory / PLOT_FILE
        plot_curve(self, plot)
        return [data, plot]


def exponential_lrs(cfg: LrFindConfig) -> list[float]:
    """start_lr * (end_lr / start_lr) ** (i / (num_steps - 1)) for each step i: start_lr at the first
    step, end_lr at the last."""
    ratio = cfg.end_lr / cfg.start_lr
    return [cfg.start_lr * ratio ** (i / (cfg.num_steps - 1)) for i in range(cfg.num_steps)]


def smooth(losses: list[float], beta: float) -> list[float]:
    """The exponential moving average avg_i = beta avg_(i-1) + (1 - beta) loss_i, divided by
    1 - beta^(i+1) so that the first values are not pulled towards 0 (Adam's bias correction, as
    fastai smooths its curve). A non-finite loss makes every later value NaN."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float], num_steps: int) -> dict[str, float]:
    """Three readings of the curve, since no one rule is always right. As fastai's `lr_find`, the
    first num_steps // 10 points (the loss still settling) and the last 5 (the blow-up) are left
    out when enough remain.

    - minimum: the learning rate of the lowest smoothed loss, divided by 10 (the loss is lowest
      just before it blows up; a tenth of that is safely below).
    - steepest: where the smoothed loss falls fastest per decade of learning rate (the most negative
      slope against log10(lr)).
    - valley: fastai's `valley` (Zachary Mueller, fastai 2.4): the longest decreasing subsequence of
      the losses, and the point a third plus a sixth of the way along it.

    Args:
        lrs, smoothed: the test's learning rates and smoothed losses.
        num_steps: the steps the test was planned for (train.lr_find.num_steps).

    Raises:
        ValueError: fewer than 3 finite points.
    """
    finite = [i for i, value in enumerate(smoothed) if math.isfinite(value)]
    kept = [i for i in finite if num_steps // 10 <= i < len(smoothed) - 5]
    finite = kept if len(kept) >= 3 else finite
    if len(finite) < 3:
        raise ValueError("the range test has fewer than 3 finite losses; lower train.lr_find.start_lr")
    lr = np.asarray([lrs[i] for i in finite])
    loss = np.asarray([smoothed[i] for i in finite])
    slopes = np.gradient(loss, np.log10(lr))
    return {
        "valley": float(lr[_valley(loss)]),
        "steepest": float(lr[int(np.argmin(slopes))]),
        "minimum": float(lr[int(np.argmin(loss))] / 10),
    }


def _valley(losses: np.ndarray) -> int:
    """fastai's valley index: the longest decreasing subsequence (lds, O(n^2)) ending at max_end and
    starting at max_start, then max_start + int(len / 3) + int(len / 6)."""
    n = len(losses)
    longest = [1] * n
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[i] < longest[j] + 1:
                longest[i] = longest[j] + 1
            if longest[end] < longest[i]:
                end = i
                start = end - longest[end]
    sections = (end - start) / 3
    return min(n - 1, max(0, start + int(sections) + int(sections / 2)))


def plot_curve(result: LrFindResult, path: Path) -> None:
    """The smoothed loss against the learning rate (log scale), the raw losses faint, the
    suggestions as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=110)
    axes = figure.subplots()
    axes.plot(result.lrs[: len(result.losses)], result.losses, color="#bbbbbb", linewidth=0.8, label="loss")
    axes.plot(result.lrs[: len(result.smoothed)], result.smoothed, color="#1f5fa8", linewidth=1.6, label="smoothed")
    colors = {"valley": "#2a9d3a", "steepest": "#d9822b", "minimum": "#b03a2e"}
    for name, lr in result.suggestions.items():
        axes.axvline(lr, color=colors[name], linestyle="--", linewidth=1, label=f"{name} {lr:.2e}")
    axes.set_xscale("log")
    finite = [v for v in result.smoothed if math.isfinite(v)]
    raw = [v for v in result.losses if math.isfinite(v)]
    if finite:  # the divergence at the end would flatten the rest of the curve
        low, first = min(finite + raw[: len(finite)]), finite[0]
        axes.set_ylim(low - 0.1 * (first - low + 1e-9), first + 0.5 * (first - low + 1e-9))
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"learning-rate range test ({result.stopped})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def range_test(model: torch.nn.Module, data: PreparedData, config: Config, console: Console | None = None):
    """Run the range test on `model` and return an `LrFindResult`; `model` and the random
    generators are as they were before.

    The test trains train.lr_find.num_steps optimizer steps with the run's micro-batches,
    accumulation and precision, the learning rate at step i being `exponential_lrs(...)[i]`,
    and stops early when the smoothed loss passes diverge_factor x its lowest value (or is not
    finite). No evaluation, checkpoint or tracking happens.

    Raises:
        ValueError: fewer than 3 finite losses (start_lr already diverges).
    """
    from lmforge.engine.loop import train
    from lmforge.tracking.base import Trackers

    cfg = config.train.lr_find
    lrs = exponential_lrs(cfg)
    test = _test_config(config)
    losses: list[float] = []
    best = [math.inf]

    def observe(step: int, metrics: dict[str, float]) -> str | None:
        losses.append(metrics["train/loss"])
        value = smooth(losses, cfg.smoothing)[-1]
        if console is not None and (step % 10 == 0 or step == cfg.num_steps):
            console.print(f"[dim]lr-find step {step}/{cfg.num_steps}: lr {lrs[step - 1]:.2e} loss {value:.4f}[/dim]")
        if not math.isfinite(value) or value > cfg.diverge_factor * best[0]:
            return "diverged"
        best[0] = min(best[0], value)
        return None

    saved_weights = _trainable_state(model)
    saved_rng = capture_rng()
    try:
        result = train(
            model,
            data,
            test,
            Trackers(None, [], None, warn=lambda _: None),
            console=Console(quiet=True),
            on_log=observe,
            schedule=lambda step: lrs[min(step, len(lrs) - 1)] / cfg.start_lr,
        )
        stopped = result.state.stop_reason
        if stopped in INTERRUPTS:  # the user stopped it: no curve cut short is ever used
            raise RangeTestInterrupted(stopped)
    finally:
        _restore(model, saved_weights)
        restore_rng(saved_rng)
    smoothed = smooth(losses, cfg.smoothing)
    return LrFindResult(
        lrs=lrs[: len(losses)],
        losses=losses,
        smoothed=smoothed,
        suggestions=suggest(lrs, smoothed, cfg.num_steps),
        stopped=f"diverged at step {len(losses)}" if stopped == "diverged" else "completed",
        settings=cfg.model_dump(),
    )


def _test_config(config: Config) -> Config:
    """The run's config as the range test trains it: its steps, the learning rate from start_lr,
    a log point per step, and no evaluation, checkpoint, early stopping, time limit or sampling."""
    test = config.model_copy(deep=True)
    cfg = test.train
    cfg.lr, cfg.max_steps = config.train.lr_find.start_lr, config.train.lr_find.num_steps
    cfg.log_every, cfg.eval_every, cfg.save_every = 1, None, None
    cfg.early_stopping, cfg.max_time = None, None
    test.eval.at_start, test.eval.max_batches = False, 1  # (the last step evaluates one batch)
    test.tracking.system_metrics = False
    return test


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of what training can change: the trainable parameters and every buffer (frozen
    weights, a quantized base, stay where they are: nothing writes them)."""
    state = {f"p:{name}": p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    state.update({f"b:{name}": b.detach().clone() for name, b in model.named_buffers()})
    return state


@torch.no_grad()
def _restore(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(model, keep_fp32_wrapper=False)  # undo accelerate's autocast wrapper
    for name, p in model.named_parameters():
        if f"p:{name}" in saved:
            p.copy_(saved[f"p:{name}"])
        p.grad = None
    for name, b in model.named_buffers():
        b.copy_(saved[f"b:{name}"])
