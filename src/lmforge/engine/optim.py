"""The optimizer and the learning-rate schedule.

Optimizers are plain builder functions in `OPTIMIZERS`, keyed by train.optimizer; schedules are the
multiplier of the peak learning rate at each step (`lr_factor`), their shapes after warmup plain
functions in `DECAYS`, keyed by train.scheduler. Every state they keep (optimizer moments, the
scheduler's step) is tensors and plain numbers, which checkpoints save and load back with
`torch.load(weights_only=True)`: a resumed run continues bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import TrainConfig
from lmforge.errors import UserError

SGD_MOMENTUM = 0.9
"""train.momentum when it is not given (sgd)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed and not decayed.

    Matrices of linear layers are decayed; norms, biases (all 1-D) and embeddings are not: decay
    there only shrinks scales and rare-token vectors without regularising anything.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    seen: set[int] = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if param.ndim < 2 or id(param) in embedding_ids else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# --------------------------------------------------------------------------- optimizers


def _adamw(groups: list[dict], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """torch's AdamW, with the fused kernel on CPU and CUDA (one kernel for all parameters; on 2 CPU
    cores 4x faster than foreach for a 20M model), foreach elsewhere."""
    fused = device in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


def _adafactor(groups: list[dict], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """torch's Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost"): second moments of a matrix kept as one row and one column vector, no first
    moment. Its step is min(lr, 1/sqrt(t)) times the parameter's RMS, lr coming from the schedule
    (no relative-step schedule of its own): relative to the weights, so it takes larger learning
    rates than AdamW (torch's default is 1e-2)."""
    return torch.optim.Adafactor(groups, lr=cfg.lr)


def _sgd(groups: list[dict], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """torch's SGD with (Nesterov) momentum; its weight decay is L2, added to the gradient."""
    momentum = SGD_MOMENTUM if cfg.momentum is None else cfg.momentum
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=cfg.nesterov)


def _lion(groups: list[dict], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") from lion-pytorch:
    the sign of an interpolated momentum, so every update has size lr; betas are train.adam_beta1/2
    as the Hugging Face Trainer takes them (the paper's are 0.9, 0.99)."""
    from lion_pytorch import Lion

    return Lion(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))


def _bitsandbytes(cfg: TrainConfig):
    """The bitsandbytes module, or the error config validation gives (for a caller that skipped it)."""
    if not torch.cuda.is_available():
        raise UserError(
            f"train.optimizer={cfg.optimizer} needs a CUDA GPU (bitsandbytes' 8-bit optimizers); "
            "on CPU use adamw, adafactor, sgd or lion"
        )
    try:
        import bitsandbytes
    except ImportError:
        raise UserError(f"train.optimizer={cfg.optimizer} needs bitsandbytes: pip install bitsandbytes") from None
    return bitsandbytes


def _adamw_8bit(groups: list[dict], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-quantized moments (Dettmers et al. 2022): a quarter
    of AdamW's optimizer memory."""
    adam = _bitsandbytes(cfg).optim.AdamW8bit
    return adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


def _paged_adamw_8bit(groups: list[dict], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    """adamw_8bit whose moments live in paged (unified) memory, moved to the CPU when the GPU runs out."""
    adam = _bitsandbytes(cfg).optim.PagedAdamW8bit
    return adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)


OptimizerBuilder = Callable[[list[dict], TrainConfig, str], torch.optim.Optimizer]

OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adamw": _adamw,
    "adamw_8bit": _adamw_8bit,
    "paged_adamw_8bit": _paged_adamw_8bit,
    "adafactor": _adafactor,
    "sgd": _sgd,
    "lion": _lion,
}
"""train.optimizer: a builder of the optimizer over `param_groups`, given the config and the
parameters' device type."""


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """train.optimizer over `param_groups` (no weight decay on norms, biases and embeddings)."""
    device = next(model.parameters()).device.type
    return OPTIMIZERS[cfg.optimizer](param_groups(model, cfg.weight_decay), cfg, device)


# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Schedule:
    """Everything the learning-rate multiplier of a run depends on besides the step. The
    defaults are those of the TrainConfig fields that are null when not given."""

    kind: str
    total: int
    warmup: int
    min_ratio: float = 0.0
    num_cycles: int = 2
    power: float = 1.0
    decay_ratio: float = 0.2
    decay_shape: str = "1-sqrt"

    @property
    def decay_steps(self) -> int:
        """wsd: the steps of the final decay (transformers' num_decay_steps)."""
        return round(self.decay_ratio * self.total)

    def floor(self, decay: float) -> float:
        """A decay from 1 to 0 moved to end at min_ratio."""
        return self.min_ratio + (1.0 - self.min_ratio) * decay

    def progress(self, step: int) -> float:
        """How far past warmup `step` is, from 0 to 1 at the last step."""
        return min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate for optimizer step `step` (0-based): linear
        warmup from 0, then the schedule's decay."""
        if step < self.warmup:
            return step / max(1, self.warmup)
        return DECAYS[self.kind](step, self)


def _constant(step: int, s: Schedule) -> float:
    return 1.0


def _linear(step: int, s: Schedule) -> float:
    """transformers' get_linear_schedule_with_warmup."""
    return s.floor(1.0 - s.progress(step))


def _cosine(step: int, s: Schedule) -> float:
    """transformers' get_cosine_schedule_with_warmup (half a cosine, Loshchilov & Hutter 2017)."""
    return s.floor(0.5 * (1.0 + math.cos(math.pi * s.progress(step))))


def _cosine_with_restarts(step: int, s: Schedule) -> float:
    """transformers' get_cosine_with_hard_restarts_schedule_with_warmup: num_cycles half-cosine
    decays, each restarting at the peak (SGDR, Loshchilov & Hutter 2017)."""
    progress = (step - s.warmup) / max(1, s.total - s.warmup)
    if progress >= 1.0:
        return s.min_ratio
    return s.floor(0.5 * (1.0 + math.cos(math.pi * ((s.num_cycles * progress) % 1.0))))


def _polynomial(step: int, s: Schedule) -> float:
    """transformers' get_polynomial_decay_schedule_with_warmup with lr_end = lr * min_ratio:
    (1 - progress) ** power from the peak to lr_end (BERT's and fairseq's polynomial decay)."""
    return s.floor((1.0 - s.progress(step)) ** s.power)


def _inverse_sqrt(step: int, s: Schedule) -> float:
    """transformers' get_inverse_sqrt_schedule (from big_vision): 1 / sqrt(step / timescale) after
    warmup, timescale the warmup steps or 10,000 without warmup. It never ends, so the total
    plays no part; min_ratio is a floor the decay stops at."""
    timescale = s.warmup or 10_000
    shift = timescale - s.warmup
    return max(s.min_ratio, 1.0 / math.sqrt((step + shift) / timescale))


WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "1-sqrt": lambda progress: 1.0 - math.sqrt(progress),
}
"""wsd's decay from 1 to 0 over its progress from 0 to 1. 1-sqrt is Hägele et al. 2024, "Scaling
Laws and Compute-Optimal Training Beyond Fixed Training Durations", which finds it matches or
beats a cosine schedule run for the same length."""


def _wsd(step: int, s: Schedule) -> float:
    """transformers' get_wsd_schedule (warmup-stable-decay; Hu et al. 2024, MiniCPM): the peak
    until the last decay_steps, then the decay_shape down to min_ratio at the last step. Its
    warmup is the linear one from 0 of every schedule here (transformers' starts at min_ratio)."""
    decay_start = s.total - s.decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, s.decay_steps))
    return s.floor(WSD_SHAPES[s.decay_shape](progress))


