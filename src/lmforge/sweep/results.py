"""What a sweep leaves behind, from its study: trials.csv, summary.json, best.yaml, and the
leaderboard that the end of a sweep and `lmforge sweep status` print.

runs/sweeps/<name>/
  trials.csv     number, state, reason, parameters, metric, best step, seconds, run directory
  summary.json   counts, the best trial, parameter importances (Optuna's fANOVA)
  best.yaml      the best trial's whole config: `lmforge train runs/sweeps/<name>/best.yaml`
  trial-0000/    each trial's run directory (trial.yaml, train.log, metrics.jsonl, checkpoints, final/)
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console

from lmforge.config import dump_yaml, load_config
from lmforge.engine.progress import format_duration
from lmforge.sweep.spec import LoadedSpec, as_override
from lmforge.sweep.study import LEASE, REASON, RUN_DIR, decoded_params

BEST_STEP = "lmforge.best_step"
SECONDS = "lmforge.seconds"
ADJUSTED = "lmforge.adjusted"
"""Trial user attribute: overrides a retry added (micro_batch_size halved after running out of memory)."""
STATES = {
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "paused",
}


def trial_rows(study: optuna.Study, loaded: LoadedSpec) -> list[dict[str, Any]]:
    """One row per trial, in trial order (see trials.csv)."""
    rows = []
    metric = loaded.spec.metric.name
    for t in study.get_trials(deepcopy=False):
        params = decoded_params(t, loaded.spec)
        value = t.value if t.state == TrialState.COMPLETE else _last(t) if t.state == TrialState.PRUNED else None
        row = {"number": t.number, "state": STATES.get(t.state, t.state.name.lower())}
        row["reason"] = t.user_attrs.get(REASON) or ""
        row.update({k: _text(params.get(k)) for k in loaded.spec.parameters})
        if row.get("train.lr") == "find" and t.user_attrs.get(RUN_DIR):
            row["train.lr"] = _found_lr(loaded.sweep_dir / t.user_attrs[RUN_DIR])
        row[metric] = value
        row["best_step"] = t.user_attrs.get(BEST_STEP)
        row["seconds"] = round(t.user_attrs.get(SECONDS, 0.0), 1)
        row["run_dir"] = str(loaded.sweep_dir / t.user_attrs[RUN_DIR]) if t.user_attrs.get(RUN_DIR) else ""
        rows.append(row)
    return rows


def _found_lr(run_dir: Path) -> str:
    """'find (3e-04)': train.lr=find with the learning rate the trial's range test found (its run's
    saved config holds it), or 'find' before the test ended."""
    try:
        lr = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["train"]["lr"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return "find"
    return f"find ({lr:.3g})" if isinstance(lr, int | float) else "find"


def state_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Trials in each state, in the order the states first appear."""
    return dict(Counter(row["state"] for row in rows))


def _last(trial: FrozenTrial) -> float | None:
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def _text(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, list | dict) else value


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return study.best_trial


def write_results(study: optuna.Study, loaded: LoadedSpec, final: bool = False) -> dict[str, Any]:
    """trials.csv, summary.json and best.yaml in the sweep directory (each written aside and
    renamed); returns the summary.

    Args:
        final: the end of a sweep (or its status): also parameter importances, which take about
            a second, so they are not computed after every trial."""
    sweep_dir = loaded.sweep_dir
    rows = trial_rows(study, loaded)
    if rows:
        _write_csv(sweep_dir / "trials.csv", rows)
    summary = summarize(study, loaded, rows, final)
    _replace(sweep_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    best = best_trial(study)
    if best is not None:
        _replace(sweep_dir / "best.yaml", best_config_text(loaded, best))
    return summary


def summarize(study: optuna.Study, loaded: LoadedSpec, rows: list[dict[str, Any]], final: bool) -> dict[str, Any]:
    spec = loaded.spec
    counts = state_counts(rows)
    summary: dict[str, Any] = {
        "name": spec.name,
        "metric": spec.metric.name,
        "goal": spec.metric.goal,
        "method": spec.method,
        "max_trials": spec.trial_budget(),
        "trials": counts,
    }
    best = best_trial(study)
    if best is not None:
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "best_step": best.user_attrs.get(BEST_STEP),
            "params": decoded_params(best, spec),
            "run_dir": str(loaded.sweep_dir / best.user_attrs.get(RUN_DIR, "")),
            "config": str(loaded.sweep_dir / "best.yaml"),
        }
    summary["importances"] = importances(study) if final else "computed when the sweep ends"
    return summary


