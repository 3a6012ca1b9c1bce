"""`lmforge sweep`: hand out trials, run each as its own process, record what happened.

A worker (this process) keeps up to N trial processes running. It asks the study for a trial
(a paused or stale one first, else a new one while max_trials allows), writes the trial's config,
starts `python -m lmforge.sweep.trial`, renews the trial's lease while it runs, and tells the study
how it ended. Ctrl-C or SIGTERM pauses every trial at a step boundary (each checkpoints) and puts
it back in the queue; running the same command again resumes it from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from rich.console import Console
from rich.markup import escape

from lmforge.config import Config, dump_yaml, load_config
from lmforge.errors import ConfigError, UserError
from lmforge.sweep.results import ADJUSTED, BEST_STEP, SECONDS, best_trial, leaderboard, short_value, write_results
from lmforge.sweep.spec import LoadedSpec, as_override
from lmforge.sweep.study import (
    JOURNAL,
    LEASE,
    REASON,
    RUN_DIR,
    handing_out,
    lease,
    open_storage,
    open_study,
    release,
    requeue_stale,
    sampler_for,
    stale_reason,
    suggest,
)
from lmforge.sweep.trial import OUTCOME, TRIAL_CONFIG, TRIAL_CONTEXT

KILLS = "lmforge.kills"
"""Trial user attribute: how often its process was killed from outside the sweep."""
MAX_KILLS = 3
"""A trial killed this often (not by its sweep) fails instead of resuming again."""
RETRIED = "lmforge.retried"
"""Trial user attribute: what a retry changed, and why (out of memory)."""
HEARTBEAT = 10.0
"""Seconds between lease renewals (and checks for stale trials of other workers)."""
PARENT = "lmforge.mlflow_parent_run"
"""Study user attribute: the MLflow run the trials' runs are nested under."""


@dataclass
class Running:
    number: int
    trial_id: int
    trial_dir: Path
    process: subprocess.Popen
    started: float
    params: dict[str, Any]
    slot: int
    """Which of the worker's N places it holds (its GPU, when there are several)."""
    oom_kills: int | None = field(default_factory=lambda: out_of_memory_kills())
    """The kernel's out-of-memory kill count when it started."""


