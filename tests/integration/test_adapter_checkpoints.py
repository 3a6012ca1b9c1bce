"""A LoRA run on a pretrained base checkpoints its trainable weights only (the adapters, beside a
record of the base): the checkpoint is a fraction of the base's size, a resume from it ends with
the weights, losses and learning rates of the uninterrupted run, and a resume or a load on another
base is refused."""

import io
import json

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from conftest import chapters, save_tiny_llama, tiny_config_dict
from lmforge.config import load_config
from lmforge.data.prepare import prepare_data
from lmforge.engine.checkpoint import list_checkpoints
from lmforge.engine.loop import train
from lmforge.errors import UserError
from lmforge.eval.target import load_target
from lmforge.models.build import build_model
from lmforge.models.peft import base_record
from lmforge.models.tokenizer import train_bpe_tokenizer
from lmforge.run import run_train
from lmforge.tracking.base import JsonlTracker, Trackers

STEPS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapters")
    (tmp / "corpus.txt").write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    save_tiny_llama(tmp / "base", train_bpe_tokenizer(chapters(30), vocab_size=400))
    return tmp


def config_of(workdir, *overrides):
    raw = tiny_config_dict(workdir / "corpus.txt", workdir / "cache", workdir / "runs")
    raw["model"] = {"name_or_path": str(workdir / "base")}
    raw["tokenizer"] = {}
    raw["lora"] = {"r": 4, "alpha": 8, "dropout": 0.1}  # dropout draws from the RNG the checkpoint restores
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = (f"train.max_steps={STEPS}", "train.save_every=3", "train.keep_last=5", "train.warmup_steps=1")
    return load_config(path, [*settings, *overrides], env={})


def run(config, where, base, resume_from=None):
    """Train as a fresh process would (prepared data, the base loaded, seeded adapters); return the
    trained weights and the logged (step, loss, lr) of every step."""
    where.mkdir()
    data = prepare_data(config, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(config, data.tokenizer)
    trackers = Trackers(JsonlTracker(where / "metrics.jsonl"), [], None, print)
    quiet = Console(file=io.StringIO())
    result = train(
        model, data, config, trackers, console=quiet, checkpoint_dir=where / "ckpt", resume_from=resume_from, base=base
    )
    points = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    logged = [(p["step"], p["train/loss"], p["train/lr"]) for p in points if "train/loss" in p]
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}, logged


def test_an_adapter_checkpoint_holds_the_adapters_and_resumes_exactly(workdir):
    config, base = config_of(workdir), base_record(str(workdir / "base"))
    weights, logged = run(config, workdir / "whole", base)
    checkpoint = list_checkpoints(workdir / "whole" / "ckpt")[0]
    assert checkpoint.step == 3
    saved = load_file(checkpoint.path / "model.safetensors")
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    assert json.loads((checkpoint.path / "manifest.json").read_text())["weights"] == "trainable"
    assert json.loads((checkpoint.path / "lmforge_base.json").read_text()) == base
    base_size = (workdir / "base" / "model.safetensors").stat().st_size
    assert (checkpoint.path / "model.safetensors").stat().st_size < base_size / 4

    resumed, tail = run(config, workdir / "resumed", base, resume_from=checkpoint.path)
    assert tail == logged[3:]
    assert resumed.keys() == weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)

    # the checkpoint loads as a model: its base under its adapters, the weights of step 3
    model, _, _ = load_target(checkpoint.path)
    for name, value in model.state_dict().items():
        if ".lora_" in name:
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


def test_a_resume_on_another_base_is_refused(workdir, tmp_path):
    base = tmp_path / "base"
    save_tiny_llama(base, train_bpe_tokenizer(chapters(30), vocab_size=400))
    config = config_of(workdir, "train.max_steps=3", f"model.name_or_path={base}", f"output_dir={tmp_path / 'runs'}")
    outcome = run_train(config, Console(file=io.StringIO()))
    assert (outcome.run_dir / "checkpoints" / "step-000003" / "lmforge_base.json").is_file()
    save_tiny_llama(base, train_bpe_tokenizer(chapters(30), vocab_size=400), seed=1)  # same path, other weights
    longer = config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 6})})
    with pytest.raises(UserError, match="holds LoRA adapters trained on the base model .*other weights"):
        run_train(longer, Console(file=io.StringIO()), resume=str(outcome.run_dir))
