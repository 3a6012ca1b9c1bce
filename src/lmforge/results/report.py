"""`lmforge report`: one self-contained HTML file about a run, a group of runs or a sweep.

Everything is read from the files runs already write (metrics.jsonl, eval.json, predictions.jsonl,
examples.jsonl, a sweep's trials.csv and summary.json). The file makes no network request: no
script or style is fetched, and the plots are inline SVG drawn by matplotlib (text kept as text,
so a plot is a few tens of KB; inline Plotly would add ~5 MB and a Vega bundle ~1 MB before the
first point). The only script is a few lines that sort the leaderboard.

Sections: leaderboard; loss curves (train and validation on one axis per run, overfitting flagged,
the early-stopping and restored-best steps marked), learning rate, throughput and memory; for a
sweep, the metric against each parameter, parallel coordinates, importances and the trials that
were pruned or failed; significance against a baseline; error analysis; samples before and after.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.results import analysis, stats
from lmforge.results.predictions import PREDICTIONS, read_predictions

MAX_CURVES = 12
"""Runs drawn one axis each (the leaderboard's first); the rest are in the overlay of all runs."""
MAX_ERROR_RUNS = 3
"""Runs whose error analysis is shown (the leaderboard's first)."""


@dataclass
class RunData:
    """What the report reads of one run."""

    path: Path
    name: str
    row: dict[str, Any]
    """Its row of `runs.load_runs`."""
    metrics: Any = None
    """`runs.load_metrics` (a DataFrame), or None."""
    final: dict[str, Any] = field(default_factory=dict)
    """eval.json."""
    predictions: list[dict] | None = None
    examples: list[dict] = field(default_factory=list)


def build_report(
    paths: list[Path], out: Path, baseline: Path | None = None, resamples: int = 1000, title: str | None = None
) -> Path:
    """Write the report of the runs under `paths` (runs, run directories, sweep directories) to
    `out`, written aside and renamed.

    Args:
        baseline: a run whose predictions every other run is compared with (paired bootstrap on
            the same examples, Holm-corrected over the runs), and whose seed group is the
            reference of the seed comparison.
        resamples: bootstrap resamples of the comparisons.

    Raises:
        UserError: a path with no runs, or a baseline that is not a run with predictions.
    """
    import pandas as pd

    from lmforge.results.runs import load_runs

    out = _out_file(Path(out))
    tables = []
    for path in paths:
        table = load_runs(path)
        if table.empty:
            raise UserError(f"{path}: no runs in it (a run directory holds config.yaml and metrics.jsonl)")
        tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    table = table[~table["run"].map(lambda p: str(Path(p).resolve())).duplicated()]  # a run given twice, or in two ways
    sweeps = [Path(p) for p in paths if (Path(p) / "trials.csv").is_file()]
    metric, goal = _main_metric(table, sweeps)
    table = _ranked(table, metric, goal)
    runs = [_read(row) for row in table.to_dict("records")]
    base = _read_baseline(baseline) if baseline is not None else None
    _label(runs + ([base] if base else []))
    sections = [
        ("leaderboard", "Leaderboard", leaderboard(table, metric, [r.name for r in runs])),
        ("curves", "Training curves", curves(runs)),
    ]
    for sweep in sweeps:
        sections.append(("sweep", f"Sweep {sweep.name}", sweep_section(sweep)))
    sections.append(("significance", "Significance", significance(runs, base, table, resamples)))
    sections.append(("errors", "Error analysis", errors(runs, base)))
    sections.append(("samples", "Samples before and after training", samples(runs)))
    page = render(title or _title(paths, runs), sections)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out {out}: cannot write it ({exc.strerror})") from None
    return out


def _out_file(out: Path) -> Path:
    """`out`, its directory made; checked before any work.

    Raises:
        UserError: `out` is a directory, or its directory cannot be made.
    """
    if out.is_dir():
        raise UserError(f"--out {out}: a directory; give the file to write, e.g. {out / 'report.html'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot make its directory {out.parent} ({exc.strerror})") from None
    return out


def _label(runs: list[RunData]) -> None:
    """Name each run by its directory, relative to the directory the runs share (two runs of one
    config share a name, never a directory)."""
    import os

    if len(runs) == 1:
        runs[0].name = runs[0].path.name
        return
    common = Path(os.path.commonpath([r.path.resolve() for r in runs]))
    for run in runs:
        run.name = str(run.path.resolve().relative_to(common)) if run.path.resolve() != common else run.path.name


def _title(paths: list[Path], runs: list[RunData]) -> str:
    if len(runs) == 1:
        return f"lmforge report: {runs[0].name}"
    return f"lmforge report: {', '.join(Path(p).name for p in paths)} ({len(runs)} runs)"


def _main_metric(table, sweeps: list[Path]) -> tuple[str | None, str]:
    """The metric that ranks the runs: the sweep's, else the test loss, else the validation loss."""
    for sweep in sweeps:
        summary = _json(sweep / "summary.json")
        if summary.get("metric"):
            name = summary["metric"]
            column = name if name in table.columns else f"validation/{name.removeprefix('eval/')}"
            return (column if column in table.columns else None), summary.get("goal", "minimize")
    for column in ("test/loss", "validation/loss", "test/accuracy"):
        if column in table.columns and table[column].notna().any():
            return column, "maximize" if column.endswith("accuracy") else "minimize"
    return None, "minimize"


def _ranked(table, metric: str | None, goal: str):
    if metric is None:
        return table.reset_index(drop=True)
    return table.sort_values(metric, ascending=goal == "minimize", na_position="last").reset_index(drop=True)


def _read(row: dict[str, Any]) -> RunData:
    from lmforge.results.runs import load_metrics

    path = Path(row["run"])
    run = RunData(path, str(row.get("name") or path.name), row)
    try:
        run.metrics = load_metrics(path)
    except UserError:
        run.metrics = None
    run.final = _json(path / "eval.json")
    if (path / PREDICTIONS).is_file():
        run.predictions = read_predictions(path / PREDICTIONS)
    if (path / "examples.jsonl").is_file():
        run.examples = [json.loads(line) for line in (path / "examples.jsonl").read_text().splitlines() if line]
    return run


def _read_baseline(path: Path) -> RunData:
    """The baseline: a run directory with predictions.jsonl, or the output of `lmforge eval
    --out DIR` (its predictions.jsonl: a model that was never trained here, such as a base model).

    Raises:
        UserError: no such directory, several runs in it, or no predictions.
    """
    from lmforge.results.runs import load_runs

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--baseline {path}: no such directory")
    if (path / PREDICTIONS).is_file() and not (path / "config.yaml").is_file():  # an evaluation
        said = _json(path / "eval.json")
        if (path / "baseline.predictions.jsonl").is_file():
            raise UserError(
                f"--baseline {path}: it holds two models' predictions, {said.get('target')} (predictions.jsonl) and "
                f"{said.get('baseline', {}).get('target')} (baseline.predictions.jsonl); evaluate the one you mean "
                "alone (`lmforge eval MODEL --out DIR`) and give DIR"
            )
        return RunData(path, path.name, {"run": str(path)}, predictions=read_predictions(path / PREDICTIONS))
    table = load_runs(path)
    if len(table) != 1:
        raise UserError(
            f"--baseline {path}: expected one run directory (or an `lmforge eval --out` directory), "
            f"found {len(table)} runs"
        )
    run = _read(table.to_dict("records")[0])
    if run.predictions is None:
        raise UserError(
            f"--baseline {path}: it has no {PREDICTIONS} (a run writes it at its final evaluation; for a run "
            f"that has none, `lmforge eval {path} --out DIR` writes one, and DIR is a baseline)"
        )
    return run


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- plots


def _svg(fig) -> str:
    """The figure as inline SVG (text as text, no XML prologue), and closed."""
    import matplotlib.pyplot as plt

    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _figure(width: float = 5.0, height: float = 2.6, ncols: int = 1, nrows: int = 1):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 8, "axes.spines.top": False, "axes.spines.right": False})
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False)


