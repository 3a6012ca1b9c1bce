"""seq2seq (T5-style) and classification (BERT-style) through the CLI on tiny models saved as
"pretrained" directories, with metrics checked against values computed independently."""

import json
import random
import subprocess

import pytest
import yaml

from conftest import chapters, lmforge_command, save_tiny_bert, save_tiny_t5, subprocess_env
from lmforge.eval.evaluate import macro_f1
from lmforge.models.tokenizer import train_bpe_tokenizer

WORDS = "light darkness waters earth heaven herb seed fruit tree beast fowl fish day night".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    tokenizer = train_bpe_tokenizer(chapters(30) + [" ".join(WORDS)] * 5, vocab_size=400)
    tokenizer.save_pretrained(str(directory))
    return directory, tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run(tmp_path, cfg, *args):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        lmforge_command("train", str(path), *args), capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (run_dir,) = (tmp_path / "runs").glob("*-2*")
    return run_dir, proc.stdout


def base_config(tmp_path, model_dir, fmt, task, train, validation, **train_cfg):
    return {
        "name": fmt,
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": str(model_dir), "task": task},
        "data": {
            "train": train,
            "validation": validation,
            "test": validation,
            "format": fmt,
            "max_length": 32,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"micro_batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "eval_every": 20, "log_every": 5, **train_cfg},
        "eval": {"generate": {"num_examples": 3, "max_new_tokens": 10, "temperature": 0}},
        "tracking": {"backends": ["none"]},
    }


@pytest.mark.slow
def test_seq2seq_learns_to_reverse_word_lists(tmp_path, tokenizer_dir):
    directory, tokenizer = tokenizer_dir
    model_dir = save_tiny_t5(tmp_path / "t5-tiny", tokenizer)
    rng = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            words = rng.sample(WORDS, 3)
            out.append({"source": " ".join(words), "target": " ".join(reversed(words))})
        return out

    train = write_jsonl(tmp_path / "train.jsonl", rows(800))
    validation = write_jsonl(tmp_path / "val.jsonl", rows(40))
    cfg = base_config(tmp_path, model_dir, "seq2seq", "seq2seq", train, validation, max_steps=120)
    cfg["data"]["template"] = "reverse: {source}"
    run_dir, out = run(tmp_path, cfg)
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [p["eval/loss"] for p in points if "eval/loss" in p]
    assert evals[-1] < evals[0] / 2, evals
    final = json.loads((run_dir / "eval.json").read_text())
    assert final["test"]["token_accuracy"] > 0.5
    generation = final["generation"]  # greedy answers to the held-out sources, scored on references
    assert generation["examples"] == 40 and 0 <= generation["bleu"] <= 100 and 0 <= generation["rougeL"] <= 1
    examples = [json.loads(line) for line in (run_dir / "examples.jsonl").read_text().splitlines()]
    after = [e for e in examples if e["stage"] == "after"]
    assert all(e["prompt"].startswith("reverse: ") and e["reference"] for e in after)
    # the saved directory is a plain seq2seq model
    from transformers import AutoModelForSeq2SeqLM

    assert AutoModelForSeq2SeqLM.from_pretrained(run_dir / "final").config.is_encoder_decoder


@pytest.mark.slow
def test_classification_trains_and_reports_consistent_metrics(tmp_path, tokenizer_dir):
    directory, tokenizer = tokenizer_dir
    model_dir = save_tiny_bert(tmp_path / "bert-tiny", tokenizer, positions=64)
    text = (chapters(1)[0], chapters(1, start=60)[0])  # Genesis 1 and a chapter of Exodus
    genesis = [{"text": line, "label": "genesis"} for line in text[0].split("\n")]
    exodus = [{"text": line, "label": "exodus"} for line in text[1].split("\n")]
    validation = write_jsonl(tmp_path / "val.jsonl", genesis[:5] + exodus[:5])  # balanced: majority = 50%
    rows = genesis[5:] + exodus[5:]
    random.Random(1).shuffle(rows)
    train = write_jsonl(tmp_path / "train.jsonl", rows * 6)
    cfg = base_config(tmp_path, model_dir, "classification", "classification", train, validation, max_steps=60, lr=5e-4)
    run_dir, out = run(tmp_path, cfg)
    final = json.loads((run_dir / "eval.json").read_text())
    test = final["test"]
    matrix = final["test_confusion_matrix"]
    assert matrix["labels"] == ["exodus", "genesis"]
    cells = matrix["matrix"]
    assert sum(map(sum, cells)) == test["examples"] == 10
    assert test["accuracy"] == pytest.approx((cells[0][0] + cells[1][1]) / 10)
    assert test["macro_f1"] == pytest.approx(macro_f1(cells))
    # a random-init tiny encoder only shows that the loop optimises: the training loss falls
    # (beating the majority class on so little data takes a pretrained encoder)
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [p["train/loss"] for p in points if "train/loss" in p]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["labels"] == ["exodus", "genesis"]
    assert sum(report["splits"]["train"]["labels"].values()) == report["splits"]["train"]["examples"]
    examples = [json.loads(line) for line in (run_dir / "examples.jsonl").read_text().splitlines()]
    assert {e["generated"] for e in examples} <= {"exodus", "genesis"}


def test_macro_f1_on_a_known_confusion_matrix():
    # 3 classes; per-class F1 = 2TP / (predicted + actual): a 8/(5+5)... computed by hand
    cells = [[4, 1, 0], [2, 3, 0], [0, 0, 5]]
    f1 = [2 * 4 / (6 + 5), 2 * 3 / (4 + 5), 2 * 5 / (5 + 5)]
    assert macro_f1(cells) == pytest.approx(sum(f1) / 3)
    assert macro_f1([[0, 0], [0, 3]]) == 1.0  # an absent class does not count
