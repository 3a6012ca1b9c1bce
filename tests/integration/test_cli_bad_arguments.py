"""No command ends in a traceback for a user's input: each takes bad arguments with a message."""

import subprocess

import pytest

from conftest import lmforge_command, subprocess_env

CASES = {
    "train: no config": ["train", "missing.yaml"],
    "train: bad override": ["train", "{config}", "train.lr"],
    "train: bad resume": ["train", "{config}", "--resume", "nowhere"],
    "eval: no target": ["eval", "nowhere"],
    "eval: a file": ["eval", "{config}"],
    "eval: bad split": ["eval", "{model}", "--split", "nonsense"],
    "eval: missing data": ["eval", "{model}", "--data", "missing.txt"],
    "generate: no target": ["generate", "nowhere", "hi"],
    "export: no run": ["export", "nowhere", "--out", "x"],
    "export: a model dir": ["export", "{model}", "--out", "x"],
    "sync: no run": ["sync", "nowhere"],
    "inspect: no config": ["data", "inspect", "missing.yaml"],
    "inspect: negative example": ["data", "inspect", "{config}", "--example", "-1"],
    "show: bad yaml": ["config", "show", "{bad}"],
    "validate: bad yaml": ["config", "validate", "{bad}"],
    "unknown command": ["trian", "{config}"],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "c.yaml").write_text("model: {preset: llama-tiny}\ntokenizer: {train: true}\ndata: {train: d.txt}\n")
    (tmp / "d.txt").write_text("In the beginning.\n")
    (tmp / "bad.yaml").write_text("model: [unclosed\n")
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return {"config": str(tmp / "c.yaml"), "bad": str(tmp / "bad.yaml"), "model": str(model), "cwd": tmp}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments_end_in_a_message(files, case):
    args = [a.format(**files) for a in CASES[case]]
    proc = subprocess.run(
        lmforge_command(*args), capture_output=True, text=True, env=subprocess_env(), cwd=files["cwd"], timeout=120
    )
    assert proc.returncode in (1, 2), (case, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, (case, proc.stderr)
    assert proc.stderr.strip(), case  # something says what went wrong
