"""Every command that takes a model takes a checkpoint and a paused run too, as Trainer users
expect of checkpoint-N/: a checkpoint holds the model's config and tokenizer beside its weights."""

import io
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from conftest import chapters, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import load_config
from lmforge.eval.target import load_target
from lmforge.export.export import export_run
from lmforge.run import run_train

pytestmark = pytest.mark.slow


def train_tiny(tmp, name: str, **extra):
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(20)) + "\n")
    raw = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
    raw["name"] = name
    raw["train"].update({"max_steps": 4, "save_every": 2, "keep_last": 3})
    raw.update(extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir


def logits(target):
    model, tokenizer, _ = load_target(target)
    model.eval()
    with torch.no_grad():
        return model(**tokenizer("In the beginning", return_tensors="pt")).logits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    full = train_tiny(tmp, "full")
    base = full / "final"
    lora = train_tiny(tmp, "lora", model={"name_or_path": str(base)}, tokenizer={}, lora={"r": 4, "dropout": 0.0})
    return {"full": full, "lora": lora}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_the_last_checkpoint_is_the_final_model(runs, kind):
    run_dir = runs[kind]
    torch.testing.assert_close(logits(run_dir / "checkpoints" / "step-000004"), logits(run_dir), rtol=0, atol=0)
    assert not torch.equal(logits(run_dir / "checkpoints" / "step-000002"), logits(run_dir))


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_generate_eval_and_export_take_a_checkpoint_and_a_paused_run(runs, kind, tmp_path):
    paused = tmp_path / "paused-run"
    shutil.copytree(runs[kind], paused, ignore=shutil.ignore_patterns("final", "eval.json"))
    checkpoint = runs[kind] / "checkpoints" / "step-000002"
    for target in (checkpoint, paused):
        generate = subprocess.run(
            lmforge_command("generate", str(target), "In the beginning", "--max-new-tokens", "4"),
            capture_output=True,
            text=True,
            env=subprocess_env(),
        )
        assert generate.returncode == 0 and generate.stdout.startswith("In the beginning"), generate.stderr
        data = str(runs[kind].parent.parent / "corpus.txt")
        evaluate = subprocess.run(
            lmforge_command("eval", str(target), "--data", data), capture_output=True, text=True, env=subprocess_env()
        )
        assert evaluate.returncode == 0 and '"perplexity"' in evaluate.stdout, evaluate.stderr
    export = export_run(paused, tmp_path / "export", merge_lora=kind == "lora")
    torch.testing.assert_close(logits(export), logits(runs[kind] / "checkpoints" / "step-000004"))
    assert "checkpoint taken during training" in (export / "README.md").read_text()


def test_a_run_with_relative_data_paths_is_evaluated_from_any_directory(tmp_path, monkeypatch):
    from lmforge.eval.target import evaluate_target

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "corpus.txt").write_text("\n\n".join(chapters(20)) + "\n")
    raw = tiny_config_dict(project / "data" / "corpus.txt", tmp_path / "cache", tmp_path / "runs")
    raw["data"]["train"] = "data/corpus.txt"  # relative to where the run is started, as users write it
    (project / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(project)
    run_dir = run_train(load_config(project / "c.yaml", env={}), Console(file=io.StringIO())).run_dir
    monkeypatch.chdir(tmp_path)  # somewhere else: data/corpus.txt is not here
    metrics = evaluate_target(run_dir, None, "test", None, 4, log=lambda _: None)
    assert metrics["tokens"] > 0
    assert Path.cwd() == tmp_path  # and back where we were
