"""Tracking the best evaluation and deciding when patience has run out."""

from __future__ import annotations

from lmforge.engine.state import TrainState


def is_improvement(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` in direction `mode` (min or max)."""
    if best is None:
        return value == value  # any number beats nothing; NaN never improves
    return value < best - min_delta if mode == "min" else value > best + min_delta


def record_eval(state: TrainState, value: float, mode: str, min_delta: float) -> bool:
    """Update best value, best step and the patience counter in `state`; True if a new best."""
    if is_improvement(value, state.best_metric, mode, min_delta):
        state.best_metric, state.best_step = value, state.step
        state.evals_without_improvement = 0
        return True
    state.evals_without_improvement += 1
    return False