@dataclass
class Worker:
    loaded: LoadedSpec
    study: optuna.Study
    console: Console
    slots: int
    parent_run: str | None = None
    running: dict[int, Running] = field(default_factory=dict)
    stopping: str | None = None
    """SIGINT or SIGTERM once the sweep was asked to stop."""
    given_up: str | None = None
    """Why the sweep stopped handing out trials (the same failure again and again)."""
    same_failures: list[str] = field(default_factory=list)
    last_beat: float = 0.0
    warned_shared: bool = False
    devices: list[str] | None = None
    """The GPUs the trials share out, one per slot (`gpus_for`)."""

    # ---------------------------------------------------------------- handing out and starting

    def claim(self) -> tuple[optuna.Trial, dict[str, Any]] | None:
        """The next trial for this worker, or None when the sweep has handed out all it may."""
        study = self.study
        with handing_out(study, self.loaded.sweep_dir):
            requeue_stale(study, self.loaded.spec.lease_timeout, self.say)
            trials = study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and len(trials) >= self.loaded.spec.trial_budget():
                return None
            study.sampler = sampler_for(self.loaded.spec, len(trials))
            trial = study.ask()
            params = suggest(trial, self.loaded.spec)
            study._storage.set_trial_user_attr(trial._trial_id, LEASE, lease(None))
        return trial, params

    def start(self, trial: optuna.Trial, params: dict[str, Any]) -> None:
        storage, number = self.study._storage, trial.number
        attrs = storage.get_trial(trial._trial_id).user_attrs
        name = attrs.get(RUN_DIR) or f"trial-{number:04d}"
        trial_dir = self.loaded.sweep_dir / name
        if RUN_DIR not in attrs:
            storage.set_trial_user_attr(trial._trial_id, RUN_DIR, name)
        if not (trial_dir / TRIAL_CONFIG).is_file():
            try:
                config = trial_config(self.loaded, params, number, self.parent_run, attrs.get(ADJUSTED, []))
            except ConfigError as exc:
                problems = "; ".join(exc.problems)
                self.fail(number, trial._trial_id, f"the sampled values make an invalid config: {problems}")
                return
            self.write_trial_files(trial_dir, config, trial._trial_id)
        resumed = (trial_dir / "checkpoints").is_dir()
        slot = self.free_slot()
        process = self.spawn(trial_dir, slot)
        storage.set_trial_user_attr(trial._trial_id, LEASE, lease(process.pid))
        self.running[number] = Running(number, trial._trial_id, trial_dir, process, time.time(), params, slot)
        if self.stopping:  # Ctrl-C came while it was being started: it pauses too
            process.send_signal(signal.SIGTERM)
        shown = escape(" ".join(f"{k}={short_value(v, None)}" for k, v in params.items()))
        how = "resumes from its checkpoint" if resumed else "starts"
        gpu = f" on GPU {self.devices[slot % len(self.devices)]}" if self.devices and len(self.devices) > 1 else ""
        self.say(f"trial {number} {how}{gpu}: {shown}  [dim]({escape(str(trial_dir / 'train.log'))})[/dim]")

    def write_trial_files(self, trial_dir: Path, config: Config, trial_id: int) -> None:
        trial_dir.mkdir(parents=True, exist_ok=True)
        (trial_dir / TRIAL_CONFIG).write_text(dump_yaml(config))
        spec = self.loaded.spec
        context = {
            "study": spec.name,
            "storage": spec.storage,
            "sweep_dir": str(self.loaded.sweep_dir.resolve()),
            "trial_id": trial_id,
            "metric": spec.metric.name,
            "goal": spec.metric.goal,
            "pruner": spec.pruner.model_dump(),
            "eval_every": self.loaded.base.train.eval_every,
        }
        (trial_dir / TRIAL_CONTEXT).write_text(json.dumps(context, indent=2))

    def others_here(self) -> int:
        """RUNNING trials of other live sweep processes on this machine (they share its CPUs)."""
        here, count = platform.node(), 0
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            held = trial.user_attrs.get(LEASE)
            if held and held["host"] == here and held["pid"] != os.getpid() and stale_reason(trial, 1e9) is None:
                count += 1
        return count

    def free_slot(self) -> int:
        taken = {run.slot for run in self.running.values()}
        return min(set(range(self.slots)) - taken)

    def spawn(self, trial_dir: Path, slot: int) -> subprocess.Popen:
        """The trial's process, in its own session (a Ctrl-C reaches it through this worker only),
        with its share of the CPU threads and, given several GPUs, its own."""
        (trial_dir / OUTCOME).unlink(missing_ok=True)
        env = dict(os.environ)
        others = self.others_here()
        threads = _threads_per_trial(self.slots + others)
        if others and not self.warned_shared:
            self.warned_shared = True
            self.say(
                f"[yellow]{others} trial(s) of another sweep process run on this machine: each trial started here "
                f"gets {threads} CPU thread(s), but theirs keep what they had. One `lmforge sweep --workers N` per "
                "machine shares the CPUs evenly[/yellow]"
            )
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        devices = self.devices if self.devices is not None else []
        if len(devices) > 1:
            env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
        log = (trial_dir / "train.log").open("a", encoding="utf-8")
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} starts this trial ====\n")
        log.flush()
        with log:
            return subprocess.Popen(
                [sys.executable, "-m", "lmforge.sweep.trial", str(trial_dir), str(os.getpid())],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )

    # ---------------------------------------------------------------- watching and ending

    def watch(self) -> None:
        """Wait a moment; end the trials whose process exited; renew leases."""
        time.sleep(0.2)
        for number, run in list(self.running.items()):
            code = run.process.poll()
            if code is not None:
                del self.running[number]
                self.end(run, code)
        if time.time() - self.last_beat >= HEARTBEAT:
            self.beat()

    def beat(self) -> None:
        self.last_beat = time.time()
        storage = self.study._storage
        for number, run in list(self.running.items()):
            if storage.get_trial(run.trial_id).state != TrialState.RUNNING:  # another worker took it over
                self.say(f"[yellow]trial {number} was taken over by another worker; stopping it here[/yellow]")
                run.process.terminate()
                run.process.wait()
                del self.running[number]
                continue
            storage.set_trial_user_attr(run.trial_id, LEASE, lease(run.process.pid))

    def end(self, run: Running, code: int) -> None:
        storage = self.study._storage
        outcome = _read_outcome(run.trial_dir, code, run.oom_kills)
        attrs = storage.get_trial(run.trial_id).user_attrs
        storage.set_trial_user_attr(run.trial_id, SECONDS, attrs.get(SECONDS, 0.0) + time.time() - run.started)
        state = outcome["state"]
        if outcome.get("best_step") is not None:
            storage.set_trial_user_attr(run.trial_id, BEST_STEP, outcome["best_step"])
        metric = self.loaded.spec.metric.name
        killed = state == "paused" and not (run.trial_dir / OUTCOME).is_file() and not self.stopping
        kills = attrs.get(KILLS, 0) + killed
        if killed:
            storage.set_trial_user_attr(run.trial_id, KILLS, kills)
        if state == "paused" and kills >= MAX_KILLS:
            state, outcome = "failed", {"reason": f"{outcome['reason']}, {kills} times; it is not resumed again"}
        if state == "paused":
            why = f"the sweep got {self.stopping}" if self.stopping else outcome.get("reason")
            release(self.study, run.trial_id, f"paused ({why})")
            if self.stopping:
                self.say(f"trial {run.number} paused; it resumes from its newest checkpoint when the sweep runs again")
            else:  # stopped from outside the sweep: resumed at once
                self.say(
                    f"trial {run.number} was stopped ({escape(why)}); it resumes from its newest checkpoint, if any"
                )
        elif state == "complete":
            storage.set_trial_user_attr(run.trial_id, REASON, attrs.get(RETRIED, ""))
            self.tell(run.number, outcome["value"])
            self.same_failures.clear()
            self.say(
                f"trial {run.number} complete: {escape(metric)} {outcome['value']:.5g} (step {outcome['best_step']})"
            )
        elif state == "pruned":
            storage.set_trial_user_attr(run.trial_id, REASON, f"pruned at step {outcome.get('step')}")
            self.tell(run.number, state=TrialState.PRUNED)
            self.same_failures.clear()
            self.say(f"trial {run.number} pruned at step {outcome.get('step')}")
        elif outcome.get("oom") and self.retry_smaller(run, attrs, outcome["reason"]):
            return
        else:
            self.fail(run.number, run.trial_id, outcome["reason"])
            if not (run.trial_dir / OUTCOME).is_file():
                end_tracking(run.trial_dir, "FAILED")
        write_results(self.study, self.loaded)

    def fail(self, number: int, trial_id: int, reason: str) -> None:
        self.study._storage.set_trial_user_attr(trial_id, REASON, reason)
        self.tell(number, state=TrialState.FAIL)
        self.say(f"[red]trial {number} failed[/red]: {escape(reason)}")
        self.same_failures.append(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", reason)[:300])
        limit = self.loaded.spec.max_same_failures
        if len(self.same_failures) >= limit and len(set(self.same_failures[-limit:])) == 1:
            self.given_up = (
                f"{limit} trials in a row failed with the same error ({reason}); the sweep stops here instead of "
                "spending its budget on it. A fix outside the sweep's settings (data, environment): run the same "
                "command, finished trials are kept. A fix that changes the search or the base config: start a new "
                "sweep (name=...)"
            )

    def tell(self, number: int, value: float | None = None, state: TrialState | None = None) -> None:
        """Optuna's tell; a trial another worker took over meanwhile (this one's lease had lapsed) is
        theirs to tell, and this is said instead of stopping the sweep."""
        try:
            self.study.tell(number, value, state=state)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError) as exc:
            self.say(
                f"[yellow]trial {number}: not recorded here ({escape(str(exc))}); another worker holds it[/yellow]"
            )

    def retry_smaller(self, run: Running, attrs: dict[str, Any], reason: str) -> bool:
        """Out of memory: run the trial again, once, with micro_batch_size halved and grad_accum
        doubled (the same effective batch). False when it was retried already or cannot shrink."""
        config = load_config(run.trial_dir / TRIAL_CONFIG)
        micro, accum = config.train.micro_batch_size, config.train.grad_accum
        if not self.loaded.spec.retry_oom or attrs.get(ADJUSTED) or micro < 2:
            return False
        adjusted = [f"train.micro_batch_size={micro // 2}", f"train.grad_accum={accum * 2}"]
        attempt = run.trial_dir.with_name(run.trial_dir.name + ".out-of-memory")
        if attempt.exists():
            import shutil

            shutil.rmtree(attempt)
        run.trial_dir.rename(attempt)
        end_tracking(attempt, "FAILED")
        storage = self.study._storage
        storage.set_trial_user_attr(run.trial_id, ADJUSTED, adjusted)
        note = f"out of memory ({reason}); retried with micro_batch_size {micro // 2}, grad_accum {accum * 2}"
        storage.set_trial_user_attr(run.trial_id, REASON, note)
        storage.set_trial_user_attr(run.trial_id, RETRIED, note)
        new = config.model_copy(deep=True)
        new.train.micro_batch_size, new.train.grad_accum = micro // 2, accum * 2
        self.write_trial_files(run.trial_dir, new, run.trial_id)
        process = self.spawn(run.trial_dir, run.slot)
        storage.set_trial_user_attr(run.trial_id, LEASE, lease(process.pid))
        self.running[run.number] = Running(
            run.number, run.trial_id, run.trial_dir, process, time.time(), run.params, run.slot
        )
        self.say(f"[yellow]trial {run.number}[/yellow]: {escape(note)} (the first attempt is in {attempt.name}/)")
        return True

    def stop(self, signum: int, frame: object) -> None:
        """First Ctrl-C/SIGTERM: every trial pauses at a step boundary. Second: they stop at once."""
        name = signal.Signals(signum).name
        again = self.stopping is not None
        self.stopping = name
        for run in self.running.values():
            if run.process.poll() is None:
                run.process.send_signal(signal.SIGTERM)
        if not again:
            self.say(f"[yellow]{name}: pausing the running trials at their next step (again: at once)[/yellow]")

    def say(self, message: str) -> None:
        self.console.print(message, highlight=False)


