"""`lmforge sync RUN`: replay a run's metrics.jsonl into the backends that missed points.

MLflow takes points in any order and keeps a step per point, so its run is completed exactly: the
run id comes from tracking.json (a run that never started is created), params and artifacts are
sent again, and only the (metric, step) pairs it lacks are logged. W&B and Comet keep their own
local copies for their own upload tools; TensorBoard is local files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

from lmforge.config import Config, config_to_dict, flatten, load_config, redacted_dict
from lmforge.errors import UserError
from lmforge.secrets import REDACTED, redact_text
from lmforge.tracking.base import (
    RUN_ARTIFACTS,
    TRACKING_FILE,
    RunInfo,
    read_points,
    run_tags,
    saved_ids,
    short_error,
)
from lmforge.tracking.mlflow import MlflowTracker

OFFLINE_HINTS = {
    "wandb": "W&B keeps its own copy: upload it with `wandb sync {run_dir}/wandb/<run directory>`",
    "comet": "Comet offline archives upload with `comet upload {run_dir}/comet/<key>.zip`",
    "tensorboard": "TensorBoard event files are local: nothing to sync",
}


def sync_run(run_dir: Path, overrides: Iterable[str], log: Callable[[str], None]) -> dict[str, int]:
    """Complete the MLflow run of `run_dir` from its metrics.jsonl; return {backend: values it holds}."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: not a run directory (it needs config.yaml and metrics.jsonl)")
    config = load_config(run_dir / "config.yaml", list(overrides))
    record = json.loads((run_dir / TRACKING_FILE).read_text()) if (run_dir / TRACKING_FILE).is_file() else {}
    status = record.get("status", "RUNNING")
    if status == "RUNNING":
        status = "KILLED"  # the process ended without finishing its tracking: killed or crashed
    if config.train.mirror:  # first: a tracker that fails must not keep the files from the mirror
        _sync_mirror(config, run_dir, status, log)
    held, lacking = {}, {}
    for name in config.tracking.backends:
        if name == "mlflow":
            held[name], lacking[name] = _sync_mlflow(config, run_dir, saved_ids(run_dir).get(name), status, log)
        elif name in OFFLINE_HINTS:
            log(f"{name}: " + OFFLINE_HINTS[name].format(run_dir=run_dir))
    if held:
        record = json.loads((run_dir / TRACKING_FILE).read_text()) if (run_dir / TRACKING_FILE).is_file() else record
        record.setdefault("backends", {})
        record.setdefault("status", status)
        for name in held:
            record["backends"].setdefault(name, {})["missing"] = lacking[name]
        (run_dir / TRACKING_FILE).write_text(json.dumps(record, indent=2))
    return held


def _sync_mlflow(config: Config, run_dir: Path, run_id: str | None, status: str, log) -> tuple[int, int]:
    """(metric values the MLflow run holds, values of metrics.jsonl it still lacks) after the sync."""
    settings = flatten(config_to_dict(config))
    redacted = [k for k, v in settings.items() if k.startswith("tracking.mlflow") and v == REDACTED]
    if redacted:
        raise UserError(
            f"{run_dir / 'config.yaml'}: {', '.join(redacted)} held a secret and was saved redacted; pass it "
            f"again (lmforge sync {run_dir} {redacted[0]}=...) or, better, put the credential in "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN"
        )
    tracker = MlflowTracker(RunInfo(config, run_dir, run_tags(config, run_dir)))
    step = _step_runner(tracker, log)
    step("start the run", lambda: tracker.start(run_id))
    if tracker.run_id is None:
        raise UserError(f"mlflow at {tracker.uri} refused to create the run; see the message above")
    if run_id is None:
        log(f"mlflow: the run never started; created run {tracker.run_id}")
        _record_id(run_dir, tracker.run_id)
    elif tracker.run_id != run_id:
        log(f"mlflow: {tracker.uri} has no run {run_id} (recorded on another machine); created run {tracker.run_id}")
        _record_id(run_dir, tracker.run_id)
    before = tracker.points()
    step("log the params", lambda: tracker.log_params(flatten(redacted_dict(config))))
    points = list(read_points(run_dir / "metrics.jsonl"))
    local = sum(len(metrics) for _, _, metrics in points)
    step("log the metrics", lambda: tracker.log_history(points))
    for name in RUN_ARTIFACTS:
        if (run_dir / name).is_file():
            step(f"upload {name}", lambda name=name: tracker.log_artifact(run_dir / name))
    if (run_dir / "final").is_dir():
        step("log the model", lambda: tracker.log_model(run_dir))
    step(f"set the status {status}", lambda: tracker.finish(status))
    log(
        f"mlflow: sent {tracker.points() - before} missing metric values; run {tracker.run_id} now holds "
        f"{tracker.points()} (metrics.jsonl: {local}), status {status}"
    )
    return tracker.points(), tracker.lacks(points)


def _sync_mirror(config: Config, run_dir: Path, status: str, log) -> None:
    """Copy to train.mirror whatever of the run directory it lacks (files already there unchanged
    are not sent again).

    Raises:
        UserError: the mirror cannot be reached or refuses a file; running sync again sends only
            what is still missing.
    """
    from lmforge.publish.mirror import MirrorTracker

    mirror = MirrorTracker(RunInfo(config, run_dir, {}))
    try:
        mirror.start(None)
        path = run_dir / TRACKING_FILE
        if path.is_file():  # the mirror is about to hold everything: no longer missing anything
            record = json.loads(path.read_text())
            record.get("backends", {}).get("mirror", {})["missing"] = 0
            path.write_text(json.dumps(record, indent=2))
        mirror.finish(status)
    except UserError as exc:
        raise UserError(f"train.mirror: {exc}. Run lmforge sync again: it sends only what is still missing") from None
    log(f"{mirror.where()}: holds the run directory")


def _step_runner(tracker: MlflowTracker, log: Callable[[str], None]) -> Callable[[str, Callable[[], object]], None]:
    """Runs one call of the sync: a call MLflow refuses for good is reported and skipped (the rest
    still goes); any other failure (server down, network) stops the sync with a message saying
    that running it again sends only what is still missing."""

    def step(what: str, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a message, never a traceback
            if tracker.rejects(exc):
                log(f"mlflow refused to {what}: {short_error(exc)}; skipped, the rest is sent")
                return
            raise UserError(
                f"mlflow at {redact_text(tracker.uri)} failed to {what}: {short_error(exc)}. Nothing is lost: "
                "run lmforge sync again when it is reachable; it sends only what is still missing"
            ) from None

    return step


def _record_id(run_dir: Path, run_id: str) -> None:
    path = run_dir / TRACKING_FILE
    record = json.loads(path.read_text()) if path.is_file() else {"status": "KILLED", "backends": {}}
    record["backends"].setdefault("mlflow", {})["run_id"] = run_id
    path.write_text(json.dumps(record, indent=2))
