"""Checks of issue 23's settings found missing by a user's trial: AdamW's settings with other
optimizers, a curriculum stage's file, a local model of the wrong kind for model.task, and a
curriculum that reaches past the run's end."""

import json

import pytest
import yaml

from lmforge.config import load_config
from lmforge.errors import ConfigError
from lmforge.run import curriculum_beyond_the_run


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "easy.jsonl").write_text('{"text": "a b c"}\n')
    raw = {"model": {"preset": "llama-tiny"}, "tokenizer": {"train": True}, "data": {"train": "easy.jsonl"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.optimizer=sgd", "train.adam_beta1=0.8"], "train.adam_beta1 applies to train.optimizer=adamw"),
        (["train.optimizer=adafactor", "train.adam_eps=1e-6"], "train.adam_eps applies to train.optimizer=adamw"),
        (["train.optimizer=lion", "train.adam_eps=1e-6"], "not lion: remove it"),
    ],
)
def test_adamw_settings_with_another_optimizer_are_errors(config_file, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file, overrides, env={})
    load_config(config_file, ["train.optimizer=lion", "train.adam_beta2=0.99"], env={})  # Lion's betas


def test_a_missing_stage_file_is_found_by_validation(config_file):
    stages = "data.curriculum={stages: [{data: easy.jsonl, until_step: 6}, {data: nope.jsonl}]}"
    with pytest.raises(ConfigError, match=r"data.curriculum.stages.1.data: no such file .*nope.jsonl"):
        load_config(config_file, [stages], env={}, check_files=True)


def test_a_local_model_of_the_wrong_kind_for_the_task(config_file, tmp_path):
    for name, saved in {
        "llama": {"model_type": "llama"},
        "t5": {"model_type": "t5", "is_encoder_decoder": True},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(saved))
    base = ["model.preset=null", "tokenizer.train=false"]
    seq2seq = [*base, "model.name_or_path=llama", "model.task=seq2seq", "data.format=seq2seq"]
    with pytest.raises(ConfigError, match="is a llama model, not an encoder-decoder: model.task=seq2seq needs one"):
        load_config(config_file, seq2seq, env={}, check_files=True)
    with pytest.raises(ConfigError, match="is a t5 encoder-decoder: set model.task=seq2seq"):
        load_config(config_file, [*base, "model.name_or_path=t5"], env={}, check_files=True)
    load_config(config_file, [*base, "model.name_or_path=t5", "model.task=seq2seq", "data.format=seq2seq"], env={})


def test_a_curriculum_past_the_end_of_the_run_is_said(config_file):
    stages = (
        "data.curriculum={stages: [{data: easy.jsonl, until_step: 6}, {data: easy.jsonl, until_step: 12}, "
        "{data: easy.jsonl}]}"
    )
    config = load_config(config_file, [stages], env={})
    assert curriculum_beyond_the_run(config, 5).startswith("data.curriculum.stages 1, 2 start at or after step 5")
    assert curriculum_beyond_the_run(config, 13) == ""
    config = load_config(config_file, ["data.curriculum={steps: 100}"], env={})
    assert "data.curriculum.steps (100) is longer than the run (16 steps)" in curriculum_beyond_the_run(config, 16)
    assert curriculum_beyond_the_run(config, 100) == ""
