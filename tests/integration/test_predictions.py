"""predictions.jsonl for every task, through the CLI on tiny models: one line per kept record of the
evaluated split, losses that add up to eval.json's, scores that average to its corpus values, and
plugin metrics that reach every output."""

import json
import math
import random
import subprocess

import pytest
import sacrebleu
import torch
import yaml

from conftest import chapters, lmforge_command, save_tiny_bert, save_tiny_t5, subprocess_env
from lmforge.models.tokenizer import train_bpe_tokenizer

WORDS = "light darkness waters earth heaven herb seed fruit tree beast fowl fish day night".split()  # noqa: SIM905


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(chapters(30) + [" ".join(WORDS)] * 5, vocab_size=400)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def train(tmp_path, cfg, cwd=None, expect=0):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        lmforge_command("train", str(path)),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
        cwd=cwd,
    )
    assert proc.returncode == expect, proc.stdout + proc.stderr
    runs = list((tmp_path / "runs").glob("*-2*")) if expect == 0 else []
    return (runs[0] if runs else None), proc.stdout + proc.stderr


def config(tmp_path, data, model=None, **train_cfg):
    return {
        "name": "p",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "model": model or {"preset": "llama-tiny"},
        **({} if model else {"tokenizer": {"train": True, "vocab_size": 400}}),
        "data": {"max_length": 48, "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"micro_batch_size": 8, "lr": 3e-3, "max_steps": 8, "eval_every": None, "log_every": 4, **train_cfg},
        "eval": {"at_start": False, "batch_size": 4, "generate": {"num_examples": 2, "max_new_tokens": 8}},
        "tracking": {"backends": ["none"]},
    }


def spelling_rows(n, seed):
    rng = random.Random(seed)
    words = sorted({w.strip(".,;:") for c in chapters(20) for w in c.lower().split() if w.isalpha()})
    return [{"word": w, "spelling": " ".join(w)} for w in rng.sample(words, n)]


def check_losses_add_up(run_dir, split="test"):
    rows = read_jsonl(run_dir / "predictions.jsonl")
    final = json.loads((run_dir / "eval.json").read_text())
    report = json.loads((run_dir / "data_report.json").read_text())["splits"][split]
    assert final["predictions"] == {"split": split, "examples": len(rows), "pieces": report["examples"]}
    assert sum(r["pieces"] for r in rows) == report["examples"]
    assert [r["index"] for r in rows] == list(range(len(rows)))
    tokens = sum(r["tokens"] for r in rows)
    loss = sum(r["loss_sum"] for r in rows) / tokens
    # the packed evaluation and the per-example one are the same sums, up to float rounding
    metrics = final[split]
    assert tokens == metrics.get("tokens", metrics.get("examples"))
    assert loss == pytest.approx(metrics["loss"], rel=1e-4)
    interval = final["intervals"][f"{split}/loss"]  # the bootstrap interval of the same mean
    assert interval["value"] == pytest.approx(loss) and interval["low"] <= loss <= interval["high"]
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_sum"] / r["tokens"])
    return rows, final


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A prompt-completion run from scratch with two plugins (one per-example and corpus-level, one
    that raises) from a module in the directory lmforge is started from."""
    tmp_path = tmp_path_factory.mktemp("sft")
    (tmp_path / "my_metrics.py").write_text(
        "def letters(predictions, references, inputs):\n"
        "    return {'letter_overlap': [len(set(p) & set(r)) / max(len(set(r)), 1) for p, r in "
        "zip(predictions, references)], 'answered': float(sum(bool(p) for p in predictions))}\n"
        "def broken(predictions, references, inputs):\n"
        "    raise ValueError('this metric is broken')\n"
    )
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", spelling_rows(300, 0)),
        "test": write_jsonl(tmp_path / "test.jsonl", spelling_rows(30, 1)),
        "validation_fraction": 0.05,
        "format": "prompt-completion",
        "columns": {"prompt": "word", "completion": "spelling"},
        "template": "Spell {prompt}:\n",
    }
    cfg = config(tmp_path, data)
    cfg["eval"]["generate"]["max_examples"] = 12
    cfg["eval"]["metrics_plugins"] = ["my_metrics:letters", "my_metrics:broken"]
    run_dir, out = train(tmp_path, cfg, cwd=tmp_path)
    return tmp_path, cfg, run_dir, out


def test_causal_sft_predictions_and_plugins(sft_run):
    tmp_path, cfg, run_dir, out = sft_run
    rows, final = check_losses_add_up(run_dir)
    assert len(rows) == 30
    assert final["intervals"]["generation/letter_overlap"]["value"] == pytest.approx(
        final["generation"]["letter_overlap"]
    )
    generated = [r for r in rows if "prediction" in r]
    assert [r["index"] for r in generated] == list(range(12))  # bounded by eval.generate.max_examples
    assert all(r["input"].startswith("Spell ") and r["reference"] for r in rows)
    generation = final["generation"]
    assert generation["examples"] == 12 and generation["split"] == "test"
    for key in ("exact_match", "rouge1", "rougeL", "letter_overlap"):
        assert generation[key] == pytest.approx(sum(r["scores"][key] for r in generated) / 12), key
    references = [r["reference"] for r in generated]
    assert generation["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([r["prediction"] for r in generated], [references]).score
    )
    assert generation["truncated"] == sum(r["truncated"] for r in generated)
    assert all(r["truncated"] == (r["new_tokens"] == 8) for r in generated if r["truncated"])
    # the plugins: the per-example values in each line and their mean; the corpus value; the
    # failure named, with everything else kept
    assert generation["answered"] == float(sum(bool(r["prediction"]) for r in generated))
    assert final["plugin_errors"] == {"my_metrics:broken": "ValueError: this metric is broken"}
    assert "my_metrics:broken failed: ValueError: this metric is broken" in out
    points = read_jsonl(run_dir / "metrics.jsonl")
    assert any(p.get("generation/letter_overlap") == pytest.approx(generation["letter_overlap"]) for p in points)
    assert (run_dir / "final" / "config.json").is_file()
    # and the report: the plugin's metric on the leaderboard and among the intervals
    from lmforge.results.report import build_report

    page = build_report([run_dir], tmp_path / "report.html").read_text()
    assert page.count("generation/letter_overlap") >= 2


def test_a_plugin_that_cannot_be_imported_stops_the_run_before_training(tmp_path):
    data = {"train": write_jsonl(tmp_path / "train.jsonl", spelling_rows(40, 0)), "format": "prompt-completion"}
    data["columns"] = {"prompt": "word", "completion": "spelling"}
    cfg = config(tmp_path, data)
    cfg["eval"]["metrics_plugins"] = ["no_such_module:metric", "json:no_such_function"]
    _, out = train(tmp_path, cfg, cwd=tmp_path, expect=2)
    assert "eval.metrics_plugins[0] ('no_such_module:metric'): cannot import 'no_such_module'" in out
    assert "eval.metrics_plugins[1] ('json:no_such_function'): json has no function 'no_such_function'" in out
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*-2*"))


def test_text_predictions_hold_per_document_losses(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(40)) + "\n")
    data = {"train": str(corpus), "validation_fraction": 0.1, "test_fraction": 0.1}
    run_dir, _ = train(tmp_path, config(tmp_path, data))
    rows, final = check_losses_add_up(run_dir)
    assert "generation" not in final and all("prediction" not in r for r in rows)
    assert any(r["pieces"] > 1 for r in rows)  # chapters are longer than 48 tokens: one line per document
    assert all(r["id"].startswith(str(corpus)) for r in rows)


@pytest.mark.slow
def test_seq2seq_predictions(tmp_path, tokenizer):
    model_dir = save_tiny_t5(tmp_path / "t5", tokenizer)
    rng = random.Random(0)
    rows = [
        {"source": " ".join(w), "target": " ".join(reversed(w))} for w in (rng.sample(WORDS, 3) for _ in range(240))
    ]
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", rows[:200]),
        "validation": write_jsonl(tmp_path / "val.jsonl", rows[200:]),
        "test_fraction": 0.0,  # no test split: the validation split is the one predicted
        "format": "seq2seq",
    }
    run_dir, _ = train(tmp_path, config(tmp_path, data, {"name_or_path": str(model_dir), "task": "seq2seq"}))
    predictions, final = check_losses_add_up(run_dir, split="validation")
    assert len(predictions) == 40 == final["generation"]["examples"]
    assert final["generation"]["exact_match"] == pytest.approx(
        sum(r["scores"]["exact_match"] for r in predictions) / 40
    )


@pytest.mark.slow
def test_classification_predictions(tmp_path, tokenizer):
    model_dir = save_tiny_bert(tmp_path / "bert", tokenizer, positions=64)
    text = (chapters(1)[0], chapters(1, start=60)[0])
    genesis = [{"text": line, "label": "genesis"} for line in text[0].split("\n")]
    exodus = [{"text": line, "label": "exodus"} for line in text[1].split("\n")]
    data = {
        "train": write_jsonl(tmp_path / "train.jsonl", (genesis[5:] + exodus[5:]) * 3),
        "test": write_jsonl(tmp_path / "test.jsonl", genesis[:5] + exodus[:5]),
        "validation": write_jsonl(tmp_path / "val.jsonl", genesis[:5] + exodus[:5]),
        "format": "classification",
    }
    model = {"name_or_path": str(model_dir), "task": "classification"}
    run_dir, _ = train(tmp_path, config(tmp_path, data, model, lr=5e-4))
    rows, final = check_losses_add_up(run_dir)
    assert len(rows) == 10
    assert [r["label"] for r in rows] == ["genesis"] * 5 + ["exodus"] * 5
    for r in rows:
        assert set(r["probabilities"]) == {"exodus", "genesis"}
        assert sum(r["probabilities"].values()) == pytest.approx(1.0)
        assert r["predicted"] == max(r["probabilities"], key=r["probabilities"].get)
        assert r["loss"] == pytest.approx(-math.log(r["probabilities"][r["label"]]), rel=1e-4)
    assert final["test"]["accuracy"] == pytest.approx(sum(r["scores"]["correct"] for r in rows) / 10)
    cells = final["test_confusion_matrix"]["matrix"]
    labels = final["test_confusion_matrix"]["labels"]
    for r in rows:
        cells[labels.index(r["label"])][labels.index(r["predicted"])] -= 1
    assert cells == [[0, 0], [0, 0]]


def test_batched_greedy_answers_equal_one_at_a_time(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.config import GenerateConfig
    from lmforge.eval.generation import generate_each

    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
        )
    )
    prompts = ["In the beginning", "And God said, Let there be", "light", "And the evening and the morning were"]
    cfg = GenerateConfig(temperature=0.0, max_new_tokens=6)
    one = generate_each(model, tokenizer, prompts, cfg, batch_size=1)
    batched = generate_each(model, tokenizer, prompts, cfg, batch_size=4)
    assert [g.text for g in batched] == [g.text for g in one]
    assert all(g.new_tokens == 6 and g.hit_limit for g in one if tokenizer.eos_token not in g.text)


def test_eval_against_the_base_model(sft_run):
    """A LoRA run on top of the SFT run, evaluated against its base: the baseline's predictions are
    the base's own (its run's predictions.jsonl), and the comparison is of the two files."""
    tmp_path, cfg, base_run, _ = sft_run
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    lora = dict(cfg, output_dir=str(lora_dir / "runs"), model={"name_or_path": str(base_run / "final")})
    lora = {k: v for k, v in lora.items() if k != "tokenizer"} | {"lora": {"r": 4, "alpha": 8}}
    lora_run, _ = train(lora_dir, lora, cwd=tmp_path)
    out = tmp_path / "comparison"
    proc = subprocess.run(
        lmforge_command("eval", str(lora_run), "--baseline", "base", "--out", str(out), "--resamples", "200"),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["loss"] == pytest.approx(
        json.loads((lora_run / "eval.json").read_text())["test"]["loss"]
    )
    mine, theirs = read_jsonl(out / "predictions.jsonl"), read_jsonl(out / "baseline.predictions.jsonl")
    base_rows = read_jsonl(base_run / "predictions.jsonl")
    assert [r["loss_sum"] for r in theirs] == pytest.approx([r["loss_sum"] for r in base_rows], rel=1e-5)
    assert [r.get("prediction") for r in theirs] == [r.get("prediction") for r in base_rows]
    comparison = json.loads((out / "comparison.json").read_text())
    loss = comparison["metrics"]["test/loss"]
    mean = lambda rows: sum(r["loss_sum"] for r in rows) / sum(r["tokens"] for r in rows)  # noqa: E731
    assert loss["candidate"] == pytest.approx(mean(mine)) and loss["baseline"] == pytest.approx(mean(theirs))
    assert loss["low"] <= loss["difference"] <= loss["high"] and 0 < loss["p_value"] <= 1
    assert loss["better"] == (loss["difference"] < 0)
    right = lambda r: r["scores"]["exact_match"] == 1.0  # noqa: E731
    pairs = [(right(a), right(b)) for a, b in zip(mine, theirs, strict=True) if "prediction" in a]
    assert comparison["fixed"] == sum(a and not b for a, b in pairs)
    assert comparison["broken"] == sum(b and not a for a, b in pairs)
    assert "test/loss" in proc.stderr and "fixed" in proc.stderr
    # an `lmforge eval --out` directory of one model is a baseline for the report (here: the run's
    # own predictions); one holding a comparison is refused, naming both models
    from lmforge.errors import UserError
    from lmforge.eval.target import evaluate_target
    from lmforge.results.report import build_report

    with pytest.raises(UserError, match="it holds two models' predictions"):
        build_report([lora_run], tmp_path / "report.html", baseline=out)
    evaluate_target(lora_run, None, "test", None, 8, log=lambda _: None, out_dir=tmp_path / "alone")
    page = build_report([lora_run], tmp_path / "report.html", baseline=tmp_path / "alone", resamples=50).read_text()
    assert 'id="significance-table"' in page and "+0 [+0, +0]" in page
    # compared with itself: no difference, nothing fixed or broken, p = 1
    same = subprocess.run(
        lmforge_command("eval", str(lora_run), "--baseline", str(lora_run), "--out", str(tmp_path / "same")),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert same.returncode == 0, same.stderr
    itself = json.loads((tmp_path / "same" / "comparison.json").read_text())
    assert all(t["difference"] == 0 and t["p_value"] == 1.0 for t in itself["metrics"].values())
    assert itself["fixed"] == itself["broken"] == 0


def test_a_scratch_run_has_no_base_to_compare_with(sft_run):
    tmp_path, _, run_dir, _ = sft_run
    proc = subprocess.run(
        lmforge_command("eval", str(run_dir), "--baseline", "base", "--out", str(tmp_path / "x")),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 2 and "was trained from scratch" in proc.stderr and "Traceback" not in proc.stderr
