"""The tracker interface, the local metrics.jsonl that is always written, and the fan-out.

metrics.jsonl is the source of truth: it is written synchronously, and resume and `lmforge sync`
read it. Every other backend sits behind a `Channel`, a queue drained by its own thread, so a slow
or dead server never blocks a training step: a failure is reported once, the calls stay queued
and are retried with backoff, and at the end of the run lmforge says which backends are still
missing points. `lmforge sync RUN` replays them from metrics.jsonl later.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lmforge
from lmforge import malloc
from lmforge.config import Config, flatten, redacted_dict
from lmforge.secrets import redact, redact_text

RUN_ARTIFACTS = (
    "config.yaml",
    "data_report.json",
    "eval.json",
    "examples.jsonl",
    "metrics.jsonl",
    "predictions.jsonl",
    "final/README.md",
)
"""The files of a finished run that every backend receives (those it has), relative to the run directory."""
TRACKING_FILE = "tracking.json"
"""Per run directory: each backend's run id and whether it received every point."""


class Tracker(Protocol):
    """A tracking backend. Calls come from one thread, in order. An exception means "retry later",
    unless the backend's optional `rejects(exc) -> bool` says the backend refused the call for
    good (a name it does not allow): then the call is dropped and reported, and the others go on.
    A backend that can tell which points it holds has `lacks(points) -> int`; the values of
    metrics.jsonl it lacks are what tracking.json reports missing, and `reconcile(points)` sends
    them (on resume)."""

    name: str

    def start(self, run_id: str | None) -> str | None:
        """Create a run, or continue `run_id`; return the run's id (None if the backend has none)."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: float) -> None:
        """timestamp: when the point was measured (seconds); delivery may come later."""

    def log_artifact(self, path: Path) -> None: ...

    def finish(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""


@dataclass
class RunInfo:
    """What a backend is built from."""

    config: Config
    run_dir: Path
    tags: dict[str, str]
    resume_step: int | None = None
    """On resume, the step of the checkpoint: points after it are logged again."""


def run_tags(config: Config, run_dir: Path, project_dir: Path | None = None) -> dict[str, str]:
    """Tags every backend puts on the run: versions, host, git commit, study and the user's tags."""
    tags = {
        "lmforge.version": lmforge.__version__,
        "lmforge.run_dir": str(run_dir.resolve()),
        "host": platform.node(),
        "lmforge.malloc": malloc.active(),  # tcmalloc or not changes CPU speed (lmforge.malloc)
    }
    tags.update(git_state(project_dir or Path.cwd()))
    if config.tracking.study:
        tags["lmforge.study"] = config.tracking.study
    tags.update(config.tracking.tags)
    return redact(tags)


