"""A tracker never silently loses points: a call the real MLflow refuses (a name it does not allow)
is dropped and reported while every other call goes through, `lmforge sync` reports instead of
crashing, and `missing` in tracking.json counts metrics.jsonl values the MLflow run lacks."""

import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import Config
from lmforge.tracking.base import JsonlTracker, RunInfo, Trackers
from lmforge.tracking.mlflow import MlflowTracker


def mlflow_config(tmp_path, corpus, cache_dir, **tags) -> Config:
    """A config that skips lmforge's up-front checks, as a name MLflow's server refuses and its
    client does not (a stricter server, say) would: what the running tracker must survive."""
    raw = tiny_config_dict(corpus, cache_dir, tmp_path / "runs")
    raw["tracking"] = {"backends": ["mlflow"], "tags": tags}
    return Config.model_validate(raw)


def test_a_refused_param_costs_only_itself_and_the_run_finishes_with_every_point(tmp_path, corpus, cache_dir):
    config = mlflow_config(tmp_path, corpus, cache_dir, **{"cost-center, team": "nlp", "team": "nlp"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker, warnings = MlflowTracker(RunInfo(config, run_dir, {"team": "nlp"})), []
    trackers = Trackers(JsonlTracker(run_dir / "metrics.jsonl"), [tracker], run_dir, warnings.append, None, 30)
    trackers.log_params({"train.lr": 0.001, "tracking.tags.cost-center, team": "nlp", "tracking.tags.team": "nlp"})
    for step in range(1, 4):
        trackers.log_metrics({"train/loss": 1.0 / step}, step)
    assert trackers.finish("FINISHED") == {}
    client = MlflowClient(tracker.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.001", "tracking.tags.team": "nlp"}  # the good ones, despite the bad
    assert [m.step for m in client.get_metric_history(tracker.run_id, "train/loss")] == [1, 2, 3]
    record = json.loads((run_dir / "tracking.json").read_text())["backends"]["mlflow"]
    assert record["missing"] == 0 and len(record["rejected"]) == 1 and "cost-center, team" in record["rejected"][0]
    assert len(warnings) == 1 and "mlflow refused log_params" in warnings[0]


def test_sync_reports_a_refusal_and_sends_the_rest_without_a_traceback(tmp_path, corpus, cache_dir):
    import subprocess

    config = mlflow_config(tmp_path, corpus, cache_dir, **{"a, b": "x"})
    run_dir = tmp_path / "runs" / "tiny-20261130-000000"
    run_dir.mkdir(parents=True)
    raw = config.model_dump(mode="json")
    raw["tracking"]["tags"] = {}  # the saved config passes validation; the bad name arrives with the points
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    points = [{"step": s, "time": 1.0, "train/loss": 1.0 / s, "bad, name": 1.0} for s in (1, 2)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    proc = subprocess.run(
        lmforge_command("sync", str(run_dir)), capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "mlflow refused to log the metrics" in proc.stdout and "bad, name" in proc.stdout
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["backends"]["mlflow"]["missing"] == 2  # the two values MLflow refused, counted honestly
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    history = client.get_metric_history(record["backends"]["mlflow"]["run_id"], "train/loss")
    assert sorted(m.step for m in history) == [1, 2]


def test_sync_against_a_dead_server_is_a_message_not_a_traceback(tmp_path, corpus, cache_dir):
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    raw = tiny_config_dict(corpus, cache_dir, tmp_path / "runs")
    raw["tracking"] = {"backends": ["mlflow"], "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}}
    run_dir = tmp_path / "runs" / "tiny-20261130-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.0, "train/loss": 1.0}) + "\n")
    env = subprocess_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    proc = subprocess.run(lmforge_command("sync", str(run_dir)), capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "failed to start the run" in proc.stderr and "run lmforge sync again" in proc.stderr


@pytest.mark.parametrize("bad", [{"tags": {"cost-center, team": "nlp"}}, {"mlflow": {"register_as": "a/b"}}])
def test_names_mlflow_refuses_are_config_errors_before_anything_runs(tmp_path, corpus, cache_dir, bad):
    import subprocess

    raw = tiny_config_dict(corpus, cache_dir, tmp_path / "runs")
    raw["tracking"] = {"backends": ["mlflow"], **bad}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run(
        lmforge_command("config", "validate", str(path)), capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 1 and "MLflow refuses it" in proc.stderr and "Traceback" not in proc.stderr
