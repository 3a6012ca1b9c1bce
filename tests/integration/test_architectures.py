"""Models of other families built from scratch (model.architecture, model.config, model.dropout): a
GPT-2 and a Qwen2 train with packing on the shipped corpus, their final/ loads in plain transformers
and reproduces, example by example and without packing, the validation loss the trained model
recorded on packed rows; model.dropout reaches every dropout field and changes training. (Packed rows
of both families giving each example's own losses and updates: tests/integration/test_packing.py.)"""

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, Qwen2ForCausalLM
from typer.testing import CliRunner

from conftest import chapters, tiny_config_dict
from lmforge.config import load_config
from lmforge.data.loader import IGNORE_INDEX
from lmforge.data.prepare import prepare_data
from lmforge.export.export import export_run
from lmforge.run import run_train

GPT2_DROPOUT = ["attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout"]
RUNS = {
    # lmforge's sizes, mapped onto GPT-2's names (n_embd, n_layer, n_head, n_inner)
    "gpt2": {
        "architecture": "gpt2",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 128,
        "dropout": 0.1,
    },
    "gpt2-no-dropout": {
        "architecture": "gpt2",
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "intermediate_size": 128,
        "dropout": 0.0,
    },
    # Qwen2's own field names, grouped-query attention; its dropout left at the family's default
    "qwen2": {
        "architecture": "qwen2",
        "config": {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 128,
            "rope_theta": 10000.0,
        },
    },
}
STEPS = 30


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One short packed run of each model in RUNS, on verses of the shipped corpus (one document a
    line, so that rows hold several examples), evaluated on all of its validation rows."""
    tmp = tmp_path_factory.mktemp("architectures")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    done = {}
    for name, model in RUNS.items():
        cfg = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
        cfg["name"] = name
        cfg["model"] = model
        cfg["data"].update({"max_length": 64, "txt_documents": "line"})
        cfg["train"].update({"max_steps": STEPS, "lr": 3e-3, "micro_batch_size": 8})
        cfg["eval"].update({"max_batches": None, "predictions": False, "bootstrap_resamples": 0})
        cfg["eval"]["generate"]["max_examples"] = 0
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        console = io.StringIO()
        outcome = run_train(load_config(path, env={}), Console(file=console, width=200))
        done[name] = (outcome.run_dir, console.getvalue())
    return done


def train_losses(run_dir):
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [p["train/loss"] for p in points if "train/loss" in p]


@pytest.mark.parametrize("name", ["gpt2", "qwen2"])
def test_the_loss_falls(runs, name):
    run_dir, output = runs[name]
    losses = train_losses(run_dir)
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.4, losses
    assert "attention varlen" in output  # both families keep packed examples apart with varlen
    assert "fused cross-entropy from hidden states" in output  # and their plain linear heads are chunked


@pytest.mark.parametrize(("name", "kind"), [("gpt2", GPT2LMHeadModel), ("qwen2", Qwen2ForCausalLM)])
def test_final_in_plain_transformers_gives_the_trained_models_validation_loss_example_by_example(runs, name, kind):
    """The validation loss recorded at the end of training (the trained model in memory, packed rows,
    varlen attention) equals the loss of final/ loaded in plain transformers (its own attention), each
    example alone in a row of its own with default positions: the saved model is the trained one, and
    packing kept the examples apart (GPT-2's learned absolute positions restart in every example)."""
    run_dir, _ = runs[name]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final").eval()
    assert type(model) is kind and model.config._attn_implementation == "sdpa"
    validation = prepare_data(load_config(run_dir / "config.yaml", env={}), log=lambda _: None).splits["validation"]
    assert max(len(lengths) for lengths in validation["lengths"]) > 2  # the rows were packed
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels, lengths in zip(
            validation["input_ids"], validation["labels"], validation["lengths"], strict=True
        ):
            start = 0
            for n in lengths:
                example, targets = torch.tensor([ids[start : start + n]]), torch.tensor(labels[start + 1 : start + n])
                logits = model(input_ids=example).logits[0, :-1]
                total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
                count += int((targets != IGNORE_INDEX).sum())
                start += n
    recorded = json.loads((run_dir / "eval.json").read_text())["validation"]
    assert count == recorded["tokens"]
    # on CPU (fp32) 1e-8 apart, and 4e-4 if the packed rows were seen as one; a CUDA run records its
    # loss in bf16 (precision auto), from which only a bound is expected
    assert total / count == pytest.approx(recorded["loss"], rel=1e-2 if torch.cuda.is_available() else 1e-6)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    inputs = tokenizer("And God said", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5


def test_model_dropout_sets_every_dropout_field_and_changes_training(runs):
    saved = {name: json.loads((runs[name][0] / "final" / "config.json").read_text()) for name in RUNS}
    assert {field: saved["gpt2"][field] for field in GPT2_DROPOUT} == dict.fromkeys(GPT2_DROPOUT, 0.1)
    assert {field: saved["gpt2-no-dropout"][field] for field in GPT2_DROPOUT} == dict.fromkeys(GPT2_DROPOUT, 0.0)
    assert saved["qwen2"]["attention_dropout"] == 0.0  # not set: the family's default
    assert saved["gpt2"]["n_embd"] == 64 and saved["gpt2"]["n_inner"] == 128 and saved["gpt2"]["n_layer"] == 2
    assert saved["qwen2"]["num_key_value_heads"] == 2 and saved["qwen2"]["rope_parameters"]["rope_theta"] == 10000.0
    with_dropout, without = train_losses(runs["gpt2"][0]), train_losses(runs["gpt2-no-dropout"][0])
    # the same initial weights and data: only the dropped activations differ
    assert with_dropout[0] != without[0] and max(abs(a - b) for a, b in zip(with_dropout, without, strict=True)) > 0.01
    assert all(math.isfinite(v) for v in with_dropout + without)


def test_export_card_and_generate_command(runs, tmp_path):
    from lmforge.cli import app

    run_dir, _ = runs["gpt2"]
    exported = export_run(run_dir, tmp_path / "export")
    assert "trained from scratch" in (exported / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model) is GPT2LMHeadModel
    result = CliRunner().invoke(
        app, ["generate", str(run_dir), "And Moses", "--max-new-tokens", "6", "--temperature", "0"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("And Moses") and len(result.output.strip()) > len("And Moses")
