"""The tracker interface, the local metrics.jsonl that is always written, and the fan-out.

metrics.jsonl is the source of truth. Other backends are best effort: an exception in one is
reported once and that backend is switched off, so tracking never stops training.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from lmforge.config import Config


class Tracker(Protocol):
    name: str

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""


class JsonlTracker:
    """One JSON object per logged point: {"step", "time", metric: value, ...}.

    On resume the file is cut back to the lines it had when the checkpoint was saved, so points
    logged after that checkpoint (and logged again by the resumed run) appear once.
    """

    name = "jsonl"

    def __init__(self, path: Path, keep_lines: int | None = None) -> None:
        self.path = path
        self.lines = 0
        if keep_lines is not None and path.is_file():
            kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep_lines]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
            self.lines = len(kept)
        elif path.is_file():
            self.lines = len(path.read_text(encoding="utf-8").splitlines())
        self._file = path.open("a", encoding="utf-8")

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass  # config.yaml in the run directory holds them

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        point = {"step": step, "time": round(time.time(), 3)}
        point.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._file.write(json.dumps(point) + "\n")
        self._file.flush()
        self.lines += 1

    def log_artifact(self, path: Path) -> None:
        pass  # it is already in the run directory

    def finish(self, status: str) -> None:
        self._file.close()


class Trackers:
    """Fans every call out to each tracker; a failing backend is reported once and dropped."""

    def __init__(self, trackers: list[Tracker], warn: Callable[[str], None]) -> None:
        self.trackers = trackers
        self.warn = warn

    def ids(self) -> dict[str, str]:
        """Run ids of the backends that have one, to continue the same runs on resume."""
        return {t.name: t.run_id for t in self.trackers if getattr(t, "run_id", None)}

    def position(self) -> int:
        """Points written to metrics.jsonl so far."""
        return next((t.lines for t in self.trackers if isinstance(t, JsonlTracker)), 0)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                self.warn(f"tracking: {tracker.name} failed in {method} ({exc!r}); it is off for this run")
                self.trackers.remove(tracker)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self._each("log_metrics", metrics, step)

    def log_artifact(self, path: Path) -> None:
        self._each("log_artifact", path)

    def finish(self, status: str) -> None:
        self._each("finish", status)

    def describe(self) -> list[str]:
        return [line for t in self.trackers if (line := getattr(t, "where", lambda: "")())]


def open_trackers(
    config: Config,
    run_dir: Path,
    warn: Callable[[str], None],
    resume_ids: dict[str, str] | None = None,
    keep_lines: int | None = None,
) -> Trackers:
    """metrics.jsonl plus every backend named in tracking.backends.

    Args:
        resume_ids: run ids saved in a checkpoint: those backends continue their runs.
        keep_lines: on resume, the metrics.jsonl lines that the checkpoint had seen.
    """
    from lmforge.tracking.mlflow import MlflowTracker

    builders: dict[str, Callable[..., Tracker]] = {"mlflow": MlflowTracker}
    trackers: list[Tracker] = [JsonlTracker(run_dir / "metrics.jsonl", keep_lines)]
    for name in config.tracking.backends:
        if name == "none":
            continue
        try:
            trackers.append(builders[name](config, run_dir, run_id=(resume_ids or {}).get(name)))
        except Exception as exc:  # noqa: BLE001
            warn(f"tracking: cannot start {name} ({exc!r}); training goes on without it")
    return Trackers(trackers, warn)
