"""The loop's own state, in one place: what a checkpoint must hold besides tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken (skipped non-finite steps included)."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Steps taken within the current epoch: the data position to continue from."""
    tokens_seen: int = 0
    """Input tokens processed (all processes, padding excluded)."""
    target_tokens_seen: int = 0
    """Tokens that carried loss."""
    window_loss: float = 0.0
    """Loss sum since the last log point, so a resumed run logs the same averages."""
    window_targets: int = 0
    """Target tokens since the last log point."""
    window_tokens: int = 0
    """Input tokens since the last log point."""
    skipped_steps: int = 0
    """Steps whose loss or gradient norm was not finite (no update was made)."""
    bad_steps_in_a_row: int = 0
    """Consecutive non-finite steps; the run stops at train.max_bad_steps."""
    best_metric: float | None = None
    """Best value of the early-stopping (or best-checkpoint) metric so far."""
    best_step: int | None = None
    """Step at which best_metric was reached."""
    evals_without_improvement: int = 0
    """The early-stopping counter."""
    eval_history: list[dict[str, float]] = field(default_factory=list)
    """Validation metrics of every evaluation, each with its step."""
    metrics_lines: int = 0
    """Lines in metrics.jsonl when this state was saved; later lines are dropped on resume."""
    tracker_ids: dict[str, str] = field(default_factory=dict)
    """Run ids of the tracking backends, to continue the same runs on resume."""
    config_hash: str = ""
    """Hash of the config fields that define the model and data."""
    world_size: int = 1
    """Processes of the job that wrote this state: a resume on another number keeps the global
    batch (train.grad_accum x processes) the same."""
    stop_reason: str | None = None
    """Why training ended or paused: max_steps, epochs, early_stopping, max_time, SIGTERM, SIGINT."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