def overfitting_steps(validation: list[tuple[int, float]], train: list[tuple[int, float]], k: int = 2) -> list[int]:
    """Evaluation steps at which validation loss has risen for `k` consecutive evaluations while
    the training loss (its mean between evaluations) fell over the same evaluations.

    Args:
        validation: (step, loss) of each evaluation, in step order.
        train: (step, loss) of each logged training step.
    """
    flagged = []
    means = []
    for i, (step, _) in enumerate(validation):
        previous = validation[i - 1][0] if i else -1
        window = [loss for s, loss in train if previous < s <= step]
        means.append(sum(window) / len(window) if window else math.nan)
    for i in range(k, len(validation)):
        rising = all(validation[j][1] > validation[j - 1][1] for j in range(i - k + 1, i + 1))
        falling = all(means[j] < means[j - 1] for j in range(i - k + 1, i + 1))
        if rising and falling:
            flagged.append(validation[i][0])
    return flagged


def _series(metrics, column: str) -> list[tuple[int, float]]:
    if metrics is None or column not in metrics.columns:
        return []
    frame = metrics[["step", column]].dropna()
    return [(int(s), float(v)) for s, v in zip(frame["step"], frame[column], strict=True) if math.isfinite(v)]


def _loss_plot(run: RunData) -> tuple[str, list[int]]:
    train = _series(run.metrics, "train/loss")
    validation = _series(run.metrics, "eval/loss")
    fig, axes = _figure(4.2, 2.4)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train, strict=True), lw=0.8, color="#4c72b0", label="train")
    if validation:
        ax.plot(*zip(*validation, strict=True), "o-", ms=3, lw=1.2, color="#dd8452", label="validation")
    flagged = overfitting_steps(validation, train)
    for step in flagged:
        ax.axvline(step, color="#c44e52", lw=0.8, ls=":")
    best = run.final.get("restored_best_step")
    if best is not None:
        ax.axvline(best, color="#55a868", lw=1, ls="--", label=f"restored best (step {best})")
    if run.final.get("stop_reason") == "early_stopping":
        ax.axvline(run.final["step"], color="#8172b3", lw=1, ls="-.", label="early stop")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.name, fontsize=8)
    ax.legend(fontsize=6, frameon=False)
    return _svg(fig), flagged


