"""Sweep specs are checked against the training schema before anything runs; samplers are seeded;
leases tell a live trial from an abandoned one."""

import json
import os
import platform
import subprocess
import sys
import time

import pytest
import yaml

from conftest import tiny_config_dict
from lmforge.errors import ConfigError, UserError
from lmforge.sweep.spec import load_spec, multirun_spec
from lmforge.sweep.study import open_storage, open_study, stale_reason
from lmforge.sweep.trial import best_of


@pytest.fixture
def base(corpus, cache_dir, tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, cache_dir, tmp_path / "runs")))
    return path


def write_spec(tmp_path, text: str):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_an_invalid_spec_is_one_error_listing_every_problem_with_its_line(base, tmp_path):
    path = write_spec(
        tmp_path,
        """name: s
base: base.yaml
parameters:
  train.lrr: {values: [1.0e-3]}
  train.micro_batch_size: {values: []}
  train.warmup_steps: {distribution: int_uniform, min: 10, max: 2}
  train.adam_eps: {distribution: log_uniform, min: 0, max: 1.0e-6}
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    problems = caught.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith(f"{path}:4: parameters.train.lrr: unknown key; did you mean train.lr?")
    assert problems[1].startswith(f"{path}:5: parameters.train.micro_batch_size") and "values is empty" in problems[1]
    assert (
        problems[2].startswith(f"{path}:6: parameters.train.warmup_steps")
        and "min (10) is above max (2)" in problems[2]
    )
    assert problems[3].startswith(f"{path}:7: parameters.train.adam_eps") and "needs min > 0" in problems[3]

    path.write_text(path.read_text().replace("values: []", "values: [4, big]"))
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    assert any(p.startswith(f"{path}:5: parameters.train.micro_batch_size: value 'big'") for p in caught.value.problems)


def test_spec_keys_metric_and_method_are_checked(base, tmp_path):
    path = write_spec(
        tmp_path,
        """name: s
base: base.yaml
max_trial: 3
metric: {name: eval/accuracy}
method: grid
parameters:
  train.lr: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_spec(path)
    text = "\n".join(caught.value.problems)
    assert f"{path}:3: max_trial: unknown key; did you mean max_trials?" in text
    assert "method grid needs values: [...] for every parameter; train.lr has a distribution" in text

    path.write_text(path.read_text().replace("max_trial: 3\n", "").replace("method: grid", "method: tpe"))
    with pytest.raises(ConfigError, match=r"sweep.yaml:3: metric.name: a causal-lm run logs no eval/accuracy; use one"):
        load_spec(path)


def test_overrides_on_the_command_line_set_the_spec_or_the_training(base, tmp_path):
    path = write_spec(tmp_path, "name: s\nbase: base.yaml\nparameters:\n  train.lr: {values: [1.0e-3, 2.0e-3]}\n")
    loaded = load_spec(path, ["max_trials=7", "pruner.type=median", "train.max_steps=9"])
    assert loaded.spec.max_trials == 7 and loaded.spec.pruner.type == "median"
    assert loaded.spec.overrides == ["train.max_steps=9"] and loaded.base.train.max_steps == 9
    assert loaded.sweep_dir == tmp_path / "runs" / "sweeps" / "s"


def test_a_storage_url_with_a_password_is_refused(base, tmp_path):
    with pytest.raises(UserError, match="set PGPASSWORD"):
        open_storage("postgresql://me:secret@localhost/db", tmp_path)
    with pytest.raises(UserError, match="SQLite locks up under concurrent workers"):
        open_storage(f"sqlite:///{tmp_path}/x.db", tmp_path)


@pytest.mark.parametrize("method", ["random", "tpe", "cmaes"])
def test_a_seeded_sampler_samples_the_same_parameters_twice_and_a_continuation_draws_new_ones(base, tmp_path, method):
    """Twelve trials (TPE past its ten random start-up trials), each told a value that depends on its
    parameters, handed out as a sweep does, six by one process and six by the next (a continued
    sweep, or another worker): twelve different draws; the same in a second sweep with the same
    seed; others with another seed."""
    from rich.console import Console

    from lmforge.sweep.runner import Worker

    text = f"""name: s
base: base.yaml
method: {method}
seed: 3
parameters:
  train.lr: {{distribution: log_uniform, min: 1.0e-5, max: 1.0e-2}}
  train.warmup_steps: {{distribution: int_uniform, min: 0, max: 50}}
  train.weight_decay: {{distribution: uniform, min: 0.0, max: 0.3}}
"""
    if method != "cmaes":
        text += "  train.micro_batch_size: {values: [2, 4, 8]}\n"

    def sample(seed: int, where: str) -> list[dict]:
        path = write_spec(tmp_path, text.replace("seed: 3", f"seed: {seed}").replace("name: s", f"name: {where}"))
        drawn = []
        for _process in range(2):
            loaded = load_spec(path, ["max_trials=12"])
            study = open_study(loaded, open_storage(None, loaded.sweep_dir))
            worker = Worker(loaded, study, Console(quiet=True), 1)
            for _ in range(6):
                trial, params = worker.claim()
                study.tell(trial, (params["train.lr"] - 1e-3) ** 2 + params["train.weight_decay"])
                drawn.append(params)
        return drawn

    first, second, other = sample(3, "a"), sample(3, "b"), sample(4, "c")
    assert len({json.dumps(p, sort_keys=True) for p in first}) == 12
    assert first == second
    assert first != other


def test_multirun_overrides_with_commas_are_the_grid(base):
    loaded = multirun_spec(base, ["train.lr=1e-3,3e-3", "train.micro_batch_size=2,4,8", "train.max_steps=5"])
    spec = loaded.spec
    assert spec.method == "grid" and spec.grid_size() == 6 and spec.trial_budget() == 6
    assert spec.parameters["train.lr"].values == [1e-3, 3e-3]
    assert spec.overrides == ["train.max_steps=5"]
    again = multirun_spec(base, ["train.lr=1e-3,3e-3", "train.micro_batch_size=2,4,8", "train.max_steps=5"])
    assert again.spec.name == spec.name and spec.name.startswith("tiny-multirun-")
    with pytest.raises(ConfigError, match="needs an override with several values"):
        multirun_spec(base, ["train.lr=1e-3"])


def test_a_lease_is_stale_once_its_processes_are_gone_or_its_heartbeat_is_old():
    from optuna.trial import create_trial

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    here, now = platform.node(), time.time()

    def trial(lease):
        return create_trial(state=__import__("optuna").trial.TrialState.RUNNING, user_attrs={"lmforge.lease": lease})

    live = {"host": here, "pid": os.getpid(), "child": None, "beat": now}
    assert stale_reason(trial(live), timeout=60) is None
    dead = {"host": here, "pid": gone.pid, "child": gone.pid, "beat": now}
    assert "are gone" in stale_reason(trial(dead), timeout=60)
    elsewhere = {"host": "another-machine", "pid": 1, "child": 2, "beat": now - 30}
    assert stale_reason(trial(elsewhere), timeout=60) is None
    assert "no heartbeat from another-machine" in stale_reason(trial(elsewhere), timeout=10)


def test_the_best_value_is_the_best_finite_evaluation_after_step_0(tmp_path):
    points = [
        {"step": 0, "time": 1, "eval/loss": 1.0},
        {"step": 5, "time": 2, "train/loss": 0.1},
        {"step": 10, "time": 3, "eval/loss": 3.0},
        {"step": 20, "time": 4, "eval/loss": 2.5},
        {"step": 30, "time": 5, "eval/loss": "nan"},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    assert best_of(tmp_path, "eval/loss", "minimize") == (2.5, 20)
    assert best_of(tmp_path, "eval/loss", "maximize") == (3.0, 10)
    assert best_of(tmp_path, "eval/accuracy", "maximize") == (None, None)


def test_several_trials_at_once_share_out_the_gpus_in_turn():
    from lmforge.sweep.runner import gpus_for

    assert gpus_for(2, {"CUDA_VISIBLE_DEVICES": "0, 3,5"}) == ["0", "3", "5"]
    assert gpus_for(1, {"CUDA_VISIBLE_DEVICES": "0,1"}) == []  # one trial keeps what it is given
    assert gpus_for(2, {}) == []  # no GPU here


def test_every_problem_at_once_even_with_a_wrong_fixed_override_and_command_line_keys(base, tmp_path):
    path = write_spec(
        tmp_path,
        """name: s
base: base.yaml
overrides: [train.max_steps=10, train.max_stepz=3, train.lr=1.0e-3]
storage: postgres://me@localhost/db
parameters:
  lora.rr: {values: [4]}
  train.lr: {values: [1.0e-3, abc]}
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_spec(path, ["parameters.train.warmup_steps.values=[-1]", "storage=postgresql://me@h/db?password=hunter2"])
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "hunter2" not in text  # a password typed on the command line is never echoed
    assert f"{path}:3: overrides: override 'train.max_stepz=3': train.max_stepz: unknown key; did you mean" in text
    assert "override 'storage=(a URL)': storage: the URL holds a password" in text
    assert f"{path}:6: parameters.lora.rr: unknown key; did you mean lora.r?" in text  # lora is an optional section
    assert f"{path}:7: parameters.train.lr: also fixed by the override 'train.lr=1.0e-3'" in text
    assert f"{path}:7: parameters.train.lr: value 'abc'" in text
    assert "override 'parameters.train.warmup_steps.values=[-1]': parameters.train.warmup_steps: value -1" in text
    with pytest.raises(ConfigError, match=r"max_trial: neither a sweep key nor a training setting; did you mean max_t"):
        load_spec(path, ["max_trial=3"])
    path.write_text(path.read_text().replace("train.max_stepz=3, train.lr=1.0e-3", "train.max_steps=3"))
    with pytest.raises(ConfigError, match=r"sweep.yaml:4: storage: postgres:// is not a URL SQLAlchemy takes"):
        load_spec(path)


def test_continuing_a_sweep_with_settings_that_change_its_metric_is_refused_with_the_differences(base, tmp_path):
    path = write_spec(tmp_path, "name: s\nbase: base.yaml\nparameters:\n  train.lr: {values: [1.0e-3, 2.0e-3]}\n")
    loaded = load_spec(path)
    open_study(loaded, open_storage(None, loaded.sweep_dir))
    for allowed in (["train.log_every=7", "tracking.backends=[mlflow]", "max_trials=9"], []):
        again = load_spec(path, allowed)
        open_study(again, open_storage(None, again.sweep_dir))  # settings that change no trial's metric
    changed = load_spec(path, ["train.max_steps=9", "seed=5"])
    with pytest.raises(UserError) as caught:
        open_study(changed, open_storage(None, changed.sweep_dir))
    assert "base train.max_steps: 4 -> 9" in str(caught.value) and "seed: 0 -> 5" in str(caught.value)


def test_a_pruning_hook_stops_a_run_before_its_last_step_but_not_at_it(tiny_config):
    """The evaluation hook's "pruned" ends the run there (no final model); at the last step the run is
    complete whatever the hook says, with its final model."""
    from rich.console import Console

    from lmforge.run import run_train

    calls = []

    def prune(step, metrics):
        calls.append(step)
        return "pruned"

    early = run_train(tiny_config("train.eval_every=2"), Console(quiet=True), on_eval=prune)
    assert calls == [2] and early.eval["stop_reason"] == "pruned" and early.eval["step"] == 2
    assert not (early.run_dir / "final").exists()
    assert json.loads((early.run_dir / "eval.json").read_text())["stop_reason"] == "pruned"

    calls.clear()
    last = run_train(tiny_config(), Console(quiet=True), on_eval=prune)  # evaluated at the end only
    assert calls == [4] and last.eval["stop_reason"] == "max_steps"
    assert (last.run_dir / "final" / "model.safetensors").is_file()


def test_importances_name_the_parameter_that_alone_sets_the_metric():
    # a 2 x 2 grid where only the learning rate matters (Optuna's default PED-ANOVA, comparing the
    # top 10% of four trials, can split the importance evenly here)
    import optuna

    from lmforge.sweep.results import importances

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for lr, r, loss in ((1e-3, 8, 4.96), (1e-3, 32, 4.95), (3e-3, 8, 3.90), (3e-3, 32, 3.91)):
        study.add_trial(
            optuna.trial.create_trial(
                params={"train.lr": lr, "lora.r": r},
                distributions={
                    "train.lr": optuna.distributions.CategoricalDistribution([1e-3, 3e-3]),
                    "lora.r": optuna.distributions.CategoricalDistribution([8, 32]),
                },
                value=loss,
            )
        )
    found = importances(study)
    assert found["train.lr"] > 0.8 > found["lora.r"]
