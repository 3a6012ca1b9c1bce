"""The notebooks in examples/notebooks/ are committed without outputs, run end to end on quick
example runs in this venv's kernel, print what the run files say, and stop on a missing run with
the command that makes it."""

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import scipy.stats
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from conftest import ROOT, lmforge_command, subprocess_env

NOTEBOOKS = ROOT / "examples" / "notebooks"
NAMES = ["performance_analysis.ipynb", "error_analysis.ipynb"]
PROBE = "import sys\nprint('kernel prefix:', sys.prefix)"
"""A cell run first: the kernel's Python is this venv's."""


def execute(name: str, runs: Path, monkeypatch) -> tuple[nbformat.NotebookNode, CellExecutionError | None]:
    """The notebook run from its directory with LMFORGE_RUNS=runs (the kernel inherits the
    environment), a probe cell first; the error that stopped it, if one did."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(PROBE))
    monkeypatch.setenv("LMFORGE_RUNS", str(runs))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        return nb, exc
    return nb, None


def printed(nb: nbformat.NotebookNode) -> dict[str, str]:
    """What each cell printed on stdout, by the cell's id without its number ("setup", "table", ...);
    the probe's under "probe"."""
    found = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        key = cell.get("id", "").split("-", 1)[-1] if cell.source != PROBE else "probe"
        found[key] = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
    return found


def assert_in_this_venv(text: dict[str, str]) -> None:
    assert text["probe"].strip() == f"kernel prefix: {sys.prefix}"


# ------------------------------------------------------------------------------ no kernel, no runs


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert 'os.environ.get("LMFORGE_RUNS", "../../runs")' in code[0].source


@pytest.mark.parametrize(
    "name, command",
    [
        ("performance_analysis.ipynb", "make quickstart"),
        ("error_analysis.ipynb", "make quickstart && lmforge train examples/spelling-lora.yaml"),
    ],
)
def test_a_missing_run_stops_the_first_cell_with_the_command_that_makes_it(tmp_path, monkeypatch, name, command):
    nb, error = execute(name, tmp_path / "runs", monkeypatch)
    assert error is not None
    assert_in_this_venv(printed(nb))
    failed = [cell for cell in nb.cells if any(o.output_type == "error" for o in cell.get("outputs", []))]
    assert len(failed) == 1 and failed[0] is [c for c in nb.cells if c.cell_type == "code"][1]  # the setup cell
    (output,) = [o for o in failed[0].outputs if o.output_type == "error"]
    assert output.ename == "RuntimeError"
    assert f"`{command}`" in output.evalue and str(tmp_path / "runs") in output.evalue


# ----------------------------------------------------------------------------- on the example runs