def _small_plot(runs: list[RunData], column: str, label: str) -> str | None:
    lines = [(run.name, _series(run.metrics, column)) for run in runs]
    lines = [(name, points) for name, points in lines if points]
    if not lines:
        return None
    fig, axes = _figure(4.2, 2.2)
    ax = axes[0][0]
    for name, points in lines:
        ax.plot(*zip(*points, strict=True), lw=0.8, label=name if len(lines) <= 8 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    if len(lines) <= 8:
        ax.legend(fontsize=6, frameon=False)
    return _svg(fig)


# --------------------------------------------------------------------------- sections


def leaderboard(table, metric: str | None, labels: list[str] | None = None) -> str:
    """A sortable table: rank, run, state, step, the settings that differ between runs, the final metrics."""
    import pandas as pd

    from lmforge.results.runs import differing_settings, metric_columns

    settings = differing_settings(table)
    metrics = [c for c in metric_columns(table) if pd.api.types.is_numeric_dtype(table[c])]  # (not the split's name)
    extra = [c for c in ("sweep", "trial") if c in table.columns and table[c].notna().any()]
    columns = ["name", *extra, "state", "step", *metrics, *settings]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["#", "run", *columns])
    body = []
    for rank, row in enumerate(table.to_dict("records"), start=1):
        label = labels[rank - 1] if labels else Path(row["run"]).name
        cells = [f"<td>{rank}</td><td>{html.escape(label)}</td>"]
        cells += [f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns]
        body.append(f"<tr>{''.join(cells)}</tr>")
    note = f"<p>Ranked by <b>{html.escape(metric)}</b>; click a column to sort.</p>" if metric else ""
    rows = "".join(body)
    table = f'<table class="sortable" id="leaderboard-table"><thead><tr>{head}</tr></thead>'
    table += f"<tbody>{rows}</tbody></table>"
    return note + table


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "strftime"):
        return value.strftime("%Y-%m-%d %H:%M")
    return str(value)


