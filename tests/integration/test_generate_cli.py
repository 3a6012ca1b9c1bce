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

from conftest import ROOT, chapters, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import load_config
from lmforge.data.sources import Record
from lmforge.data.tokenize import prompt_and_reference
from lmforge.eval.generation import as_trained
from lmforge.models.tokenizer import train_bpe_tokenizer
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


def sums(n: int, seed: int) -> list[tuple[str, str]]:
    import random

    rng = random.Random(seed)
    return [(f"{a} + {b}", str(a + b)) for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]


def train_sums(tmp, name: str, chat: bool, template: str | None = None):
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        if chat
        else {"prompt": q, "completion": a}
        for q, a in sums(300, seed=1)
    ]
    data = tmp / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_config_dict(data, tmp / "cache", tmp / "runs")
    # a tokenizer from text without digits, like the quickstart's: " 4" is two tokens, " the" one
    tokenizer = tmp / "kjv-tokenizer"
    if not tokenizer.is_dir():
        train_bpe_tokenizer(chapters(30), vocab_size=512).save_pretrained(str(tokenizer))
    raw["tokenizer"] = {"path": str(tokenizer)}
    raw["name"] = name
    raw["data"].update({"format": "chat" if chat else "prompt-completion", "max_length": 64})
    if template is not None:
        raw["data"]["template" if not chat else "chat_template"] = template
    raw["train"].update({"max_steps": 30, "lr": 3e-3})
    raw["eval"]["generate"] = {"num_examples": 6, "max_new_tokens": 6, "temperature": 0.0}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir


@pytest.mark.parametrize(
    ("chat", "template"),
    [(False, "{prompt} = "), (True, "plain"), (True, "chatml")],
    ids=["template-ending-in-a-space", "chat-plain", "chat-chatml"],
)
def test_generate_answers_a_question_exactly_as_the_runs_own_samples_did(tmp_path, chat, template):
    """The held-out samples are prompted with the training row's exact prefix; generate, given the
    bare question, must reach the same ids (a template's trailing space kept or not as training
    had it, whatever the vocabulary does with digits) and end the answer where training did."""
    run_dir = train_sums(tmp_path, "sums", chat, template)
    samples = [json.loads(line) for line in (run_dir / "examples.jsonl").read_text().splitlines()]
    after = {s["reference"]: s["generated"] for s in samples if s["stage"] == "after"}
    held_out = dict(sums(300, seed=1))  # question -> answer
    questions = [q for q, a in held_out.items() if a in after][:3]
    assert questions
    for question in questions:
        proc = generate(str(run_dir), question, "--temperature", "0", "--max-new-tokens", "6")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.rstrip("\n") == after[held_out[question]].rstrip("\n"), (question, proc.stdout)
        assert "<|im_end|>" not in proc.stdout and "<|im_end|>" not in after[held_out[question]]


def generate(*args):
    return subprocess.run(lmforge_command("generate", *args), capture_output=True, text=True, env=subprocess_env())


def test_the_trained_chat_template_is_saved_with_the_model(chat_run):
    tokenizer = AutoTokenizer.from_pretrained(str(chat_run / "final"))
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    # the tokenizer lmforge trained for chat data has the template's markers as tokens of their own
    assert [len(tokenizer(m, add_special_tokens=False)["input_ids"]) for m in ("<|im_start|>", "<|im_end|>")] == [1, 1]


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
    greedy = generate(str(chat_run), "What is 2 + 3?", "--temperature", "0", "--max-new-tokens", "12").stdout
    greedy = greedy.rstrip("\n")
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
