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


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["train.eval_every=10", "train.early_stopping.metric=eval/accuracy"],
            "train.early_stopping.metric: a causal-lm evaluation does not produce eval/accuracy; use one of "
            "eval/loss, eval/perplexity, eval/token_accuracy",
        ),
        (["data.format=prompt-completion", "data.columns.answer=a"], "data.columns.answer: data.format="),
        (["data.format=prompt-completion", "data.template=Q: {question}"], "has no {prompt}"),
        (["data.format=prompt-completion", "data.template='Q: {prompt'"], "data.template: expected '}'"),
        (["data.template=Q: {prompt}"], "data.template applies to data.format prompt-completion / alpaca / seq2seq"),
        (["data.chat_template=chatml"], "data.chat_template applies to data.format chat only"),
        (["data.format=chat", "data.text_field=body"], "data.text_field applies to data.format text / classification"),
        (["data.max_target_length=64"], "data.max_target_length applies to data.format seq2seq only"),
        (["data.loss_on=all"], "data.loss_on applies to data.format prompt-completion / alpaca / chat only"),
        (["data.train="], "data.train is empty: give a file, a glob or a directory"),
        (["data.validation=[]"], "data.validation is empty"),
    ],
)
def test_settings_are_checked_against_what_the_task_and_format_produce(config_file, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, overrides, env={})
    assert any(expected in p for p in problems_of(info)), problems_of(info)


def test_classification_metrics_and_repeated_labels(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  name_or_path: ./enc\n  task: classification\n"
        "data:\n  train: d.jsonl\n  format: classification\n  labels: [a, b, a]\n"
        "train:\n  eval_every: 5\n  early_stopping:\n    metric: eval/perplexity\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert problems_of(info) == [
        f"{path}:7: data.labels: each class once; repeated: a",
        f"{path}:11: train.early_stopping.metric: a classification evaluation does not produce eval/perplexity; "
        "use one of eval/loss, eval/accuracy, eval/macro_f1",
    ]
    path.write_text(path.read_text().replace("[a, b, a]", "[a, b]").replace("perplexity", "macro_f1"))
    assert load_config(path, env={}).train.early_stopping.metric == "eval/macro_f1"


def test_every_metric_a_setting_may_name_is_one_evaluation_produces():
    """EVAL_METRICS is what validation checks against; evaluate() must return those names."""
    import torch
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from lmforge.config import EVAL_METRICS
    from lmforge.eval.evaluate import evaluate

    torch.manual_seed(0)
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    causal = LlamaForCausalLM(LlamaConfig(vocab_size=50, **tiny))
    rows = Dataset.from_list([{"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4], "lengths": [4], "num_tokens": 4}])
    assert set(EVAL_METRICS["causal-lm"]) <= set(evaluate(causal, rows, 0, 1, task="causal-lm"))
    classifier = BertForSequenceClassification(BertConfig(vocab_size=50, num_labels=2, **tiny))
    rows = Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1], "lengths": [3], "num_tokens": 3}])
    assert set(EVAL_METRICS["classification"]) <= set(
        evaluate(classifier, rows, 0, 1, task="classification", num_labels=2)
    )


def test_a_string_setting_is_taken_as_typed_when_yaml_reads_it_as_something_else(config_file):
    """`data.template=Q: {prompt}` is a mapping to YAML; a string field takes the text as typed."""
    typed = ["data.format=prompt-completion", "data.template=Q: {prompt}", "tracking.study=[x]"]
    config = load_config(config_file, typed, env={})
    assert (config.data.template, config.tracking.study) == ("Q: {prompt}", "[x]")
    env = {"LMFORGE_DATA__TEMPLATE": "A: {prompt}"}
    assert load_config(config_file, ["data.format=prompt-completion"], env=env).data.template == "A: {prompt}"
    with pytest.raises(ConfigError) as info:  # a number where one belongs is still checked
        load_config(config_file, ["train.lr=fast"], env={})
    assert "train.lr" in problems_of(info)[0]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("train.learning_rate=1e-4", "train.learning_rate: unknown key; lmforge calls it train.lr"),
        ("per_device_train_batch_size=8", "lmforge calls it train.micro_batch_size"),
        ("train.gradient_accumulation_steps=4", "lmforge calls it train.grad_accum"),
        ("num_train_epochs=3", "lmforge calls it train.epochs"),
        ("train.bf16=true", "lmforge calls it train.precision=bf16"),
        ("max_seq_length=512", "lmforge calls it data.max_length"),
    ],
)
def test_a_peers_name_for_a_setting_suggests_lmforges(config_file, key, expected):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [key], env={})
    assert any(expected in p for p in problems_of(info)), problems_of(info)


def test_tag_values_that_are_numbers_or_booleans_are_taken_as_text(config_file):
    config = load_config(config_file, ["tracking.tags={run: 1, lr: 0.5, final: true}"], env={})
    assert config.tracking.tags == {"run": "1", "lr": "0.5", "final": "true"}


def test_a_key_given_twice_is_an_error_not_the_last_one_silently(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: a\nname: b\ndata: {train: x.txt}\ntrain:\n  lr: 1.0\n  lr: 2.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"{path}:2: name: given twice (lines 1 and 2); keep one",
        f"{path}:6: train.lr: given twice (lines 5 and 6); keep one",
    ]


def test_config_show_says_what_each_derived_default_comes_to(config_file):
    import yaml

    from lmforge.config import derived_defaults, with_derived_comments

    config = load_config(config_file, ["train.micro_batch_size=3"], env={})
    shown = yaml.safe_load(text := with_derived_comments(dump_yaml(config), derived_defaults(config)))
    assert shown == yaml.safe_load(dump_yaml(config))  # comments only: the text is the same config
    lines = text.splitlines()
    assert "  num_layers: null  # 2 (model.preset llama-tiny)" in lines
    assert "  tie_embeddings: null  # false" in lines
    assert "  batch_size: null  # 3 (train.micro_batch_size)" in lines
    assert "  on_too_long: null  # split (for data.format=text)" in lines
    assert "  validation: null  # 0.05 of data.train's records held out (data.validation_fraction)" in lines
    assert "  lr: 0.001" in lines  # a value given is left alone