def curves(runs: list[RunData]) -> str:
    """Loss curves per run (the first MAX_CURVES), then learning rate, throughput and memory."""
    parts = []
    shown = runs[:MAX_CURVES]
    cards = []
    for run in shown:
        if run.metrics is None:
            continue
        svg, flagged = _loss_plot(run)
        warning = (
            f'<p class="warn">overfitting: validation loss rose while training loss fell, at step(s) '
            f"{', '.join(map(str, flagged))}</p>"
            if flagged
            else ""
        )
        cards.append(f'<div class="card">{svg}{warning}</div>')
    if len(runs) > len(shown):
        parts.append(f"<p>The first {len(shown)} of {len(runs)} runs by rank; all of them below.</p>")
    parts.append(f'<div class="grid">{"".join(cards)}</div>')
    if len(runs) > 1:
        overlay = _small_plot(runs, "eval/loss", "validation loss")
        if overlay:
            parts.append(f"<h3>Validation loss of every run</h3>{overlay}")
    for column, label in (
        ("train/lr", "learning rate"),
        ("train/tokens_per_sec", "tokens / s"),
        ("system/rss_mb", "memory (RSS, MB)"),
        ("system/gpu_memory_mb", "GPU memory (MB)"),
    ):
        plot = _small_plot(runs[:MAX_CURVES], column, label)
        if plot:
            parts.append(f'<div class="inline"><h3>{label}</h3>{plot}</div>')
    return "".join(parts)