def git_state(directory: Path) -> dict[str, str]:
    """git.commit and git.dirty of the repository holding `directory`; empty outside one."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return {}
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {"git.commit": commit.stdout.strip(), "git.dirty": str(bool(status.stdout.strip())).lower()}


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

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp: float) -> None:
        point = {"step": step, "time": round(timestamp, 3)}
        point.update({k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()})
        self._file.write(json.dumps(point) + "\n")
        self._file.flush()
        self.lines += 1

    def finish(self, status: str) -> None:
        self._file.close()


def read_points(path: Path) -> Iterator[tuple[int, float, dict[str, float]]]:
    """(step, time, metrics) of every line of a metrics.jsonl."""
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            point = json.loads(line)
            step, stamp = point.pop("step"), point.pop("time")
            yield step, stamp, {k: float(v) for k, v in point.items()}


def short_error(exc: BaseException, limit: int = 240) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Rejected(Exception):
    """A call a backend refused for good: retrying it would fail the same way."""


class Channel:
    """One backend behind a queue and a worker thread.

    Calls are queued and delivered in order. When one fails, the error is shown once, the call
    stays at the head of the queue and is retried with exponential backoff (up to `max_backoff`
    seconds), and training goes on. At most `capacity` calls are kept; beyond that the oldest
    metric points are dropped from memory (metrics.jsonl still has them).
    """

    def __init__(
        self,
        tracker: Tracker,
        warn: Callable[[str], None],
        on_start: Callable[[], None],
        capacity: int = 100_000,
        max_backoff: float = 30.0,
    ) -> None:
        self.tracker = tracker
        self.name = tracker.name
        self.run_id: str | None = None
        self.started = False
        self.failing: str | None = None
        """The last error while the backend is failing; None while it works."""
        self.dropped = 0
        """Metric values dropped from a full queue."""
        self.rejected: list[str] = []
        """Calls the backend refused for good (each dropped), as method: error."""
        self._refused_start = False
        self._warn, self._on_start = warn, on_start
        self._calls: deque[tuple[str, tuple]] = deque()
        self._capacity, self._max_backoff = capacity, max_backoff
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._work, name=f"lmforge-tracking-{self.name}", daemon=True)
        self._thread.start()

    def put(self, method: str, *args: Any) -> None:
        if method != "start" and not hasattr(self.tracker, method):
            return
        with self._cond:
            if len(self._calls) >= self._capacity:
                self._drop_oldest_metrics()
            self._calls.append((method, args))
            self._cond.notify()

    def _drop_oldest_metrics(self) -> None:
        for i, (method, args) in enumerate(self._calls):
            if method == "log_metrics":
                self.dropped += len(args[0])
                del self._calls[i]
                return

    def _work(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._calls:
                    self._busy = False
                    self._cond.notify_all()
                    self._cond.wait()
                method, args = self._calls[0]
                self._busy = True
            try:
                if self._refused_start:
                    raise Rejected("no run: the backend refused to create it")
                result = getattr(self.tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                if isinstance(exc, Rejected) or getattr(self.tracker, "rejects", lambda _: False)(exc):
                    self._reject(method, args, exc)
                    continue
                if self.failing is None:
                    self._warn(
                        f"tracking: {self.name} failed in {method} ({short_error(exc)}); training goes on, "
                        + getattr(
                            self.tracker, "keeps", "its points are kept and retried, and metrics.jsonl has them all"
                        )
                    )
                self.failing = short_error(exc)
                time.sleep(backoff)  # not woken by new calls: each retry may cost a network timeout
                backoff = min(backoff * 2, self._max_backoff)
                continue
            if self.failing is not None:
                self._warn(f"tracking: {self.name} works again; sending the calls it missed")
            self.failing, backoff = None, 0.5
            with self._cond:
                self._calls.popleft()
            if method == "start":
                self.run_id, self.started = result, True
                try:
                    self._on_start()
                except OSError as exc:
                    self._warn(f"tracking: cannot record the {self.name} run id ({exc!r})")

    def _reject(self, method: str, args: tuple, exc: Exception) -> None:
        """Drop a call the backend refused for good; report it, and go on with the next."""
        if not isinstance(exc, Rejected) or not self._refused_start:
            self.rejected.append(f"{method}: {short_error(exc)}")
            self._warn(
                f"tracking: {self.name} refused {method} ({short_error(exc)}); that call is dropped and the "
                "others go on (retrying cannot help: fix the name or value it names)"
            )
        if method == "log_metrics":
            self.dropped += len(args[0])
        self._refused_start = self._refused_start or method == "start"
        self.failing = None
        with self._cond:
            self._calls.popleft()

    def missing(self) -> int:
        """Metric values not delivered (queued or dropped)."""
        with self._cond:
            queued = sum(len(args[0]) for method, args in self._calls if method == "log_metrics")
        return queued + self.dropped

    def pending(self) -> int:
        """Calls not delivered yet."""
        with self._cond:
            return len(self._calls)

    def close(self, timeout: float) -> bool:
        """Wait until every queued call is delivered; give up after `timeout` seconds in which the
        backend kept failing (a healthy backend gets all the time it needs: large artifacts).
        True when everything was delivered."""
        failing_since: float | None = None
        with self._cond:
            while self._calls or self._busy:
                if self.failing is None:
                    failing_since = None
                elif failing_since is None:
                    failing_since = time.monotonic()
                elif time.monotonic() - failing_since > timeout:
                    return False
                self._cond.wait(timeout=0.2)
        return True


class Trackers:
    """metrics.jsonl, written at once, plus one channel per backend. `None` local file: a process
    other than the main one, which logs nothing (one job is one run)."""

    def __init__(
        self,
        local: JsonlTracker | None,
        backends: list[Tracker],
        run_dir: Path | None,
        warn: Callable[[str], None],
        resume_ids: Mapping[str, str] | None = None,
        flush_timeout: float = 30.0,
    ) -> None:
        self.local = local
        self.run_dir = run_dir
        self.warn = lambda message: warn(redact_text(message))
        self.flush_timeout = flush_timeout
        self._lock = threading.Lock()
        self.channels = [Channel(tracker, self.warn, self._record) for tracker in backends]
        for channel in self.channels:
            channel.put("start", (resume_ids or {}).get(channel.name))

    def ids(self) -> dict[str, str]:
        """Run ids of the backends that have one, to continue the same runs on resume."""
        return {c.name: c.run_id for c in self.channels if c.run_id}

    def position(self) -> int:
        """Points written to metrics.jsonl so far."""
        return self.local.lines if self.local else 0

    def log_params(self, params: Mapping[str, Any]) -> None:
        params = redact(dict(params))
        for channel in self.channels:
            channel.put("log_params", params)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self.local is None:
            return
        now = time.time()
        self.local.log_metrics(metrics, step, now)
        for channel in self.channels:
            channel.put("log_metrics", dict(metrics), step, now)

    def log_artifact(self, path: Path) -> None:
        for channel in self.channels:
            channel.put("log_artifact", path)

    def reconcile(self) -> None:
        """Send each backend that can tell what it holds the points of metrics.jsonl it lacks (a
        resumed run whose backend was unreachable, or still had calls queued, when it stopped)."""
        if self.local is None or not self.local.path.is_file():
            return
        points = list(read_points(self.local.path))
        for channel in self.channels:
            channel.put("reconcile", points)

    def log_checkpoint(self, path: Path) -> None:
        """A complete checkpoint, for backends that copy them (the mirror, `train.mirror`)."""
        for channel in self.channels:
            channel.put("log_checkpoint", path)

    def log_model(self, run_dir: Path) -> None:
        """The finished run's model, for backends that log models (MLflow)."""
        for channel in self.channels:
            channel.put("log_model", run_dir)

    def finish(self, status: str) -> dict[str, int]:
        """End every run with `status`; return the backends still missing points, and how many."""
        if self.local is not None:
            self.local.finish(status)
        for channel in self.channels:
            channel.put("finish", status)
        missing = {}
        points = list(read_points(self.local.path)) if self.local is not None and self.local.path.is_file() else []
        for channel in self.channels:
            delivered = channel.close(self.flush_timeout)
            lacks = getattr(channel.tracker, "lacks", None)
            count = lacks(points) if lacks is not None and channel.started else channel.missing()
            what = "metric values"
            files = hasattr(channel.tracker, "log_checkpoint")  # a backend of files: the mirror
            if files and not count and (not delivered or channel.rejected):
                count, what = max(channel.pending(), len(channel.rejected), 1), "uploads"
            if not count:
                continue
            missing[channel.name] = count
            why = "it is still failing" if not delivered else "it refused calls"
            detail = f" ({channel.failing})" if not delivered else ""
            has = "metrics.jsonl has them all" if what == "metric values" else "the run directory has everything"
            self.warn(
                f"tracking: {why}{detail}: {channel.name} is missing {count} {what}; {has}: run "
                f"`lmforge sync {self.run_dir}`" + (f" when {channel.name} is back" if not delivered else "")
            )
        self._record(status=status, missing=missing)
        for channel in self.channels:  # the mirror's tracking.json says how the run ended
            if hasattr(channel.tracker, "log_checkpoint") and channel.name not in missing and self.run_dir:
                channel.put("log_artifact", self.run_dir / TRACKING_FILE)
                channel.close(self.flush_timeout)
        return missing

    def _record(self, status: str = "RUNNING", missing: Mapping[str, int] | None = None) -> None:
        """Write tracking.json: run ids, status, and what each backend is missing."""
        if self.run_dir is None:
            return
        with self._lock:
            path = self.run_dir / TRACKING_FILE
            old = json.loads(path.read_text()) if path.is_file() else {}
            backends = old.get("backends", {})
            for channel in self.channels:
                entry = backends.setdefault(channel.name, {})
                entry["run_id"] = channel.run_id or entry.get("run_id")
                if missing is not None:
                    entry["missing"] = missing.get(channel.name, 0)
                    if channel.rejected:
                        entry["rejected"] = channel.rejected
            record = {"status": status if missing is not None else old.get("status", status), "backends": backends}
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=2))
            os.replace(tmp, path)

    def describe(self) -> list[str]:
        lines = [getattr(c.tracker, "where", lambda: "")() for c in self.channels if c.started]
        return [redact_text(line) for line in lines if line]


