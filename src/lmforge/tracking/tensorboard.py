"""TensorBoard event files under <run dir>/tensorboard (pip install 'lmforge[tensorboard]')."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.tracking.base import RunInfo


class TensorboardTracker:
    name = "tensorboard"

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.log_dir = info.run_dir / "tensorboard"
        self.writer = None

    def start(self, run_id: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # On resume, purge_step hides the points after the checkpoint that the first run wrote:
        # the resumed run logs them again.
        purge = self.info.resume_step + 1 if self.info.resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("config", f"| param | value |\n|---|---|\n{table}", global_step=0)
        tags = "\n".join(f"| {k} | {v} |" for k, v in self.info.tags.items())
        self.writer.add_text("tags", f"| tag | value |\n|---|---|\n{tags}", global_step=0)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: float | None = None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=timestamp)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        pass  # artifacts are in the run directory beside the event files

    def finish(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()

    def where(self) -> str:
        return f"TensorBoard logs in {self.log_dir}\n  view them: tensorboard --logdir {self.log_dir}"
