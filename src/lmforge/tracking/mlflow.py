"""MLflow tracking through the client API (no global active run), embedded sqlite by default."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lmforge.secrets import redact_text
from lmforge.tracking.base import RunInfo

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow's limit on params per log_batch
METRIC_BATCH = 1000  # and on metrics
# The channel retries with its own backoff; MLflow's defaults (7 retries, factor 2, 120 s timeout)
# would hold one call for minutes against a dead server. The user's own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


REFUSALS = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE")
"""MLflow error codes of a call refused for what it holds (a name MLflow does not allow, a value
too long, a finished run): retrying cannot help. Connection errors and server errors can."""


def default_tracking_uri(output_dir: str) -> str:
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MlflowTracker:
    """An MLflow run. On resume it continues the run id, and points it already has (same metric,
    same step) are skipped, so a resumed run or `lmforge sync` never duplicates a point."""

    name = "mlflow"

    def __init__(self, info: RunInfo) -> None:
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.info = info
        self.settings = info.config.tracking.mlflow
        self.uri = self.settings.tracking_uri or default_tracking_uri(info.config.output_dir)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.logged: dict[str, set[int]] = {}
        """Steps each metric already has in the run."""
        self.params: dict[str, str] = {}

    def start(self, run_id: str | None) -> str:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        tags = dict(self.info.tags)
        if run_id is not None:
            if self._resume(run_id):
                return run_id
            tags["lmforge.continues_run"] = run_id  # a new machine's store: a new run takes the points over
        if self.settings.parent_run_id:
            tags["mlflow.parentRunId"] = self.settings.parent_run_id
        self.experiment_id = self._experiment_id()
        run = self.client.create_run(self.experiment_id, run_name=self.info.run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        return self.run_id

    def _experiment_id(self) -> str:
        name = self.settings.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.settings.tracking_uri is None:  # keep artifacts beside the embedded store
            location = (Path(self.info.config.output_dir).resolve() / "mlartifacts").as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _resume(self, run_id: str) -> bool:
        """Continue `run_id`; False if this store has no such run (the run was resumed on another
        machine, whose embedded store did not come along): a new run then takes its points."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.params = dict(run.data.params)
        for key in run.data.metrics:
            self.logged[key] = {m.step for m in self.client.get_metric_history(run_id, key)}
        self.client.update_run(run_id, status="RUNNING")
        return True

    def rejects(self, exc: BaseException) -> bool:
        """Whether MLflow refused a call for good (see REFUSALS)."""
        from mlflow.exceptions import MlflowException

        return isinstance(exc, MlflowException) and exc.error_code in REFUSALS

    def log_params(self, params: Mapping[str, Any]) -> None:
        """New params only: MLflow params are immutable, and a resumed run may change resume-safe
        settings (those keep their first value here; config.yaml has the current one). A batch
        MLflow refuses is sent again one param at a time, so one bad name costs only itself.

        Raises:
            MlflowException: the first refusal, once every other param is logged.
        """
        from mlflow.entities import Param

        values = {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}
        items = [Param(k, v) for k, v in values.items() if k not in self.params]
        refused: list[Exception] = []
        for i in range(0, len(items), BATCH):
            batch = items[i : i + BATCH]
            for part in self._deliverable(batch, self._send_params, refused):
                self.params.update((p.key, p.value) for p in part)
        if refused:
            raise refused[0]

    def _send_params(self, params: list) -> None:
        self.client.log_batch(self.run_id, params=params, synchronous=True)

    def _send_metrics(self, metrics: list) -> None:
        self.client.log_batch(self.run_id, metrics=metrics)

    def _deliverable(self, batch: list, send: Callable[[list], None], refused: list[Exception]) -> list[list]:
        """Send `batch`; if MLflow refuses it, send each half again (down to single items, whose
        refusals are collected in `refused`). Returns the parts that were delivered."""
        try:
            send(batch)
            return [batch]
        except Exception as exc:
            if not self.rejects(exc):
                raise
            if len(batch) == 1:
                refused.append(exc)
                return []
        mid = len(batch) // 2
        return self._deliverable(batch[:mid], send, refused) + self._deliverable(batch[mid:], send, refused)

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: float | None = None) -> None:
        self.log_history([(step, timestamp or time.time(), metrics)])

    def log_history(self, points: list[tuple[int, float, Mapping[str, float]]]) -> None:
        """Many (step, time, metrics) points at once, in batches, skipping those the run has."""
        from mlflow.entities import Metric

        fresh = [
            Metric(k, float(v), int(stamp * 1000), step)
            for step, stamp, metrics in points
            for k, v in metrics.items()
            if step not in self.logged.get(k, ())
        ]
        refused: list[Exception] = []
        for i in range(0, len(fresh), METRIC_BATCH):
            batch = fresh[i : i + METRIC_BATCH]
            for part in self._deliverable(batch, self._send_metrics, refused):
                for metric in part:
                    self.logged.setdefault(metric.key, set()).add(metric.step)
        if refused:
            raise refused[0]

    reconcile = log_history

    def lacks(self, points: list[tuple[int, float, Mapping[str, float]]]) -> int:
        """How many metric values of `points` (metrics.jsonl's) the run does not hold."""
        return sum(step not in self.logged.get(k, ()) for step, _, metrics in points for k in metrics)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_model(self, run_dir: Path) -> None:
        """With tracking.mlflow.log_model or register_as: the final model as an MLflow pyfunc model
        under the run's `model/` artifacts (a LoRA adapter is merged first, so it stands alone),
        registered as a new version of `register_as` when that is set."""
        if not (self.settings.log_model or self.settings.register_as):
            return
        from lmforge.tracking.mlflow_model import save_pyfunc

        with tempfile.TemporaryDirectory(prefix="lmforge-mlflow-") as tmp:
            save_pyfunc(run_dir, Path(tmp) / "model")
            self.client.log_artifacts(self.run_id, str(Path(tmp) / "model"), "model")
        if self.settings.register_as:
            self._register(self.settings.register_as)

    def _register(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"runs:/{self.run_id}/model"
        if any(v.run_id == self.run_id for v in self.client.search_model_versions(f"name='{name}'")):
            return  # a retried call after the version was created
        self.client.create_model_version(name, source=source, run_id=self.run_id)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def points(self) -> int:
        """Metric values the run holds."""
        return sum(len(steps) for steps in self.logged.values())

    def where(self) -> str:
        store = redact_text(self.uri)
        if store.startswith(("http://", "https://")):
            page = f"{store.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            return f"MLflow run {self.run_id}: {page}"
        return f"MLflow run {self.run_id} in {store}\n  view it: mlflow ui --backend-store-uri {store}"
