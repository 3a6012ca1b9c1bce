"""Every optimizer and every learning-rate schedule resumes exactly: a run stopped after step 3 and
resumed from its checkpoint (a fresh model, optimizer and scheduler loaded back with
weights_only=True) ends with the weights, losses and learning rates of the uninterrupted run."""

import io
import json

import pytest
import torch
import yaml
from rich.console import Console

from conftest import chapters, tiny_config_dict
from lmforge.config import load_config
from lmforge.data.prepare import prepare_data
from lmforge.engine.checkpoint import list_checkpoints
from lmforge.engine.loop import train
from lmforge.engine.optim import schedule_of
from lmforge.models.build import build_model
from lmforge.tracking.base import JsonlTracker, Trackers

STEPS = 6

# each optimizer and each schedule added with them at least once; lr suits the optimizer
CASES = {
    "adamw + wsd": ("train.optimizer=adamw", "train.scheduler=wsd", "train.decay_ratio=0.5"),
    "adafactor + cosine_with_restarts": (
        "train.optimizer=adafactor",
        "train.lr=1e-2",
        "train.scheduler=cosine_with_restarts",  # restarts at step 4, after the resume
    ),
    "sgd + polynomial": (
        "train.optimizer=sgd",
        "train.lr=0.1",
        "train.nesterov=true",
        "train.scheduler=polynomial",
        "train.power=2",
        "train.min_lr_ratio=0.1",
    ),
    "lion + inverse_sqrt": ("train.optimizer=lion", "train.lr=3e-4", "train.scheduler=inverse_sqrt"),
}

STATE_KEYS = {  # what each optimizer keeps per parameter matrix: the optimizer that ran is the one named
    "adamw": {"step", "exp_avg", "exp_avg_sq"},
    "adafactor": {"step", "row_var", "col_var"},
    "sgd": {"momentum_buffer"},
    "lion": {"exp_avg"},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optimizers")
    (tmp / "corpus.txt").write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    return tmp


def config_of(workdir, *overrides):
    raw = tiny_config_dict(workdir / "corpus.txt", workdir / "cache", workdir / "runs")
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    settings = (f"train.max_steps={STEPS}", "train.save_every=3", "train.keep_last=5", "train.warmup_steps=1")
    return load_config(path, [*settings, *overrides], env={})


def run(config, where, resume_from=None):
    """Train as a fresh process would: prepared data, a seeded new model; return the initial and
    trained weights and the logged (step, loss, lr) of every step."""
    where.mkdir()
    data = prepare_data(config, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(config, data.tokenizer)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trackers = Trackers(JsonlTracker(where / "metrics.jsonl"), [], None, print)
    quiet = Console(file=io.StringIO())
    result = train(model, data, config, trackers, console=quiet, checkpoint_dir=where / "ckpt", resume_from=resume_from)
    points = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
    logged = [(p["step"], p["train/loss"], p["train/lr"]) for p in points if "train/loss" in p]
    weights = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return initial, weights, logged


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_equals_the_uninterrupted_one(workdir, tmp_path, case):
    config = config_of(workdir, *CASES[case])
    initial, weights, logged = run(config, tmp_path / "whole")
    checkpoint = {c.step: c.path for c in list_checkpoints(tmp_path / "whole" / "ckpt")}[3]

    _, resumed_weights, resumed_logged = run(config, tmp_path / "resumed", resume_from=checkpoint)
    assert [step for step, _, _ in resumed_logged] == [4, 5, 6]
    assert resumed_logged == logged[3:]  # exact floats: losses and learning rates
    assert weights.keys() == resumed_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name  # bit for bit

    # the schedule is the one configured, through the resume
    schedule = schedule_of(config.train, STEPS)
    assert [lr for _, _, lr in logged] == [config.train.lr * schedule.factor(step - 1) for step, _, _ in logged]
    assert len({lr for _, _, lr in logged}) >= 4
    # and the optimizer is the one named: its state is that optimizer's
    optimizer = config.train.optimizer
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert {frozenset(s) for s in state.values()} >= {frozenset(STATE_KEYS[optimizer])}
    assert all(set(s) <= STATE_KEYS[optimizer] | {"variance"} for s in state.values())
    # every weight moved, so equal runs are no two no-ops
    assert all(torch.isfinite(torch.tensor([loss for _, loss, _ in logged])))
    assert [name for name in weights if torch.equal(weights[name], initial[name])] == []


def test_the_optimizers_train_differently(workdir, tmp_path):
    """Under the same schedule, sgd and lion end with other weights than adamw: the setting reaches
    the loop (a test of resume alone would pass if every run built AdamW)."""
    ends = {}
    for optimizer in ("adamw", "sgd", "lion"):
        config = config_of(workdir, f"train.optimizer={optimizer}", "train.max_steps=2", "train.save_every=null")
        _, ends[optimizer], _ = run(config, tmp_path / optimizer)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ends["adamw"][name], ends["sgd"][name])
    assert not torch.equal(ends["adamw"][name], ends["lion"][name])
    assert not torch.equal(ends["sgd"][name], ends["lion"][name])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bitsandbytes' 8-bit optimizers need CUDA: bench/gpu_session.sh controls"
)
@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_8bit_optimizers_resume_exactly_on_cuda(workdir, tmp_path, optimizer):
    """On a GPU (CI has none: the refusal on CPU is tested in test_schedules): a resumed 8-bit run
    equals the uninterrupted one, where bitsandbytes' kernels are deterministic (a difference is a
    finding to record)."""
    config = config_of(workdir, f"train.optimizer={optimizer}", "train.scheduler=cosine")
    _, weights, logged = run(config, tmp_path / "whole")
    checkpoint = {c.step: c.path for c in list_checkpoints(tmp_path / "whole" / "ckpt")}[3]
    _, resumed_weights, resumed_logged = run(config, tmp_path / "resumed", resume_from=checkpoint)
    assert resumed_logged == logged[3:]
    for name, tensor in weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name