def lmforge(*args: str) -> None:
    proc = subprocess.run(
        lmforge_command(*args), capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def example_runs(tmp_path_factory) -> Path:
    """runs/ as the README's commands leave it, from quick runs: quickstart-latest (and the same
    quickstart with another seed), spelling-lora-latest, and the spelling run evaluated against its
    base model in evaluations/spelling-vs-base."""
    root = tmp_path_factory.mktemp("notebooks")
    runs = root / "runs"

    def train(example: str, *overrides: str) -> None:
        config = ROOT / "examples" / f"{example}.yaml"
        where = [f"output_dir={runs}", f"data.cache_dir={root / 'cache'}", "tracking.backends=[none]"]
        lmforge("train", str(config), "--quick-test", *where, *overrides)

    train("quickstart")
    train("quickstart", "seed=1")
    quickstart = sorted(runs.glob("quickstart-quick-test-2*"))[0]
    train("spelling-lora", f"model.name_or_path={quickstart / 'final'}")
    (spelling,) = runs.glob("spelling-lora-quick-test-2*")
    (runs / "quickstart-latest").symlink_to(quickstart.name)  # the names the notebooks look for
    (runs / "spelling-lora-latest").symlink_to(spelling.name)
    out = runs / "evaluations" / "spelling-vs-base"
    lmforge("eval", str(runs / "spelling-lora-latest"), "--baseline", "base", "--out", str(out))
    return runs


def run_dirs(runs: Path) -> list[Path]:
    return sorted(d for d in runs.iterdir() if d.is_dir() and not d.is_symlink() and d.name != "evaluations")


def points(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def values(run: Path, metric: str) -> list[tuple[int, float]]:
    return [(p["step"], p[metric]) for p in points(run) if metric in p]


def eval_json(path: Path) -> dict:
    return json.loads((path / "eval.json").read_text())


@pytest.mark.slow
def test_performance_analysis_shows_the_runs(example_runs, monkeypatch):
    nb, error = execute("performance_analysis.ipynb", example_runs, monkeypatch)
    assert error is None, str(error)
    text = printed(nb)
    assert_in_this_venv(text)
    runs = run_dirs(example_runs)
    assert len(runs) == 3
    assert f"runs: {len(runs)}\n" in text["table"] and "states: finished 3" in text["table"]
    for run in runs:
        train, validation = values(run, "train/loss"), values(run, "eval/loss")
        line = f"{run.name}: train loss {train[0][1]:.4f} -> {train[-1][1]:.4f}, "
        line += f"validation loss {validation[-1][1]:.4f} at step {validation[-1][0]}"
        assert line in text["curves"].splitlines()
        speed = statistics.median(v for _, v in values(run, "train/tokens_per_sec"))
        memory = max(v for _, v in values(run, "system/rss_mb"))
        assert f"{run.name}: median {speed:.1f} tokens/s, peak memory {memory:.1f} MB" in text["system"]
        for metric, i in eval_json(run)["intervals"].items():
            assert f"{run.name}  {metric}  {i['value']:.4f} [{i['low']:.4f}, {i['high']:.4f}]" in text["intervals"]
    spelling = next(r for r in runs if r.name.startswith("spelling"))
    assert "generation/exact_match" in eval_json(spelling)["intervals"]
    # the two quickstarts differ only in seed; the spelling run has no twin
    losses = [eval_json(r)["test"]["loss"] for r in runs if r.name.startswith("quickstart")]
    mean, std = statistics.mean(losses), statistics.stdev(losses)
    half = scipy.stats.t.ppf(0.975, 1) * std / math.sqrt(2)
    line = f"quickstart-quick-test x2 test/loss: n=2 mean {mean:.4f} std {std:.4f} "
    line += f"95% t-interval [{mean - half:.4f}, {mean + half:.4f}] (seeds 42, 1)"
    assert line in text["seeds"].splitlines()
    assert "spelling-lora" not in text["seeds"]


@pytest.mark.slow
def test_error_analysis_shows_the_spelling_runs_errors(example_runs, monkeypatch):
    nb, error = execute("error_analysis.ipynb", example_runs, monkeypatch)
    assert error is None, str(error)
    text = printed(nb)
    assert_in_this_venv(text)
    spelling = example_runs / "spelling-lora-latest"
    rows = [json.loads(line) for line in (spelling / "predictions.jsonl").read_text().splitlines()]
    answered = [r for r in rows if "prediction" in r]
    final = eval_json(spelling)
    assert len(rows) == final["predictions"]["examples"] and answered
    assert f"predictions: {len(rows)} test examples ({len(answered)} answered)" in text["setup"]
    worst = max(rows, key=lambda r: r["loss"])
    assert f"worst by loss: {worst['id']} loss {worst['loss']:.4f}\n" in text["worst"]
    failures = sum(r["scores"]["exact_match"] < 1 for r in answered)
    assert f"exact-match failures: {failures} of {len(answered)} answered" in text["failures"]
    assert f"by input length: 4 buckets, {len(rows)} examples" in text["length"]
    flags = final["generation"]
    line = f"empty {flags['empty']}, truncated {flags['truncated']}, repetitive {flags['repetitive']} "
    assert line + f"of {len(answered)} answered" in text["flags"]
    # the interval of exact match is the one the run wrote (its seed, its resamples)
    i = final["intervals"]["generation/exact_match"]
    line = f"exact match {i['value']:.4f}, 95% interval [{i['low']:.4f}, {i['high']:.4f}] over {len(answered)} "
    assert line in text["interval"]
    assert i["value"] == final["generation"]["exact_match"] and i["low"] <= i["value"] <= i["high"]
    # the comparison computed again from the two predictions files is the one lmforge eval wrote
    saved = json.loads((example_runs / "evaluations" / "spelling-vs-base" / "comparison.json").read_text())
    assert set(saved["metrics"]) >= {"test/loss", "generation/exact_match"}
    for metric, t in saved["metrics"].items():
        line = f"{metric}: {t['candidate']:.4f} vs {t['baseline']:.4f}, difference {t['difference']:+.4f} "
        line += f"[{t['low']:+.4f}, {t['high']:+.4f}], p={t['p_value']:.4f}"
        assert line in text["baseline"], line
    assert f"fixed {saved['fixed']}, broke {saved['broken']} of {len(rows)} examples" in text["baseline"]
    assert "(agrees)" in text["baseline"]


@pytest.mark.slow
def test_error_analysis_without_a_baseline_says_how_to_make_one(example_runs, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "spelling-lora-latest").symlink_to((example_runs / "spelling-lora-latest").resolve())
    nb, error = execute("error_analysis.ipynb", runs, monkeypatch)
    assert error is None, str(error)
    said = printed(nb)["baseline"]
    assert said.startswith(f"No baseline predictions in {runs / 'evaluations' / 'spelling-vs-base'}")
    assert f"`lmforge eval {runs / 'spelling-lora-latest'} --baseline base --out" in said
    assert os.path.abspath(runs) in said
