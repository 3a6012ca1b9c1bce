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
    "eval: batch size 0": ["eval", "{model}", "--batch-size", "0"],
    "eval: max length 0": ["eval", "{model}", "--max-length", "0"],
    "generate: top-p 0": ["generate", "{model}", "x", "--top-p", "0"],
    "generate: empty stop": ["generate", "{model}", "x", "--stop", ""],
    "generate: undecodable prompts file": ["generate", "{model}", "--prompts-file", "{latin1}"],
    "export: out below a file": ["export", "{model}", "--out", "{config}/sub"],
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
    (tmp / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return {
        "config": str(tmp / "c.yaml"),
        "bad": str(tmp / "bad.yaml"),
        "model": str(model),
        "latin1": str(tmp / "latin1.txt"),
        "cwd": tmp,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_bad_arguments_end_in_a_message(files, case):
    args = [a.format(**files) for a in CASES[case]]
    proc = subprocess.run(
        lmforge_command(*args), capture_output=True, text=True, env=subprocess_env(), cwd=files["cwd"], timeout=120
    )
    assert proc.returncode in (1, 2), (case, proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, (case, proc.stderr)
    assert proc.stderr.strip(), case  # something says what went wrong


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["generate", "{model}", "x", "--top-p", "0"], "--top-p: Input should be greater than 0"),
        (["generate", "{model}", "x", "--stop", ""], "--stop: Value error, a stop string cannot be empty"),
        (["generate", "{model}", "--prompts-file", "{latin1}"], "not valid UTF-8: byte 0xe9"),
        (["export", "{model}", "--out", "{config}/sub"], "is a file, so no directory can be made below it"),
        (["eval", "{model}", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_the_message_names_what_to_change(files, args, fragment):
    proc = subprocess.run(
        lmforge_command(*[a.format(**files) for a in args]),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=files["cwd"],
        timeout=120,
    )
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
