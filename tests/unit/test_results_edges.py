"""Edges of the results commands on hand-made run directories (no training): what is a run, a
paused run's step, the report's --out and repeated runs, the comparison without resamples, eval's
--out and --baseline base."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lmforge.errors import UserError
from lmforge.results import analysis
from lmforge.results.report import build_report
from lmforge.results.runs import load_runs


def make_run(root: Path, name: str, lr: float = 1e-3, finished: bool = True) -> Path:
    run = root / f"{name}-20261201-000000"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": name, "train": {"lr": lr}}))
    points = [{"step": s, "time": 1e9 + s, "train/loss": 5.0 - s / 10, "train/lr": lr} for s in range(1, 11)]
    points += [{"step": s, "time": 1e9 + s, "eval/loss": 5.0 - s / 20} for s in (5, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    (run / "tracking.json").write_text(json.dumps({"status": "FINISHED" if finished else "KILLED"}))
    if finished:
        (run / "final").mkdir()
        (run / "eval.json").write_text(
            json.dumps({"step": 10, "stop_reason": "max_steps", "validation": {"loss": 4.5}})
        )
    return run


def test_mlflow_artifact_copies_are_not_runs(tmp_path):
    run = make_run(tmp_path / "runs", "a")
    copy = tmp_path / "runs" / "mlartifacts" / "0123abcd" / "artifacts"
    copy.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "eval.json"):
        (copy / name).write_bytes((run / name).read_bytes())
    table = load_runs(tmp_path / "runs")
    assert table["run"].tolist() == [str(run)]


def test_a_paused_run_stands_at_its_newest_checkpoint(tmp_path):
    run = make_run(tmp_path, "p", finished=False)
    (run / "checkpoints" / "step-000012").mkdir(parents=True)  # saved at the pause, after the last logged point
    (row,) = load_runs(run).to_dict("records")
    assert row["state"] == "paused" and row["step"] == 12


def test_report_out_is_checked_first_and_a_run_given_twice_is_one(tmp_path):
    run = make_run(tmp_path / "runs", "a")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="a directory; give the file to write"):
        build_report([run], tmp_path / "dir")
    assert not list((tmp_path).glob(".*partial"))
    page = build_report([run, tmp_path / "runs", Path(str(run) + "/")], tmp_path / "deep" / "r.html").read_text()
    assert page.count("<td>1</td><td>a-20261201-000000</td>") == 1 and "<td>2</td>" not in page


def test_a_corrupt_predictions_line_is_named(tmp_path):
    run = make_run(tmp_path, "a")
    line = '{"index": 0, "id": "a", "input": "x", "loss_sum": 1.0, "tokens": 1}'
    (run / "predictions.jsonl").write_text(line + '\n{"index": 1, cut\n')
    with pytest.raises(UserError, match=r"predictions.jsonl:2: not valid JSON"):
        build_report([run], tmp_path / "r.html")


def test_compare_without_resamples_and_the_verdicts():
    rows = [
        {"id": str(i), "input": "x", "loss_sum": 1.0 + (i % 3), "tokens": 2, "label": "a", "predicted": p}
        for i, p in enumerate("aabab")
    ]
    worse = [
        dict(r, predicted="b" if i == 0 else r["predicted"], loss_sum=r["loss_sum"] + 1) for i, r in enumerate(rows)
    ]
    found = analysis.compare(rows, worse, ["a", "b"], resamples=0)
    assert found["metrics"]["test/accuracy"] == {
        "candidate": 0.6,
        "baseline": 0.4,
        "difference": pytest.approx(0.2),
        "verdict": "not tested",
        "higher_is_better": True,
    }
    tested = analysis.compare(rows, worse, ["a", "b"], resamples=200)["metrics"]
    assert tested["test/loss"]["verdict"] == "better"  # lower loss on every example: p = 1/201
    assert tested["test/accuracy"]["verdict"] == "no significant difference"  # 0.6 vs 0.4 on five examples


def test_eval_out_may_not_be_a_run_or_model_directory(tmp_path):
    from lmforge.eval.target import _check_out_dir

    run = make_run(tmp_path, "a")
    with pytest.raises(UserError, match="that is a run or checkpoint directory; writing there would replace"):
        _check_out_dir(run)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="that is a model directory"):
        _check_out_dir(tmp_path / "model")
    _check_out_dir(tmp_path / "new")  # a new directory is fine


def test_baseline_base_is_the_base_the_adapter_recorded(tmp_path):
    from lmforge.eval.target import _base_of

    run = make_run(tmp_path, "lora")
    (run / "final" / "config.json").write_text("{}")
    recorded = tmp_path / "quickstart-20261130-000000" / "final"
    (run / "final" / "lmforge_base.json").write_text(json.dumps({"path": str(recorded), "given_as": "q-latest/final"}))
    config = SimpleNamespace(model=SimpleNamespace(name_or_path="q-latest/final"))
    assert _base_of(run, config) == recorded
    (run / "final" / "lmforge_base.json").unlink()
    with pytest.raises(UserError, match="trained from scratch"):
        _base_of(run, SimpleNamespace(model=SimpleNamespace(name_or_path=None)))


def test_a_plugins_metric_has_no_direction_and_answers_are_compared_where_both_answered():
    def row(i, prediction, plen):
        return {"id": str(i), "input": "x", "reference": "a", "loss_sum": 1.0, "tokens": 1, "prediction": prediction,
                "scores": {"exact_match": float(prediction == "a"), "plen": plen}}  # fmt: skip

    short = [row(i, "a", 1.0) for i in range(30)]
    long = [row(i, "a a a", 5.0) for i in range(20)] + [{"id": str(i), "input": "x", "loss_sum": 1.0, "tokens": 1}
                                                       for i in range(20, 30)]  # fmt: skip
    found = analysis.compare(short, long, resamples=100)["metrics"]
    assert found["generation/plen"]["verdict"] == "lower" and found["generation/plen"]["better"] is None
    assert found["generation/exact_match"]["verdict"] == "better"
    assert found["generation/exact_match"]["candidate"] == 1.0  # on the 20 examples both answered


def test_predictions_lines_missing_fields_are_named(tmp_path):
    from lmforge.results.predictions import read_predictions

    path = tmp_path / "predictions.jsonl"
    path.write_text('{"index": 0, "id": "a", "input": "x", "loss_sum": 1.0, "tokens": 1}\n{}\n')
    with pytest.raises(UserError, match=r"predictions.jsonl:2: index, id, input, loss_sum, tokens missing"):
        read_predictions(path)
    path.write_text('{"index": 0, "id": "a", "input": "x", "loss_sum": 1.0, "tokens": 1, "prediction": null}\n')
    with pytest.raises(UserError, match=r":1: prediction missing or of the wrong type"):
        read_predictions(path)


def test_eval_out_may_not_be_a_directory_of_other_files(tmp_path):
    from lmforge.eval.target import _check_out_dir

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "trials.csv").write_text("number\n")
    with pytest.raises(UserError, match="not empty and not an earlier evaluation"):
        _check_out_dir(tmp_path / "sweep")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "eval.json").write_text('{"target": "runs/a", "split": "test"}')
    _check_out_dir(tmp_path / "earlier")  # an earlier evaluation is replaced


def test_baseline_base_of_a_final_directory_is_its_recorded_base(tmp_path):
    from lmforge.eval.target import _base_of

    run = make_run(tmp_path, "lora")
    (run / "final" / "config.json").write_text("{}")
    recorded = tmp_path / "base-model"
    (run / "final" / "lmforge_base.json").write_text(json.dumps({"path": str(recorded)}))
    assert _base_of(run / "final", None) == recorded