def sweep_section(sweep: Path) -> str:
    """The metric against each parameter, parallel coordinates, importances, and the pruned and
    failed trials with their reasons."""
    import pandas as pd

    trials = pd.read_csv(sweep / "trials.csv")
    summary = _json(sweep / "summary.json")
    metric = summary.get("metric")
    spec = _json_or_yaml(sweep / "sweep.yaml")
    params = [p for p in (spec.get("parameters") or {}) if p in trials.columns] or [
        c for c in trials.columns if "." in c
    ]
    parts = [f"<p>{html.escape(_counts(summary))}</p>"]
    if metric in trials.columns and params:
        parts.append(f"<h3>{html.escape(metric)} against each parameter</h3>{_scatter(trials, params, metric)}")
        parts.append(f"<h3>Parallel coordinates</h3>{_parallel(trials, params, metric)}")
    importances = summary.get("importances")
    if isinstance(importances, dict) and importances:
        parts.append(f"<h3>Parameter importances</h3>{_bars(importances)}")
    elif importances:
        parts.append(f"<p>Parameter importances: {html.escape(str(importances))}</p>")
    stopped = trials[trials["state"].isin(["pruned", "failed"])]
    if len(stopped):
        rows = "".join(
            f"<tr><td>{int(t['number'])}</td><td>{html.escape(str(t['state']))}</td>"
            f"<td>{html.escape(_cell(t.get('reason')))}</td></tr>"
            for t in stopped.to_dict("records")
        )
        parts.append(
            f'<h3>Pruned and failed trials</h3><table id="stopped-trials"><tr><th>trial</th><th>state</th>'
            f"<th>reason</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _json_or_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _counts(summary: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in (summary.get("trials") or {}).items())
    best = summary.get("best")
    line = f"{summary.get('method', '')} search, {counts}"
    if best:
        line += f"; best: trial {best['number']} with {summary.get('metric')} {best['value']:.4g}"
    return line


def _numeric(column) -> tuple[list[float], list[str] | None]:
    """A parameter's values as numbers, and the category names of a categorical one."""
    import pandas as pd

    values = pd.to_numeric(column, errors="coerce")
    if values.notna().all():
        return values.tolist(), None
    names = sorted({str(v) for v in column})
    return [float(names.index(str(v))) for v in column], names


def _scatter(trials, params: list[str], metric: str) -> str:
    ncols = min(3, len(params))
    nrows = math.ceil(len(params) / ncols)
    fig, axes = _figure(2.6 * ncols, 2.1 * nrows, ncols, nrows)
    colors = {"complete": "#4c72b0", "pruned": "#c0c0c0", "failed": "#c44e52"}
    for i, param in enumerate(params):
        ax = axes[i // ncols][i % ncols]
        x, names = _numeric(trials[param])
        ax.scatter(x, trials[metric], s=10, c=[colors.get(s, "#999999") for s in trials["state"]])
        if names:
            ax.set_xticks(range(len(names)), names, fontsize=6)
        elif min(x) > 0 and max(x) / min(x) > 50:
            ax.set_xscale("log")
        ax.set_xlabel(param, fontsize=7)
        ax.set_ylabel(metric, fontsize=7)
    for j in range(len(params), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    return _svg(fig)


def _parallel(trials, params: list[str], metric: str) -> str:
    import matplotlib

    complete = trials[trials[metric].notna()]
    if complete.empty:
        return "<p>No trial has a value of the metric yet.</p>"
    axes_names = [*params, metric]
    columns = []
    for name in axes_names:
        x, _ = _numeric(complete[name])
        low, high = min(x), max(x)
        columns.append([(v - low) / (high - low) if high > low else 0.5 for v in x])
    fig, axes = _figure(1.2 * len(axes_names) + 1, 2.6)
    ax = axes[0][0]
    values = complete[metric].tolist()
    low, high = min(values), max(values)
    cmap = matplotlib.colormaps["viridis"]
    for row, value in enumerate(values):
        ax.plot(range(len(axes_names)), [c[row] for c in columns], lw=0.7, alpha=0.7,
                color=cmap((value - low) / (high - low) if high > low else 0.5))  # fmt: skip
    ax.set_xticks(range(len(axes_names)), axes_names, fontsize=6, rotation=20)
    ax.set_yticks([])
    for i in range(len(axes_names)):
        ax.axvline(i, color="#888888", lw=0.5)
    return _svg(fig)


def _bars(values: dict[str, float]) -> str:
    fig, axes = _figure(4.0, 0.3 * len(values) + 0.6)
    ax = axes[0][0]
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="#4c72b0")
    ax.set_xlabel("importance")
    return _svg(fig)


def significance(runs: list[RunData], base: RunData | None, table, resamples: int) -> str:
    """Against the baseline: each run's paired bootstrap per metric, p-values Holm-corrected over the
    runs; runs that differ only in seed: mean, standard deviation, t-interval, Welch's test."""
    parts = []
    if base is not None:
        parts.append(_against_baseline(runs, base, resamples))
    else:
        parts.append("<p>No baseline given (<code>--baseline RUN</code>): no paired tests.</p>")
    parts.append(_intervals_table(runs))
    parts.append(_seed_groups(runs, base, table))
    return "".join(parts)


def _against_baseline(runs: list[RunData], base: RunData, resamples: int) -> str:
    candidates = [r for r in runs if r.path.resolve() != base.path.resolve() and r.predictions]
    results = {}
    for run in candidates:
        try:
            results[run.name] = analysis.compare(run.predictions, base.predictions, resamples=resamples)
        except UserError as exc:
            results[run.name] = {"problem": str(exc)}
    names = sorted({m for r in results.values() for m in r.get("metrics", {})})
    for metric in names:  # Holm over the candidates tested on this metric
        tested = [r["metrics"][metric] for r in results.values() if metric in r.get("metrics", {})]
        for test, adjusted in zip(tested, stats.holm([t["p_value"] for t in tested]), strict=True):
            test["p_holm"] = adjusted
    rows = []
    for name, result in results.items():
        if "problem" in result:
            rows.append(f'<tr><td>{html.escape(name)}</td><td colspan="7">{html.escape(result["problem"])}</td></tr>')
            continue
        for metric, t in result["metrics"].items():
            verdict = _verdict(t)
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{html.escape(metric)}</td><td>{t['candidate']:.4g}</td>"
                f"<td>{t['baseline']:.4g}</td><td>{t['difference']:+.4g} [{t['low']:+.4g}, {t['high']:+.4g}]</td>"
                f"<td>{t['p_value']:.4f}</td><td>{t['p_holm']:.4f}</td><td>{verdict}</td></tr>"
            )
    table = (
        '<table id="significance-table"><tr><th>run</th><th>metric</th><th>run</th><th>baseline</th>'
        "<th>difference [95% interval]</th><th>p</th><th>p (Holm)</th><th>at 5%</th></tr>" + "".join(rows) + "</table>"
    )
    fixes = "".join(
        f"<li>{html.escape(name)}: fixed {r['fixed']}, broke {r['broken']}</li>"
        for name, r in results.items()
        if "fixed" in r
    )
    return (
        f"<p>Paired bootstrap ({resamples} resamples) of each run against <b>{html.escape(base.name)}</b> on the "
        "same examples (generation metrics on the examples both answered); p-values Holm-corrected, for each "
        f"metric, over the runs compared on it.</p>{table}<ul>{fixes}</ul>"
    )


def _verdict(test: dict) -> str:
    """At 5% after Holm: better or worse, higher or lower for a metric with no known direction
    (a plugin's), else no significant difference."""
    if test["p_holm"] >= analysis.SIGNIFICANCE:
        return "no significant difference"
    if test["better"] is None:
        return "higher" if test["difference"] > 0 else "lower"
    return "better" if test["better"] else "worse"


def _intervals_table(runs: list[RunData]) -> str:
    rows = []
    for run in runs[:MAX_CURVES]:
        for metric, i in (run.final.get("intervals") or {}).items():
            rows.append(
                f"<tr><td>{html.escape(run.name)}</td><td>{html.escape(metric)}</td><td>{i['value']:.4g}</td>"
                f"<td>[{i['low']:.4g}, {i['high']:.4g}]</td></tr>"
            )
    if not rows:
        return ""
    return (
        '<h3>95% bootstrap intervals of the final metrics</h3><table id="intervals-table"><tr><th>run</th>'
        "<th>metric</th><th>value</th><th>interval</th></tr>" + "".join(rows) + "</table>"
    )


def _seed_groups(runs: list[RunData], base: RunData | None, table) -> str:
    """Groups of runs whose settings differ only in seed (and name), on the ranking metrics."""
    from lmforge.results.runs import config_columns

    settings = [c for c in config_columns(table) if c not in ("seed", "name", "output_dir")]
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        key = json.dumps([_cell(run.row.get(c)) for c in settings])
        groups.setdefault(key, []).append(run)
    seeded = {f"{g[0].name} x{len(g)}": g for g in groups.values() if len(g) > 1}
    if not seeded:
        return "<p>No runs differ only in seed.</p>"
    metrics = [m for m in ("test/loss", "validation/loss", "test/accuracy", "generation/exact_match") if m in table]
    parts = []
    base_key = next((k for k, g in seeded.items() if base and any(r.path == base.path for r in g)), None)
    for metric in metrics:
        values = {k: [float(r.row[metric]) for r in g if _finite(r.row.get(metric))] for k, g in seeded.items()}
        values = {k: v for k, v in values.items() if v}
        if not values:
            continue
        found = analysis.seed_groups(values, base_key if base_key in values else None)
        rows = []
        for name, s in found["groups"].items():
            test = found.get("tests", {}).get(name)
            welch = f"{test['p_value']:.4f} (Holm {test['p_holm']:.4f})" if test else ""
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{s['n']}</td><td>{s['mean']:.4g}</td><td>{s['std']:.3g}</td>"
                f"<td>[{s['low']:.4g}, {s['high']:.4g}]</td><td>{welch}</td></tr>"
            )
        parts.append(
            f'<h3>Seeds: {html.escape(metric)}</h3><table class="seeds"><tr><th>group</th><th>runs</th><th>mean</th>'
            f"<th>std</th><th>95% t-interval</th><th>Welch p vs baseline</th></tr>{''.join(rows)}</table>"
        )
    return "".join(parts)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def errors(runs: list[RunData], base: RunData | None) -> str:
    """Error analysis of the best runs with predictions (the first MAX_ERROR_RUNS)."""
    shown = [r for r in runs if r.predictions][:MAX_ERROR_RUNS]
    if not shown:
        return f"<p>No run has {PREDICTIONS}.</p>"
    parts = []
    for run in shown:
        parts.append(f"<h3>{html.escape(run.name)}</h3>")
        if run.predictions and "label" in run.predictions[0]:
            parts.append(_classification(run))
        else:
            parts.append(_generation(run))
        if base is not None and base.path.resolve() != run.path.resolve():
            parts.append(_fixed_broken(run, base))
    return "".join(parts)


