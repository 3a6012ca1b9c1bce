"""Every exported model loads exactly as its model card says, and an adapter always loads onto the
base it was trained on.

For each task (causal LM, seq2seq, classification) a tiny pretrained model is fine-tuned with LoRA
in-process; its adapter and merged exports are loaded by running the card's own snippet in a fresh
Python (plain transformers and peft, another working directory), whose outputs must equal what
lmforge computes from the run."""

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from conftest import chapters, save_tiny_bert, save_tiny_llama, save_tiny_t5
from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.eval.target import load_target
from lmforge.export.export import CARD_PATH, export_run
from lmforge.models.tokenizer import train_bpe_tokenizer
from lmforge.run import run_train

pytestmark = pytest.mark.slow
PROBE = "In the beginning God created"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(chapters(30), vocab_size=400)


def lines(n: int, start: int = 0) -> list[str]:
    return [line for ch in chapters(n, start) for line in ch.split("\n")]


def train_run(tmp: Path, base: str, task: str, lora: bool = True) -> Path:
    """A few LoRA steps on `base`; the run directory."""
    data = tmp / "data.jsonl"
    rows = lines(3)
    if task == "causal-lm":
        records, fmt = [{"prompt": r[:30], "completion": r[30:60]} for r in rows], "prompt-completion"
    elif task == "seq2seq":
        records, fmt = [{"source": r[:40], "target": r[40:60]} for r in rows], "seq2seq"
    else:
        names = ["exodus", "genesis", "leviticus"]
        records, fmt = [{"text": r, "label": names[i % 3]} for i, r in enumerate(rows)], "classification"
    random.Random(0).shuffle(records)
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
    outcome = run_train(load_config(path, env={}), Console(file=io.StringIO()))
    return outcome.run_dir


def snippet(card: str) -> str:
    return card.split("```python\n", 1)[1].split("```", 1)[0]


def run_card(export: Path, task: str, workdir: Path) -> dict:
    """The card's snippet in a fresh Python, in another directory, then its model's outputs on PROBE."""
    code = snippet((export / "README.md").read_text()).replace(f'PATH = "{CARD_PATH}"', f"PATH = {str(export)!r}")
    probe = (
        f"\nimport torch, json\nbatch = tokenizer({PROBE!r}, return_tensors='pt')\nmodel.eval()\n"
        "with torch.no_grad():\n"
        + (
            "    logits = model(**batch, decoder_input_ids=batch['input_ids'][:, :3]).logits\n"
            if task == "seq2seq"
            else "    logits = model(**batch).logits\n"
        )
        + "torch.save(logits, 'logits.pt')\n"
        + "json.dump(getattr(model.config, 'id2label', None), open('labels.json', 'w'))\n"
    )
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMFORGE_")} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code + probe], cwd=workdir, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, code + "\n" + proc.stderr[-3000:]
    labels = json.loads((workdir / "labels.json").read_text())
    return {"logits": torch.load(workdir / "logits.pt"), "labels": labels}


