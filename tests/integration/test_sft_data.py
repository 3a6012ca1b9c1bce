"""Fine-tuning data end to end: exact report counts, cache invalidation, data inspect, and an SFT
run through the CLI with packing on and off."""

import json
import random
import subprocess

import pytest
import yaml

from conftest import lmforge_command, subprocess_env
from lmforge.config import load_config
from lmforge.data.prepare import prepare_data
from lmforge.errors import DataError

LONG = " ".join(["and the children of Israel went up out of the land of Egypt"] * 12)


def arithmetic(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}."})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def fixture_file(tmp_path):
    """20 valid, 3 malformed, 2 empty answers, 1 missing column, 4 too long: 30 records."""
    valid = arithmetic(20, seed=1)
    rows = valid[:5] + ['{"question": "broken', '{"question": "x", "answer": }', "not json at all"]
    rows += valid[5:10] + [{"question": "Empty?", "answer": ""}, {"question": "Blank?", "answer": "   "}]
    rows += [{"question": "No answer field"}] + valid[10:15]
    rows += [{"question": f"Long {i}?", "answer": LONG} for i in range(4)] + valid[15:]
    return write_jsonl(tmp_path / "fixture.jsonl", rows)


def sft_config(tmp_path, train, cache, *overrides):
    validation = write_jsonl(tmp_path / "val.jsonl", arithmetic(8, seed=99))
    base = [
        "model.preset=llama-tiny",
        "tokenizer.train=true",
        "tokenizer.vocab_size=300",
        f"data.train={train}",
        f"data.validation={validation}",
        "data.test_fraction=0",
        "data.format=prompt-completion",
        "data.columns={prompt: question, completion: answer}",
        "data.template='Q: {prompt}\nA: '",
        "data.max_length=64",
        f"data.cache_dir={cache}",
    ]
    return load_config(None, [*base, *overrides], env={})


def test_report_counts_exactly(fixture_file, tmp_path):
    config = sft_config(tmp_path, fixture_file, tmp_path / "c", "data.on_invalid=drop", "data.on_too_long=drop")
    report = prepare_data(config, log=lambda _: None).report["splits"]["train"]
    assert report["records"] == 30
    assert report["examples"] == 20
    assert report["dropped"] == {"empty_completion": 2, "malformed_json": 3, "missing_column": 1, "too_long": 4}
    assert report["truncated"] == 0
    assert sum(report["length_histogram"].values()) == 20
    assert 0 < report["trained_tokens"] < report["tokens"]

    truncating = sft_config(tmp_path, fixture_file, tmp_path / "c", "data.on_invalid=drop")
    report = prepare_data(truncating, log=lambda _: None).report["splits"]["train"]
    assert report["examples"] == 24 and report["truncated"] == 4
    assert report["dropped"] == {"empty_completion": 2, "malformed_json": 3, "missing_column": 1}


def test_errors_name_the_record(fixture_file, tmp_path):
    with pytest.raises(DataError, match=r"fixture.jsonl:6: malformed JSON"):
        prepare_data(sft_config(tmp_path, fixture_file, tmp_path / "c"), log=lambda _: None)
    config = sft_config(tmp_path, fixture_file, tmp_path / "c", "data.on_invalid=drop", "data.on_too_long=error")
    with pytest.raises(DataError, match=r"fixture.jsonl:22: \d+ tokens, more than data.max_length=64"):
        prepare_data(config, log=lambda _: None)


def test_changing_the_template_retokenizes(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic(60, seed=2))
    messages = []
    config = sft_config(tmp_path, train, tmp_path / "c")
    prepare_data(config, log=messages.append)
    assert "tokenizing and packing the data" in messages
    messages.clear()
    assert prepare_data(config, log=messages.append).cache_hit and not messages
    changed = sft_config(tmp_path, train, tmp_path / "c", "data.template='Question: {prompt}\nAnswer: '")
    data = prepare_data(changed, log=messages.append)
    assert not data.cache_hit and "tokenizing and packing the data" in messages
    assert "Question:" in data.tokenizer.decode(data.splits["train"][0]["input_ids"])