def _classification(run: RunData) -> str:
    labels = (run.final.get("test_confusion_matrix") or {}).get("labels")
    found = analysis.classification_errors(run.predictions, labels)
    names = found["labels"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(
        f"<tr><th>{html.escape(n)}</th>{''.join(f'<td>{v}</td>' for v in row)}</tr>"
        for n, row in zip(names, found["confusion_matrix"], strict=True)
    )
    per_class = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{_cell(c['precision'])}</td><td>{_cell(c['recall'])}</td>"
        f"<td>{_cell(c['f1'])}</td><td>{c['support']}</td></tr>"
        for n, c in found["per_class"].items()
    )
    confusions = "".join(
        f"<li>{html.escape(c['label'])} taken for {html.escape(c['predicted'])}: {c['count']}</li>"
        for c in found["top_confusions"]
    )
    wrong = "".join(
        f"<tr><td>{html.escape(w['id'])}</td><td>{html.escape(w['input'][:200])}</td><td>{html.escape(w['label'])}</td>"
        f"<td>{html.escape(w['predicted'])}</td><td>{w['confidence']:.3f}</td></tr>"
        for w in found["confident_wrong"]
    )
    calibration = found["calibration"]
    return (
        f'<div class="classification"><h4>Confusion matrix (rows: true, columns: predicted)</h4>'
        f'<table class="confusion"><tr><th></th>{head}</tr>{body}</table>'
        f"<h4>Per class</h4><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>"
        f"{per_class}</table><h4>Most frequent confusions</h4><ul>{confusions or '<li>none</li>'}</ul>"
        f"<h4>Most confident wrong answers</h4><table><tr><th>id</th><th>input</th><th>true</th><th>predicted</th>"
        f"<th>confidence</th></tr>{wrong}</table>"
        f"<h4>Calibration: expected calibration error {calibration['ece']:.4f}</h4>{_reliability(calibration)}</div>"
    )


