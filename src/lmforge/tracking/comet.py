"""Comet, online or offline (pip install 'lmforge[comet]'; COMET_API_KEY from the environment).
Offline experiments are zip archives under <run dir>/comet; upload them with `comet upload`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lmforge.tracking.base import RunInfo

# lmforge logs what it means to log; Comet's automatic collection would also capture the console
# (where a secret could appear), the environment, git patches and source code.
QUIET = {
    "auto_metric_logging": False,
    "auto_param_logging": False,
    "auto_output_logging": False,
    "log_env_details": False,
    "log_git_metadata": False,
    "log_git_patch": False,
    "log_env_gpu": False,
    "log_env_host": False,
    "log_env_cpu": False,
    "log_code": False,
    "log_graph": False,
    "parse_args": False,
    "display_summary_level": 0,
}


class CometTracker:
    name = "comet"

    def __init__(self, info: RunInfo) -> None:
        self.info = info
        self.settings = info.config.tracking.comet
        self.directory = info.run_dir / "comet"
        self.experiment = None

    def start(self, run_id: str | None) -> str:
        import comet_ml

        common = {"project_name": self.settings.project, "workspace": self.settings.workspace, **QUIET}
        if self.settings.mode == "offline":
            self.directory.mkdir(parents=True, exist_ok=True)
            common["offline_directory"] = str(self.directory)
            if run_id:
                experiment = comet_ml.ExistingOfflineExperiment(previous_experiment=run_id, **common)
            else:
                experiment = comet_ml.OfflineExperiment(**common)
        elif run_id:
            experiment = comet_ml.ExistingExperiment(previous_experiment=run_id, **common)
        else:
            experiment = comet_ml.Experiment(**common)
        experiment.set_name(self.info.run_dir.name)
        experiment.add_tags([f"{k}:{v}" for k, v in self.info.tags.items()])
        self.experiment = experiment
        return experiment.get_key()

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.experiment.log_parameters(dict(params))

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: float | None = None) -> None:
        self.experiment.log_metrics(dict(metrics), step=step)

    def log_artifact(self, path: Path) -> None:
        self.experiment.log_asset(str(path))

    def finish(self, status: str) -> None:
        if status != "FINISHED":
            self.experiment.log_other("lmforge.status", status)
        self.experiment.end()

    def where(self) -> str:
        if self.settings.mode == "offline":
            return f"Comet offline experiment in {self.directory}\n  upload it: comet upload {self.directory}/<key>.zip"
        return f"Comet experiment {self.experiment.url}"