def run_cli(*args, cwd):
    proc = subprocess.run(
        lmforge_command(*args), capture_output=True, text=True, cwd=cwd, env=subprocess_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_sft_through_the_cli_with_and_without_packing(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic(600, seed=3))
    validation = write_jsonl(tmp_path / "val.jsonl", arithmetic(60, seed=4))
    cfg = {
        "name": "sft",
        "seed": 1,
        "output_dir": str(tmp_path / "runs"),
        "model": {"preset": "llama-tiny"},
        "tokenizer": {"train": True, "vocab_size": 300},
        "data": {
            "train": str(train),
            "validation": str(validation),
            "test_fraction": 0,
            "format": "prompt-completion",
            "columns": {"prompt": "question", "completion": "answer"},
            "template": "Q: {prompt}\nA: ",
            "max_length": 128,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"epochs": 3, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": None},
        "eval": {"generate": {"num_examples": 2, "max_new_tokens": 12}},
        "tracking": {"backends": ["none"]},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(cfg))

    inspect = run_cli("data", "inspect", str(path), cwd=tmp_path)
    assert "train: 600 records -> 600 examples; dropped 0" in inspect
    assert "«" in inspect and "Q: What is" in inspect  # the masked prompt is marked

    # A packed row holds several of these short examples: give the unpacked run as many examples
    # per step as a packed row holds on average, so both take about the same number of steps.
    results = {}
    batch = 1
    for packing in ("true", "false"):
        args = [f"data.packing={packing}", f"name=sft-{packing}", f"train.micro_batch_size={batch}"]
        out = run_cli("train", str(path), *args, cwd=tmp_path)
        (run_dir,) = (tmp_path / "runs").glob(f"sft-{packing}-2*")
        final = json.loads((run_dir / "eval.json").read_text())
        report = json.loads((run_dir / "data_report.json").read_text())["splits"]["train"]
        results[packing] = (final["validation"]["loss"], report, out)
        batch = round(report["examples"] / report["rows"])
    (packed_loss, packed, _), (padded_loss, padded, _) = results["true"], results["false"]
    assert packed["trained_tokens"] == padded["trained_tokens"]  # the same tokens are trained on
    assert packed["rows"] < padded["rows"] / 3  # several short examples per packed row
    first_eval = 5.7  # ~ln(300): an untrained model
    assert packed_loss < first_eval - 3 and padded_loss < first_eval - 3  # both learned the task
    assert abs(packed_loss - padded_loss) / padded_loss < 0.15, (packed_loss, padded_loss)
    run_dir = next((tmp_path / "runs").glob("sft-true-2*"))
    after = [json.loads(line) for line in (run_dir / "examples.jsonl").open() if '"after"' in line]
    for example in after:  # prompts are held-out questions, references their true answers
        assert example["prompt"].startswith("Q: What is") and example["prompt"].endswith("\nA: ")
        a, b = example["prompt"].split("What is ")[1].split("?")[0].split(" plus ")
        assert example["reference"] == f"{a} + {b} = {int(a) + int(b)}."


def test_source_weights_repeat_or_subsample(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", arithmetic(100, seed=5))
    b = write_jsonl(tmp_path / "b.jsonl", arithmetic(200, seed=6))
    config = sft_config(tmp_path, "x", tmp_path / "c")
    config.data.train = [{"path": str(a), "weight": 2.0}, {"path": str(b), "weight": 0.5}]
    report = prepare_data(config, log=lambda _: None).report["splits"]["train"]
    assert 200 + 80 <= report["records"] <= 200 + 120  # all of a twice, about half of b
    again = prepare_data(config, log=lambda _: None).report["splits"]["train"]
    assert again["records"] == report["records"]  # the same half every time


def test_worker_processes_give_the_same_rows(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", arithmetic(1500, seed=7))
    one = prepare_data(sft_config(tmp_path, train, tmp_path / "c1"), log=lambda _: None)
    two = prepare_data(sft_config(tmp_path, train, tmp_path / "c2", "data.num_proc=2"), log=lambda _: None)
    assert one.report == two.report
    assert one.splits["train"]["input_ids"] == two.splits["train"]["input_ids"]
    assert one.splits["train"]["labels"] == two.splits["train"]["labels"]


def test_dropping_is_suggested_only_when_few_records_are_bad(fixture_file, tmp_path):
    with pytest.raises(DataError) as info:  # 3 malformed + 3 others of 30
        prepare_data(sft_config(tmp_path, fixture_file, tmp_path / "c"), log=lambda _: None)
    assert "or set data.on_invalid=drop to skip such records" in str(info.value)
    wrong_columns = sft_config(tmp_path, fixture_file, tmp_path / "c", "data.columns={prompt: q, completion: a}")
    with pytest.raises(DataError) as info:  # every record: the settings are wrong, not the data
        prepare_data(wrong_columns, log=lambda _: None)
    message = str(info.value)
    assert "on_invalid=drop" not in message and "the settings do not fit this data" in message


def test_an_empty_split_names_what_emptied_it(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"Q{i} " + LONG, "answer": "yes"} for i in range(30)])
    config = sft_config(tmp_path, train, tmp_path / "c", "data.max_length=16")
    with pytest.raises(DataError) as info:
        prepare_data(config, log=lambda _: None)
    assert "no_trained_tokens_left" in str(info.value) and "raise data.max_length (now 16)" in str(info.value)
    assert "validation_fraction" not in str(info.value)


def test_dry_run_shows_the_data_report_and_warns_when_much_is_lost(tmp_path):
    rows = arithmetic(40, seed=3)
    rows[:30] = [{"question": r["question"] + " " + LONG, "answer": r["answer"]} for r in rows[:30]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump({"model": {"preset": "llama-tiny"}, "tokenizer": {"train": True, "vocab_size": 300}})
    )
    validation = write_jsonl(tmp_path / "val.jsonl", arithmetic(8, seed=99))
    args = [
        f"data.train={train}", f"data.validation={validation}", "data.test_fraction=0", "data.format=prompt-completion",
        "data.columns={prompt: question, completion: answer}", "data.max_length=32", f"data.cache_dir={tmp_path / 'c'}",
    ]  # fmt: skip
    proc = subprocess.run(
        lmforge_command("train", str(config), *args, "train.num_threads=1", "--dry-run"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "train: 40 records -> " in out and "dropped" in out  # the report lines
    assert "warning: train: 30 of 40 records dropped (30 no_trained_tokens_left); raise data.max_length (now 32)" in out
    assert "dry run: config and data are valid" in out
    assert "1 CPU thread (train.num_threads)" in out
