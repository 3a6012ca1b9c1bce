import json

import pytest

from lmforge.config import Config, check_config, dump_yaml, flatten, load_config
from lmforge.errors import ConfigError

BASE = """\
name: demo
model:
  preset: llama-tiny
tokenizer:
  train: true
data:
  train: corpus.txt
train:
  lr: 1.0e-3
  micro_batch_size: 4
"""


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(BASE)
    return path


def problems_of(exc_info) -> list[str]:
    return exc_info.value.problems


def test_defaults_filled_and_file_values_kept(config_file):
    config = load_config(config_file, env={})
    assert config.train.lr == 1e-3
    assert config.train.micro_batch_size == 4
    assert config.train.scheduler == "cosine"  # a default
    assert config.tracking.backends == ["mlflow"]


def test_dotted_overrides_parse_values(config_file):
    config = load_config(config_file, ["train.lr=3e-4", "train.max_steps=7", "data.train=[a.txt, b.txt]"], env={})
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.max_steps == 7
    assert config.data.train == ["a.txt", "b.txt"]


def test_environment_overrides(config_file):
    config = load_config(config_file, env={"LMFORGE_TRAIN__LR": "5e-4", "LMFORGE_NAME": "from-env"})
    assert config.train.lr == pytest.approx(5e-4)
    assert config.name == "from-env"


def test_precedence_file_then_env_then_command_line(config_file):
    env = {"LMFORGE_TRAIN__LR": "5e-4", "LMFORGE_TRAIN__MICRO_BATCH_SIZE": "2"}
    config = load_config(config_file, ["train.lr=7e-4"], env=env)
    assert config.train.lr == pytest.approx(7e-4)  # command line beats env
    assert config.train.micro_batch_size == 2  # env beats file
    assert load_config(config_file, env={}).train.micro_batch_size == 4  # file alone


def test_unknown_key_in_file_names_line_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE + "  learning_rate: 0.1\n  warmup_step: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = problems_of(info)
    assert any("c.yaml:11: train.learning_rate: unknown key" in p for p in problems), problems
    assert any("c.yaml:12: train.warmup_step: unknown key; did you mean train.warmup_steps?" in p for p in problems)


def test_unknown_key_from_override_and_env_names_origin(config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["train.lrr=1"], env={"LMFORGE_MODLE__PRESET": "x"})
    problems = problems_of(info)
    assert any(p.startswith("override 'train.lrr=1': train.lrr: unknown key; did you mean train.lr?") for p in problems)
    assert any(
        "environment variable LMFORGE_MODLE__PRESET: modle: unknown key; did you mean model?" in p for p in problems
    )


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: llama-tiny\ntrain:\n  lr: abc\n  epochs: 0\n  precision: fp8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = problems_of(info)
    assert len(problems) == 4, problems  # lr, epochs, precision, and the missing data section
    joined = "\n".join(problems)
    assert "c.yaml:4: train.lr" in joined
    assert "c.yaml:5: train.epochs" in joined
    assert "c.yaml:6: train.precision" in joined
    assert "data: required" in joined


def test_problems_are_listed_in_file_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: llama-tiny\ntrain:\n  lr: abc\n  epochs: 0\ndata:\n  train: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert [p.split(":")[1] for p in problems_of(info)] == ["4", "5"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.name_or_path=./base"], "model.name_or_path and model.preset/sizes are exclusive"),
        (
            ["model.hidden_size=100", "model.num_heads=3"],
            "model.hidden_size (100) must be divisible by model.num_heads (3)",
        ),
        (["model.num_kv_heads=3"], "model.num_heads (4) must be divisible by model.num_kv_heads (3)"),
        (
            ["data.max_length=2048", "model.max_position_embeddings=1024"],
            "data.max_length (2048) exceeds model.max_position_embeddings (1024)",
        ),
        (["tokenizer.train=false"], "tokenizer.train=true"),
        (
            ["train.warmup_steps=10", "train.warmup_ratio=0.1"],
            "train.warmup_steps and train.warmup_ratio are exclusive",
        ),
        (["data.validation_fraction=0.6", "data.test_fraction=0.5"], "must be below 1"),
        (["model.preset=llama-tny"], "did you mean llama-tiny?"),
        (["tracking.backends=[mlflow, none]"], "'none' cannot be combined"),
        (["data.format=seq2seq"], "data.format=seq2seq trains a seq2seq model, but model.task is causal-lm"),
        (
            ["model.task=classification", "data.format=classification"],
            "model.task=classification needs model.name_or_path",
        ),
        (["data.format=classification", "data.packing=true"], "data.packing applies to causal LMs only"),
        (["data.on_too_long=split", "data.format=alpaca"], "data.on_too_long=split applies to the text format only"),
    ],
)
def test_cross_field_errors_name_fields_and_fix(config_file, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, overrides, env={})
    assert any(expected in p for p in problems_of(info)), problems_of(info)


def test_several_cross_field_errors_at_once(config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["train.warmup_steps=1", "train.warmup_ratio=0.1", "model.num_kv_heads=3"], env={})
    assert len(problems_of(info)) == 2


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: llama-tiny\n train: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "c.yaml:3: invalid YAML" in str(info.value)


def test_json_config(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps({"model": {"preset": "llama-tiny"}, "tokenizer": {"train": True}, "data": {"train": "x"}})
    )
    assert load_config(path, env={}).model.preset == "llama-tiny"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml", env={})


def test_resolved_config_round_trips(config_file, tmp_path):
    config = load_config(config_file, ["train.lr=2e-4"], env={})
    saved = tmp_path / "resolved.yaml"
    saved.write_text(dump_yaml(config))
    again = load_config(saved, env={})
    assert again == config
    assert check_config(again) == []


def test_every_field_has_a_docstring():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Config.__mro__[1]):
                walk(annotation, f"{prefix}{name}.")

    walk(Config)


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_loss_chunk_size_is_auto_by_default_and_checked():
    base = ["data.train=x.txt", "model.preset=llama-tiny", "tokenizer.train=true"]
    assert load_config(None, base, env={}).train.loss_chunk_size == "auto"
    assert load_config(None, [*base, "train.loss_chunk_size=null"], env={}).train.loss_chunk_size is None
    with pytest.raises(ConfigError, match="train.loss_chunk_size must be a positive number of tokens, auto or null"):
        load_config(None, [*base, "train.loss_chunk_size=0"], env={})
    seq2seq = [
        "data.train=x.jsonl",
        "model.task=seq2seq",
        "data.format=seq2seq",
        "model.preset=t5-tiny",
        "tokenizer.train=true",
    ]
    assert load_config(None, seq2seq, env={}).train.loss_chunk_size == "auto"  # auto means plain there
    with pytest.raises(ConfigError, match="train.loss_chunk_size applies to causal LMs"):
        load_config(None, [*seq2seq, "train.loss_chunk_size=512"], env={})
