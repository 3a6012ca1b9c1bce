"""`lmforge train --nnodes 2`: two "machines" of one process each on loopback, each in its own working
directory with its own data cache (no shared filesystem), are one job: one run directory and one
MLflow run (machine 0's), each machine's data prepared on it, the losses of one process with the
whole batch; a resume needs the checkpoint on each machine. Also `lmforge data prepare` ahead of a
job."""

import json
import subprocess

import pytest
import yaml

from conftest import chapters, free_port, lmforge_command, subprocess_env, tiny_config_dict

pytestmark = pytest.mark.slow


def machine(tmp_path, name: str, **train) -> tuple:
    """A working directory with the corpus and a config whose paths are relative to it."""
    where = tmp_path / name
    where.mkdir()
    (where / "corpus.txt").write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    cfg = tiny_config_dict(where / "corpus.txt", where / "cache", where / "runs")
    cfg["data"].update({"train": "corpus.txt", "cache_dir": "cache", "test_fraction": 0.0})
    cfg["output_dir"] = "runs"
    cfg["train"].update({"max_steps": 6, "eval_every": 3, "save_every": 3} | train)
    cfg["tracking"] = {"backends": ["mlflow"]}
    (where / "config.yaml").write_text(yaml.safe_dump(cfg))
    return where


def train_alone(where):
    """`lmforge train config.yaml` in one process in `where`; its run directory."""
    proc = subprocess.run(
        lmforge_command("train", "config.yaml", "tracking.backends=[none]"),
        cwd=where,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (where / "runs").glob("tiny-2*")
    return run_dir


def losses(run_dir):
    points = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(p["step"], p["train/loss"]) for p in points if "train/loss" in p]


def test_two_machines_without_a_shared_disk_are_one_run(tmp_path):
    from mlflow.tracking import MlflowClient

    nodes = [machine(tmp_path, f"node{rank}") for rank in (0, 1)]
    jobs, outputs = on_two_machines(nodes)
    for job, (out, err) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, out + err
    assert outputs[0][0].count("done in") == 1 and "done in" not in outputs[1][0]
    (run_dir,) = (nodes[0] / "runs").glob("tiny-2*")
    assert not list((nodes[1] / "runs").glob("tiny-2*"))  # machine 1 writes no run directory
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] and (run_dir / "final" / "config.json").is_file()
    for where in nodes:  # each machine prepared its own copy of the data
        assert any((where / "cache").rglob("*.arrow")), where
    client = MlflowClient(tracking_uri=f"sqlite:///{nodes[0] / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7))

    alone = train_alone(machine(tmp_path, "single", micro_batch_size=8))
    got, expected = losses(run_dir), losses(alone)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)

    # a resume on machines that share no disk needs the checkpoint on each: machine 1 has none
    resume = ("train.max_steps=9", "tracking.backends=[none]", "distributed.timeout_minutes=1", "--resume", "auto")
    jobs, outputs = on_two_machines(nodes, *resume)
    assert jobs[1].returncode != 0
    assert "has no copy of the checkpoint the main process resumes from" in outputs[1][1]

    # FSDP: every process writes its shards into the run directory, so machines must share it
    jobs, outputs = on_two_machines(nodes, "name=sharded", "distributed.strategy=fsdp", "tracking.backends=[none]")
    assert all(job.returncode != 0 for job in jobs)
    said = " ".join((outputs[1][0] + outputs[1][1]).split())
    assert "process 1 cannot see the run directory" in said and "shared output_dir" in said
    assert not list((nodes[0] / "runs").glob("sharded-2*/checkpoints/*"))  # nothing trained


def machine_options(rank: int, port: int, nproc: int = 1) -> list[str]:
    return [
        "--nnodes",
        "2",
        "--node-rank",
        str(rank),
        "--nproc",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]


