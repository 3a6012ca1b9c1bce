"""Killed at any moment and resumed, a run must produce exactly the model of an uninterrupted run."""

import json
import shlex
import signal
import subprocess
import time

import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, lmforge_command, subprocess_env, tiny_config_dict

pytestmark = pytest.mark.slow
STEPS = 24


def write_config(tmp, name="run", **train):
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text((ROOT / "data" / "kjv-pentateuch.txt").read_text()[:150_000])
    cfg = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
    cfg["name"] = name
    # wide enough that a checkpoint write takes a while: the kill test aims inside one
    cfg["model"].update({"hidden_size": 256, "intermediate_size": 1024, "num_layers": 3})
    cfg["train"].update(
        {"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "lr": 2e-3, "warmup_steps": 3}
        | {"eval_every": 6, "save_every": 5, "keep_last": 2, "log_every": 1}
    )
    cfg["train"].update(train)
    cfg["eval"].update({"at_start": True})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config, *args):
    """Start training in the background; its output goes to <config>.<time>.log."""
    with open(config.with_suffix(f".{time.monotonic_ns()}.log"), "w") as log:
        return subprocess.Popen(
            lmforge_command("train", str(config), *args), stdout=log, stderr=subprocess.STDOUT, env=subprocess_env()
        )


def finish(config, *args):
    proc = subprocess.run(
        lmforge_command("train", str(config), *args), capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_dir_of(tmp, name):
    (run_dir,) = sorted((tmp / "runs").glob(f"{name}-2*"))
    return run_dir


def points(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(p["step"], p["train/loss"]) for p in points(run_dir) if "train/loss" in p]


def logged_step(run_dir_glob, step):
    for path in run_dir_glob:
        metrics = path / "metrics.jsonl"
        if metrics.is_file() and any(f'"step": {step},' in line for line in metrics.read_text().splitlines()):
            return True
    return False


def logged_eval(run_dirs, step):
    for path in run_dirs:
        metrics = path / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        if any(f'"step": {step},' in line and "eval/loss" in line for line in lines):
            return True
    return False


def wait_until(proc, condition, timeout=120.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(interval)
    raise TimeoutError


def assert_same_run(run_dir, reference):
    assert losses(run_dir) == losses(reference)  # exact floats, every step once
    ours = load_file(run_dir / "final" / "model.safetensors")
    theirs = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key  # bit for bit
    evals = [p["step"] for p in points(run_dir) if "eval/loss" in p]
    assert evals == [p["step"] for p in points(reference) if "eval/loss" in p]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    finish(write_config(tmp, "ref"))
    return run_dir_of(tmp, "ref")


def test_sigkill_at_several_points_then_resume_equals_uninterrupted(tmp_path, reference):
    config = write_config(tmp_path)
    runs = tmp_path / "runs"

    # 1. mid-interval, after the first checkpoint (step 5)
    proc = start(config)
    wait_until(proc, lambda: logged_step(runs.glob("run-2*"), 8))
    proc.kill(), proc.wait()
    run_dir = run_dir_of(tmp_path, "run")
    assert [c.name for c in sorted((run_dir / "checkpoints").iterdir())] == ["step-000005"]

    # 2. inside a checkpoint write: a temporary directory exists, no manifest yet
    caught = 0
    checkpoints = run_dir / "checkpoints"
    for _ in range(4):
        proc = start(config, "--resume", "auto")
        in_write = wait_until(
            proc, lambda: any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()), interval=0.0005
        )
        proc.kill(), proc.wait()
        leftovers = [p for p in checkpoints.iterdir() if p.name.startswith(".tmp-")]
        if in_write and leftovers:
            caught += 1
            assert not (leftovers[0] / "manifest.json").exists()
            break
    assert caught, "never managed to kill the process while it was writing a checkpoint"

    # 3. right after a checkpoint completed, then 4. through to the end
    proc = start(config, "--resume", "auto")
    newest = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    next_manifest = run_dir / "checkpoints" / f"step-{newest + 5:06d}" / "manifest.json"
    wait_until(proc, next_manifest.exists, interval=0.001)
    proc.kill(), proc.wait()
    out = finish(config, "--resume", "auto").stdout
    assert "resuming from" in out and str(run_dir / "checkpoints") in out

    assert run_dir_of(tmp_path, "run") == run_dir  # resumed in place, no second run directory
    assert_same_run(run_dir, reference)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # leftovers cleaned
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-2:] == ["step-000020", "step-000024"]


