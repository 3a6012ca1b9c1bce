"""MLflow tracking through the client API (no global active run), embedded sqlite by default."""

from __future__ import annotations

import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lmforge
from lmforge.config import Config, config_to_dict, flatten

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch


def default_tracking_uri(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MlflowTracker:
    name = "mlflow"

    def __init__(self, config: Config, run_dir: Path, run_id: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = config.tracking.mlflow.tracking_uri or default_tracking_uri(config.output_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_name = config.tracking.mlflow.experiment
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifact_location = None
            if config.tracking.mlflow.tracking_uri is None:  # keep artifacts beside the embedded store
                artifact_location = (Path(config.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
        self.experiment_id = experiment_id
        self.logged_through: dict[str, int] = {}
        if run_id is not None:
            self._resume(run_id)
            return
        tags = {
            "lmforge.version": lmforge.__version__,
            "lmforge.run_dir": str(run_dir.resolve()),
            "host": platform.node(),
        }
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        self.log_params(flatten(config_to_dict(config)))

    def _resume(self, run_id: str) -> None:
        """Continue an existing run. A resumed lmforge run recomputes exactly the points that were
        logged after its checkpoint, so points at or below a metric's last logged step are skipped
        instead of duplicated."""
        run = self.client.get_run(run_id)
        self.run_id = run_id
        for key in run.data.metrics:
            history = self.client.get_metric_history(run_id, key)
            self.logged_through[key] = max((m.step for m in history), default=-1)
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if step > self.logged_through.get(k, -1)]
        if items:
            self.client.log_batch(self.run_id, metrics=items, synchronous=True)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def where(self) -> str:
        store = self.uri
        return f"MLflow run {self.run_id} in {store}\n  view it: mlflow ui --backend-store-uri {store}"