def on_two_machines(nodes, *args, nproc: int = 1) -> tuple[list, list]:
    """`lmforge train config.yaml ARGS` as machine 0 and machine 1 of a job (`nproc` processes each,
    each machine in its own directory), on a free loopback port; the processes and their (stdout, stderr)."""
    port = free_port()
    jobs = [
        subprocess.Popen(
            lmforge_command("train", "config.yaml", *args, *machine_options(rank, port, nproc)),
            cwd=where,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for rank, where in enumerate(nodes)
    ]
    return jobs, [job.communicate(timeout=400) for job in jobs]


def test_machines_without_the_checkpoint_resume_from_the_mirror_each_downloading_it_once(tmp_path):
    """A run trained on one machine with train.mirror resumes (--resume auto) on two new machines of
    two processes each: on each machine its first process downloads the checkpoint and the others
    then find it there (four processes downloading into one directory at once would collide)."""
    drive = tmp_path / "drive"
    alone = train_alone(machine(tmp_path, "single", grad_accum=4, mirror=str(drive)))

    nodes = [machine(tmp_path, f"node{rank}", mirror=str(drive)) for rank in (0, 1)]
    resume = ("train.max_steps=8", "tracking.backends=[none]", "--resume", "auto")
    jobs, outputs = on_two_machines(nodes, *resume, nproc=2)
    for job, (out, err) in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, out + err
    assert outputs[0][0].count(f"downloading checkpoint step-000006 of {alone.name}") == 1
    for where in nodes:  # each machine holds the checkpoint, downloaded whole
        checkpoint = where / "runs" / alone.name / "checkpoints" / "step-000006"
        assert (checkpoint / "manifest.json").is_file(), list(checkpoint.parent.iterdir())
    resumed = nodes[0] / "runs" / alone.name
    assert [s for s, _ in losses(resumed)] == list(range(1, 9))
    assert (resumed / "final" / "config.json").is_file()


def test_data_prepare_fills_the_cache_a_job_then_reads(tmp_path):
    where = machine(tmp_path, "node")
    proc = subprocess.run(
        lmforge_command("data", "prepare", "config.yaml"),
        cwd=where,
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "the data is cached now" in proc.stdout and "train: " in proc.stdout
    proc = subprocess.run(
        lmforge_command("train", "config.yaml", "--dry-run", "--nproc", "1"),
        cwd=where,
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "data (from cache)" in proc.stdout


def test_a_signal_to_one_process_pauses_the_whole_job_at_one_step(tmp_path):
    """SIGTERM reaches rank 1 alone (a scheduler that signals one process): the job agrees to pause
    at one step, the main process checkpoints it, nothing waits on a collective, and --resume goes on."""
    import signal
    import time

    import psutil

    where = machine(tmp_path, "node", max_steps=400, eval_every=None, save_every=None, log_every=1)
    launcher = subprocess.Popen(
        lmforge_command("train", "config.yaml", "--nproc", "2", "tracking.backends=[none]"),
        cwd=where,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    deadline = time.monotonic() + 180
    rank1 = None
    while time.monotonic() < deadline and rank1 is None:
        time.sleep(0.2)
        metrics = list((where / "runs").glob("tiny-2*/metrics.jsonl"))
        if metrics and len(losses(metrics[0].parent)) >= 2:
            workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "lmforge" in p.cmdline()]
            rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    assert rank1 is not None, "the job did not reach step 2"
    rank1.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)  # no process is left waiting at a collective
    (run_dir,) = (where / "runs").glob("tiny-2*")
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    paused_at = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 2 <= paused_at < 400 and json.loads((checkpoint / "trainer_state.json").read_text())["stop_reason"] == (
        "SIGTERM"
    ), out + err
    assert losses(run_dir)[-1][0] == paused_at
    proc = subprocess.run(
        lmforge_command(
            "train",
            "config.yaml",
            "--nproc",
            "2",
            "tracking.backends=[none]",
            "train.max_steps=" + str(paused_at + 2),
            "--resume",
            "auto",
        ),  # fmt: skip
        cwd=where,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [s for s, _ in losses(run_dir)][-3:] == [paused_at, paused_at + 1, paused_at + 2]
