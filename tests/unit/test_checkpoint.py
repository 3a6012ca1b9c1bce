import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from lmforge.engine.checkpoint import (
    capture_rng,
    latest_valid,
    list_checkpoints,
    load_checkpoint,
    prune,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
    verify,
)
from lmforge.engine.early_stopping import record_eval
from lmforge.engine.state import TrainState


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # shared, as with tie_word_embeddings


def write(tmp_path, step, model=None, **state):
    model = model or Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(tmp_path, TrainState(step=step, **state), model, optimizer, scheduler, None, "x: 1\n")


def test_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.head(model.embed(torch.tensor([1, 2, 3]))).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    scheduler.step()
    state = TrainState(step=12, epoch=1, step_in_epoch=3, best_metric=1.5, best_step=10, tracker_ids={"mlflow": "abc"})
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    checkpoint = save_checkpoint(tmp_path, state, model, optimizer, scheduler, None, "x: 1\n")
    expected = (random.random(), np.random.rand(), torch.rand(1))

    other = Tied()
    other_opt = torch.optim.AdamW(other.parameters(), lr=0.1)
    other_sched = torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 0.5**s)
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    loaded = load_checkpoint(checkpoint.path, other, other_opt, other_sched)
    assert loaded == state
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.head.weight is other.embed.weight  # still tied after loading
    assert other_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # the same streams continue


def test_manifest_written_last_and_verified(tmp_path):
    checkpoint = write(tmp_path, 5)
    manifest = json.loads((checkpoint.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "trainer_state.json",
        "config.yaml",
    }
    assert verify(checkpoint.path) is None


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
        (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt is missing"),
        (lambda p: os.truncate(p / "model.safetensors", 10), "model.safetensors has 10 bytes"),
        (lambda p: (p / "rng.pt").write_bytes(b"x" * (p / "rng.pt").stat().st_size), "rng.pt does not match"),
    ],
)
def test_damaged_newest_checkpoint_is_skipped_with_reason(tmp_path, damage, message):
    write(tmp_path, 5)
    newest = write(tmp_path, 10)
    damage(newest.path)
    warnings = []
    found = latest_valid(tmp_path, warnings.append)
    assert found.step == 5
    assert len(warnings) == 1 and message in warnings[0] and "step-000010" in warnings[0]


def test_interrupted_write_leaves_previous_usable(tmp_path, monkeypatch):
    write(tmp_path, 5)
    import lmforge.engine.checkpoint as checkpoint

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_model", crash)  # the write fails part-way
    with pytest.raises(OSError):
        write(tmp_path, 10)
    assert [c.step for c in list_checkpoints(tmp_path)] == [5]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # cleaned up


def test_stale_temporaries_are_removed(tmp_path):
    write(tmp_path, 5)
    (tmp_path / ".tmp-step-000010-abc").mkdir()
    (tmp_path / ".tmp-step-000010-abc" / "model.safetensors").write_bytes(b"partial")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]


def test_prune_keeps_last_and_best(tmp_path):
    for step in (2, 4, 6, 8, 10):
        write(tmp_path, step)
    prune(tmp_path, keep_last=2, keep_steps={4})
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 8, 10]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, monkeypatch):
    checkpoint = write(tmp_path, 5)
    torch.save({"state": {}, "param_groups": [], "payload": Evil()}, checkpoint.path / "optimizer.pt")
    monkeypatch.chdir(tmp_path)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(checkpoint.path, model, optimizer)
    assert not (tmp_path / "PWNED").exists()


def test_source_loads_torch_files_only_with_weights_only():
    import ast
    from pathlib import Path

    import lmforge

    for path in Path(lmforge.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            is_call = isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load"
            if is_call and getattr(node.func.value, "id", None) == "torch":
                kwargs = {k.arg: k.value for k in node.keywords}
                assert isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value, path
            assert not (isinstance(node, ast.Name) and node.id == "pickle"), path


def test_rng_capture_restore():
    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_early_stopping_on_a_known_sequence():
    # patience 2, min_delta 0.05: 3.0 best, 2.9 (best), 2.87 (not enough), 2.7 (best), 2.69, 2.8 -> stop
    state = TrainState()
    values = [3.0, 2.9, 2.87, 2.7, 2.69, 2.8, 1.0]
    stopped_at = None
    for i, value in enumerate(values):
        state.step = (i + 1) * 10
        record_eval(state, value, "min", 0.05)
        if state.evals_without_improvement >= 2:
            stopped_at = state.step
            break
    assert stopped_at == 60
    assert (state.best_metric, state.best_step) == (2.7, 40)


def test_early_stopping_max_mode_and_nan():
    state = TrainState()
    assert record_eval(state, float("nan"), "max", 0.0) is False
    assert record_eval(state, 0.3, "max", 0.0) is True
    assert record_eval(state, 0.2, "max", 0.0) is False and state.evals_without_improvement == 1
    assert record_eval(state, 0.31, "max", 0.0) is True and state.evals_without_improvement == 0