def importances(study: optuna.Study) -> dict[str, float] | str:
    """Parameter importances over the complete trials, or why there are none: Optuna's fANOVA
    estimate of the fraction of the metric's variance each parameter explains, from a random
    forest fitted to the trials (an estimate: on a handful of trials a parameter that explains
    nothing still gets a few percent) (Hutter et al. 2014, "An
    Efficient Approach for Assessing Hyperparameter Importance"; a seeded random forest). Not
    Optuna's default PED-ANOVA, which compares the top 10% of trials with the rest: in a sweep of a
    few trials that top is one trial, and a parameter that alone sets the metric can come out as
    half the importance."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return "needs at least 2 complete trials"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        found = optuna.importance.get_param_importances(study, evaluator=evaluator)
        return {name: float(value) for name, value in found.items()}
    except (ValueError, RuntimeError) as exc:  # e.g. every trial had the same parameters
        return f"not computed: {exc}"


def best_config_text(loaded: LoadedSpec, best: FrozenTrial) -> str:
    """The best trial's config as a file `lmforge train` runs: the base, the sweep's fixed
    overrides, the trial's parameters and any retry's adjustment; named <sweep>-best."""
    spec = loaded.spec
    params = decoded_params(best, spec)
    overrides = [*spec.overrides, *(as_override(k, v) for k, v in params.items()), *best.user_attrs.get(ADJUSTED, [])]
    config = load_config(loaded.base_path, [*overrides, f"name={spec.name}-best"])
    header = (
        f"# The best trial ({best.number}) of sweep {spec.name}: {spec.metric.name} {best.value:.6g} at step "
        f"{best.user_attrs.get(BEST_STEP)}.\n# Parameters: {', '.join(f'{k}={v}' for k, v in params.items())}\n"
        "# Relative paths are relative to the directory the sweep ran from. Run: lmforge train THIS_FILE\n"
    )
    return header + dump_yaml(config)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- printing


def leaderboard(study: optuna.Study, loaded: LoadedSpec, console: Console, top: int = 10) -> None:
    """The best trials (complete, then pruned by their last value), the count of each state, and
    the reason of every failed trial."""
    spec = loaded.spec
    rows = trial_rows(study, loaded)
    metric = spec.metric.name
    sign = 1 if spec.metric.goal == "minimize" else -1
    ranked = sorted(
        (r for r in rows if r["state"] in ("complete", "pruned") and _finite(r[metric])),
        key=lambda r: (r["state"] != "complete", sign * r[metric]),
    )
    header = ["rank", "trial", "state", metric, "best step", *spec.parameters, "time"]
    cells = [
        [
            str(rank),
            str(r["number"]),
            r["state"],
            f"{r[metric]:.5g}",
            str(r["best_step"] or ""),
            *(short_value(r[k]) for k in spec.parameters),
            format_duration(r["seconds"]),
        ]
        for rank, r in enumerate(ranked[:top], start=1)
    ]
    if cells:  # plain aligned text: whole in a log file or a narrow terminal (a rich table squeezes cells)
        console.print(f"sweep {spec.name}: best {min(top, len(ranked))} by {metric} ({spec.metric.goal})", markup=False)
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        for row in [header, *cells]:
            console.print(
                "  ".join(
                    c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(row, widths, strict=True)
                ).rstrip(),
                markup=False,
                soft_wrap=True,
            )
    counts = state_counts(rows)
    shown = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no trials yet"
    budget = spec.trial_budget()
    total = (
        f"{len(rows)} of {budget} trials" if len(rows) <= budget else f"{len(rows)} trials (max_trials now {budget})"
    )
    console.print(f"{total}: {shown}")
    for r in rows:
        if r["state"] == "failed":
            console.print(f"  trial {r['number']} failed: {r['reason']}", markup=False)


def print_running(study: optuna.Study, loaded: LoadedSpec, console: Console) -> None:
    """Who runs what: each RUNNING trial's host, worker pid, heartbeat age and last logged step."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        held = t.user_attrs.get(LEASE)
        run_dir = loaded.sweep_dir / t.user_attrs.get(RUN_DIR, f"trial-{t.number:04d}")
        step = _last_step(run_dir)
        at = f" at step {step}" if step is not None else ""
        if t.state == TrialState.WAITING:
            console.print(f"  trial {t.number} paused{at}: {t.user_attrs.get(REASON, '')}", markup=False)
        elif held:
            age = time.time() - held["beat"]
            console.print(
                f"  trial {t.number} running{at} on {held['host']} (worker pid {held['pid']}, "
                f"trial pid {held.get('child')}), heartbeat {age:.0f} s ago",
                markup=False,
            )


def _last_step(run_dir: Path) -> int | None:
    """The step of a trial's newest checkpoint (where it resumes), else of its last logged point."""
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    if steps:
        return max(steps)
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return json.loads(lines[-1])["step"] if lines else None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def short_value(value: Any, width: int | None = 24) -> str:
    """A parameter's value as shown: floats to 3 significant digits, text cut at `width` (None: whole)."""
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return text if width is None or len(text) <= width else text[: width - 1] + "…"
