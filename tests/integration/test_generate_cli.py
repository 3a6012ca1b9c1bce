"""`lmforge generate` prompts a model as it was trained (chat template, prompt template), reads
prompts from a file, samples with top-p, stops at stop strings, names a classifier's class, and
answers bad arguments with a message, never a traceback."""

import io
import json
import subprocess

import pytest
import yaml
from rich.console import Console
from transformers import AutoTokenizer

from conftest import ROOT, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import load_config
from lmforge.data.sources import Record
from lmforge.data.tokenize import prompt_and_reference
from lmforge.eval.generation import as_trained
from lmforge.run import run_train

pytestmark = pytest.mark.slow
CHATS = ROOT / "examples" / "data" / "arithmetic_chat.jsonl"


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    data = tmp / "chats.jsonl"
    data.write_text("".join(CHATS.read_text().splitlines(keepends=True)[:200]))
    raw = tiny_config_dict(data, tmp / "cache", tmp / "runs")
    raw["data"].update({"format": "chat", "chat_template": "chatml", "max_length": 160})
    raw["train"].update({"max_steps": 6})
    path = tmp / "chat.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir


def generate(*args):
    return subprocess.run(lmforge_command("generate", *args), capture_output=True, text=True, env=subprocess_env())


def test_the_trained_chat_template_is_saved_with_the_model(chat_run):
    tokenizer = AutoTokenizer.from_pretrained(str(chat_run / "final"))
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"


def test_prompts_are_rendered_as_the_training_data_was(chat_run):
    """What generate sends is the text before the answer of a training record holding the prompt."""
    config = load_config(chat_run / "config.yaml", env={})
    tokenizer = AutoTokenizer.from_pretrained(str(chat_run / "final"))
    record = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}
    expected = prompt_and_reference(Record(record, "x"), config.data, tokenizer)["prompt"]
    assert as_trained("What is 2 + 3?", config, tokenizer, chat=False) == expected
    for template in ("<human>: {prompt}\n<assistant>:", None):
        config.data = config.data.model_copy(update={"format": "prompt-completion", "template": template})
        record = {"prompt": "What is 2 + 3?", "completion": "5"}
        expected = prompt_and_reference(Record(record, "x"), config.data, tokenizer)["prompt"]
        assert as_trained("What is 2 + 3?", config, tokenizer, chat=False) == expected


def test_chat_prompts_file_top_p_and_stop(chat_run, tmp_path):
    proc = generate(str(chat_run), "What is 2 + 3?", "--temperature", "0", "--max-new-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert not proc.stdout.startswith("What is")  # the answer alone, not a continuation of the question
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1 + 1?"}\n{"prompt": "What is 7 + 8?"}\n')
    proc = generate(str(chat_run), "--prompts-file", str(prompts), "--top-p", "0.9", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 1 + 1?", "What is 7 + 8?"]
    greedy = generate(str(chat_run), "What is 2 + 3?", "--temperature", "0", "--max-new-tokens", "12").stdout.strip()
    cut = greedy[len(greedy) // 2 :][:3]  # a piece of the greedy answer: generation ends before it
    stopped = generate(str(chat_run), "What is 2 + 3?", "--temperature", "0", "--max-new-tokens", "12", "--stop", cut)
    assert stopped.returncode == 0 and stopped.stdout.rstrip("\n") == greedy[: greedy.index(cut)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["x", "--temperature", "-1"], "--temperature"),
        (["x", "--top-p", "2"], "--top-p"),
        ([], "give a prompt or --prompts-file"),
        (["x", "--chat", "--raw"], "--chat and --raw"),
        (["--prompts-file", "missing.txt"], "no such file"),
    ],
)
def test_bad_arguments_are_messages(chat_run, args, message):
    proc = generate(str(chat_run), *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