def lmforge_logits(run_dir: Path, task: str) -> torch.Tensor:
    model, tokenizer, _ = load_target(run_dir)
    batch = tokenizer(PROBE, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        if task == "seq2seq":
            return model(**batch, decoder_input_ids=batch["input_ids"][:, :3]).logits
        return model(**batch).logits


@pytest.mark.parametrize("task", ["causal-lm", "seq2seq", "classification"])
def test_the_card_snippet_loads_every_export_with_the_runs_outputs_and_labels(tmp_path, tokenizer, task):
    save = {"causal-lm": save_tiny_llama, "seq2seq": save_tiny_t5, "classification": save_tiny_bert}[task]
    base = save(tmp_path / "base", tokenizer)
    run_dir = train_run(tmp_path, str(base), task)
    expected = lmforge_logits(run_dir, task)
    for merge in (False, True):
        export = export_run(run_dir, tmp_path / f"export-{merge}", merge_lora=merge)
        card = (export / "README.md").read_text()
        assert ("AutoPeft" in snippet(card)) != merge
        got = run_card(export, task, tmp_path / f"elsewhere-{merge}")
        torch.testing.assert_close(got["logits"], expected, rtol=1e-4, atol=1e-5)
        if task == "classification":
            assert got["labels"] == {"0": "exodus", "1": "genesis", "2": "leviticus"}


def test_a_fully_fine_tuned_classifier_export_loads_with_its_label_names(tmp_path, tokenizer):
    run_dir = train_run(tmp_path, str(save_tiny_bert(tmp_path / "base", tokenizer)), "classification", lora=False)
    export = export_run(run_dir, tmp_path / "export")
    got = run_card(export, "classification", tmp_path / "elsewhere")
    torch.testing.assert_close(got["logits"], lmforge_logits(run_dir, "classification"), rtol=1e-4, atol=1e-5)
    assert got["labels"] == {"0": "exodus", "1": "genesis", "2": "leviticus"}


def test_an_adapter_loads_its_own_base_from_anywhere_and_refuses_another(tmp_path, tokenizer, monkeypatch):
    """The base is given through a `-latest` link, relative to the working directory (as
    examples/spelling-lora.yaml does); the link then moves to a new base."""
    save_tiny_llama(tmp_path / "base-1", tokenizer, seed=0)
    save_tiny_llama(tmp_path / "base-2", tokenizer, seed=1)
    (tmp_path / "base-latest").symlink_to("base-1")
    monkeypatch.chdir(tmp_path)
    run_dir = train_run(tmp_path, "base-latest", "causal-lm")
    expected = lmforge_logits(run_dir, "causal-lm")
    record = json.loads((run_dir / "final" / "lmforge_base.json").read_text())
    assert record["path"] == str((tmp_path / "base-1").resolve()) and record["given_as"] == "base-latest"
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == record["path"]  # peft's own loaders find it too
    card = (run_dir / "final" / "README.md").read_text()
    assert f"- **Base model:** {record['path']} (given as base-latest; weights fingerprint " in card

    (tmp_path / "base-latest").unlink()
    (tmp_path / "base-latest").symlink_to("base-2")  # the next base run moves the link
    monkeypatch.chdir(tmp_path / "runs")  # and we are somewhere else
    torch.testing.assert_close(lmforge_logits(run_dir, "causal-lm"), expected, rtol=0, atol=0)
    merged = export_run(run_dir, tmp_path / "merged", merge_lora=True)
    torch.testing.assert_close(run_card(merged, "causal-lm", tmp_path / "w")["logits"], expected)
    checkpoint = run_dir / "checkpoints" / "step-000003"  # the adapters only, on the base its record names
    assert json.loads((checkpoint / "manifest.json").read_text())["weights"] == "trainable"
    assert json.loads((checkpoint / "lmforge_base.json").read_text()) == record
    merged = export_run(checkpoint, tmp_path / "merged-checkpoint", merge_lora=True)
    torch.testing.assert_close(run_card(merged, "causal-lm", tmp_path / "w2")["logits"], expected)

    weights = tmp_path / "base-1" / "model.safetensors"
    save_tiny_llama(tmp_path / "base-1", tokenizer, seed=2)  # the base itself is overwritten
    assert weights.is_file()
    for action in (
        lambda: load_target(run_dir),
        lambda: export_run(run_dir, tmp_path / "again", merge_lora=True),
        lambda: load_target(checkpoint),
        lambda: export_run(checkpoint, tmp_path / "adapter-of-checkpoint"),
        lambda: export_run(checkpoint, tmp_path / "merged-again", merge_lora=True),
    ):
        with pytest.raises(UserError, match="is not the one this adapter was trained on"):
            action()
    (tmp_path / "base-1" / "model.safetensors").unlink()
    for path in (tmp_path / "base-1").iterdir():
        path.unlink()
    (tmp_path / "base-1").rmdir()
    with pytest.raises(UserError, match=r"trained on, .*base-1 \(given as base-latest\), is gone"):
        load_target(run_dir)