def test_damaged_newest_checkpoint_falls_back_to_previous(tmp_path, reference):
    config = write_config(tmp_path, max_steps=STEPS)
    proc = start(config)
    runs = tmp_path / "runs"
    wait_until(proc, lambda: logged_step(runs.glob("run-2*"), 12))
    proc.kill(), proc.wait()
    run_dir = run_dir_of(tmp_path, "run")
    newest = run_dir / "checkpoints" / "step-000010"
    (newest / "optimizer.pt").write_bytes((newest / "optimizer.pt").read_bytes()[:100])  # truncated
    out = finish(config, "--resume", "auto").stdout
    assert "skipping checkpoint" in out and "step-000010" in out and "optimizer.pt has 100 bytes" in out
    assert "resuming from" in out and "step-000005 (step 5)" in out
    assert_same_run(run_dir, reference)


def test_sigterm_saves_and_resume_continues_exactly_with_the_same_mlflow_run(tmp_path, reference):
    from mlflow.tracking import MlflowClient

    path = write_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"] = {"backends": ["mlflow"]}
    path.write_text(yaml.safe_dump(cfg))
    typed = ["tracking.tags={team: nlp core}", "train.log_every=1"]  # overrides, one with spaces
    proc = start(path, *typed)
    runs = tmp_path / "runs"
    wait_until(proc, lambda: logged_step(runs.glob("run-2*"), 8))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    run_dir = run_dir_of(tmp_path, "run")
    log = next(tmp_path.glob("run.*.log")).read_text()
    assert "stopped (SIGTERM)" in log
    (printed,) = [line.removeprefix("resume with: ") for line in log.splitlines() if line.startswith("resume with: ")]
    assert shlex.split(printed) == ["lmforge", "train", str(path), *typed, "--resume", str(run_dir)]
    stopped = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert stopped >= 8 and stopped % 5  # saved at the stop, not at a periodic step
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "KILLED"

    finish(path, *shlex.split(printed)[3:])  # the printed command, as pasted
    assert_same_run(run_dir, reference)
    (again,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # continuing steps, no duplicates


def test_resume_refuses_a_changed_model_and_allows_more_steps(tmp_path):
    config = write_config(tmp_path, max_steps=6, save_every=3)
    finish(config)
    proc = subprocess.run(
        lmforge_command("train", str(config), "--resume", "auto", "train.lr=1e-2", "data.max_length=64"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot resume" in proc.stderr and "train.lr: 0.002 -> 0.01" in proc.stderr
    assert "data.max_length: 32 -> 64" in proc.stderr
    out = finish(config, "--resume", "auto", "train.max_steps=9").stdout
    assert "resuming with a changed setting: train.max_steps: 6 -> 9" in out
    # lr 2e-3, 3 warmup steps, cosine: at step 6 the old plan had ended (0), the new is halfway down
    assert (
        "the cosine learning-rate schedule is planned again over 9 steps instead of 6: at step 7 the learning "
        "rate becomes 0.001 (it was 0), reaching 0 at step 9"
    ) in " ".join(out.split())
    run_dir = run_dir_of(tmp_path, "run")
    assert [s for s, _ in losses(run_dir)] == list(range(1, 10))
    rates = {p["step"]: p["train/lr"] for p in points(run_dir) if "train/lr" in p}
    assert rates[7] == pytest.approx(0.001)  # the first step after the resume follows the new plan


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    """--resume of a checkpoint before the run's newest starts another history: the later
    checkpoints are kept aside, where --resume auto does not take them, and the run continues
    exactly as it went the first time."""
    config = write_config(tmp_path, max_steps=6, save_every=2, keep_last=3)
    finish(config)
    run_dir = run_dir_of(tmp_path, "run")
    first = losses(run_dir)
    out = " ".join(finish(config, "--resume", str(run_dir / "checkpoints" / "step-000002")).stdout.split())
    assert "its later checkpoints (step-000004, step-000006) are set aside in" in out
    dry = finish(config, "--resume", "auto", "--dry-run").stdout
    assert f"a run would resume from {run_dir / 'checkpoints' / 'step-000006'} (step 6)" in " ".join(dry.split())
    (aside,) = (run_dir / "abandoned").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["step-000004", "step-000006"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    assert losses(run_dir) == first


def test_early_stopping_resumed_mid_patience_stops_at_the_same_step(tmp_path_factory):
    early = {"max_steps": 60, "eval_every": 4, "save_every": 50, "early_stopping": {"patience": 2, "min_delta": 0.25}}
    ref_tmp = tmp_path_factory.mktemp("es-ref")
    finish(write_config(ref_tmp, "es", **early))
    reference = run_dir_of(ref_tmp, "es")
    evals = [(p["step"], p["eval/loss"]) for p in points(reference) if "eval/loss" in p and p["step"] > 0]

    # what the rule says, computed independently from the logged sequence
    best, best_step, bad, first_miss, stop = None, None, 0, None, None
    for step, value in evals:
        if best is None or value < best - 0.25:
            best, best_step, bad = value, step, 0
        else:
            bad += 1
            first_miss = first_miss or step
        if bad >= 2:
            stop = step
            break
    assert stop is not None and stop < 60, evals
    result = json.loads((reference / "eval.json").read_text())
    assert result["stop_reason"] == "early_stopping" and result["step"] == stop
    assert result["restored_best_step"] == best_step
    best_weights = load_file(reference / "checkpoints" / f"step-{best_step:06d}" / "model.safetensors")
    final = load_file(reference / "final" / "model.safetensors")
    assert all((final[k] == best_weights[k]).all() for k in final)  # final/ holds the best weights
    assert any("early_stopping/best_step" in p for p in points(reference))

    # interrupted after the first evaluation without improvement, then resumed
    tmp = tmp_path_factory.mktemp("es-int")
    config = write_config(tmp, "es", **early)
    proc = start(config)
    wait_until(proc, lambda: logged_eval((tmp / "runs").glob("es-2*"), first_miss))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    finish(config, "--resume", "auto")
    run_dir = run_dir_of(tmp, "es")
    assert json.loads((run_dir / "eval.json").read_text())["step"] == stop
    assert_same_run(run_dir, reference)


def test_first_sigint_pauses_at_a_step_boundary_second_exits_at_once(tmp_path):
    # Steps of 128 rows take long enough that the second signal, sent as soon as the first is
    # acknowledged, lands inside the step: with tiny steps the pause could already be complete, and
    # the second Ctrl-C would then (rightly) interrupt the printing of the resume command instead.
    config = write_config(tmp_path, max_steps=400, eval_every=None, save_every=None, micro_batch_size=16, grad_accum=8)
    runs = tmp_path / "runs"

    proc = start(config)
    wait_until(proc, lambda: logged_step(runs.glob("run-2*"), 3))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    run_dir = run_dir_of(tmp_path, "run")
    log = sorted(tmp_path.glob("run.*.log"))[-1].read_text()
    assert "stopped (SIGINT)" in log and "Traceback" not in log
    (paused,) = list((run_dir / "checkpoints").glob("step-*"))

    proc = start(config, "--resume", "auto")
    wait_until(proc, lambda: logged_step([run_dir], int(paused.name.split("-")[1]) + 2))
    proc.send_signal(signal.SIGINT)
    # the second signal once the first is handled (two signals a few ms apart may arrive as one)
    wait_until(proc, lambda: "SIGINT: stopping after this step" in sorted(tmp_path.glob("run.*.log"))[-1].read_text())
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    log = sorted(tmp_path.glob("run.*.log"))[-1].read_text()
    assert "interrupted" in log and "stopped (SIGINT)" not in log and "Traceback" not in log
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_resume_after_sigkill_with_mlflow_unreachable_sends_mlflow_every_point(tmp_path):
    """MLflow was down for the whole first attempt (SIGKILLed, its queue lost); the resumed run's
    MLflow run holds every point of metrics.jsonl, and tracking.json counts against that file."""
    import socket

    from mlflow.tracking import MlflowClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    path = write_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"] = {"backends": ["mlflow"], "mlflow": {"tracking_uri": f"http://127.0.0.1:{port}"}}
    path.write_text(yaml.safe_dump(cfg))
    proc = start(path)
    runs = tmp_path / "runs"
    wait_until(proc, lambda: logged_step(runs.glob("run-2*"), 12))
    proc.kill()
    proc.wait(timeout=60)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow is back (here: a store that answers)
    resumed = finish(path, "--resume", "auto", f"tracking.mlflow.tracking_uri={store}")
    assert "tracking incomplete" not in resumed.stdout
    run_dir = run_dir_of(tmp_path, "run")
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    held = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}
    local: dict[str, list[int]] = {}
    for point in points(run_dir):
        for key in point.keys() - {"step", "time"}:
            local.setdefault(key, []).append(point["step"])
    assert held == {key: sorted(steps) for key, steps in local.items()}  # steps 1.. and every eval, once
    assert held["train/loss"] == list(range(1, STEPS + 1))
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["backends"]["mlflow"] == {"run_id": run.info.run_id, "missing": 0}
