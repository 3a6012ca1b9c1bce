"""distributed.strategy: deepspeed on CPU over gloo (`lmforge train --nproc 2`; DeepSpeed's CPU
accelerator): ZeRO-2 and ZeRO-3 give the per-step losses of one process taking the whole batch;
their checkpoints are DeepSpeed's own partitions under lmforge's manifest and resume on as many
processes as wrote them, the losses continuing as in the uninterrupted run, while another count
or another strategy is refused before training; final/ is a plain Hugging Face directory (ZeRO-3's
weights gathered), and a LoRA run's checkpoints hold the adapters only.

Tolerance: relative 1e-5 on losses, absolute 1e-4 on weights, as tests/integration/test_fsdp.py
(the same sums in another order)."""

import json
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp import ATOL, lora_workdir, losses, run_named, weights, workdir
from test_fsdp import lmforge as lmforge_in

from conftest import deepspeed_env, lmforge_command, subprocess_env

pytestmark = pytest.mark.slow


def lmforge(where, *args, ok=True):
    """`lmforge train config.yaml ARGS` in `where`, DeepSpeed importable (conftest.deepspeed_env)."""
    return lmforge_in(where, *args, ok=ok, env=deepspeed_env())


def test_zero2_and_zero3_train_as_one_process_and_resume_on_as_many(tmp_path):
    from transformers import AutoModelForCausalLM

    where = workdir(tmp_path, distributed={"strategy": "deepspeed"})
    lmforge(where, "name=one", "train.grad_accum=2", "distributed.strategy=ddp")  # micro-batches 4 x 2
    two = lmforge(where, "name=zero2", "--nproc", "2")
    assert "2 processes (DeepSpeed ZeRO-2)" in two.stdout and "Traceback" not in two.stderr
    lmforge(where, "name=zero3", "--nproc", "2", "distributed.deepspeed.zero_stage=3")
    one, zero2, zero3 = (run_named(where, name) for name in ("one", "zero2", "zero3"))
    expected = losses(one)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    for run in (zero2, zero3):
        assert list(losses(run).values()) == pytest.approx(list(expected.values()), rel=1e-5), run.name
        model = AutoModelForCausalLM.from_pretrained(run / "final")  # plain, ZeRO-3's gathered
        reference = weights(one / "final")
        for name, tensor in weights(run / "final").items():
            torch.testing.assert_close(tensor, reference[name], atol=ATOL, rtol=0)
        assert type(model).__name__ == "LlamaForCausalLM"
        # the last checkpoint exported outside a job: DeepSpeed's zero_to_fp32 joins the partitions
        out = where / f"export-{run.name}"
        export = subprocess.run(
            lmforge_command("export", str(run / "checkpoints" / "step-000006"), "--out", str(out)),
            capture_output=True,
            text=True,
            env=deepspeed_env(),
        )
        assert export.returncode == 0, export.stdout + export.stderr
        exported = weights(out)
        for name, tensor in weights(run / "final").items():
            torch.testing.assert_close(exported[name], tensor, atol=0, rtol=0)

    checkpoint = zero2 / "checkpoints" / "step-000003"
    alone = subprocess.run(  # where deepspeed is not installed: said, no traceback
        lmforge_command("export", str(checkpoint), "--out", str(where / "no-deepspeed")),
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert alone.returncode == 2 and "pip install 'lmforge[deepspeed]'" in alone.stderr, alone.stderr
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["sharded"] == {"strategy": "deepspeed", "world_size": 2}
    assert {f"sharded/zero/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)} <= set(manifest["files"])

    for run in (zero2, zero3):  # step 3 resumes on 2 processes, steps 4-6 as uninterrupted
        copy = shutil.copytree(run, where / "runs" / f"{run.name[:5]}-again-20990101-000000")
        stage = "distributed.deepspeed.zero_stage=" + ("3" if run == zero3 else "2")
        lmforge(
            where, "--resume", str(copy / "checkpoints" / "step-000003"), f"name={run.name[:5]}", stage, "--nproc", "2"
        )
        resumed = losses(copy)
        assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)], rel=1e-5), run.name

    # ZeRO's partitions are per process, and DeepSpeed's alone: another count or strategy is refused
    for args, said in (
        (["train.grad_accum=2"], "DeepSpeed wrote its ZeRO partitions for 2; resume with --nproc 2"),
        (["--nproc", "2", "distributed.strategy=fsdp"], "it was written with DeepSpeed"),
    ):
        refused = lmforge(where, "--resume", str(checkpoint), "name=zero2", *args, ok=False)
        assert refused.returncode != 0
        message = " ".join((refused.stdout + refused.stderr).split())
        assert said in message and "Traceback" not in refused.stderr, message
    refused = lmforge(where, "--resume", str(one / "checkpoints" / "step-000003"), "name=one", "--nproc", "2", ok=False)
    assert "it was written without DeepSpeed" in " ".join((refused.stdout + refused.stderr).split())


def test_lora_under_zero2_checkpoints_the_adapters_only_and_resumes(tmp_path):
    where = lora_workdir(tmp_path, distributed={"strategy": "deepspeed"})
    lmforge(where, "name=one", "train.grad_accum=2", "distributed.strategy=ddp")
    lmforge(where, "name=two", "--nproc", "2")
    one, two = run_named(where, "one"), run_named(where, "two")
    assert list(losses(two).values()) == pytest.approx(list(losses(one).values()), rel=1e-5)

    checkpoint = two / "checkpoints" / "step-000003"
    assert json.loads((checkpoint / "manifest.json").read_text())["weights"] == "trainable"
    saved = torch.load(checkpoint / "sharded" / "zero" / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["module"] and all("lora_" in key for key in saved["module"]), list(saved["module"])[:3]

    copy = shutil.copytree(two, where / "runs" / "lora-again-20990101-000000")
    lmforge(where, "--resume", str(copy / "checkpoints" / "step-000003"), "name=two", "--nproc", "2")
    resumed = losses(copy)
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([losses(one)[s] for s in (4, 5, 6)], rel=1e-5)
    adapters = load_file(str(copy / "final" / "adapter_model.safetensors"))
    reference = load_file(str(one / "final" / "adapter_model.safetensors"))
    for name, tensor in adapters.items():
        torch.testing.assert_close(tensor, reference[name], atol=ATOL, rtol=0)
