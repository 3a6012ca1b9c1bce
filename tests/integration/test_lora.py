"""LoRA, DoRA and rsLoRA through peft: what trains, what is saved, merging, export, and the chain
pretrain -> fine-tune."""

import io
import json
import subprocess

import pytest
import torch
import yaml
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.data.prepare import prepare_data
from lmforge.engine.loop import train
from lmforge.models.build import build_model
from lmforge.tracking.base import JsonlTracker, Trackers


def one_step(config, tmp_path):
    data = prepare_data(config, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(config, data.tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trackers = Trackers(JsonlTracker(tmp_path / "m.jsonl"), [], None, print)
    result = train(model, data, config, trackers, console=Console(file=io.StringIO()))
    return before, dict(result.model.named_parameters()), data


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_only_adapter_parameters_change(tiny_config, tmp_path, variant):
    extra = {"lora": [], "dora": ["lora.use_dora=true"], "rslora": ["lora.use_rslora=true"]}[variant]
    config = tiny_config("train.max_steps=2", "lora.r=4", "lora.dropout=0.0", "train.lr=1e-2", *extra)
    before, after, _ = one_step(config, tmp_path)
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    adapters = {n for n in before if "lora_" in n}
    assert adapters and changed == {n for n in adapters if after[n].requires_grad}
    assert any("lora_B" in n for n in changed)  # B starts at zero and must move for the update to exist
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in changed)
    assert all(not after[n].requires_grad for n in before if "lora_" not in n)


def test_freeze_keeps_named_parameters_fixed(tiny_config, tmp_path):
    config = tiny_config("train.max_steps=2", "model.freeze=[embeddings, layers.0]", "train.lr=1e-2")
    before, after, _ = one_step(config, tmp_path)
    for name, value in before.items():
        frozen = "embed_tokens" in name or ".layers.0." in name
        assert torch.equal(value, after[name].detach()) == frozen, name


def test_freeze_pattern_matching_nothing_is_an_error(tiny_config):
    from lmforge.errors import UserError

    config = tiny_config("model.freeze=[encoder.blocks]")
    data = prepare_data(config, log=lambda _: None)
    with pytest.raises(UserError, match="model.freeze: 'encoder.blocks' matches no parameter"):
        build_model(config, data.tokenizer)


def write_run_config(tmp_path, **extra):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((ROOT / "data" / "kjv-pentateuch.txt").read_text()[:60_000])
    cfg = tiny_config_dict(corpus, tmp_path / "cache", tmp_path / "runs")
    cfg["train"].update({"max_steps": 6})
    for key, value in extra.items():
        cfg[key] = value if not isinstance(value, dict) else {**cfg.get(key, {}), **value}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args):
    proc = subprocess.run(lmforge_command(*args), capture_output=True, text=True, env=subprocess_env(), timeout=300)
    return proc


@pytest.mark.slow
def test_pretrain_then_lora_then_merge_and_export(tmp_path):
    # 1. pretrain a tiny model from scratch
    pre = tmp_path / "pre"
    pre.mkdir()
    proc = cli("train", str(write_run_config(pre, name="base")))
    assert proc.returncode == 0, proc.stderr
    (base_run,) = (pre / "runs").glob("base-2*")

    # 2. LoRA fine-tune it, from its final/ directory, on prompt-completion data
    ft = tmp_path / "ft"
    ft.mkdir()
    rows = [
        {"prompt": f"Spell {w}:", "completion": " " + " ".join(w)} for w in ["moses", "aaron", "egypt", "jacob"] * 30
    ]
    (ft / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load(write_run_config(ft, name="lora").read_text())
    cfg["model"] = {"name_or_path": str(base_run / "final")}
    cfg["tokenizer"] = {}
    cfg["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    cfg["data"].update(
        {
            "train": str(ft / "sft.jsonl"),
            "format": "prompt-completion",
            "validation_fraction": 0.2,
            "test_fraction": 0.0,
        }
    )
    cfg["train"].update({"max_steps": 8, "lr": 5e-3})
    path = ft / "lora.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "trainable (" in proc.stdout
    (lora_run,) = (ft / "runs").glob("lora-2*")
    final = lora_run / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()

    # 3. generate from the adapter run, then merge: merged logits equal the adapter model's
    proc = cli("generate", str(lora_run), "Spell moses:", "--max-new-tokens", "4", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("Spell moses:"), proc.stderr
    merged_dir = tmp_path / "merged"
    proc = cli("export", str(lora_run), "--merge-lora", "--out", str(merged_dir))
    assert proc.returncode == 0, proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # plain transformers, no peft
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    from lmforge.eval.target import load_target

    adapter_model, _, _ = load_target(lora_run)
    ids = tokenizer("Spell aaron: a a r o n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(base_run / "final")
        assert (base(ids).logits - merged(ids).logits).abs().max() > 1e-3  # the adapter did change something
    proc = cli("generate", str(merged_dir), "Spell moses:", "--max-new-tokens", "4", "--temperature", "0")
    assert proc.returncode == 0 and proc.stdout.startswith("Spell moses:"), proc.stderr
    card = (merged_dir / "README.md").read_text()
    assert str(base_run / "final") in card and "## Final metrics" in card and "AutoModelForCausalLM" in card

    # 4. adapter-only export loads with peft
    adapter_dir = tmp_path / "adapter"
    assert cli("export", str(lora_run), "--out", str(adapter_dir)).returncode == 0
    assert (adapter_dir / "adapter_config.json").is_file() and "AutoPeftModelForCausalLM" in (
        adapter_dir / "README.md"
    ).read_text()


def test_qlora_without_cuda_is_a_clear_config_error(tmp_path):
    path = write_run_config(tmp_path, lora={"quantize": "4bit"})
    proc = cli("train", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lora.quantize=4bit (QLoRA) needs a CUDA GPU" in proc.stderr
    assert "training a byte-level BPE tokenizer" not in proc.stdout + proc.stderr  # nothing was loaded first


def test_export_of_a_tied_embedding_model_keeps_the_tie(tmp_path):
    path = write_run_config(tmp_path, name="tied", model={"tie_embeddings": True})
    proc = cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").glob("tied-2*")
    out = tmp_path / "export"
    assert cli("export", str(run_dir), "--out", str(out)).returncode == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    original = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert (out / "README.md").is_file() and (out / "lmforge_eval.json").is_file()