DECAYS: dict[str, Callable[[int, Schedule], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt,
    "wsd": _wsd,
}
"""train.scheduler: the multiplier after warmup, a pure function of the step."""

ENDLESS = ("constant", "inverse_sqrt")
"""Schedules whose curve does not depend on the run's length (besides a warmup_ratio)."""


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return math.ceil(total_steps * (cfg.warmup_ratio or 0.0))


def schedule_of(cfg: TrainConfig, total_steps: int) -> Schedule:
    """The schedule train.* describes over a run of `total_steps` optimizer steps."""
    given = {"num_cycles": cfg.num_cycles, "power": cfg.power, "decay_ratio": cfg.decay_ratio}
    given["decay_shape"] = cfg.decay_shape
    settings = {name: value for name, value in given.items() if value is not None}
    return Schedule(cfg.scheduler, total_steps, warmup_steps(cfg, total_steps), cfg.min_lr_ratio, **settings)


def lr_factor(step: int, total_steps: int, warmup: int, kind: str, min_ratio: float = 0.0, **settings) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Linear warmup from 0, then the `kind` schedule (see `DECAYS`) down to `min_ratio`. The same
    curves as transformers' schedule functions when min_ratio is 0.

    Args:
        settings: the schedule's own settings (`Schedule`'s num_cycles, power, decay_ratio,
            decay_shape); each has its default when not given.
    """
    return Schedule(kind, total_steps, warmup, min_ratio, **settings).factor(step)


def check_schedule(schedule: Schedule) -> None:
    """A wsd decay must fit the run (its length is known only once the data is).

    Raises:
        UserError: no decay step, or a decay that would start inside the warmup.
    """
    if schedule.kind != "wsd":
        return
    ratio, total, decay = schedule.decay_ratio, schedule.total, schedule.decay_steps
    if decay < 1:
        raise UserError(
            f"train.decay_ratio={ratio} of {total:,} steps rounds to no decay step: raise train.decay_ratio "
            f"above {0.5 / total:.3g} or train longer"
        )
    if schedule.warmup + decay > total:
        raise UserError(
            f"train.scheduler=wsd: the decay (train.decay_ratio={ratio}: the last {decay:,} of {total:,} steps) "
            f"would start inside the {schedule.warmup:,} warmup steps: lower train.decay_ratio or the warmup "
            "(train.warmup_steps / train.warmup_ratio), or train longer"
        )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """train.scheduler over `total_steps` as a LambdaLR, whose state (the step) resumes exactly.

    Raises:
        UserError: a wsd decay that does not fit the run (`check_schedule`).
    """
    schedule = schedule_of(cfg, total_steps)
    check_schedule(schedule)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.factor(step))


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set each parameter group's learning rate from the scheduler's schedule at its current step.
    A resumed optimizer and scheduler bring back the rate the checkpoint's schedule set for the next
    step; when the resume plans the schedule again (a new train.max_steps), the next step must
    already take the new plan's rate. Without a change it is the same rate, bit for bit."""
    rates = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (torch's LRScheduler keeps it there)


def schedule_change(cfg_before: TrainConfig, cfg_now: TrainConfig, total_before: int, total_now: int, step: int) -> str:
    """What a resume that changes the run's length does to its learning-rate schedule, in words
    ('' when nothing changes): the schedule is planned over the total steps, so a new total moves
    every later learning rate (constant and inverse_sqrt only through a warmup_ratio)."""
    if total_before == total_now:
        return ""
    before, now = schedule_of(cfg_before, total_before), schedule_of(cfg_now, total_now)
    if now.kind in ENDLESS and before.warmup == now.warmup:
        return ""
    rates = [cfg_before.lr * before.factor(step), cfg_now.lr * now.factor(step)]  # (the next step's)
    text = (
        f"the {now.kind} learning-rate schedule is planned again over {total_now:,} steps instead of "
        f"{total_before:,}: at step {step + 1:,} the learning rate becomes {rates[1]:.3g} (it was {rates[0]:.3g})"
    )
    if now.kind in ENDLESS:
        return f"{text}, its warmup now {now.warmup:,} steps (it was {before.warmup:,})"
    if now.kind == "wsd":
        text += f", decaying from step {total_now - now.decay_steps:,} (it was {total_before - before.decay_steps:,})"
    return f"{text}, reaching {cfg_now.lr * now.min_ratio:.3g} at step {total_now:,}"
