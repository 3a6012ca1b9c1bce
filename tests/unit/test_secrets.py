"""Credential redaction: by key name, by shape, and by environment value."""

import pytest

from lmforge.config import dump_yaml, load_config
from lmforge.secrets import REDACTED, environment_secrets, is_secret_name, redact, redact_text


@pytest.mark.parametrize(
    "key", ["tracking.tags.api_key", "token", "x.password", "a.hf_token", "client_secret", "b.credentials", "apikey"]
)
def test_secret_key_names(key):
    assert is_secret_name(key)


@pytest.mark.parametrize(
    "key", ["eval.generate.max_new_tokens", "tokenizer.path", "data.columns.prompt", "keep_last", "train.monkey"]
)
def test_ordinary_key_names(key):
    assert not is_secret_name(key)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("token hf_abcdefghijklmnopqrstuvwxyz123456 here", f"token {REDACTED} here"),
        ("sk-proj-ABCDEFGHIJKLMNOPQRSTUV", REDACTED),
        ("ghp_0123456789abcdefghijABCDEFGHIJ", REDACTED),
        ("AKIAIOSFODNN7EXAMPLE", REDACTED),
        ("postgresql://optuna:hunter2@db:5432/s", f"postgresql://optuna:{REDACTED}@db:5432/s"),
        ("https://host/x?token=abc123&page=2", f"https://host/x?token={REDACTED}&page=2"),
        ("Authorization: Bearer eyJhbGciOi.x.y", f"Authorization: Bearer {REDACTED}"),
        ("http://127.0.0.1:5000 and runs/tiny-20261121", "http://127.0.0.1:5000 and runs/tiny-20261121"),
        ("git commit 0123456789abcdef0123456789abcdef01234567", "git commit 0123456789abcdef0123456789abcdef01234567"),
    ],
)
def test_secret_shapes(text, expected):
    assert redact_text(text, environ={}) == expected


def test_environment_credentials_are_redacted_wherever_they_appear():
    environ = {"WANDB_API_KEY": "0123456789abcdef", "TOKENIZERS_PARALLELISM": "true", "HOME": "/home/someone-long"}
    assert environment_secrets(environ) == ["0123456789abcdef"]
    assert redact_text("key=0123456789abcdef; home /home/someone-long", environ) == (
        f"key={REDACTED}; home /home/someone-long"
    )


def test_redact_walks_nested_config_data():
    data = {"tags": {"api_key": "x" * 10, "note": "ok", "empty_token": ""}, "backends": ["mlflow"], "lr": 0.1}
    assert redact(data, environ={}) == {
        "tags": {"api_key": REDACTED, "note": "ok", "empty_token": ""},
        "backends": ["mlflow"],
        "lr": 0.1,
    }


def test_saved_config_is_redacted_but_the_config_in_memory_is_not(tiny_config, monkeypatch):
    config = tiny_config("tracking.tags.deploy_token=abc-real-value", "tracking.tags.owner=me")
    assert config.tracking.tags["deploy_token"] == "abc-real-value"
    text = dump_yaml(config)
    assert "abc-real-value" not in text and f"deploy_token: '{REDACTED}'" in text and "owner: me" in text


def test_an_env_override_carrying_a_credential_is_redacted(tmp_path, corpus):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{preset: llama-tiny}}\ntokenizer: {{train: true}}\ndata: {{train: {corpus}}}\n")
    env = {"LMFORGE_TRACKING__MLFLOW__TRACKING_URI": "https://user:pa55word-xyz@mlflow.example.com"}
    config = load_config(path, env=env)
    assert "pa55word-xyz" in config.tracking.mlflow.tracking_uri
    assert "pa55word-xyz" not in dump_yaml(config) and "https://user:***REDACTED***@mlflow.example.com" in dump_yaml(
        config
    )
