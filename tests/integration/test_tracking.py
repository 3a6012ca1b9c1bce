"""Tracking end to end through the real CLI: a real MLflow server (started, killed and restarted
here), the model registry, W&B and Comet offline files, TensorBoard event files, secrets."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import lmforge_command, subprocess_env, tiny_config_dict


def write_config(tmp_path: Path, corpus: Path, cache_dir: Path, **tracking) -> Path:
    cfg = tiny_config_dict(corpus, cache_dir, tmp_path / "runs")
    cfg["train"].update({"max_steps": 12, "eval_every": 6, "save_every": 6})
    cfg["tracking"] = tracking
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        lmforge_command(*args), capture_output=True, text=True, cwd=cwd, env=env or subprocess_env(), timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_dir_of(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "runs").glob("tiny-2*")
    return run_dir


def jsonl_values(run_dir: Path) -> dict[str, list[int]]:
    """metric -> the steps it was logged at, from metrics.jsonl."""
    steps: dict[str, list[int]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        point = json.loads(line)
        for key in point.keys() - {"step", "time"}:
            steps.setdefault(key, []).append(point["step"])
    return steps


# --------------------------------------------------------------------------- a real MLflow server


class MlflowServer:
    """`mlflow server` on a loopback port, with a sqlite store and proxied artifacts in `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            *[str(Path(sys.executable).with_name("mlflow")), "server"],
            *["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"],
            *["--artifacts-destination", str(self.root / "artifacts")],
            *["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
        ]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runners
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


@pytest.mark.slow
def test_mlflow_server_killed_mid_run_then_sync_completes_the_run(tmp_path, corpus, cache_dir, mlflow_server):
    from mlflow.tracking import MlflowClient

    path = write_config(
        tmp_path, corpus, cache_dir, backends=["mlflow"], mlflow={"tracking_uri": mlflow_server.uri}, flush_timeout=3
    )
    cfg = yaml.safe_load(path.read_text())
    cfg["train"].update({"max_steps": 300, "eval_every": 100, "save_every": 100})
    path.write_text(yaml.safe_dump(cfg))
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(
        lmforge_command("train", str(path)), stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=subprocess_env()
    )
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill the server once it has some of the run's points
        record = list((tmp_path / "runs").glob("tiny-2*/tracking.json"))
        run_id = json.loads(record[0].read_text())["backends"]["mlflow"]["run_id"] if record else None
        if run_id and len(client.get_metric_history(run_id, "train/loss")) >= 5:
            break
        assert proc.poll() is None, (tmp_path / "train.log").read_text()
        time.sleep(0.2)
    jsonl = list((tmp_path / "runs").glob("tiny-2*/metrics.jsonl"))
    mlflow_server.kill()
    killed_at = sum(1 for _ in jsonl[0].read_text().splitlines())

    assert proc.wait(timeout=300) == 0, (tmp_path / "train.log").read_text()
    out = (tmp_path / "train.log").read_text()
    run_dir = run_dir_of(tmp_path)
    steps = jsonl_values(run_dir)
    assert steps["train/loss"] == list(range(1, 301))  # the local record is complete
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert "tracking: mlflow failed" in out and out.count("tracking: mlflow failed") == 1
    assert f"lmforge sync {run_dir}" in out
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["status"] == "FINISHED" and record["backends"]["mlflow"]["missing"] > 0
    assert record["backends"]["mlflow"]["run_id"] == run_id
    assert killed_at < len((run_dir / "metrics.jsonl").read_text().splitlines())

    mlflow_server.start()
    partial = client.get_metric_history(run_id, "train/loss")
    assert 5 <= len(partial) < 300 and client.get_run(run_id).info.status == "RUNNING"
    sync = run_cli("sync", str(run_dir), cwd=tmp_path)
    assert "sent" in sync.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    held = {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
    assert held == {key: sorted(s) for key, s in steps.items()}  # every point, once, at its step
    assert sum(map(len, held.values())) == sum(map(len, steps.values()))
    assert run.data.params["train.max_steps"] == "300"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "eval.json", "metrics.jsonl", "examples.jsonl", "data_report.json"} <= artifacts
    assert json.loads((run_dir / "tracking.json").read_text())["backends"]["mlflow"]["missing"] == 0

    again = run_cli("sync", str(run_dir), cwd=tmp_path)  # idempotent: nothing is sent twice
    assert "sent 0 missing metric values" in again.stdout
    assert sum(len(client.get_metric_history(run_id, k)) for k in run.data.metrics) == sum(map(len, steps.values()))


@pytest.mark.slow
def test_mlflow_server_run_params_metrics_artifacts_and_registered_model(
    tmp_path, corpus, cache_dir, mlflow_server, monkeypatch
):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    tracking = {"backends": ["mlflow"], "mlflow": {"tracking_uri": mlflow_server.uri, "register_as": "tiny-kjv"}}
    path = write_config(tmp_path, corpus, cache_dir, **tracking)
    out = run_cli("train", str(path), cwd=tmp_path).stdout
    run_dir = run_dir_of(tmp_path)
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = json.loads((run_dir / "tracking.json").read_text())["backends"]["mlflow"]["run_id"]
    assert run_id in out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.preset"] == "llama-tiny"
    assert int(run.data.params["model.parameters"]) > 0
    assert run.data.tags["lmforge.version"] and run.data.tags["host"]
    for key, steps in jsonl_values(run_dir).items():
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == sorted(steps), key
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}
    local = {
        p["step"]: p["train/loss"] for p in map(json.loads, (run_dir / "metrics.jsonl").open()) if "train/loss" in p
    }
    assert loss == pytest.approx(local)
    assert "system/rss_mb" in run.data.metrics and run.data.metrics["system/rss_mb"] > 50
    downloaded = Path(client.download_artifacts(run_id, "eval.json", str(tmp_path / "dl")))
    assert json.loads(downloaded.read_text()) == json.loads((run_dir / "eval.json").read_text())
    card = Path(client.download_artifacts(run_id, "README.md", str(tmp_path / "dl")))
    assert "# tiny" in card.read_text() and "## Final metrics" in card.read_text()

    (version,) = client.search_model_versions("name='tiny-kjv'")
    assert version.run_id == run_id and version.version == "1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)  # where models:/ URIs resolve
    model = mlflow.pyfunc.load_model("models:/tiny-kjv/1")
    generated = model.predict(["In the beginning God"])
    assert len(generated) == 1 and isinstance(generated[0], str) and generated[0].strip()


# --------------------------------------------------------------------------- offline backends


def wandb_records(path: Path):
    """The records of a W&B run file (`run-<id>.wandb`): wandb's LevelDB-style log of protobuf
    `Record`s (wandb/sdk/internal/datastore in older releases). wandb 0.2x+ ships no Python
    reader, so the format is read here: a 7-byte header, then 32 KiB blocks of chunks, each with a
    7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, parts = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_history(run_file: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    history: dict[str, list[tuple[int, float]]] = {}
    config: dict = {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    history.setdefault(key, []).append((row["_step"], value))
        elif kind == "config":
            for item in record.config.update:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return history, config


def comet_metrics(archive: Path) -> tuple[dict[str, list[tuple[int, float]]], dict]:
    """Metrics and parameters from a Comet offline archive (its messages.json, one JSON per line)."""
    metrics: dict[str, list[tuple[int, float]]] = {}
    params = {}
    with zipfile.ZipFile(archive) as z:
        for line in z.read("messages.json").decode().splitlines():
            message = json.loads(line)
            payload = message["payload"]
            if message["type"] == "metric_msg":
                m = payload["metric"]
                metrics.setdefault(m["metricName"], []).append((m["step"], float(m["metricValue"])))
            elif message["type"] == "parameter_msg":  # "param" for scalars, "params" for lists
                param = payload.get("param") or payload["params"]
                if param["source"] == "manual":
                    params[param["paramName"]] = param["paramValue"]
    return metrics, params


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_series(got: list[tuple[int, float]], expected: list[tuple[int, float]], rel: float = 1e-12) -> None:
    assert [step for step, _ in got] == [step for step, _ in expected]
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=rel)


def local_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    points = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(p["step"], p[key]) for p in points if key in p]


@pytest.mark.slow
def test_wandb_and_comet_offline_and_tensorboard_hold_the_metrics(tmp_path, corpus, cache_dir):
    tracking = {
        "backends": ["wandb", "comet", "tensorboard"],
        "wandb": {"mode": "offline", "project": "lmforge-test"},
        "comet": {"mode": "offline", "project": "lmforge-test"},
        "study": "study-1",
    }
    path = write_config(tmp_path, corpus, cache_dir, **tracking)
    env = subprocess_env(WANDB_SILENT="true")
    out = run_cli("train", str(path), cwd=tmp_path, env=env).stdout
    run_dir = run_dir_of(tmp_path)
    loss = local_series(run_dir, "train/loss")
    evals = local_series(run_dir, "eval/loss")
    assert [s for s, _ in loss] == list(range(1, 13)) and [s for s, _ in evals] == [6, 12]
    assert "wandb sync" in out and "comet upload" in out and "tensorboard --logdir" in out

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = wandb_history(run_file)
    assert_series(history["train/loss"], loss)
    assert_series(history["eval/loss"], evals)
    assert "system/rss_mb" in history
    assert config["train.lr"] == 0.001 and config["model.preset"] == "llama-tiny"

    (archive,) = (run_dir / "comet").glob("*.zip")
    metrics, params = comet_metrics(archive)
    assert_series(metrics["train/loss"], loss)
    assert_series(metrics["eval/loss"], evals)
    assert params["train.lr"] == 0.001 and params["tracking.backends"] == ["wandb", "comet", "tensorboard"]

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert_series(scalars["train/loss"], loss, rel=1e-6)  # event files store float32
    assert_series(scalars["eval/loss"], evals, rel=1e-6)
    assert json.loads((run_dir / "tracking.json").read_text())["status"] == "FINISHED"


# --------------------------------------------------------------------------- secrets, nesting, extras


def all_bytes_under(root: Path) -> bytes:
    """Every file under `root`, zip archives unpacked (Comet), as one blob to search."""
    blob = bytearray()
    for path in root.rglob("*"):
        if path.is_file():
            blob += path.read_bytes()
            if path.suffix == ".zip":
                with zipfile.ZipFile(path) as z:
                    for name in z.namelist():
                        blob += z.read(name)
    return bytes(blob)


@pytest.mark.slow
def test_secrets_never_reach_saved_config_params_or_logs(tmp_path, corpus, cache_dir):
    from mlflow.tracking import MlflowClient

    in_field = "plain-looking-secret-value-1234"  # only its key name (api_key) says it is a secret
    shaped = "hf_" + "Q" * 34  # a Hugging Face token pasted into free text
    from_env = "env-credential-value-98765"  # a credential from the environment, pasted into a tag
    (tmp_path / "runs").mkdir()
    parent = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = parent.create_experiment("sweeps", artifact_location=(tmp_path / "runs" / "mlartifacts").as_uri())
    parent_run = parent.create_run(experiment, run_name="sweep-parent")
    tracking = {
        "backends": ["mlflow", "wandb", "comet", "tensorboard"],
        "mlflow": {"experiment": "sweeps", "parent_run_id": parent_run.info.run_id},
        "wandb": {"mode": "offline"},
        "comet": {"mode": "offline"},
        "study": "lr-search",
        "tags": {"api_key": in_field, "note": f"pulled with {shaped}", "owner": "team-a", "deploy": from_env},
    }
    path = write_config(tmp_path, corpus, cache_dir, **tracking)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "config.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "config"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    env = subprocess_env(MY_SERVICE_TOKEN=from_env, WANDB_SILENT="true")
    proc = run_cli("train", str(path), "tracking.tags.cli_password=cli-given-password-555", cwd=tmp_path, env=env)
    shown = run_cli("config", "show", str(path), cwd=tmp_path, env=env)
    run_dir = run_dir_of(tmp_path)

    secrets = [in_field, shaped, from_env, "cli-given-password-555"]
    blob = all_bytes_under(tmp_path / "runs")
    for secret in secrets:
        for text in (proc.stdout, proc.stderr, shown.stdout):
            assert secret not in text
        assert secret.encode() not in blob, secret
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["tracking"]["tags"]
    assert saved == {
        "api_key": "***REDACTED***",
        "note": "pulled with ***REDACTED***",
        "owner": "team-a",
        "deploy": "***REDACTED***",
        "cli_password": "***REDACTED***",
    }

    run_id = json.loads((run_dir / "tracking.json").read_text())["backends"]["mlflow"]["run_id"]
    run = parent.get_run(run_id)
    assert run.data.params["tracking.tags.api_key"] == "***REDACTED***"
    assert run.data.params["tracking.tags.owner"] == "team-a"
    # nested under the sweep's run and tagged with its study
    assert run.data.tags["mlflow.parentRunId"] == parent_run.info.run_id
    assert run.data.tags["lmforge.study"] == "lr-search" and run.data.tags["owner"] == "team-a"
    assert run.data.tags["api_key"] == "***REDACTED***"
    assert run.data.tags["git.commit"] == head and run.data.tags["git.dirty"] == "false"


def test_a_backend_that_is_not_installed_is_a_config_error_naming_the_extra(tmp_path, corpus, cache_dir, monkeypatch):
    """The one faked thing is the package's absence: find_spec answers None for wandb."""
    import importlib.util

    from lmforge.config import load_config
    from lmforge.errors import ConfigError

    path = write_config(tmp_path, corpus, cache_dir, backends=["mlflow", "wandb"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("  backends:"))
    assert f"{path}:{line}: tracking.backends" in str(error.value)
    assert "wandb is not installed: pip install 'lmforge[wandb]'" in str(error.value)


# --------------------------------------------------------------------------- distributed: one job, one run


@pytest.mark.slow
def test_two_process_job_is_one_run_logged_once_with_the_single_process_losses(tmp_path, corpus, cache_dir):
    """`lmforge train --nproc 2` (lmforge starts torchrun: 2 CPU processes over gloo), micro-batch 4
    each, against 1 process with micro-batch 8: the same per-step losses, one run directory, one
    MLflow run, every step logged once. (Plain torchrun: test_curriculum_runs.)"""
    from mlflow.tracking import MlflowClient

    path = write_config(tmp_path, corpus, cache_dir, backends=["mlflow"])
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["test_fraction"] = 0.0
    cfg["train"].update({"max_steps": 6, "eval_every": None, "save_every": None})
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(path), "--nproc", "2", cwd=tmp_path)
    assert proc.stdout.count("done in") == 1  # the other process prints nothing
    run_dir = run_dir_of(tmp_path)
    distributed = local_series(run_dir, "train/loss")
    assert [s for s, _ in distributed] == list(range(1, 7))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7))

    single_dir = tmp_path / "single"
    single_dir.mkdir()
    run_cli("train", str(path), "train.micro_batch_size=8", "tracking.backends=[none]", cwd=single_dir)
    runs = sorted((tmp_path / "runs").glob("tiny-2*"))  # the same output_dir: the newer one is single-process
    assert len(runs) == 2 and runs[0] == run_dir
    assert_series(distributed, local_series(runs[-1], "train/loss"), rel=1e-5)
