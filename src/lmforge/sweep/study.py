"""The sweep's Optuna study: its storage, sampler and pruner, and the rules that let many workers
share it: one trial handed out at a time, leases that show who runs what, and stale trials put
back in the queue so that whoever asks next resumes them.

An interrupted trial is not failed: it goes back to Optuna's WAITING state with its parameters,
and `Study.ask` hands out WAITING trials before it creates new ones, atomically (the storage
refuses a second WAITING -> RUNNING). Its run directory holds its checkpoints, so it continues.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from lmforge.config import flatten, redacted_dict
from lmforge.errors import UserError
from lmforge.sweep.spec import LoadedSpec, Pruner, SweepSpec, decode_choice, encode_choice, shown_url, storage_problem

JOURNAL = "study.journal"
"""The default storage: Optuna's journal file, safe for several processes on one machine (unlike
SQLite, which reports "database is locked" under concurrent workers)."""
LEASE = "lmforge.lease"
"""Trial user attribute: {host, pid, child, beat} of the worker running it."""
RUN_DIR = "lmforge.run_dir"
"""Trial user attribute: the trial's run directory, relative to the sweep directory."""
REASON = "lmforge.reason"
"""Trial user attribute: why a trial failed or was interrupted, or what was done about it."""


def open_storage(url: str | None, sweep_dir: Path) -> BaseStorage:
    """A sweep's storage: `url` (spec.storage) a PostgreSQL database, or None for a journal file in
    the sweep directory.

    Raises:
        UserError: a URL with a password in it, a missing driver, or a server that cannot be reached.
    """
    if url is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(sweep_dir / JOURNAL)))
    from sqlalchemy.exc import SQLAlchemyError

    problem = storage_problem(url)
    if problem:
        raise UserError(f"storage: {problem}")
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except ModuleNotFoundError as exc:
        raise UserError(
            f"storage {shown_url(url)}: {exc.name} is not installed: pip install 'lmforge[postgres]'"
        ) from None
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise UserError(f"storage {shown_url(url)}: cannot open it: {reason}") from None


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler without its `study.stop()` after the last point, which only works
    inside `Study.optimize`: a sweep hands out trials itself and ends a grid at its size."""

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001 - Optuna's signature
        return None


def sampler_for(spec: SweepSpec, trials: int = 0) -> optuna.samplers.BaseSampler:
    """Optuna's sampler for spec.method, seeded with spec.seed + `trials` (the trials the study
    has; a grid with spec.seed): a sampler is made anew for each trial, so that a continued sweep, a second worker or
    another machine draws what one uninterrupted process would, never the first draws again (a
    sampler seeded once per process repeats its sequence in each). Optuna's samplers keep their
    state in the study (TPE's history, CMA-ES's optimizer), not in the object."""
    seed = spec.seed + trials
    if spec.method == "grid":  # its seed shuffles the grid once; trial n takes point n of that order
        space = {key: [encode_choice(v) for v in p.choices()] for key, p in spec.parameters.items()}
        return GridSampler(space, seed=spec.seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.method == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed)


def pruner_for(pruner: Pruner, eval_every: int | None) -> optuna.pruners.BasePruner:
    """Optuna's pruner for spec.pruner; `eval_every` (the base config's) is hyperband's and ASHA's
    default minimum resource. Warmup (pruner.warmup_evals) is applied by the trial."""
    min_resource = pruner.min_resource or eval_every or 1
    if pruner.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=pruner.startup_trials, n_warmup_steps=0)
    if pruner.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=min_resource, reduction_factor=pruner.reduction_factor)
    if pruner.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_resource, reduction_factor=pruner.reduction_factor
        )
    return optuna.pruners.NopPruner()


SWEEP_SAFE = (
    "name",
    "output_dir",
    "data.cache_dir",
    "data.num_proc",
    "data.prefetch",
    "train.log_every",
    "train.save_every",
    "train.keep_last",
    "train.max_time",
    "train.num_threads",
    "eval.generate.",
    "tracking.",
)
"""Base-config settings a continued sweep may change: none of them changes a trial's metric."""


def search_record(loaded: LoadedSpec) -> dict[str, Any]:
    """What a continued sweep must keep, flat: the spec's space, method, seed and metric, and every
    base-config setting (with the fixed overrides) that changes a trial's metric."""
    spec = loaded.spec
    record: dict[str, Any] = {f"parameters.{k}": p.model_dump(exclude_none=True) for k, p in spec.parameters.items()}
    record.update(method="tpe" if spec.method == "bayes" else spec.method, seed=spec.seed)
    record.update({"metric.name": spec.metric.name, "metric.goal": spec.metric.goal})
    for key, value in flatten(redacted_dict(loaded.base)).items():
        if not any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SWEEP_SAFE):
            record[f"base {key}"] = value
    return json.loads(json.dumps(record, default=str))


SEARCH = "lmforge.search"
"""Study user attribute: `search_record` of the sweep when it started; a continued sweep must keep it."""