def _reliability(calibration: dict[str, Any]) -> str:
    fig, axes = _figure(2.8, 2.6)
    ax = axes[0][0]
    ax.plot([0, 1], [0, 1], ls="--", color="#888888", lw=0.8)
    for b in calibration["bins"]:
        ax.bar((b["low"] + b["high"]) / 2, b["accuracy"], width=b["high"] - b["low"], alpha=0.7, color="#4c72b0",
               edgecolor="white")  # fmt: skip
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _svg(fig)


def _generation(run: RunData) -> str:
    found = analysis.generation_errors(run.predictions)

    def rows(items, keys):
        return "".join(
            "<tr>" + "".join(f"<td>{html.escape(_cell(i.get(k)))[:300]}</td>" for k in keys) + "</tr>" for i in items
        )

    keys = ["id", "input", "reference", "prediction", "loss"]
    head = "".join(f"<th>{k}</th>" for k in keys)
    lengths = "".join(
        f"<tr><td>{b['chars']}</td><td>{b['count']}</td><td>{_cell(b['loss'])}</td>"
        f"<td>{_cell(b.get('exact_match'))}</td></tr>"
        for b in found["by_input_length"]
    )
    return (
        f'<div class="generation"><p>{found["answered"]} answered: {found["failures"]} not exactly right, '
        f"{found['empty']} empty, {found['truncated']} truncated (hit max_new_tokens), "
        f"{found['repetitive']} repetitive.</p>"
        f"<h4>Worst examples by loss</h4><table><tr>{head}</tr>{rows(found['worst_by_loss'], keys)}</table>"
        f"<h4>Exact-match failures</h4><table><tr>{head}</tr>{rows(found['exact_match_failures'], keys)}</table>"
        f"<h4>By input length (characters)</h4><table><tr><th>length</th><th>examples</th><th>loss</th>"
        f"<th>exact match</th></tr>{lengths}</table></div>"
    )


