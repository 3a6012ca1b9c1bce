"""`lmforge sweep` end to end through the real CLI: every trial a real run in its own process, a
real Optuna study (journal file, or a real PostgreSQL server), a real MLflow store."""

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, chapters, free_port, lmforge_command, subprocess_env, tiny_config_dict

pytestmark = pytest.mark.slow


def write_base(tmp: Path, backends=("none",), **train) -> Path:
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    cfg = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
    cfg["train"].update({"max_steps": 12, "eval_every": 6, "save_every": 6, "log_every": 3} | train)
    cfg["tracking"]["backends"] = list(backends)
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_spec(tmp: Path, name: str, body: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: base.yaml\n" + body)
    return path


def cli(tmp: Path, *args: str, **options) -> subprocess.CompletedProcess:
    """An lmforge command run in `tmp`, its output captured."""
    return subprocess.run(
        lmforge_command(*args), cwd=tmp, capture_output=True, text=True, env=subprocess_env(), timeout=600, **options
    )


def sweep(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return cli(tmp, "sweep", *args)


def start_sweep(tmp: Path, log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            lmforge_command("sweep", *args), cwd=tmp, stdout=out, stderr=subprocess.STDOUT, env=subprocess_env()
        )


def trials(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "trials.csv").open() as rows:
        return list(csv.DictReader(rows))


def wait_for(condition, what: str, timeout=180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_grid_sweep_runs_each_point_once_nests_its_runs_in_mlflow_and_best_yaml_reproduces_it(tmp_path):
    write_base(tmp_path, backends=("mlflow",))
    spec = write_spec(
        tmp_path,
        "grid",
        "method: grid\nparameters:\n"
        "  train.lr: {values: [1.0e-3, 3.0e-3]}\n"
        "  train.micro_batch_size: {values: [2, 4]}\n",
    )
    proc = sweep(tmp_path, str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 of 4 trials: 4 complete" in proc.stdout
    sweep_dir = tmp_path / "runs" / "sweeps" / "grid"
    rows = trials(sweep_dir)
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"] and {r["state"] for r in rows} == {"complete"}
    points = {(float(r["train.lr"]), int(r["train.micro_batch_size"])) for r in rows}
    assert points == {(1e-3, 2), (1e-3, 4), (3e-3, 2), (3e-3, 4)}
    for r in rows:  # each trial trained with its own values, and its metric is its own run's best
        config = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert (config["train"]["lr"], config["train"]["micro_batch_size"]) == (
            float(r["train.lr"]),
            int(r["train.micro_batch_size"]),
        )
        evals = [json.loads(line) for line in (Path(r["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        evals = {p["step"]: p["eval/loss"] for p in evals if "eval/loss" in p}
        assert float(r["eval/loss"]) == min(evals.values()) == evals[int(r["best_step"])]
        assert (Path(r["run_dir"]) / "final" / "model.safetensors").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.info.run_name == "grid"]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["trial"] for r in nested) == ["0", "1", "2", "3"]
    for r in nested:
        row = rows[int(r.data.tags["trial"])]
        assert float(r.data.params["train.lr"]) == float(r.data.tags["sweep.train.lr"]) == float(row["train.lr"])
        assert r.info.status == "FINISHED" and r.data.tags["lmforge.study"] == "grid"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    best = min(rows, key=lambda r: float(r["eval/loss"]))
    assert summary["best"]["number"] == int(best["number"]) and summary["trials"] == {"complete": 4}
    assert set(summary["importances"]) == {"train.lr", "train.micro_batch_size"}
    assert parent.info.status == "FINISHED" or client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).data.metrics["best/eval/loss"] == pytest.approx(float(best["eval/loss"]))

    again = cli(tmp_path, "train", str(sweep_dir / "best.yaml"), "tracking.backends=[none]")
    assert again.returncode == 0, again.stdout + again.stderr
    (rerun,) = (tmp_path / "runs").glob("grid-best-2*")
    evals = [json.loads(line) for line in (rerun / "metrics.jsonl").read_text().splitlines()]
    value = next(p["eval/loss"] for p in evals if p["step"] == int(best["best_step"]) and "eval/loss" in p)
    assert value == pytest.approx(float(best["eval/loss"]), rel=1e-6)

    status = sweep(tmp_path, "status", str(spec))  # the same sweep again: nothing left to run
    assert status.returncode == 0 and "4 of 4 trials: 4 complete" in status.stdout
    rerun_sweep = sweep(tmp_path, str(spec))
    assert rerun_sweep.returncode == 0 and " starts" not in rerun_sweep.stdout and len(trials(sweep_dir)) == 4
    _dashboard_lists(sweep_dir / "study.journal", "grid", 4)


def _dashboard_lists(journal: Path, name: str, count: int) -> None:
    """`optuna-dashboard runs/sweeps/<name>/study.journal` (the README's command) serves the study."""
    import urllib.request

    port = free_port()
    command = [str(Path(sys.executable).parent / "optuna-dashboard"), "--port", str(port), str(journal)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())

    def get(path: str):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    try:
        wait_for(lambda: get("/api/studies") is not None, "optuna-dashboard", timeout=60)
        (study,) = get("/api/studies")["study_summaries"]
        assert study["study_name"] == name
        assert len(get(f"/api/studies/{study['study_id']}")["trials"]) == count
    finally:
        server.terminate()
        server.wait()


def test_diverging_trials_fail_with_their_reason_and_the_sweep_goes_on_or_gives_up(tmp_path):
    write_base(tmp_path)
    spec = write_spec(tmp_path, "diverge", "method: grid\nparameters:\n  train.lr: {values: [1.0e-3, 1.0e+5]}\n")
    proc = sweep(tmp_path, str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {float(r["train.lr"]): r for r in trials(tmp_path / "runs" / "sweeps" / "diverge")}
    assert rows[1e-3]["state"] == "complete"
    assert rows[1e5]["state"] == "failed" and "is not finite for 5 steps in a row" in rows[1e5]["reason"]
    assert "2 of 2 trials: 1 complete, 1 failed" in proc.stdout.replace("1 failed, 1 complete", "1 complete, 1 failed")

    spec = write_spec(
        tmp_path,
        "hopeless",
        "method: grid\nmax_same_failures: 2\nparameters:\n  train.lr: {values: [1.0e+5, 2.0e+5, 4.0e+5]}\n",
    )
    proc = sweep(tmp_path, str(spec))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 trials in a row failed with the same error" in proc.stdout
    rows = trials(tmp_path / "runs" / "sweeps" / "hopeless")
    assert [r["state"] for r in rows] == ["failed", "failed"]  # the third point never started


def test_a_trial_worse_than_the_median_is_pruned_at_its_first_evaluation(tmp_path):
    write_base(tmp_path, max_steps=16, eval_every=4, save_every=None)
    spec = write_spec(
        tmp_path,
        "prune",
        "method: grid\nseed: 1\npruner: {type: median, startup_trials: 1}\n"
        "parameters:\n  train.lr: {values: [3.0e-3, 1.0e-6]}\n",
    )
    proc = sweep(tmp_path, str(spec))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = trials(tmp_path / "runs" / "sweeps" / "prune")
    assert float(rows[0]["train.lr"]) == 3e-3, "the premise: seed 1 puts the good learning rate first"
    assert rows[0]["state"] == "complete" and rows[1]["state"] == "pruned"
    assert rows[1]["reason"] == "pruned at step 4"
    pruned = Path(rows[1]["run_dir"])
    assert json.loads((pruned / "eval.json").read_text())["stop_reason"] == "pruned"
    assert not (pruned / "final").exists()
    steps = [json.loads(line)["step"] for line in (pruned / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
    assert json.loads((pruned / "tracking.json").read_text())["status"] == "KILLED"


def test_an_interrupted_trial_resumes_from_its_checkpoint_and_ends_as_if_never_interrupted(tmp_path):
    """Ctrl-C pauses the sweep; SIGKILL of the sweep (its trial pauses on its own); each time the same
    command continues. The trial resumes from a checkpoint, not from step 0, and its final weights
    equal an uninterrupted run's; the sweep has exactly max_trials trials."""
    write_base(tmp_path, max_steps=900, eval_every=300, save_every=20, log_every=50)
    spec = write_spec(
        tmp_path,
        "resume",
        "method: random\nmax_trials: 2\n"
        "parameters:\n  train.lr: {distribution: log_uniform, min: 1.0e-3, max: 3.0e-3}\n",
    )
    trial_dir = tmp_path / "runs" / "sweeps" / "resume" / "trial-0000"

    def checkpoints() -> list[int]:
        found = (trial_dir / "checkpoints").glob("step-*") if (trial_dir / "checkpoints").is_dir() else []
        return sorted(int(p.name.split("-")[1]) for p in found)

    first = start_sweep(tmp_path, tmp_path / "first.log", str(spec))
    wait_for(lambda: checkpoints(), "a first checkpoint")
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=120) == 130, (tmp_path / "first.log").read_text()
    assert "paused: run the same command to continue" in (tmp_path / "first.log").read_text()
    assert [r["state"] for r in trials(trial_dir.parent)] == ["paused"]
    paused_at = checkpoints()[-1]
    assert 0 < paused_at < 900

    second = start_sweep(tmp_path, tmp_path / "second.log", str(spec))
    wait_for(lambda: checkpoints() and checkpoints()[-1] >= paused_at + 40, "training past the pause")
    second.kill()  # SIGKILL: no handler runs; the trial process gets SIGUSR1 from the kernel and pauses
    second.wait()
    wait_for(lambda: (trial_dir / "outcome.json").is_file(), "the orphaned trial to pause")
    assert json.loads((trial_dir / "outcome.json").read_text())["state"] == "paused"

    third = sweep(tmp_path, str(spec))
    assert third.returncode == 0, third.stdout + third.stderr
    assert "trial 0 was left running" in third.stdout
    log = (trial_dir / "train.log").read_text()
    resumed = [int(s) for s in re.findall(r"resuming from \S+ \(step (\d+)\)", log)]
    assert len(resumed) == 2 and resumed[0] == paused_at and resumed[1] > paused_at
    rows = trials(trial_dir.parent)
    assert len(rows) == 2 and [r["state"] for r in rows] == ["complete", "complete"]

    plain = cli(tmp_path, "train", str(trial_dir / "trial.yaml"), f"output_dir={tmp_path / 'plain'}")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    (plain_dir,) = (tmp_path / "plain").glob("resume-trial-0000-2*")
    interrupted = load_file(trial_dir / "final" / "model.safetensors")
    uninterrupted = load_file(plain_dir / "final" / "model.safetensors")
    assert interrupted.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (interrupted[name] == tensor).all(), name


def test_workers_on_two_processes_share_one_study_in_postgresql_and_never_run_a_point_twice(tmp_path, postgres_url):
    write_base(tmp_path)
    spec = write_spec(
        tmp_path,
        "shared",
        f"method: grid\nstorage: {postgres_url}\n"
        "parameters:\n  train.lr: {values: [1.0e-3, 2.0e-3, 3.0e-3]}\n  train.micro_batch_size: {values: [2, 4]}\n",
    )
    first = start_sweep(tmp_path, tmp_path / "first.log", str(spec), "--workers", "2")
    wait_for(lambda: " starts" in (tmp_path / "first.log").read_text(), "the first worker's trials")
    second = start_sweep(tmp_path, tmp_path / "second.log", str(spec), "--worker")
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()
    assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()

    study = optuna.load_study(study_name="shared", storage=postgres_url)
    done = study.get_trials(deepcopy=False)
    assert len(done) == 6 and all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    points = sorted((t.params["train.lr"], t.params["train.micro_batch_size"]) for t in done)
    assert points == sorted((lr, b) for lr in (1e-3, 2e-3, 3e-3) for b in (2, 4))
    logs = "".join(
        (tmp_path / "runs" / "sweeps" / "shared" / f"trial-{n:04d}" / "train.log").read_text() for n in range(6)
    )
    assert set(re.findall(r"pid (\d+) starts this trial", logs)) == {str(first.pid), str(second.pid)}


def test_the_multirun_shorthand_runs_the_grid_it_names(tmp_path):
    base = write_base(tmp_path, max_steps=6)
    proc = cli(
        tmp_path, "train", str(base), "-m", "train.lr=find,3e-3", "train.max_steps=4", "train.lr_find.num_steps=8"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep_dir,) = (tmp_path / "runs" / "sweeps").glob("tiny-multirun-*")
    rows = {r["train.lr"].split(" ")[0]: r for r in trials(sweep_dir)}
    assert set(rows) == {"find", "0.003"} and {r["state"] for r in rows.values()} == {"complete"}
    for r in rows.values():
        assert yaml.safe_load((Path(r["run_dir"]) / "trial.yaml").read_text())["train"]["max_steps"] == 4
    # a trial with train.lr=find shows the learning rate its range test found, in trials.csv and the leaderboard
    found = yaml.safe_load((Path(rows["find"]["run_dir"]) / "config.yaml").read_text())["train"]["lr"]
    assert rows["find"]["train.lr"] == f"find ({found:.3g})"
    assert f"find ({found:.3g})" in proc.stdout


def test_a_trial_out_of_memory_runs_again_with_half_the_micro_batch_and_the_same_effective_batch(tmp_path):
    """The sweep and its trials run with their address space limited (RLIMIT_AS): a step of 256
    rows with full logits (vocabulary 4096, no chunked loss) cannot allocate what it needs, 128 rows
    can (measured on this machine: 256 needs about 7 GB, 128 about 5 GB, 64 about 3.5 GB)."""
    import resource

    base = write_base(tmp_path, max_steps=2, eval_every=None, save_every=None, loss_chunk_size=None)
    cfg = yaml.safe_load(base.read_text())
    cfg["tokenizer"]["vocab_size"] = 4096
    cfg["data"]["max_length"] = 256
    cfg["data"]["train"] = str(ROOT / "data" / "kjv-pentateuch.txt")  # about 800 rows of 256 tokens
    base.write_text(yaml.safe_dump(cfg))
    spec = write_spec(tmp_path, "memory", "method: grid\nparameters:\n  train.micro_batch_size: {values: [256]}\n")
    limit = int(5.6 * 2**30)
    proc = cli(tmp_path, "sweep", str(spec), preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sweep_dir = tmp_path / "runs" / "sweeps" / "memory"
    (row,) = trials(sweep_dir)
    assert row["state"] == "complete", row
    assert "out of memory" in row["reason"] and "retried with micro_batch_size 128, grad_accum 2" in row["reason"]
    first = (sweep_dir / "trial-0000.out-of-memory" / "train.log").read_text()
    assert "can't allocate memory" in first
    retried = yaml.safe_load((sweep_dir / "trial-0000" / "config.yaml").read_text())["train"]
    assert (retried["micro_batch_size"], retried["grad_accum"]) == (128, 2)
    best = yaml.safe_load((sweep_dir / "best.yaml").read_text())["train"]
    assert (best["micro_batch_size"], best["grad_accum"]) == (128, 2)


def test_handing_out_trials_is_exclusive_across_processes_sharing_postgresql(tmp_path, postgres_url):
    """The hand-out lock is PostgreSQL's (an advisory lock): a second study object on its own
    connection waits while the first holds it, and gets it when it is released."""
    import threading

    from lmforge.sweep.spec import load_spec
    from lmforge.sweep.study import handing_out, open_storage, open_study

    write_base(tmp_path)
    spec = write_spec(tmp_path, "locking", f"storage: {postgres_url}\nparameters:\n  train.lr: {{values: [1.0e-3]}}\n")
    loaded = load_spec(spec)
    first = open_study(loaded, open_storage(postgres_url, loaded.sweep_dir))
    second = open_study(loaded, open_storage(postgres_url, loaded.sweep_dir))
    got_it = threading.Event()

    def take() -> None:
        with handing_out(second, loaded.sweep_dir):
            got_it.set()

    with handing_out(first, loaded.sweep_dir):
        waiter = threading.Thread(target=take)
        waiter.start()
        assert not got_it.wait(timeout=2.0)  # held: the other waits
    assert got_it.wait(timeout=30.0)  # released: the other has it
    waiter.join()
    assert not (loaded.sweep_dir / ".hand-out.lock").exists()  # not the file lock
