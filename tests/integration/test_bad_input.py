"""User errors end with one clear line naming file and line, a non-zero exit and no traceback."""

import subprocess

import pytest
import yaml

from conftest import lmforge_command, subprocess_env, tiny_config_dict


def run_train(tmp_path, train_path, **data):
    cfg = tiny_config_dict(train_path, tmp_path / "cache", tmp_path / "runs")
    cfg["data"].update(data)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        lmforge_command("train", str(path)), capture_output=True, text=True, env=subprocess_env(), timeout=120
    )


def assert_user_error(proc, *fragments):
    """One error (a config error lists its problems on the lines below it), exit 2, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, proc.stderr
    message = proc.stderr[proc.stderr.index(error_lines[0]) :]
    for fragment in fragments:
        assert fragment in message, message


def test_missing_corpus_file(tmp_path):
    proc = run_train(tmp_path, tmp_path / "nope.txt")
    assert_user_error(proc, "data.train: no such file or directory", "nope.txt")


def test_glob_matching_nothing(tmp_path):
    proc = run_train(tmp_path, tmp_path / "*.txt")
    assert_user_error(proc, "matches no files")


def test_empty_corpus(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n   \n")
    proc = run_train(tmp_path, path)
    assert_user_error(proc, "corpus is empty", "empty.txt")


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("first line\nsecond line\nna\xefve caf\xe9\n".encode("latin-1"))
    proc = run_train(tmp_path, path)
    assert_user_error(proc, f"{path}:3:", "not valid UTF-8", "byte 0xef", "iconv")


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"text": "two"}\n\n{"text": "three",}\n')
    proc = run_train(tmp_path, path)
    assert_user_error(proc, f"{path}:4:", "malformed JSON")


def test_jsonl_without_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one"}\n{"body": "two", "id": 2}\n')
    proc = run_train(tmp_path, path)
    assert_user_error(proc, f"{path}:2:", "no field 'text'", "fields: body, id", "data.text_field")


@pytest.mark.parametrize("command", ["train", "config validate"])
def test_config_errors_listed_together(tmp_path, command):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: llama-tiny\ntrain:\n  lrr: 1\n  epochs: 0\ndata:\n  train: x.txt\n")
    proc = subprocess.run(
        lmforge_command(*command.split(), str(path)), capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == (1 if command.startswith("config") else 2)
    assert "Traceback" not in proc.stderr
    assert "c.yaml:4: train.lrr: unknown key; did you mean train.lr?" in proc.stderr
    assert "c.yaml:5: train.epochs" in proc.stderr
    assert "tokenizer" not in proc.stderr  # cross-field checks wait until the fields themselves are valid


def validate(tmp_path, cfg, **env):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run(
        lmforge_command("config", "validate", str(path)),
        capture_output=True,
        text=True,
        env=subprocess_env(**env),
        cwd=tmp_path,
        timeout=60,
    )


def test_config_validate_checks_every_path_it_names(tmp_path):
    (tmp_path / "runs" / "quickstart-latest" / "final").mkdir(parents=True)
    cfg = {"model": {"name_or_path": "runs/quickstart-latst/final"}, "data": {"train": "data/missing.jsonl"}}
    proc = validate(tmp_path, cfg)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"model.name_or_path: no directory 'runs/quickstart-latst/final' (looked for {tmp_path}/runs/" in proc.stderr
    assert f"data.train: no such file or directory: 'data/missing.jsonl' (looked for {tmp_path}/data/" in proc.stderr
    cfg["model"]["name_or_path"] = "runs/quickstart-latest/final"  # a directory, but not a model
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "missing.jsonl").write_text('{"text": "x"}\n')
    proc = validate(tmp_path, cfg)
    assert proc.returncode == 1 and "is not a Hugging Face model directory (it has no config.json)" in proc.stderr


def test_a_hub_shaped_name_that_is_not_here_is_said_at_once(tmp_path):
    """models/qwen without a models/ folder looks like a Hub id: with the Hub out of reach (offline
    here) it is an error at validation, not a minute of retries."""
    (tmp_path / "d.txt").write_text("x\n")
    proc = validate(
        tmp_path, {"model": {"name_or_path": "models/qwen"}, "data": {"train": "d.txt"}}, HF_HUB_OFFLINE="1"
    )
    assert proc.returncode == 1 and "'models/qwen' is no local directory" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "./models/qwen" in proc.stderr
    (tmp_path / "models").mkdir()  # now models/ is a local folder: models/qwen is a local path
    proc = validate(tmp_path, {"model": {"name_or_path": "models/qwen"}, "data": {"train": "d.txt"}})
    assert proc.returncode == 1 and "model.name_or_path: no directory 'models/qwen'" in proc.stderr
