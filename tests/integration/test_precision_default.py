"""train.precision: auto on a machine without CUDA: bf16 autocast where the CPU computes bf16
natively (AVX512-BF16 or AMX), fp32 elsewhere; the plan line says which and why, and
train.precision=fp32 trains in fp32. bf16 asked for on a CPU without bf16 instructions is warned
about (emulated: about 10x slower per step than fp32). A run resumed from its checkpoint ends with
the losses and weights of the uninterrupted run, bit for bit, in bf16 as in fp32 (test_resume.py).

Which branch runs depends on the CPU: on one with bf16 instructions the bf16 default is what is
tested; elsewhere (an AVX2-only CPU) that auto stays fp32 and bf16 asked for is warned about."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_fsdp import lmforge, losses, run_named

from conftest import chapters, tiny_config_dict
from lmforge.engine.loop import cpu_has_native_bf16, resolve_precision

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU default; CUDA's is tested on a GPU")


def test_auto_follows_the_cpus_bf16_instructions():
    flags = Path("/proc/cpuinfo").read_text()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert cpu_has_native_bf16() is native
    assert resolve_precision("auto") == ("bf16" if native else "no")
    assert resolve_precision("fp32") == "no" and resolve_precision("bf16") == "bf16"


def train(where, *args):
    return lmforge(where, *args).stdout


@pytest.mark.slow
def test_the_default_precision_is_said_trains_and_resumes_exactly(tmp_path):
    (tmp_path / "corpus.txt").write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    cfg = tiny_config_dict(tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "runs")
    del cfg["train"]["precision"]  # as users write it: the default, auto
    cfg["train"].update({"max_steps": 6, "save_every": 3, "eval_every": 3, "keep_last": 5})
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    native = cpu_has_native_bf16()

    out = train(tmp_path, "name=auto")
    plan = next(line for line in out.splitlines() if line.startswith("plan:"))
    assert f"precision {'bf16' if native else 'fp32'}," in plan
    said = " ".join(out.split())
    assert ("precision bf16: this CPU computes bf16 natively" in said) is native
    assert "train.precision=fp32 trains in fp32" in said or not native

    fp32 = train(tmp_path, "name=fp32", "train.precision=fp32")
    assert "precision fp32," in fp32 and "computes bf16 natively" not in fp32
    auto = run_named(tmp_path, "auto")
    if native:  # bf16 autocast computes other numbers than fp32 from the first step
        assert losses(auto)[1] != losses(run_named(tmp_path, "fp32"))[1]

    slow = train(tmp_path, "name=bf16", "train.precision=bf16", "train.max_steps=1", "train.save_every=null")
    assert "precision bf16," in slow
    assert ("bf16 matmuls are emulated, about 10x slower" in " ".join(slow.split())) is not native

    copy = tmp_path / "runs" / "copy-20261202-000000"
    shutil.copytree(auto, copy)
    train(tmp_path, "--resume", str(copy / "checkpoints" / "step-000003"))
    assert losses(copy) == losses(auto)  # exact floats, steps 4-6 trained again after the resume
    ours, theirs = load_file(copy / "final" / "model.safetensors"), load_file(auto / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
