"""The loop's own state, in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current epoch (0-based)."""
    step_in_epoch: int = 0
    """Optimizer steps taken within the current epoch: the data position to continue from."""
    tokens_seen: int = 0
    """Input tokens processed (all processes, padding excluded)."""
    target_tokens_seen: int = 0
    """Tokens that carried loss."""
    stop_reason: str | None = None
    """Why training ended: max_steps, epochs."""

    def to_dict(self) -> dict:
        return asdict(self)