def _fixed_broken(run: RunData, base: RunData) -> str:
    try:
        found = analysis.fixed_and_broken(run.predictions, base.predictions, limit=10)
    except ValueError:
        return ""
    if [r["id"] for r in run.predictions] != [r["id"] for r in base.predictions]:
        return "<p>The baseline's predictions are of other examples: no fixed and broken examples.</p>"

    def items(entries):
        return "".join(
            f"<tr><td>{html.escape(e['id'])}</td><td>{html.escape(str(e['input'])[:200])}</td>"
            f"<td>{html.escape(str(e['reference']))}</td><td>{html.escape(str(e['candidate']))}</td>"
            f"<td>{html.escape(str(e['baseline']))}</td></tr>"
            for e in entries
        )

    head = "<tr><th>id</th><th>input</th><th>reference</th><th>this run</th><th>baseline</th></tr>"
    return (
        f"<h4>Against {html.escape(base.name)}: fixed {found['fixed']}, broke {found['broken']}</h4>"
        f"<table class='fixed'>{head}{items(found['fixed_examples'])}</table>"
        f"<table class='broken'>{head}{items(found['broken_examples'])}</table>"
    )


def samples(runs: list[RunData]) -> str:
    """examples.jsonl of the best runs: each prompt's sample before and after training."""
    parts = []
    for run in runs[:MAX_ERROR_RUNS]:
        if not run.examples:
            continue
        before = {e["prompt"]: e for e in run.examples if e["stage"] == "before"}
        rows = "".join(
            f"<tr><td>{html.escape(e['prompt'])}</td>"
            f"<td>{html.escape(before.get(e['prompt'], {}).get('generated', ''))}</td>"
            f"<td>{html.escape(e['generated'])}</td><td>{html.escape(e.get('reference') or '')}</td></tr>"
            for e in run.examples
            if e["stage"] == "after"
        )
        parts.append(
            f"<h3>{html.escape(run.name)}</h3><table><tr><th>prompt</th><th>before</th><th>after</th>"
            f"<th>reference</th></tr>{rows}</table>"
        )
    return "".join(parts) or "<p>No samples (examples.jsonl) in these runs.</p>"


# --------------------------------------------------------------------------- page


def render(title: str, sections: list[tuple[str, str, str]]) -> str:
    """The page: the template in templates/report.html with the sections in order."""
    import jinja2
    from markupsafe import Markup

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("lmforge.results", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    template = environment.get_template("report.html")
    return template.render(
        title=title,
        generated=time.strftime("%Y-%m-%d %H:%M"),
        sections=[{"id": i, "title": t, "body": Markup(b)} for i, t, b in sections],
    )
