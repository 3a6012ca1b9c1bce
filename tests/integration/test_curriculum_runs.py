"""data.curriculum through the real CLI: a run killed mid-stage resumes to the uninterrupted run's
weights, and two processes draw the same schedule (each its share of it)."""

import json
import socket
import subprocess
import sys
import textwrap
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from conftest import chapters, lmforge_command, subprocess_env, tiny_config_dict

pytestmark = pytest.mark.slow
STEPS = 12
UNTIL = (4, 8)  # stage 0: steps 1-4, stage 1: steps 5-8, stage 2: steps 9-12


def write_stages(tmp: Path) -> list[Path]:
    """Three stage files: short lines, longer lines, whole paragraphs."""
    lines = [line for chapter in chapters(30) for line in chapter.split("\n") if line.strip()]
    lines.sort(key=len)
    third = len(lines) // 3
    paths = []
    for i, name in enumerate(("easy", "medium", "hard")):
        path = tmp / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[i * third : (i + 1) * third]))
        paths.append(path)
    return paths


def write_config(tmp: Path, name: str = "run", wide: bool = False, **train) -> Path:
    easy, medium, hard = write_stages(tmp)
    cfg = tiny_config_dict(easy, tmp / "cache", tmp / "runs")
    cfg["name"] = name
    cfg["data"]["curriculum"] = {
        "stages": [
            {"data": str(easy), "until_step": UNTIL[0]},
            {"data": str(medium), "until_step": UNTIL[1]},
            {"data": str(hard)},
        ]
    }
    cfg["data"]["test_fraction"] = 0.0
    if wide:  # slower steps, so that a kill lands inside the stage it aims at
        cfg["model"].update({"hidden_size": 256, "intermediate_size": 1024, "num_layers": 3})
    cfg["train"].update(
        {"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "lr": 2e-3, "warmup_steps": 2}
        | {"eval_every": None, "save_every": 5, "log_every": 1}
    )
    cfg["train"].update(train)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finish(config: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        lmforge_command("train", str(config), *args), capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_dir_of(tmp: Path, name: str) -> Path:
    (run_dir,) = sorted((tmp / "runs").glob(f"{name}-2*"))
    return run_dir


def losses(run_dir: Path) -> list[tuple[int, float]]:
    points = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [(p["step"], p["train/loss"]) for p in points if "train/loss" in p]


def assert_same_weights(run_dir: Path, reference: Path) -> None:
    ours = load_file(run_dir / "final" / "model.safetensors")
    theirs = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key  # bit for bit


def test_a_run_killed_mid_stage_resumes_to_the_uninterrupted_weights(tmp_path):
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    finish(write_config(reference_dir, "ref", wide=True))
    reference = run_dir_of(reference_dir, "ref")

    config = write_config(tmp_path, wide=True)
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            lmforge_command("train", str(config)), stdout=log, stderr=subprocess.STDOUT, env=subprocess_env()
        )
    deadline = time.monotonic() + 240
    checkpoint = None
    while time.monotonic() < deadline and proc.poll() is None:  # kill once the step-5 checkpoint is complete
        found = list((tmp_path / "runs").glob("run-2*/checkpoints/step-000005/manifest.json"))
        if found:
            checkpoint = found[0]
            break
        time.sleep(0.005)
    proc.kill(), proc.wait()
    assert checkpoint is not None, (tmp_path / "killed.log").read_text()
    run_dir = run_dir_of(tmp_path, "run")
    steps_done = [step for step, _ in losses(run_dir)]
    assert max(steps_done) < 10, "killed too late: the next checkpoint (step 10) is past the middle stage"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-000005"]

    out = finish(config, "--resume", "auto").stdout
    assert "resuming from" in out and "step-000005" in out  # step 5: the first step of stage 1 is done
    assert losses(run_dir) == losses(reference)  # exact floats, every step once
    assert_same_weights(run_dir, reference)


def test_a_run_stopped_at_max_steps_mid_stage_continues_as_one_run(tmp_path):
    """Stopped at step 6 (inside stage 1) by train.max_steps, resumed to 12: the uninterrupted run's
    weights (a constant schedule, which a longer run does not re-plan)."""
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    finish(write_config(reference_dir, "ref", scheduler="constant"))
    reference = run_dir_of(reference_dir, "ref")
    report = json.loads((reference / "data_report.json").read_text())
    assert [level["level"] for level in report["curriculum"]["levels"]] == [0, 1, 2]
    assert all(level["rows"] > 0 and level["tokens"] > 0 for level in report["curriculum"]["levels"])

    config = write_config(tmp_path, scheduler="constant")
    finish(config, "train.max_steps=6")
    run_dir = run_dir_of(tmp_path, "run")
    finish(config, "--resume", "auto")
    assert losses(run_dir) == losses(reference)
    assert_same_weights(run_dir, reference)


# --------------------------------------------------------------------------- two processes

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from itertools import islice

    import numpy as np
    from accelerate import PartialState

    from lmforge.config import load_config
    from lmforge.data.loader import StepPlan, step_data
    from lmforge.data.prepare import prepare_data

    state = PartialState(cpu=True)  # gloo
    config = load_config(sys.argv[1], [], env={})
    with state.main_process_first():
        data = prepare_data(config, log=lambda m: None)
    train = data.splits["train"]
    levels = np.asarray(train["level"])
    plan = StepPlan(len(train), 4, 1, state.num_processes)
    steps = islice(step_data(train, plan, config, 0, (0, 0), state.process_index, total_steps=12), 12)
    drawn = [[rows.tolist() for rows in d.rows] for d in steps]
    out = {"rank": state.process_index, "rows": drawn, "levels": [[levels[r].tolist() for r in s] for s in drawn]}
    with open(sys.argv[2] + f"/rank{state.process_index}.json", "w") as f:
        json.dump(out, f)
    """
)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port)]
    proc = subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_two_processes_draw_the_same_schedule_each_its_share(tmp_path):
    """Each rank of a torchrun job (gloo) records the rows and levels it drew: at every step both are
    at the same stage, their micro-batches are the two halves of the one-process draw, and a real
    2-process run trains with the one-process losses (micro-batch 4 x 2 processes = 8 x 1)."""
    from lmforge.config import load_config
    from lmforge.data.curriculum import CurriculumPhase
    from lmforge.data.loader import StepPlan, step_data
    from lmforge.data.prepare import prepare_data

    config_path = write_config(tmp_path, micro_batch_size=4, grad_accum=1)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    torchrun(str(script), str(config_path), str(tmp_path), cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    config = load_config(config_path, [], env={})
    train = prepare_data(config, log=lambda m: None).splits["train"]
    levels = np.asarray(train["level"])
    phase = CurriculumPhase.of(config, levels, 12)
    steps = step_data(train, StepPlan(len(train), 8, 1), config, 0, (0, 0), total_steps=12)
    single = [d.rows[0].tolist() for d in islice(steps, 12)]
    for t in range(12):
        (first,), (second,) = ranks[0]["rows"][t], ranks[1]["rows"][t]
        assert first + second == single[t]
        stage = phase.stage(t)
        assert set(ranks[0]["levels"][t][0]) == set(ranks[1]["levels"][t][0]) == {stage}

    # the real CLI, 2 processes of micro-batch 4 against 1 of micro-batch 8: the same per-step losses
    torchrun("-m", "lmforge", "train", str(config_path), "train.micro_batch_size=4", cwd=tmp_path)
    two = losses(run_dir_of(tmp_path, "run"))
    finish(config_path, "train.micro_batch_size=8", "name=one")
    one = losses(run_dir_of(tmp_path, "one"))
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)


def test_the_default_curriculum_length_is_saved_and_a_longer_resume_keeps_it(tmp_path):
    """data.curriculum.steps left to its default (half of the run) is resolved when the run starts:
    the saved config holds it, and a resume with a longer train.max_steps keeps the curriculum the
    run started with (the default of the new length would move every later pool)."""
    import io

    from rich.console import Console

    from lmforge.config import load_config
    from lmforge.run import run_train

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(30)) + "\n")
    cfg = tiny_config_dict(corpus, tmp_path / "cache", tmp_path / "runs")
    cfg["data"]["curriculum"] = "length"
    cfg["train"].update({"max_steps": 4, "save_every": 2})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = run_train(load_config(path, env={}), Console(file=io.StringIO()))
    saved = yaml.safe_load((first.run_dir / "config.yaml").read_text())
    assert saved["data"]["curriculum"]["steps"] == 2

    out = io.StringIO()
    resumed = run_train(load_config(path, ["train.max_steps=10"], env={}), Console(file=out), resume="auto")
    assert resumed.run_dir == first.run_dir and "resuming from" in out.getvalue()
    again = yaml.safe_load((resumed.run_dir / "config.yaml").read_text())
    assert again["data"]["curriculum"]["steps"] == 2 and again["train"]["max_steps"] == 10