def saved_ids(run_dir: Path) -> dict[str, str]:
    """Backend run ids recorded in a run directory's tracking.json."""
    path = run_dir / TRACKING_FILE
    if not path.is_file():
        return {}
    backends = json.loads(path.read_text()).get("backends", {})
    return {name: entry["run_id"] for name, entry in backends.items() if entry.get("run_id")}


def open_backend(name: str, info: RunInfo) -> Tracker:
    """The backend called `name` (constructed only; it starts in its channel's thread)."""
    from lmforge.tracking.comet import CometTracker
    from lmforge.tracking.mlflow import MlflowTracker
    from lmforge.tracking.tensorboard import TensorboardTracker
    from lmforge.tracking.wandb import WandbTracker

    builders: dict[str, Callable[[RunInfo], Tracker]] = {
        "mlflow": MlflowTracker,
        "wandb": WandbTracker,
        "comet": CometTracker,
        "tensorboard": TensorboardTracker,
    }
    return builders[name](info)


def open_trackers(
    config: Config,
    run_dir: Path,
    warn: Callable[[str], None],
    resume_ids: Mapping[str, str] | None = None,
    keep_lines: int | None = None,
    resume_step: int | None = None,
    main_process: bool = True,
    project_dir: Path | None = None,
) -> Trackers:
    """metrics.jsonl plus every backend named in tracking.backends; on a new run, the config
    (redacted) is logged as params.

    Args:
        resume_ids: backend run ids of the run being resumed: those runs continue.
        keep_lines: on resume, the metrics.jsonl lines that the checkpoint had seen.
        resume_step: on resume, the checkpoint's step.
        main_process: False in the other processes of a distributed job, which log nothing.
        project_dir: where to look for the git commit of the project being trained.
    """
    if not main_process:
        return Trackers(None, [], None, warn)
    info = RunInfo(config, run_dir, run_tags(config, run_dir, project_dir), resume_step)
    names = [name for name in config.tracking.backends if name != "none"]
    backends = [open_backend(name, info) for name in names]
    if config.train.mirror:
        from lmforge.publish.mirror import MirrorTracker

        backends.append(MirrorTracker(info))
    trackers = Trackers(
        JsonlTracker(run_dir / "metrics.jsonl", keep_lines),
        backends,
        run_dir,
        warn,
        resume_ids,
        config.tracking.flush_timeout,
    )
    trackers.log_params(flatten(redacted_dict(config)))  # on resume, backends keep the values they have
    if keep_lines is not None:  # resumed: each backend gets what metrics.jsonl has and it lacks
        trackers.reconcile()
    return trackers
