"""End to end through the real CLI on a tiny model: files, losses, MLflow, plain-transformers loading."""

import json
import subprocess

import joblib
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, chapters, cli_allocator, lmforge_command, subprocess_env, tiny_config_dict

STEPS = 30


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One CLI training run shared by the tests below (it is the slow part)."""
    tmp = tmp_path_factory.mktemp("e2e")
    corpus = tmp / "corpus.txt"
    corpus.write_text((ROOT / "data" / "kjv-pentateuch.txt").read_text()[:120_000])
    cfg = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
    cfg["train"].update({"max_steps": STEPS, "lr": 3e-3, "warmup_steps": 3, "eval_every": 10, "log_every": 1})
    cfg["eval"].update({"at_start": True, "max_batches": None})
    cfg["tracking"] = {"backends": ["mlflow"]}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        lmforge_command("train", str(path), "train.micro_batch_size=8"),
        capture_output=True,
        text=True,
        cwd=tmp,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    (run_dir,) = (tmp / "runs").glob("tiny-2*")
    return run_dir, proc.stdout, tmp


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_per_step_losses_written_and_falling(trained_run):
    run_dir, _, _ = trained_run
    points = read_jsonl(run_dir / "metrics.jsonl")
    losses = [(p["step"], p["train/loss"]) for p in points if "train/loss" in p]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    step_points = [p for p in points if "train/loss" in p]
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens_seen", "train/step_time"):
        assert all(p[key] > 0 for p in step_points[1:]), key
    first, last = [v for _, v in losses[:5]], [v for _, v in losses[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - 1.0, losses
    evals = [p for p in points if "eval/loss" in p]
    assert [p["step"] for p in evals] == [0, 10, 20, 30]
    assert evals[-1]["eval/perplexity"] < evals[0]["eval/perplexity"] / 2


def test_outputs_and_resolved_config(trained_run):
    run_dir, stdout, _ = trained_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["train"]["micro_batch_size"] == 8  # the command-line override is recorded
    assert config["train"]["scheduler"] == "cosine"  # defaults are filled in
    final = json.loads((run_dir / "eval.json").read_text())
    assert final["step"] == STEPS and final["validation"]["tokens"] > 0 and final["test"]["tokens"] > 0
    examples = read_jsonl(run_dir / "examples.jsonl")
    assert {e["stage"] for e in examples} == {"before", "after"}
    assert all(e["reference"] for e in examples)
    report = json.loads((run_dir / "data_report.json").read_text())
    assert set(report["splits"]) == {"train", "validation", "test"}
    assert str(run_dir / "final") in stdout and "mlflow ui --backend-store-uri" in stdout
    assert "loss: fused cross-entropy from hidden states, " in stdout  # the plan says how the loss is taken


def test_final_loads_with_plain_transformers_and_generates(trained_run):
    run_dir, _, _ = trained_run
    final = run_dir / "final"
    assert (final / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    inputs = tokenizer("And God said", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    # the saved weights are the trained ones: validation loss recomputed from disk matches eval.json
    from lmforge.eval.target import evaluate_target

    metrics = evaluate_target(run_dir, None, "validation", None, batch_size=8, log=lambda _: None)
    recorded = json.loads((run_dir / "eval.json").read_text())["validation"]["loss"]
    assert metrics["loss"] == pytest.approx(recorded, rel=1e-5)
    assert torch.isfinite(torch.tensor(metrics["perplexity"]))


def test_mlflow_run_holds_the_metrics(trained_run):
    from mlflow.tracking import MlflowClient

    run_dir, stdout, tmp = trained_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "default"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.micro_batch_size"] == "8"
    # the CLI re-executed itself with tcmalloc where it is installed, and says which allocator ran
    allocator = cli_allocator()
    assert run.data.tags["lmforge.malloc"] == allocator
    (plan,) = [line for line in stdout.splitlines() if line.startswith("plan: ")]
    cores = joblib.cpu_count(only_physical_cores=True)  # the cores this process may use
    assert plan.endswith(
        f", {allocator}, {cores} CPU threads (the {cores} cores this process may use; train.num_threads)"
    )
    history = client.get_metric_history(run.info.run_id, "train/loss")
    jsonl = [p for p in read_jsonl(run_dir / "metrics.jsonl") if "train/loss" in p]
    assert [(m.step, m.value) for m in history] == [(p["step"], pytest.approx(p["train/loss"])) for p in jsonl]
    assert len(client.get_metric_history(run.info.run_id, "eval/perplexity")) == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "eval.json", "metrics.jsonl", "examples.jsonl"} <= artifacts


def test_eval_and_generate_commands(trained_run):
    run_dir, _, tmp = trained_run
    proc = subprocess.run(
        lmforge_command("eval", str(run_dir), "--split", "test"), capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    recorded = json.loads((run_dir / "eval.json").read_text())["test"]
    assert metrics["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
    proc = subprocess.run(
        lmforge_command("generate", str(run_dir / "final"), "And Moses", "--max-new-tokens", "8", "--temperature", "0"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("And Moses") and len(proc.stdout.strip()) > len("And Moses")


def test_eval_takes_data_overrides_and_its_advice_is_something_eval_accepts(trained_run):
    run_dir, _, tmp = trained_run
    data = tmp / "bodies.jsonl"
    data.write_text("".join(json.dumps({"body": chapter}) + "\n" for chapter in chapters(3, start=40)))
    missing = subprocess.run(
        lmforge_command("eval", str(run_dir), "--data", str(data)), capture_output=True, text=True, env=subprocess_env()
    )
    assert missing.returncode == 2 and "set data.text_field" in missing.stderr, missing.stderr
    proc = subprocess.run(
        lmforge_command("eval", str(run_dir), "--data", str(data), "data.text_field=body"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tokens"] > 0
    wrong = subprocess.run(
        lmforge_command("eval", str(run_dir), "--data", str(data), "train.lr=1"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert wrong.returncode == 2 and "data.* overrides only" in wrong.stderr and "Traceback" not in wrong.stderr
