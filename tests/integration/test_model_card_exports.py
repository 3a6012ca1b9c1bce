"""The model cards of real runs and exports carry the Hub metadata of what they are: a LoRA adapter
of a Hub model, the same adapter merged into it, a full fine-tune of a Hub model, each read back
with huggingface_hub's ModelCard.load, with the model-index equal to the run's eval.json.

The base models are tiny random models placed in a Hugging Face cache of the test's own, under Hub
ids, with HF_HUB_OFFLINE on: lmforge, transformers and peft find them by id exactly as they would
find a downloaded model, and nothing reaches the network."""

import io
import json
import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants
from rich.console import Console

from conftest import chapters, lmforge_command, save_tiny_bert, save_tiny_llama, subprocess_env
from lmforge.config import load_config
from lmforge.export.card import LOCAL_DATASET_TYPE, local_base_warning
from lmforge.export.export import export_run
from lmforge.models.tokenizer import train_bpe_tokenizer
from lmforge.run import run_train

pytestmark = pytest.mark.slow
LLAMA, BERT = "lmforge-test/tiny-llama", "lmforge-test/tiny-bert"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo_id: str, model_dir: Path, readme: str | None = None) -> None:
    """`model_dir` as huggingface_hub keeps a downloaded `repo_id`: refs/main and a snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    if readme is not None:
        (repo / "snapshots" / SNAPSHOT / "README.md").write_text(readme)


def train(tmp: Path, base: str, task: str, lora: bool) -> Path:
    """A few steps on `base`; the run directory."""
    rows = [line for ch in chapters(3) for line in ch.split("\n")]
    if task == "causal-lm":
        records, fmt = [{"prompt": r[:30], "completion": r[30:60]} for r in rows], "prompt-completion"
    else:
        names = ["exodus", "genesis", "leviticus"]
        records, fmt = [{"text": r, "label": names[i % 3]} for i, r in enumerate(rows)], "classification"
    random.Random(0).shuffle(records)
    data = tmp / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {
        "name": task,
        "output_dir": str(tmp / "runs"),
        "model": {"name_or_path": base, "task": task},
        "data": {"train": str(data), "format": fmt, "max_length": 64, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 3, "micro_batch_size": 4, "lr": 1e-2},
        "eval": {"max_batches": 1, "generate": {"num_examples": 1, "max_new_tokens": 4}},
        "tracking": {"backends": ["none"]},
    }
    if lora:
        raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    path = tmp / f"{task}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"lora": a LoRA run on LLAMA, "full": a full fine-tune of BERT, "local": a LoRA run on a local
    copy of LLAMA's model}, with the Hub cache in place."""
    tmp = tmp_path_factory.mktemp("cards")
    tokenizer = train_bpe_tokenizer(chapters(30), vocab_size=400)
    cache = tmp / "hub-cache"
    cache_model(cache, LLAMA, save_tiny_llama(tmp / "llama", tokenizer), "---\nlicense: apache-2.0\n---\n# tiny\n")
    cache_model(cache, BERT, save_tiny_bert(tmp / "bert", tokenizer))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        yield {
            "lora": train(tmp, LLAMA, "causal-lm", True),
            "full": train(tmp, BERT, "classification", False),
            "local": train(tmp, str(tmp / "llama"), "causal-lm", True),
            "tmp": tmp,
        }


def metadata(directory: Path) -> dict:
    return ModelCard.load(directory / "README.md").data.to_dict()


def model_index(directory: Path) -> dict:
    card = ModelCard.load(directory / "README.md")
    return {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}


def final_metrics(run_dir: Path) -> dict:
    final = json.loads((run_dir / "eval.json").read_text())
    return {
        (final[section].get("split", section), name): value
        for section in ("validation", "test", "generation")
        for name, value in final.get(section, {}).items()
        if isinstance(value, float) and math.isfinite(value)
    }


def test_an_adapter_and_its_merge_name_the_hub_base_and_their_relation(runs):
    run_dir, tmp = runs["lora"], runs["tmp"]
    adapter = export_run(run_dir, tmp / "adapter")
    merged = export_run(run_dir, tmp / "merged", merge_lora=True)
    shared = {  # no datasets: causal-lm.jsonl is a local file, no Hub dataset id
        "base_model": LLAMA,
        "license": "apache-2.0",  # carried from the base's card in the cache
        "pipeline_tag": "text-generation",
    }
    for directory in (adapter, run_dir / "final"):
        data = metadata(directory)
        assert data.pop("model-index")[0]["name"] == "causal-lm"
        assert data == {**shared, "base_model_relation": "adapter", "library_name": "peft"} | {
            "tags": ["lmforge", "causal-lm", "lora"]
        }
    data = metadata(merged)
    assert data["base_model_relation"] == "merge" and data["library_name"] == "transformers"
    assert data["tags"] == ["lmforge", "causal-lm"] and all(data[k] == v for k, v in shared.items())
    for directory in (adapter, merged, run_dir / "final"):
        assert model_index(directory) == final_metrics(run_dir) and ("test", "loss") in final_metrics(run_dir)
        card = ModelCard.load(directory / "README.md")
        assert {(r.dataset_name, r.dataset_type) for r in card.data.eval_results} == {
            ("causal-lm.jsonl", LOCAL_DATASET_TYPE)
        }
        assert local_base_warning(directory) is None and "**Note:**" not in card.text  # a Hub base


def test_a_full_fine_tune_of_a_hub_classifier_is_a_finetune_with_the_given_licence(runs):
    run_dir, tmp = runs["full"], runs["tmp"]
    export = export_run(run_dir, tmp / "classifier", license="mit")
    data = metadata(export)
    assert data["base_model"] == BERT and data["base_model_relation"] == "finetune"
    assert data["pipeline_tag"] == "text-classification" and data["library_name"] == "transformers"
    assert data["license"] == "mit" and data["tags"] == ["lmforge", "classification"]
    assert "license" not in metadata(run_dir / "final")  # the base's card names none
    got = model_index(export)
    assert got == final_metrics(run_dir) and ("test", "accuracy") in got
    card = ModelCard.load(export / "README.md")
    assert {r.task_type for r in card.data.eval_results} == {"text-classification"}


def test_an_adapter_of_a_local_base_says_where_the_base_is_and_its_merge_does_not(runs):
    run_dir, tmp = runs["local"], runs["tmp"]
    adapter = export_run(run_dir, tmp / "local-adapter")
    merged = export_run(run_dir, tmp / "local-merged", merge_lora=True)
    warning = local_base_warning(adapter)
    assert warning is not None and str(tmp / "llama") in warning and "--merge-lora" in warning
    assert local_base_warning(run_dir) == warning
    for directory in (adapter, run_dir / "final"):
        card = ModelCard.load(directory / "README.md")
        assert f"## How to load\n\n**Note:** {warning}\n" in card.text
        assert "base_model" not in card.data.to_dict()  # the Hub refuses a path as base_model
    assert local_base_warning(merged) is None
    assert "**Note:**" not in (merged / "README.md").read_text()


def test_export_with_an_uppercase_licence_fails_at_once_with_the_lowercase_id(tmp_path):
    proc = subprocess.run(
        lmforge_command("export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), "--license", "MIT"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and "use --license mit" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "nowhere" not in proc.stderr  # refused before the run was read
    assert not (tmp_path / "out").exists()