def trial_config(
    loaded: LoadedSpec, params: dict[str, Any], number: int, parent_run: str | None, adjusted: list[str]
) -> Config:
    """A trial's whole config: the base, the sweep's fixed overrides, the trial's values; named for
    the trial, tagged with its number and values, nested under the sweep's MLflow run.

    Raises:
        ConfigError: the values make an invalid config (a combination the spec check cannot see).
    """
    spec = loaded.spec
    overrides = [*spec.overrides, *(as_override(k, v) for k, v in params.items()), *adjusted]
    config = load_config(loaded.base_path, [*overrides, f"name={spec.name}-trial-{number:04d}"], check_files=True)
    tracking = config.tracking
    tracking.study = spec.name
    tracking.mlflow.parent_run_id = parent_run
    tracking.tags = {**tracking.tags, "sweep": spec.name, "trial": str(number)}
    tracking.tags.update(
        {f"sweep.{k}": json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in params.items()}
    )
    return config


def end_tracking(run_dir: Path, status: str) -> None:
    """End the MLflow run of a trial process that died before it could (killed): FAILED, not
    RUNNING forever."""
    tracking = run_dir / "tracking.json"
    config_file = run_dir / TRIAL_CONFIG
    if not tracking.is_file() or not config_file.is_file():
        return
    run_id = json.loads(tracking.read_text()).get("backends", {}).get("mlflow", {}).get("run_id")
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    from lmforge.tracking.mlflow import default_tracking_uri

    config = load_config(config_file)
    uri = config.tracking.mlflow.tracking_uri or default_tracking_uri(config.output_dir)
    with contextlib.suppress(Exception):  # tracking never stops a sweep
        MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def gpus_for(slots: int, environ: dict[str, str] | None = None) -> list[str]:
    """The GPUs to give the trials, one each in turn: CUDA_VISIBLE_DEVICES when it is set, else every
    GPU torch sees; none with one slot (a lone trial keeps whatever it is given)."""
    environ = os.environ if environ is None else environ
    if slots < 2:
        return []
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def _threads_per_trial(slots: int) -> int | None:
    """With several trial processes, each gets an equal share of this process's CPUs."""
    if slots < 2:
        return None
    from lmforge.engine.threads import available_cores

    return max(1, available_cores() // slots)


def _read_outcome(trial_dir: Path, code: int, oom_kills: int | None) -> dict[str, Any]:
    """The trial's outcome.json. A process that died without one: by a signal that asks to stop
    (SIGTERM, SIGINT, SIGUSR1, or a SIGKILL while the kernel's out-of-memory killer killed nothing),
    interrupted, to be resumed from its newest checkpoint; by the out-of-memory killer, out of
    memory; otherwise failed.

    Args:
        oom_kills: the kernel's count of out-of-memory kills (/proc/vmstat) when the trial started.
    """
    path = trial_dir / OUTCOME
    if path.is_file():
        return json.loads(path.read_text())
    if code < 0:
        name = signal.Signals(-code).name
        if -code == signal.SIGKILL and (oom_kills is None or out_of_memory_kills() != oom_kills):
            return {"state": "failed", "reason": "killed by the kernel's out-of-memory killer (SIGKILL)", "oom": True}
        return {"state": "paused", "reason": f"its process was killed by {name}"}
    return {"state": "failed", "reason": f"exited with code {code} without an outcome; see {trial_dir / 'train.log'}"}


def out_of_memory_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has killed since boot (None where
    /proc/vmstat does not say)."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------- the sweep


def run_sweep(loaded: LoadedSpec, console: Console, workers: int = 1, join: bool = False) -> int:
    """Run (or continue) a sweep until it has handed out max_trials and they have ended, or until
    Ctrl-C/SIGTERM pauses it.

    Args:
        workers: trial processes at once on this machine, sharing its CPU threads.
        join: a worker joining a sweep that exists (another machine, shared storage): it never
            creates the study.

    Returns:
        The exit code: 0 when done, 130/143 when paused by SIGINT/SIGTERM, 1 when it gave up on
        a repeated failure.
    """
    spec = loaded.spec
    if join and spec.storage is None and not (loaded.sweep_dir / JOURNAL).is_file():
        raise UserError(
            f"no sweep named {spec.name!r} in {loaded.sweep_dir} yet: start it with `lmforge sweep SPEC` first"
        )
    storage = open_storage(spec.storage, loaded.sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(loaded, storage, create=not join)
    loaded.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_spec_copy(loaded)
    worker = Worker(loaded, study, console, workers)
    worker.parent_run = parent_run(loaded, study, console)
    worker.devices = gpus_for(workers)
    threads = _threads_per_trial(workers)
    share = f" ({threads} CPU thread{'s' if threads != 1 else ''} each)" if threads else ""
    console.print(
        f"sweep {spec.name}: {spec.method}, {spec.trial_budget()} trials, {spec.metric.name} ({spec.metric.goal}), "
        f"{workers} at a time{share}; in {loaded.sweep_dir}",
        highlight=False,
        markup=False,
    )
    points = spec.grid_size() if all(p.values is not None for p in spec.parameters.values()) else None
    if points is not None and spec.method != "grid" and spec.trial_budget() > points:
        console.print(
            f"[yellow]warning: the space has {points} point(s) and max_trials is {spec.trial_budget()}: "
            f"{spec.method} will try some points more than once; method: grid runs each once[/yellow]"
        )
    previous = {sig: signal.signal(sig, worker.stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            while not worker.stopping and not worker.given_up and len(worker.running) < workers:
                claimed = worker.claim()
                if claimed is None:
                    break
                worker.start(*claimed)
            if not worker.running:
                break
            worker.watch()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _finish(worker, console)


def _finish(worker: Worker, console: Console) -> int:
    loaded, study = worker.loaded, worker.study
    summary = write_results(study, loaded, final=True)
    console.print()
    leaderboard(study, loaded, console)
    others = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if others:
        console.print(f"{len(others)} trial(s) still running on other workers (lmforge sweep status shows them)")
    end_parent_run(loaded, worker.parent_run, summary, worker.stopping or worker.given_up or others)
    best = best_trial(study)
    if best is not None:
        console.print(
            f"best:     trial {best.number}, {loaded.sweep_dir / best.user_attrs.get(RUN_DIR, '')}", markup=False
        )
        console.print(
            f"config:   {loaded.sweep_dir / 'best.yaml'} (lmforge train it to reproduce the best trial)", markup=False
        )
    console.print(f"results:  {loaded.sweep_dir / 'trials.csv'}, {loaded.sweep_dir / 'summary.json'}", markup=False)
    if worker.given_up:
        console.print(f"[red]stopped[/red]: {escape(worker.given_up)}", highlight=False)
        return 1
    if worker.stopping:
        console.print(
            "[yellow]paused[/yellow]: run the same command to continue; paused trials resume from their checkpoints"
        )
        return 130 if worker.stopping == "SIGINT" else 143
    return 0


def parent_run(loaded: LoadedSpec, study: optuna.Study, console: Console) -> str | None:
    """The sweep's MLflow run, created once (its id kept in the study) and continued after."""
    if "mlflow" not in loaded.base.tracking.backends:
        return None
    from lmforge.tracking.base import RunInfo, run_tags
    from lmforge.tracking.mlflow import MlflowTracker

    with handing_out(study, loaded.sweep_dir):  # two workers starting at once create one run
        known = study.user_attrs.get(PARENT)
        tracker = MlflowTracker(RunInfo(loaded.base, loaded.sweep_dir, run_tags(loaded.base, loaded.sweep_dir)))
        try:
            run_id = tracker.start(known)
            if known is None:
                spec = loaded.spec
                tracker.log_params(
                    {
                        "sweep.method": spec.method,
                        "sweep.metric": f"{spec.metric.name} ({spec.metric.goal})",
                        "sweep.max_trials": spec.trial_budget(),
                        "sweep.base": str(loaded.base_path),
                        **{
                            f"sweep.space.{k}": json.dumps(p.model_dump(exclude_none=True))
                            for k, p in spec.parameters.items()
                        },
                    }
                )
                study.set_user_attr(PARENT, run_id)
        except Exception as exc:  # noqa: BLE001 - tracking never stops a sweep
            console.print(
                f"[yellow]warning: MLflow: cannot open the sweep's run ({escape(str(exc))}); "
                "trials are not nested[/yellow]"
            )
            return known
    return run_id


def end_parent_run(loaded: LoadedSpec, run_id: str | None, summary: dict[str, Any], unfinished: Any) -> None:
    if run_id is None:
        return
    from mlflow.tracking import MlflowClient

    from lmforge.tracking.mlflow import default_tracking_uri

    settings = loaded.base.tracking.mlflow
    client = MlflowClient(tracking_uri=settings.tracking_uri or default_tracking_uri(loaded.base.output_dir))
    try:
        if "best" in summary:
            best = summary["best"]
            client.log_metric(run_id, f"best/{loaded.spec.metric.name}", best["value"])
            client.set_tag(run_id, "best_trial", str(best["number"]))
        for state, n in summary["trials"].items():
            client.log_metric(run_id, f"trials/{state}", n)
        client.set_terminated(run_id, status="KILLED" if unfinished else "FINISHED")
    except Exception:  # noqa: BLE001, S110 - tracking never stops a sweep; the study has it all
        pass


SPEC_COPY = "sweep.yaml"
"""The spec as last run, in the sweep directory: `lmforge sweep status DIR` and `lmforge sweep DIR`
read it (a multirun has no other spec file)."""


def write_spec_copy(loaded: LoadedSpec) -> None:
    """sweep.yaml in the sweep directory: the spec with its command-line settings, its base as an
    absolute path."""
    spec = loaded.spec.model_dump(mode="json")
    spec["base"] = str(loaded.base_path.resolve())
    spec["working_dir"] = os.getcwd()
    text = "# This sweep's spec as last run, written by each run: lmforge sweep DIR and sweep status DIR read it.\n"
    (loaded.sweep_dir / SPEC_COPY).write_text(text + yaml.safe_dump(spec, sort_keys=False))


def spec_path(given: Path) -> Path:
    """A spec file, or a sweep directory's copy of its spec."""
    return given / SPEC_COPY if given.is_dir() and (given / SPEC_COPY).is_file() else given


def sweep_status(loaded: LoadedSpec, console: Console) -> None:
    """The leaderboard, every trial's state and failure reason, and what is running where. The sweep
    as it last ran (its sweep.yaml) decides max_trials and the columns."""
    from lmforge.sweep.results import print_running
    from lmforge.sweep.spec import load_spec

    copy = loaded.sweep_dir / SPEC_COPY
    if copy.is_file() and copy.resolve() != (loaded.path.resolve() if loaded.path else None):
        loaded = load_spec(copy, check_files=False)
    storage = open_storage(loaded.spec.storage, loaded.sweep_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if loaded.spec.name not in names:
        raise UserError(f"no sweep named {loaded.spec.name!r} has started yet (lmforge sweep SPEC starts it)")
    study = optuna.load_study(study_name=loaded.spec.name, storage=storage)
    leaderboard(study, loaded, console)
    print_running(study, loaded, console)
