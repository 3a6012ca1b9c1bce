"""`lmforge runs` and lmforge.results.runs on real runs: two tiny trainings through the CLI, and
directories made from them as a paused run, a corrupt run and a sweep's trials leave them."""

import io
import json
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import chapters, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.errors import UserError
from lmforge.results.runs import BASE_COLUMNS, load_metrics, load_predictions, load_runs
from lmforge.run import run_lock


def lmforge(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        lmforge_command(*args), cwd=cwd, capture_output=True, text=True, env=subprocess_env(), timeout=300
    )


def copy_run(source: Path, target: Path, name: str | None = None) -> Path:
    shutil.copytree(source, target)
    if name is not None:  # a sweep names its trials' runs <sweep>-trial-NNNN
        config = yaml.safe_load((target / "config.yaml").read_text())
        config["name"] = name
        (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def as_paused(run_dir: Path, step: int) -> None:
    """What a run paused at `step` leaves: its checkpoints up to there, its points up to there,
    tracking.json KILLED, no eval.json and no final/."""
    shutil.rmtree(run_dir / "final")
    (run_dir / "eval.json").unlink()
    for checkpoint in (run_dir / "checkpoints").iterdir():
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
    (run_dir / "tracking.json").write_text(json.dumps({"status": "KILLED", "backends": {}}))


def make_sweep(sweep_dir: Path, finished: Path, other: Path) -> None:
    """runs/sweeps/grid as `lmforge sweep` leaves it: trial 0 complete, trial 1 pruned at step 2,
    trial 2 failed before its run began (trial.yaml and outcome.json only); trials.csv says so."""
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.yaml").write_text("name: grid\nbase: base.yaml\nmethod: grid\n")
    for number, source in enumerate([finished, other]):
        trial = copy_run(source, sweep_dir / f"trial-{number:04d}", name=f"grid-trial-{number:04d}")
        shutil.copy(trial / "config.yaml", trial / "trial.yaml")
    pruned = sweep_dir / "trial-0001"
    as_paused(pruned, 2)
    validation = json.loads((finished / "eval.json").read_text())["validation"] | {"step": 2}
    (pruned / "eval.json").write_text(json.dumps({"step": 2, "stop_reason": "pruned", "validation": validation}))
    (pruned / "outcome.json").write_text(json.dumps({"state": "pruned", "step": 2}))
    early = sweep_dir / "trial-0002"
    early.mkdir()
    config = yaml.safe_load((pruned / "trial.yaml").read_text()) | {"name": "grid-trial-0002"}
    (early / "trial.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    reason = "DataError: corpus.txt:3: not UTF-8"
    (early / "outcome.json").write_text(json.dumps({"state": "failed", "reason": reason}))
    (sweep_dir / "trials.csv").write_text(
        "number,state,reason,train.lr,eval/loss,best_step,seconds,run_dir\n"
        f"0,complete,,0.003,5.9,4,6.0,{sweep_dir / 'trial-0000'}\n"
        f"1,pruned,pruned at step 2,0.001,6.2,2,3.0,{pruned}\n"
        f"2,failed,{reason},0.01,,,1.0,{early}\n"
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two real runs differing in train.lr (the second is tiny-latest), and made from them: a paused
    run, a corrupt run, a sweep of three trials, and directories that are no run (notes, an
    evaluation's predictions)."""
    tmp = tmp_path_factory.mktemp("runs-table")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    cfg = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
    cfg["train"].update({"max_steps": 4, "save_every": 2})
    (tmp / "base.yaml").write_text(yaml.safe_dump(cfg))
    for lr in ("1e-3", "3e-3"):
        proc = lmforge(tmp, "train", "base.yaml", f"train.lr={lr}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    root = tmp / "runs"
    slow, fast = sorted(root.glob("tiny-2*"))  # trained in this order: train.lr 1e-3, then 3e-3
    paused = copy_run(slow, root / "tiny-20200101-000000")
    as_paused(paused, 2)
    broken = copy_run(slow, root / "broken-20200101-000001")
    (broken / "eval.json").write_text('{"step": 4, "validation": ')
    make_sweep(root / "sweeps" / "grid", fast, slow)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run\n")
    evaluation = root / "evaluations" / f"{fast.name}-20200101-000002"  # what `lmforge eval` writes: no run
    evaluation.mkdir(parents=True)
    (evaluation / "eval.json").write_text(json.dumps({"target": str(fast), "split": "test", "metrics": {}}))
    shutil.copy(fast / "predictions.jsonl", evaluation / "predictions.jsonl")
    return {"tmp": tmp, "root": root, "slow": slow, "fast": fast, "paused": paused, "broken": broken}


def by_dir(table: pd.DataFrame) -> dict[str, pd.Series]:
    return {Path(row["run"]).name: row for _, row in table.iterrows()}


def test_every_run_is_listed_once_with_the_state_its_files_tell(runs):
    table = load_runs(runs["root"])
    assert (runs["root"] / "tiny-latest").is_symlink()
    assert sorted(table["run"]) == sorted(
        str(p)
        for p in [
            runs["slow"],
            runs["fast"],
            runs["paused"],
            runs["broken"],
            *(runs["root"] / "sweeps" / "grid").glob("trial-*"),
        ]
    )  # the latest symlink is not a second row, notes/ and evaluations/ no row at all
    states = {name: row["state"] for name, row in by_dir(table).items()}
    assert states == {
        runs["slow"].name: "finished",
        runs["fast"].name: "finished",
        "tiny-20200101-000000": "paused",
        "broken-20200101-000001": "unreadable",
        "trial-0000": "finished",
        "trial-0001": "pruned",
        "trial-0002": "failed",
    }
    assert list(table.columns[: len(BASE_COLUMNS)]) == list(BASE_COLUMNS)
    assert table["started"].dropna().is_monotonic_increasing and pd.isna(table["started"].iloc[-1])  # trial 2: none


def test_a_row_holds_the_flattened_config_and_final_metrics_of_its_files(runs):
    row = by_dir(load_runs(runs["root"]))[runs["fast"].name]
    config = yaml.safe_load((runs["fast"] / "config.yaml").read_text())
    results = json.loads((runs["fast"] / "eval.json").read_text())
    points = [json.loads(line) for line in (runs["fast"] / "metrics.jsonl").read_text().splitlines()]
    assert row["name"] == "tiny" and row["train.lr"] == 3e-3 and config["train"]["lr"] == 3e-3
    assert row["model.preset"] == config["model"]["preset"] == "llama-tiny"
    assert row["data.max_length"] == 32 and row["train.max_steps"] == 4 and row["seed"] == 7
    assert row["tracking.backends"] == '["none"]'  # a list as its JSON text
    assert row["step"] == results["step"] == 4 and row["stop_reason"] == "max_steps"
    for key in ("loss", "perplexity", "token_accuracy"):
        assert row[f"validation/{key}"] == results["validation"][key]
        assert row[f"test/{key}"] == results["test"][key]
    stamp = datetime.strptime(runs["fast"].name.removeprefix("tiny-")[:15], "%Y%m%d-%H%M%S")
    assert row["started"] == pd.Timestamp(stamp)
    assert row["duration_s"] == pytest.approx(points[-1]["time"] - points[0]["time"], abs=1e-3)

    table = load_runs(runs["root"])
    for column in ("train.lr", "step", "validation/loss", "duration_s", "trial", "data.max_length"):
        assert pd.api.types.is_numeric_dtype(table[column]), column
    assert pd.api.types.is_datetime64_any_dtype(table["started"])
    paused = by_dir(table)["tiny-20200101-000000"]
    assert paused["step"] == 2 and pd.isna(paused["validation/loss"]) and pd.isna(paused["stop_reason"])


def test_a_corrupt_run_is_listed_unreadable_with_its_problem(runs):
    row = by_dir(load_runs(runs["root"]))["broken-20200101-000001"]
    assert row["state"] == "unreadable"
    assert row["problem"].startswith("eval.json: not valid JSON")
    assert row["train.lr"] == 1e-3 and row["name"] == "tiny"  # what could be read is there
    assert pd.isna(by_dir(load_runs(runs["root"]))[runs["slow"].name]["problem"])


def test_sweep_trials_carry_their_sweep_trial_and_the_sweeps_verdict(runs):
    rows = by_dir(load_runs(runs["root"] / "sweeps" / "grid"))
    assert sorted(rows) == ["trial-0000", "trial-0001", "trial-0002"]
    assert {name: (row["sweep"], row["trial"]) for name, row in rows.items()} == {
        "trial-0000": ("grid", 0),
        "trial-0001": ("grid", 1),
        "trial-0002": ("grid", 2),
    }
    assert rows["trial-0002"]["state"] == "failed" and rows["trial-0002"]["reason"].startswith("DataError")
    assert rows["trial-0002"]["train.lr"] == 1e-3  # from trial.yaml: its run never wrote config.yaml
    assert rows["trial-0001"]["reason"] == "pruned at step 2" and rows["trial-0001"]["validation/step"] == 2
    assert rows["trial-0000"]["name"] == "grid-trial-0000" and rows["trial-0000"]["train.lr"] == 3e-3
    assert pd.isna(by_dir(load_runs(runs["root"]))[runs["fast"].name]["sweep"])


def test_one_run_directory_is_one_row_and_a_resumed_run_training_now_is_running(runs):
    (row,) = load_runs(runs["paused"]).to_dict("records")
    assert row["state"] == "paused" and row["run"] == str(runs["paused"])
    with run_lock(runs["paused"]):  # what `lmforge train --resume` holds while it trains
        assert load_runs(runs["paused"])["state"].tolist() == ["running"]
    assert load_runs(runs["paused"])["state"].tolist() == ["paused"]
    with pytest.raises(UserError, match=r"nowhere: no such directory"):
        load_runs(runs["root"] / "nowhere")


def test_load_metrics_is_one_row_a_step_with_the_last_value_logged(runs, tmp_path):
    run = copy_run(runs["fast"], tmp_path / "run")
    points = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    table = load_metrics(run)
    steps = list(dict.fromkeys(p["step"] for p in points))
    assert table["step"].tolist() == steps == [0, 1, 2, 3, 4]
    last = table.set_index("step").loc[4]
    assert last["train/loss"] == next(p["train/loss"] for p in points if p["step"] == 4 and "train/loss" in p)
    assert last["test/loss"] == next(p["test/loss"] for p in points if "test/loss" in p)
    assert last["time"] == max(p["time"] for p in points if p["step"] == 4)

    # a resumed run logs step 3 and 4 again; the first point of the step shows its last value
    with (run / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"step": 3, "time": 2e9, "train/loss": 1.25}) + "\n")
        file.write(json.dumps({"step": 4, "time": 2e9 + 1, "train/loss": "nan"}) + "\n")
        file.write('{"step": 5, "time": 2e9')  # cut off by a crash
    resumed = load_metrics(run).set_index("step")
    assert resumed.index.tolist() == [0, 1, 2, 3, 4]
    assert resumed.loc[3, "train/loss"] == 1.25 and resumed.loc[3, "time"] == 2e9
    assert pd.isna(resumed.loc[4, "train/loss"]) and resumed.loc[4, "test/loss"] == last["test/loss"]


def test_load_predictions_reads_a_runs_predictions_line_by_line(runs):
    lines = [json.loads(line) for line in (runs["fast"] / "predictions.jsonl").read_text().splitlines()]
    table = load_predictions(runs["fast"])
    assert len(table) == len(lines) > 0
    assert table["index"].tolist() == [line["index"] for line in lines]
    assert table["loss"].tolist() == [line["loss"] for line in lines]
    for name in {name for line in lines for name in line.get("scores", {})}:
        assert table[f"score/{name}"].tolist() == [line["scores"].get(name) for line in lines]


def test_load_predictions_flattens_scores_and_keeps_probabilities(tmp_path):
    records = [
        {
            "index": 0,
            "id": "a",
            "input": "good film",
            "reference": "pos",
            "prediction": "pos",
            "loss": 0.1,
            "tokens": 3,
            "scores": {"exact_match": 1.0, "bleu": 100.0},
            "label": "pos",
            "predicted": "pos",
            "probabilities": {"pos": 0.9, "neg": 0.1},
        },
        {
            "index": 1,
            "id": "b",
            "input": "dull",
            "reference": "neg",
            "prediction": "pos",
            "loss": 2.3,
            "tokens": 1,
            "scores": {"exact_match": 0.0},
            "label": "neg",
            "predicted": "pos",
            "probabilities": {"pos": 0.6, "neg": 0.4},
        },
    ]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = load_predictions(tmp_path)
    assert table["id"].tolist() == ["a", "b"] and table["loss"].tolist() == [0.1, 2.3]
    assert table["score/exact_match"].tolist() == [1.0, 0.0]
    assert table["score/bleu"].iloc[0] == 100.0 and pd.isna(table["score/bleu"].iloc[1])
    assert table["probabilities"].tolist() == [{"pos": 0.9, "neg": 0.1}, {"pos": 0.6, "neg": 0.4}]
    assert "scores" not in table.columns
    with pytest.raises(UserError, match=r"other/predictions.jsonl: no such file"):
        load_predictions(tmp_path / "other")
    (tmp_path / "predictions.jsonl").write_text('{"index": 0}\n{"index": \n{"index": 2}\n')
    with pytest.raises(UserError, match=r"predictions.jsonl:2: not valid JSON"):
        load_predictions(tmp_path)


# ------------------------------------------------------------------------------------ the CLI


def test_the_table_shows_state_the_setting_that_differs_and_why_runs_failed(runs):
    proc = lmforge(runs["tmp"], "runs")  # DIR defaults to runs
    assert proc.returncode == 0, proc.stderr
    header, *lines = proc.stdout.splitlines()
    columns = header.split()
    assert columns[:4] == ["run", "state", "step", "train.lr"] and "validation/loss" in columns
    assert "seed" not in columns and "name" not in columns  # the same in every run, or the run's own
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[1] != "failed:"}
    assert rows[runs["fast"].name][1:4] == ["finished", "4", "0.003"]
    assert rows["tiny-20200101-000000"][1:4] == ["paused", "2", "0.001"]
    assert rows["sweeps/grid/trial-0002"][1] == "failed"
    assert "sweeps/grid/trial-0002 failed: DataError: corpus.txt:3: not UTF-8" in proc.stdout
    assert "broken-20200101-000001 unreadable: eval.json: not valid JSON" in proc.stdout


def test_filters_and_sort_pick_and_order_the_rows(runs):
    proc = lmforge(runs["tmp"], "runs", "--filter", "state=finished", "--sort", "-validation/loss", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(io.StringIO(proc.stdout))
    expected = load_runs(runs["root"])
    finished = expected[expected["state"] == "finished"].sort_values("validation/loss", ascending=False)
    assert table["run"].tolist() == [str(Path("runs") / Path(r).relative_to(runs["root"])) for r in finished["run"]]
    assert len(table) == 3 and table["validation/loss"].is_monotonic_decreasing

    proc = lmforge(runs["tmp"], "runs", "--filter", "train.lr >= 2e-3", "--filter", "name~^tiny$", "--format", "csv")
    assert proc.returncode == 0, proc.stderr
    assert pd.read_csv(io.StringIO(proc.stdout))["run"].tolist() == [f"runs/{runs['fast'].name}"]


def test_an_unknown_key_or_a_malformed_filter_is_a_message_naming_it(runs):
    proc = lmforge(runs["tmp"], "runs", "--filter", "train.lrr>=1e-3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--filter train.lrr: no such column; did you mean train.lr" in proc.stderr
    proc = lmforge(runs["tmp"], "runs", "--filter", "train.lr")
    assert proc.returncode == 2 and "expected KEY OP VALUE" in proc.stderr
    proc = lmforge(runs["tmp"], "runs", "--format", "parquet")
    assert proc.returncode == 2 and "--out FILE.parquet" in proc.stderr


def assert_same_rows(expected: pd.DataFrame, got: pd.DataFrame) -> None:
    """The same columns, rows and values (a yes/no column read back from text may come as 1.0/0.0)."""
    assert list(got.columns) == list(expected.columns)
    assert len(got) == len(expected)
    got = got.assign(started=pd.to_datetime(got["started"]))
    for column in expected.columns:
        for want, have in zip(expected[column], got[column], strict=True):
            if pd.isna(want):
                assert pd.isna(have), (column, want, have)
            elif isinstance(want, float):
                assert have == pytest.approx(want, rel=1e-12), (column, want, have)
            else:
                assert have == want, (column, want, have)


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_each_export_reads_back_as_the_rows_of_load_runs(runs, tmp_path, fmt):
    out = tmp_path / f"runs.{fmt}"
    proc = lmforge(runs["tmp"], "runs", str(runs["root"]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 7 run(s) to {out}" in proc.stderr
    expected = load_runs(runs["root"])
    if fmt == "parquet":
        pd.testing.assert_frame_equal(pd.read_parquet(out), expected)  # every type kept
    else:
        read = pd.read_csv(out) if fmt == "csv" else pd.read_json(out)
        assert_same_rows(expected, read)


def test_no_runs_is_a_message_and_an_empty_csv_has_the_header(tmp_path):
    proc = lmforge(tmp_path, "runs", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout == "" and f"no runs in {tmp_path}" in proc.stderr
    proc = lmforge(tmp_path, "runs", str(tmp_path), "--format", "csv")
    assert proc.returncode == 0 and proc.stdout.splitlines() == [",".join(BASE_COLUMNS)]
