"""distributed.strategy on the config's side: which strategy a job gets, what is refused before
any process starts (fp16 or a fixed loss chunk size with FSDP), a DeepSpeed JSON file checked
against the run, and the DeepSpeed plugin built from the run's settings (DeepSpeed jobs themselves:
tests/integration/test_deepspeed.py). Also the shape copy into which FSDP's shards are gathered."""

import json

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import tiny_config_dict
from lmforge.config import ConfigError, load_config
from lmforge.engine.sharding import block_names, fsdp_settings, meta_copy, resolve_strategy
from lmforge.errors import UserError


@pytest.fixture
def config_file(tmp_path):
    def make(distributed: dict, **train):
        raw = tiny_config_dict(tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "runs")
        raw["distributed"] = distributed
        raw["train"].update(train)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return make


def problems(path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    return " ".join(str(caught.value).split())


@pytest.mark.parametrize(
    ("strategy", "world", "environment", "expected"),
    [
        ("auto", 1, {}, "single"),
        ("auto", 2, {}, "ddp"),
        ("auto", 2, {"ACCELERATE_USE_FSDP": "true"}, "fsdp"),  # accelerate launch --config_file fsdp.yaml
        ("auto", 2, {"ACCELERATE_USE_DEEPSPEED": "true"}, "deepspeed"),
        ("ddp", 2, {"ACCELERATE_USE_FSDP": "true"}, "ddp"),  # the config's word wins
        ("fsdp", 2, {}, "fsdp"),
        ("fsdp", 1, {}, "fsdp"),  # one process, unsharded, but its checkpoints stay in the sharded format
        ("ddp", 1, {}, "single"),
        ("deepspeed", 1, {}, "deepspeed"),  # ZeRO-Offload on one GPU
    ],
)
def test_the_strategy_a_job_gets(config_file, monkeypatch, strategy, world, environment, expected):
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    config = load_config(config_file({"strategy": strategy}), env={})
    assert resolve_strategy(config, world) == expected


@pytest.mark.parametrize(
    ("strategy", "environment", "expected"),
    [
        ("fsdp", {}, (True, False, False)),  # distributed.fsdp's defaults
        (  # accelerate launch --config_file fsdp.yaml: its settings, as accelerate.utils.launch exports them
            "auto",
            {
                "FSDP_RESHARD_AFTER_FORWARD": "false",
                "FSDP_OFFLOAD_PARAMS": "true",
                "FSDP_ACTIVATION_CHECKPOINTING": "true",
            },
            (False, True, True),
        ),
        ("auto", {"FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"}, (True, False, False)),  # an FSDP1 config
        ("auto", {"FSDP_RESHARD_AFTER_FORWARD": "SHARD_GRAD_OP"}, (False, False, False)),
        ("fsdp", {"FSDP_ACTIVATION_CHECKPOINTING": "true"}, (True, False, False)),  # the config's word wins
    ],
)
def test_the_fsdp_settings_a_job_gets(config_file, monkeypatch, strategy, environment, expected):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for name in ("FSDP_RESHARD_AFTER_FORWARD", "FSDP_OFFLOAD_PARAMS", "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    got = fsdp_settings(load_config(config_file({"strategy": strategy}), env={}))
    assert (got.reshard_after_forward, got.cpu_offload, got.activation_checkpointing) == expected


def test_fsdp_refuses_fp16_and_a_fixed_loss_chunk_size(config_file):
    said = problems(config_file({"strategy": "fsdp"}, precision="fp16", loss_chunk_size=256))
    assert "distributed.strategy=fsdp trains in fp32 or bf16" in said and "train.precision=bf16" in said
    assert "train.loss_chunk_size: the chunked loss reads the output layer's weight" in said
    assert "config.yaml:" in said  # where each setting is


def test_fsdp_settings_are_checked_by_name(config_file):
    said = problems(config_file({"strategy": "fsdp", "fsdp": {"reshard_after_froward": False}}))
    assert "distributed.fsdp.reshard_after_froward" in said and "reshard_after_forward" in said


def test_a_deepspeed_file_is_checked_against_the_run(config_file, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 5}, "train_micro_batch_size_per_gpu": 16}))
    said = problems(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds)}}))
    assert "zero_optimization.stage is 5; DeepSpeed's stages are the numbers 0 to 3" in said
    assert "train_micro_batch_size_per_gpu is 16 but train.micro_batch_size is 4" in said and '"auto"' in said

    ds.write_text("{not json")
    assert "not valid JSON" in problems(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds)}}))
    missing = problems(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": "nowhere.json"}}))
    assert "nowhere.json: no such file" in missing

    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto"}))
    config = load_config(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds)}}), env={})
    assert config.distributed.deepspeed.config_file == str(ds)
    assert problems(config_file({"strategy": "deepspeed", "deepspeed": {"zero_stage": 1}}))  # 2 or 3


