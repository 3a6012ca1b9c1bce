"""Weights & Biases, online or offline (pip install 'lmforge[wandb]'; WANDB_API_KEY from the
environment). Offline runs are written under <run dir>/wandb; upload them with `wandb sync`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.tracking.base import RunInfo

EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}
# lmforge logs what it means to log. W&B's own metadata would record the command line (where an
# override may carry a secret), the console output, git remotes (which may embed a token) and code.
QUIET = {
    "console": "off",
    "silent": True,
    "x_disable_meta": True,
    "disable_git": True,
    "disable_code": True,
    "save_code": False,
    "x_save_requirements": False,
}


class WandbTracker:
    name = "wandb"

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.settings = info.config.tracking.wandb
        self.run = None

    def start(self, run_id: str | None) -> str:
        import wandb

        tags = [f"{k}:{v}"[:64] for k, v in self.info.tags.items()]  # W&B tags are short strings
        self.run = wandb.init(
            project=self.settings.project,
            entity=self.settings.entity,
            mode=self.settings.mode,
            dir=str(self.info.run_dir),
            name=self.info.run_dir.name,
            group=self.info.config.tracking.study,
            tags=tags,
            id=run_id,
            resume="allow" if run_id else None,
            reinit="create_new",
            settings=wandb.Settings(**QUIET),
        )
        return self.run.id

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: float | None = None) -> None:
        # W&B ignores a step below the run's current one: on resume, the points logged after the
        # checkpoint are not written twice.
        self.run.log(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=EXIT_CODES.get(status, 1))

    def where(self) -> str:
        if self.settings.mode == "offline":
            return f"W&B offline run in {self.run.dir.rsplit('/files', 1)[0]}\n  upload it: wandb sync <that directory>"
        return f"W&B run {self.run.url}"
