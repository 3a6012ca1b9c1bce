"""One trial, in its own process: an ordinary training run in the trial's directory that reports
each validation evaluation to the study and stops when the pruner says so.

    python -m lmforge.sweep.trial TRIAL_DIR WORKER_PID

TRIAL_DIR holds trial.yaml (the trial's whole config) and trial.json (the study to report to).
The run resumes from the directory's newest checkpoint when it has one. The process ends when its
worker does (it pauses at a step boundary and checkpoints), so a dead worker leaves no trial
running unseen. What happened is written to outcome.json.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

STOPPED: list[str] = []
"""The signal that stopped this trial process at once, if one did: a KeyboardInterrupt raised inside
an extension module's import comes out as another exception (ImportError), still a stop."""
OUTCOME = "outcome.json"
TRIAL_CONFIG = "trial.yaml"
TRIAL_CONTEXT = "trial.json"
PAUSED_EXIT = 3


def best_of(run_dir: Path, metric: str, goal: str) -> tuple[float | None, int | None]:
    """The best value of `metric` (e.g. eval/loss) over the run's evaluations after step 0, and
    its step, from metrics.jsonl; (None, None) when there is none. A non-finite value is never best."""
    from lmforge.tracking.base import read_points

    path = run_dir / "metrics.jsonl"
    points = (
        [(m[metric], step) for step, _, m in read_points(path) if step > 0 and metric in m] if path.is_file() else []
    )
    finite = [(v, s) for v, s in points if math.isfinite(v)]
    if not finite:
        return (points[-1][0], points[-1][1]) if points else (None, None)
    best = min(finite) if goal == "minimize" else max(finite, key=lambda p: (p[0], -p[1]))
    return best[0], best[1]


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's CUDA out-of-memory error, or a host allocation that failed."""
    import torch

    text = str(exc)
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "can't allocate memory" in text


def _die_with_worker(worker: int) -> None:
    """Have the kernel send SIGUSR1 when the worker dies: the training loop pauses at its next step
    boundary and checkpoints (engine.signals). Until the loop runs, and after it, the first of
    SIGINT, SIGTERM or SIGUSR1 stops the trial at once, as paused; it has nothing to save there."""

    def stop_now(signum: int, frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)  # the parent-death signal comes once per thread of the worker
        STOPPED.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, stop_now)
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGUSR1)  # PR_SET_PDEATHSIG
    if os.getppid() != worker:  # it died before the line above
        sys.exit(PAUSED_EXIT)


def _pruning_hook(context: dict[str, Any]):
    """(step, metrics) -> "pruned" or None: reports the metric to the study, asks its pruner."""
    import optuna

    from lmforge.sweep.spec import Pruner
    from lmforge.sweep.study import open_storage, pruner_for

    storage = open_storage(context["storage"], Path(context["sweep_dir"]))
    pruner = pruner_for(Pruner.model_validate(context["pruner"]), context["eval_every"])
    study = optuna.load_study(study_name=context["study"], storage=storage, pruner=pruner)
    name = context["metric"].removeprefix("eval/")
    trial_id, warmup = context["trial_id"], context["pruner"]["warmup_evals"]

    def hook(step: int, metrics: dict[str, float]) -> str | None:
        value = float(metrics[name])
        storage.set_trial_intermediate_value(trial_id, step, value if math.isfinite(value) else float("nan"))
        trial = storage.get_trial(trial_id)
        if len(trial.intermediate_values) <= warmup:
            return None
        return "pruned" if study.pruner.prune(study, trial) else None

    return hook


def _from_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is behind this exception (its cause or context, at any depth)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def run_trial(trial_dir: Path) -> dict[str, Any]:
    """Train the trial; return its outcome: state (complete, pruned, paused, failed), value,
    best_step, step, reason, and oom when it ran out of memory."""
    from lmforge.errors import UserError

    context = json.loads((trial_dir / TRIAL_CONTEXT).read_text())
    try:
        from rich.console import Console  # imports inside: a signal while they load pauses the trial too

        from lmforge.cli import _quiet_libraries
        from lmforge.config import load_config
        from lmforge.run import run_train

        console = Console(highlight=False, soft_wrap=True)
        config = load_config(trial_dir / TRIAL_CONFIG, check_files=True)
        _quiet_libraries()
        hook = _pruning_hook(context)
        outcome = run_train(config, console, run_dir=trial_dir, on_eval=hook)
    except KeyboardInterrupt as exc:
        return {"state": "paused", "reason": f"stopped at once ({exc or 'a second signal'})"}
    except UserError as exc:
        return {"state": "failed", "reason": str(exc).splitlines()[0][:500]}
    except Exception as exc:  # noqa: BLE001 - a trial's crash is its own; the sweep goes on
        traceback.print_exc()
        if STOPPED or _from_interrupt(exc):
            return {"state": "paused", "reason": f"stopped at once ({STOPPED[0] if STOPPED else 'a signal'})"}
        return {
            "state": "failed",
            "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500],
            "oom": is_out_of_memory(exc),
        }
    if outcome.paused:
        return {"state": "paused", "reason": outcome.paused}
    value, best_step = best_of(trial_dir, context["metric"], context["goal"])
    step = outcome.eval.get("step")
    if outcome.eval.get("stop_reason") == "pruned":
        return {"state": "pruned", "value": value, "best_step": best_step, "step": step}
    if value is None or not math.isfinite(value):
        return {"state": "failed", "reason": f"{context['metric']} is {value}", "step": step}
    return {"state": "complete", "value": value, "best_step": best_step, "step": step}


def main(argv: list[str]) -> int:
    trial_dir, worker = Path(argv[0]), int(argv[1])
    _die_with_worker(worker)
    outcome = run_trial(trial_dir)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # what is left to do is writing the outcome
        signal.signal(sig, signal.SIG_IGN)
    tmp = trial_dir / (OUTCOME + ".tmp")
    tmp.write_text(json.dumps(outcome, indent=2))
    os.replace(tmp, trial_dir / OUTCOME)
    return {"complete": 0, "pruned": 0, "paused": PAUSED_EXIT}.get(outcome["state"], 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