def test_a_deepspeed_file_may_not_bring_its_own_optimizer_clipping_or_precision(config_file, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(
        json.dumps(
            {
                "optimizer": {"type": "Adam"},
                "gradient_clipping": 0.5,
                "bf16": {"enabled": True},
                "zero_optimization": {},
            }
        )
    )
    said = problems(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds)}}, precision="fp32"))
    assert 'lmforge builds the optimizer (train.optimizer and its settings); remove "optimizer"' in said
    assert "gradient_clipping is 0.5 but train.max_grad_norm is 1.0" in said
    assert "bf16.enabled is True but train.precision is fp32" in said
    ds.write_text(json.dumps({"zero_optimization": {"stage": "3"}, "train_batch_size": 6}))
    said = problems(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds)}}))
    assert "zero_optimization.stage is '3'; DeepSpeed's stages are the numbers 0 to 3" in said
    assert "train_batch_size is 6; DeepSpeed requires train.micro_batch_size x train.grad_accum x processes" in said


def test_a_deepspeed_file_is_one_place_for_the_zero_settings_and_checked_only_for_deepspeed(config_file, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}, "optimizer": {"type": "Adam"}}))
    said = problems(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds), "zero_stage": 3}}))
    assert "config_file and zero_stage are both given, and the file's zero_optimization would win" in said
    load_config(config_file({"strategy": "fsdp", "deepspeed": {"config_file": str(ds)}}), env={})  # not used: not read


def test_a_deepspeed_files_train_batch_size_is_checked_against_the_job(config_file, tmp_path):
    from lmforge.engine.sharding import check_deepspeed_batch

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    config = load_config(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(ds)}}), env={})
    check_deepspeed_batch(config, 2)  # 4 x 1 x 2
    with pytest.raises(UserError, match=r"train_batch_size is 8, but a job of 4 processes takes 4 x 1 x 4 = 16"):
        check_deepspeed_batch(config, 4)


def test_the_deepspeed_plugin_takes_the_runs_batch_accumulation_and_clipping(config_file, tmp_path):
    from lmforge.engine.sharding import deepspeed_plugin

    config = load_config(config_file({"strategy": "deepspeed", "deepspeed": {"zero_stage": 3}}, grad_accum=2), env={})
    ds = deepspeed_plugin(config.distributed.deepspeed, config.train).deepspeed_config
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]  # final/ is gathered whole
    file = tmp_path / "ds.json"  # a file's "auto" values are filled the same way, its own values kept
    file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto"}))
    config = load_config(config_file({"strategy": "deepspeed", "deepspeed": {"config_file": str(file)}}), env={})
    ds = deepspeed_plugin(config.distributed.deepspeed, config.train).deepspeed_config
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero_optimization"]["stage"] == 2


def test_the_shape_copy_holds_no_weights_and_keeps_the_rotary_buffers():
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    copy = meta_copy(model)
    assert all(p.is_meta for p in copy.parameters())
    assert all(p.requires_grad == q.requires_grad for p, q in zip(copy.parameters(), model.parameters(), strict=True))
    rotary = dict(copy.named_buffers())["model.rotary_emb.inv_freq"]  # in no state dict: kept as it is
    assert not rotary.is_meta and torch.equal(rotary, dict(model.named_buffers())["model.rotary_emb.inv_freq"])
    assert not next(model.parameters()).is_meta  # the original is untouched
    assert block_names(model) == {"LlamaDecoderLayer"}
