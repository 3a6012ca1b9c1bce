"""distributed.strategy: fsdp on CPU over gloo (`lmforge train --nproc 2`): FSDP2 training gives the
per-step losses of one process taking the whole batch, full fine-tuning and LoRA; its checkpoints
are sharded (torch.distributed.checkpoint) and resume on 1 and on 2 processes, and a 1-process
one on 2, the losses continuing as in the uninterrupted run; final/ is a plain Hugging Face
directory that loads in transformers with the weights of the 1-process run.

Tolerance: relative 1e-5 on losses, absolute 1e-4 on weights (a tenth of one step at lr 1e-3). The
two jobs add the same numbers in another order (a reduce-scatter of two halves instead of one
backward over the whole batch), which changes the last bits of fp32 sums; Adam divides a gradient by
its running magnitude, so on a near-zero gradient those bits move a weight by up to ~1e-5."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from conftest import chapters, lmforge_command, save_tiny_llama, subprocess_env, tiny_config_dict
from lmforge.models.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.slow
ATOL = 1e-4


def workdir(tmp_path, **config):
    (tmp_path / "corpus.txt").write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    cfg = tiny_config_dict(tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "runs")
    cfg["data"]["test_fraction"] = 0.0
    cfg["train"].update({"max_steps": 6, "eval_every": 3, "save_every": 3, "keep_last": 5})
    cfg["distributed"] = {"strategy": "fsdp"}
    cfg.update(config)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path


def lora_workdir(tmp_path, **config):
    """`workdir` for LoRA (r 4) on a tiny pretrained Llama saved in tmp_path/base."""
    save_tiny_llama(tmp_path / "base", train_bpe_tokenizer(chapters(30), vocab_size=400))
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    return workdir(tmp_path, model={"name_or_path": str(tmp_path / "base")}, tokenizer={}, lora=lora, **config)


def lmforge(where, *args, ok=True, env=None):
    proc = subprocess.run(
        lmforge_command("train", "config.yaml", *args),
        cwd=where,
        capture_output=True,
        text=True,
        env=env or subprocess_env(),
        timeout=600,
    )
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run_named(where, name):
    (run_dir,) = [p for p in (where / "runs").glob(f"{name}-2*") if p.is_dir()]
    return run_dir


def losses(run_dir):
    points = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {p["step"]: p["train/loss"] for p in points if "train/loss" in p}


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


def test_two_processes_train_as_one_and_their_sharded_checkpoints_resume_on_one_or_two(tmp_path):
    from transformers import AutoModelForCausalLM

    where = workdir(tmp_path)
    lmforge(where, "name=one", "train.grad_accum=2")  # micro-batches 4 x 2 in one process
    pair = lmforge(where, "name=two", "--nproc", "2")  # 4 in each of 2 processes
    assert "2 processes (FSDP, weights sharded)" in pair.stdout and "up to 256 tokens per step" in pair.stdout
    one, two = run_named(where, "one"), run_named(where, "two")
    expected = losses(one)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert list(losses(two).values()) == pytest.approx(list(expected.values()), rel=1e-5)
    # activation checkpointing recomputes each block's forward in the backward: the same numbers
    lmforge(where, "name=recomputed", "--nproc", "2", "distributed.fsdp.activation_checkpointing=true")
    assert list(losses(run_named(where, "recomputed")).values()) == pytest.approx(list(expected.values()), rel=1e-5)

    manifest = json.loads((two / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["sharded"] == {"strategy": "fsdp", "world_size": 2}
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= set(manifest["files"])
    assert not (two / "checkpoints" / "step-000003" / "model.safetensors").exists()
    assert json.loads((one / "checkpoints" / "step-000003" / "manifest.json").read_text())["sharded"]["world_size"] == 1

    # final/ is whole: plain transformers loads it, with the 1-process run's weights
    model = AutoModelForCausalLM.from_pretrained(two / "final")
    assert type(model).__name__ == "LlamaForCausalLM"
    reference = weights(one / "final")
    for name, tensor in weights(two / "final").items():
        torch.testing.assert_close(tensor, reference[name], atol=ATOL, rtol=0)

    # a step-3 checkpoint of 2 processes, on 1 (grad_accum 2 keeps each step's data) and on 2
    for name, args in (("to-one", ["train.grad_accum=2"]), ("to-two", ["--nproc", "2"])):
        copy = shutil.copytree(two, where / "runs" / f"{name}-20990101-000000")
        lmforge(where, "--resume", str(copy / "checkpoints" / "step-000003"), "name=two", *args)
        resumed = losses(copy)
        assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-5), name
    # and a 1-process sharded checkpoint on 2
    copy = shutil.copytree(one, where / "runs" / "one-to-two-20990101-000000")
    lmforge(where, "--resume", str(copy / "checkpoints" / "step-000003"), "name=one", "--nproc", "2")
    resumed = losses(copy)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-5)
    for name, tensor in weights(copy / "final").items():
        torch.testing.assert_close(tensor, reference[name], atol=ATOL, rtol=0)

    # resuming 2 processes' checkpoint on 1 with the same grad_accum would halve each step's data
    refused = lmforge(where, "--resume", str(two / "checkpoints" / "step-000003"), "name=two", ok=False)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    message = " ".join((refused.stdout + refused.stderr).split())
    assert "written by 2 with train.grad_accum=1" in message and "Set train.grad_accum=2" in message
    assert "Traceback" not in refused.stderr


EXIT_PROBE = """import atexit, sys


