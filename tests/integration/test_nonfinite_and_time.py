"""A non-finite loss never reaches the weights or a checkpoint; max_time pauses cleanly."""

import io
import json

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from lmforge.data.prepare import prepare_data
from lmforge.engine import loop, losses
from lmforge.engine.checkpoint import latest_valid, list_checkpoints, load_trainer_state
from lmforge.engine.loop import NonFiniteLossError, train
from lmforge.models.build import build_model
from lmforge.tracking.base import JsonlTracker, Trackers


@pytest.fixture
def nan_on_steps(monkeypatch):
    """Make the loss NaN on chosen optimizer steps (1-based): fault injection into the real loop."""

    def install(bad_steps, grad_accum):
        calls = {"n": 0}

        def loss_step_for(task, chunk_size=None):
            real = losses.loss_step_for(task, chunk_size)  # plain or chunked, as the loop chose

            def step(model, batch):
                calls["n"] += 1
                loss, count = real(model, batch)
                if (calls["n"] - 1) // grad_accum + 1 in bad_steps:
                    loss = loss * float("nan")
                return loss, count

            return step

        monkeypatch.setattr(loop, "loss_step_for", loss_step_for)

    return install


def run(config, tmp_path):
    data = prepare_data(config, log=lambda _: None)
    torch.manual_seed(0)
    model = build_model(config, data.tokenizer)
    trackers = Trackers(JsonlTracker(tmp_path / "metrics.jsonl"), [], None, print)
    quiet = Console(file=io.StringIO())
    return model, lambda: train(model, data, config, trackers, console=quiet, checkpoint_dir=tmp_path / "ckpt")


def test_nan_steps_are_skipped_then_the_run_fails_clearly(tiny_config, tmp_path, nan_on_steps):
    config = tiny_config("train.max_steps=8", "train.save_every=1", "train.keep_last=10", "train.max_bad_steps=3")
    nan_on_steps({3, 4, 5}, grad_accum=1)
    model, go = run(config, tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        go()
    message = str(info.value)
    assert "step 5:" in message and "3 steps in a row" in message and "train.max_bad_steps=3" in message
    assert "Training rows of this step: [" in message
    # steps 3 and 4 were skipped: their checkpoints hold exactly the weights and optimizer of step 2
    checkpoints = {c.step: c.path for c in list_checkpoints(tmp_path / "ckpt")}
    assert sorted(checkpoints) == [1, 2, 3, 4]
    after_2 = load_file(checkpoints[2] / "model.safetensors")
    for step in (3, 4):
        weights = load_file(checkpoints[step] / "model.safetensors")
        assert all(torch.equal(weights[k], after_2[k]) for k in after_2)
        opt_2 = torch.load(checkpoints[2] / "optimizer.pt", weights_only=True)["state"]
        opt = torch.load(checkpoints[step] / "optimizer.pt", weights_only=True)["state"]
        assert all(torch.equal(opt[i]["exp_avg"], opt_2[i]["exp_avg"]) for i in opt_2)
    assert load_trainer_state(checkpoints[4]).skipped_steps == 2
    # the model in memory never took the NaN update either
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], after_2[k]) for k in after_2)
    assert latest_valid(tmp_path / "ckpt", print).step == 4  # resumable


def test_a_single_nan_step_is_skipped_and_training_goes_on(tiny_config, tmp_path, nan_on_steps):
    config = tiny_config("train.max_steps=6", "train.grad_accum=2", "train.save_every=null")
    nan_on_steps({2}, grad_accum=2)
    model, go = run(config, tmp_path)
    result = go()
    assert result.state.step == 6 and result.state.skipped_steps == 1
    points = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_points = [p for p in points if "train/loss" in p]
    assert all(isinstance(p["train/loss"], float) for p in train_points if p["step"] != 2)
    assert train_points[-1]["train/skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_max_time_saves_a_checkpoint_and_pauses(tiny_config, tmp_path):
    config = tiny_config("train.max_steps=500", "train.max_time=0.5", "train.save_every=null")
    _, go = run(config, tmp_path)
    result = go()
    assert result.state.stop_reason == "max_time"
    assert 0 < result.state.step < 500
    (checkpoint,) = list_checkpoints(tmp_path / "ckpt")
    assert checkpoint.step == result.state.step
    assert load_trainer_state(checkpoint.path).stop_reason == "max_time"


def test_a_crashed_run_is_marked_failed_in_mlflow(tiny_config, tmp_path, nan_on_steps):
    """A run that dies of an error ends its MLflow run as FAILED (not RUNNING forever), with the
    points it logged, and says so in tracking.json."""
    from mlflow.tracking import MlflowClient

    from lmforge.run import run_train

    config = tiny_config("train.max_steps=8", "train.max_bad_steps=2", "tracking.backends=[mlflow]")
    nan_on_steps({4, 5}, grad_accum=1)
    with pytest.raises(NonFiniteLossError):
        run_train(config, Console(file=io.StringIO()))
    (run_dir,) = (tmp_path / "runs").glob("tiny-2*")
    record = json.loads((run_dir / "tracking.json").read_text())
    assert record["status"] == "FAILED" and record["backends"]["mlflow"]["missing"] == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(record["backends"]["mlflow"]["run_id"])
    assert run.info.status == "FAILED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [1, 2, 3, 4]