def open_study(loaded: LoadedSpec, storage: BaseStorage, create: bool = True) -> optuna.Study:
    """Create the sweep's study, or load it to continue; refuse a continuation that changed the search.

    Raises:
        UserError: the study does not exist and `create` is False (a --worker joining too early),
            or it was started with other parameters, method, seed or metric.
    """
    spec = loaded.spec
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if spec.name not in names and not create:
        raise UserError(f"no sweep named {spec.name!r} in its storage yet: start it with `lmforge sweep SPEC` first")
    direction = "minimize" if spec.metric.goal == "minimize" else "maximize"
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        sampler=sampler_for(spec),
        pruner=pruner_for(spec.pruner, loaded.base.train.eval_every),
        direction=direction,
        load_if_exists=True,
    )
    expected = search_record(loaded)
    recorded = study.user_attrs.get(SEARCH)
    if not isinstance(recorded, dict):  # a new study (or one without the record)
        study.set_user_attr(SEARCH, expected)
    elif recorded != expected:
        changed = [
            f"{key}: {json.dumps(recorded.get(key))} -> {json.dumps(expected.get(key))}"
            for key in sorted(set(recorded) | set(expected))
            if recorded.get(key) != expected.get(key)
        ]
        raise UserError(
            f"the sweep {spec.name!r} was started with other settings, and its trials would not compare with new "
            f"ones: {'; '.join(changed)}. Restore them, or start a new sweep (name=...)"
        )
    return study


@contextmanager
def handing_out(study: optuna.Study, sweep_dir: Path) -> Iterator[None]:
    """Hold the study's hand-out lock: counting trials, putting stale ones back and asking for the
    next happen as one step across all workers, so that max_trials is exact and a grid point is
    never handed out twice. A file lock in the sweep directory; a PostgreSQL advisory lock when the
    study is shared through PostgreSQL."""
    storage = study._storage
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        from sqlalchemy import text

        key = int.from_bytes(hashlib.sha256(study.study_name.encode()).digest()[:8], "big", signed=True)
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                connection.commit()
        return
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with (sweep_dir / ".hand-out.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def suggest(trial: optuna.Trial, spec: SweepSpec) -> dict[str, Any]:
    """The trial's value for every parameter (a resumed trial gets the values it had)."""
    values = {}
    for key, p in spec.parameters.items():
        if p.values is not None:
            raw = trial.suggest_categorical(key, [encode_choice(v) for v in p.values])
            values[key] = decode_choice(p, raw)
        elif p.distribution in ("int_uniform", "log_int_uniform"):
            step = int(p.step or 1)
            values[key] = trial.suggest_int(
                key, int(p.min), int(p.max), step=step, log=p.distribution.startswith("log")
            )
        else:
            values[key] = trial.suggest_float(key, p.min, p.max, step=p.step, log=p.distribution == "log_uniform")
    return values


def decoded_params(trial: FrozenTrial, spec: SweepSpec) -> dict[str, Any]:
    return {k: decode_choice(spec.parameters[k], v) if k in spec.parameters else v for k, v in trial.params.items()}


# ------------------------------------------------------------------------------- leases


def lease(child: int | None) -> dict[str, Any]:
    """This worker's claim on a trial: host, worker pid, the trial's process, and the time."""
    return {"host": platform.node(), "pid": os.getpid(), "child": child, "beat": time.time()}


def stale_reason(trial: FrozenTrial, timeout: float, now: float | None = None) -> str | None:
    """Why a RUNNING trial has nobody running it, or None while someone does.

    On this host a lease is stale once both the worker and its trial process are gone (the trial
    process stops on its own when its worker dies, after its checkpoint). Elsewhere, when the
    heartbeat is older than `timeout` seconds.
    """
    now = time.time() if now is None else now
    held = trial.user_attrs.get(LEASE)
    if held is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        return "its worker stopped before starting it" if now - started > timeout else None
    age = now - held["beat"]
    if held["host"] == platform.node():
        alive = [p for p in (held["pid"], held.get("child")) if p and _alive(p)]
        if not alive:
            return f"its worker (pid {held['pid']}) and trial process are gone"
    if age > timeout:
        return f"no heartbeat from {held['host']} (pid {held['pid']}) for {age:.0f} s"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ")[-1][:1] != "Z"  # a zombie is gone, only not yet reaped
    except OSError:
        return True


def requeue_stale(study: optuna.Study, timeout: float, log) -> list[int]:
    """Put every RUNNING trial that nobody runs back in the queue (WAITING). Call it while
    `handing_out`. Returns their numbers."""
    numbers = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, timeout)
        if reason is None:
            continue
        storage = study._storage
        storage.set_trial_user_attr(trial._trial_id, REASON, f"interrupted: {reason}")
        storage.set_trial_user_attr(trial._trial_id, LEASE, None)
        if storage.set_trial_state_values(trial._trial_id, TrialState.WAITING):
            numbers.append(trial.number)
            log(f"trial {trial.number} was left running ({reason}): it resumes from its newest checkpoint, if any")
    return numbers


def release(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Hand a paused trial back to the queue, to be resumed by whoever asks next."""
    storage = study._storage
    storage.set_trial_user_attr(trial_id, LEASE, None)
    storage.set_trial_user_attr(trial_id, REASON, reason)
    storage.set_trial_state_values(trial_id, TrialState.WAITING)