def probe():
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        print("process group left at exit", flush=True)


atexit.register(probe)
"""


def test_bf16_on_two_processes_trains_as_on_one(tmp_path):
    """bf16 autocast under FSDP (a MixedPrecisionPolicy: bf16 compute, fp32 master weights and
    gradient reduction) against bf16 autocast in one process. Tolerance: relative 2e-3 on losses
    (bf16 keeps 8 bits of mantissa; the two jobs round the sharded and the whole weights' casts and
    the reductions in another order, so the losses part at the third or fourth digit)."""
    where = workdir(tmp_path)
    lmforge(where, "name=one", "train.grad_accum=2", "train.precision=bf16")
    probe = tmp_path / "probe"  # reports, as each process exits, a process group it left behind
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(EXIT_PROBE)
    pair = lmforge(where, "name=two", "--nproc", "2", "train.precision=bf16", env=subprocess_env(PYTHONPATH=str(probe)))
    assert "precision bf16" in pair.stdout
    # each process left the job: a gloo group left to the interpreter's exit can abort a finished process
    assert "process group left at exit" not in pair.stdout + pair.stderr
    expected = losses(run_named(where, "one"))
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert list(losses(run_named(where, "two")).values()) == pytest.approx(list(expected.values()), rel=2e-3)


def test_accelerate_launch_with_an_fsdp_config_trains_sharded(tmp_path):
    """`accelerate launch --config_file fsdp.yaml -m lmforge train` (strategy auto): the job is FSDP,
    with the accelerate config's own FSDP settings, and its checkpoints are sharded over 2."""
    where = workdir(tmp_path, distributed={})
    (where / "fsdp.yaml").write_text(
        yaml.safe_dump(
            {
                "compute_environment": "LOCAL_MACHINE",
                "distributed_type": "FSDP",
                "num_machines": 1,
                "num_processes": 2,
                "mixed_precision": "no",
                "fsdp_config": {"fsdp_version": 2, "fsdp_activation_checkpointing": True},
            }
        )
    )
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "fsdp.yaml"]
    proc = subprocess.run(
        [*launch, "-m", "lmforge", "train", "config.yaml", "train.max_steps=3"],
        cwd=where,
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes (FSDP, weights sharded, activations recomputed)" in " ".join(proc.stdout.split())
    manifest = json.loads((run_named(where, "tiny") / "checkpoints" / "step-000003" / "manifest.json").read_text())
    assert manifest["sharded"] == {"strategy": "fsdp", "world_size": 2}


def test_lora_on_two_processes_trains_as_one_and_checkpoints_the_adapters_only(tmp_path):
    where = lora_workdir(tmp_path)
    lmforge(where, "name=one", "train.grad_accum=2")
    lmforge(where, "name=two", "--nproc", "2")
    one, two = run_named(where, "one"), run_named(where, "two")
    assert list(losses(two).values()) == pytest.approx(list(losses(one).values()), rel=1e-5)

    checkpoint = two / "checkpoints" / "step-000006"
    assert (checkpoint / "lmforge_base.json").is_file()
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["weights"] == "trainable"
    saved = FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    held = [key for key in saved if key.startswith("model.")]
    assert held and all("lora_" in key for key in held), held  # the adapters, not the base

    adapters = load_file(str(two / "final" / "adapter_model.safetensors"))
    reference = load_file(str(one / "final" / "adapter_model.safetensors"))
    assert adapters.keys() == reference.keys() and adapters
    for name, tensor in adapters.items():
        torch.testing.assert_close(tensor, reference[name], atol=ATOL, rtol=0)

    copy = shutil.copytree(two, where / "runs" / "lora-to-one-20990101-000000")
    lmforge(where, "--resume", str(copy / "checkpoints" / "step-000003"), "name=two", "train.grad_accum=2")
    resumed = losses(copy)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([losses(one)[s] for s in (4, 5, 6)], rel=1e-5)
