"""The model card's Hub metadata, read back with huggingface_hub's own ModelCard.load: the base
model and its relation for every kind of model, pipeline tags per task, datasets, licence, and the
model-index equal to eval.json. Run directories are written by hand here (eval.json,
data_report.json, lmforge_base.json as runs write them); tests/integration/test_model_card_exports.py
checks the same on real runs and exports."""

import json
import math
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from lmforge.config import Config
from lmforge.export.card import model_card
from lmforge.secrets import REDACTED

EVAL = {
    "step": 40,
    "stop_reason": "max_steps",
    "validation": {"step": 40, "loss": 2.5, "perplexity": 12.182493960703473, "token_accuracy": 0.25, "tokens": 900},
    "test": {"loss": 2.75, "perplexity": 15.642631884188171, "token_accuracy": 0.2, "tokens": 800},
    "generation": {"split": "test", "exact_match": 0.125, "bleu": 3.5, "examples": 8},
}
REPORT = {
    "max_length": 64,
    "packing": True,
    "working_dir": "/nowhere",
    "splits": {
        "train": {
            "records": 120,
            "examples": 118,
            "dropped": {"empty": 1, "too_long": 1},
            "truncated": 3,
            "split_into_pieces": 0,
            "tokens": 5000,
            "trained_tokens": 2400,
            "rows": 80,
        },
        "test": {
            "records": 10,
            "examples": 10,
            "dropped": {},
            "truncated": 0,
            "split_into_pieces": 0,
            "tokens": 400,
            "trained_tokens": 200,
            "rows": 7,
        },
    },
}


def config(task: str = "causal-lm", base: str | None = "org/base", lora: bool = False, **data) -> Config:
    fmt = {"causal-lm": "prompt-completion", "seq2seq": "seq2seq", "classification": "classification"}[task]
    model = {"task": task, **({"name_or_path": base} if base else {"preset": "llama-tiny"})}
    raw = {"name": "card-test", "model": model, "data": {"train": "data/train.jsonl", "format": fmt, **data}}
    if lora:
        raw["lora"] = {"r": 4}
    return Config.model_validate(raw)


def run_dir(tmp_path: Path, eval_json: dict | None = None, base_record: dict | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps(EVAL if eval_json is None else eval_json))
    (run / "data_report.json").write_text(json.dumps(REPORT))
    if base_record:
        (run / "lmforge_base.json").write_text(json.dumps(base_record))
    return run


def load(tmp_path: Path, text: str) -> ModelCard:
    path = tmp_path / "README.md"
    path.write_text(text)
    return ModelCard.load(path)


def test_an_adapter_a_merge_and_a_fine_tune_of_a_hub_model_name_it_with_their_relation(tmp_path):
    record = {"path": "org/base", "given_as": "org/base", "fingerprint": None}
    run = run_dir(tmp_path, base_record=record)
    cases = [  # (LoRA run, saved as adapter) -> relation, library, tags
        (True, True, "adapter", "peft", ["lmforge", "causal-lm", "lora"]),
        (True, False, "merge", "transformers", ["lmforge", "causal-lm"]),
        (False, False, "finetune", "transformers", ["lmforge", "causal-lm"]),
    ]
    for lora, adapter_only, relation, library, tags in cases:
        data = load(tmp_path, model_card(run, config(lora=lora), adapter_only)).data.to_dict()
        assert data["base_model"] == "org/base"
        assert data["base_model_relation"] == relation
        assert data["library_name"] == library
        assert data["tags"] == tags
        assert data["pipeline_tag"] == "text-generation"
        assert data["datasets"] == ["train.jsonl"]
        assert "license" not in data  # none given, and the base's card is not on this machine


def test_a_model_trained_from_scratch_has_no_base_and_no_relation(tmp_path):
    data = load(tmp_path, model_card(run_dir(tmp_path), config(base=None), False)).data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"


def test_a_local_base_is_named_in_the_text_only_and_its_licence_is_carried(tmp_path):
    """The Hub refuses a base_model that is no model id; a local base's README.md licence still counts."""
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\n---\n# my base\n")
    record = {"path": str(base), "given_as": "my-base", "fingerprint": "ab" * 32}
    card = load(tmp_path, model_card(run_dir(tmp_path, base_record=record), config(base=str(base), lora=True), True))
    data = card.data.to_dict()
    assert "base_model" not in data and "base_model_relation" not in data
    assert data["license"] == "mit"
    assert f"- **Base model:** {base} (given as my-base; weights fingerprint abababababab)" in card.text
    given = load(tmp_path, model_card(run_dir(tmp_path / "b"), config(base=str(base)), False, license="apache-2.0"))
    assert given.data.license == "apache-2.0"  # the caller's licence wins


@pytest.mark.parametrize(
    ("task", "tag"),
    [("causal-lm", "text-generation"), ("seq2seq", "text2text-generation"), ("classification", "text-classification")],
)
def test_the_pipeline_tag_and_the_model_index_task_follow_model_task(tmp_path, task, tag):
    card = load(tmp_path, model_card(run_dir(tmp_path), config(task=task), False))
    assert card.data.pipeline_tag == tag
    assert card.data.tags == ["lmforge", task]
    assert {result.task_type for result in card.data.eval_results} == {tag}


def test_the_model_index_holds_every_final_metric_of_eval_json_and_nothing_else(tmp_path):
    final = json.loads(json.dumps(EVAL))
    final["test"]["accuracy"] = float("nan")  # a classifier's accuracy over no examples: no number to publish
    card = load(tmp_path, model_card(run_dir(tmp_path, final), config(test="data/test.jsonl"), False))
    got = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    expected = {
        (final[section].get("split", section), name): value
        for section in ("validation", "test", "generation")
        for name, value in final[section].items()
        if isinstance(value, float) and math.isfinite(value)
    }
    assert got == expected
    assert len(got) == 8 and got[("test", "bleu")] == 3.5 and got[("validation", "loss")] == 2.5
    datasets = {r.dataset_split: r.dataset_type for r in card.data.eval_results}
    assert datasets == {"validation": "train.jsonl", "test": "test.jsonl"}  # validation was split off train
    assert card.data.model_name == "card-test"
    assert card.data.to_dict()["model-index"][0]["name"] == "card-test"


def test_a_checkpoints_card_has_no_model_index(tmp_path):
    card = load(tmp_path, model_card(run_dir(tmp_path), config(), False, checkpoint_step=20))
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "20 steps (a checkpoint taken during training)" in card.text


def test_datasets_name_hub_ids_and_files_and_leave_globs_out(tmp_path):
    train = ["hub:org/corpus:train", {"path": "more/extra.csv", "weight": 2.0}, "shards/*.jsonl"]
    data = load(tmp_path, model_card(run_dir(tmp_path), config(train=train, test="hub:org/corpus:test"), False))
    assert data.data.datasets == ["org/corpus", "extra.csv"]


def test_the_data_report_is_summarised_per_split(tmp_path):
    text = load(tmp_path, model_card(run_dir(tmp_path), config(), False)).text
    assert "| train | 120 | 118 | 2 (1 empty, 1 too_long) | 3 | 5,000 | 2,400 |" in text
    assert "| test | 10 | 10 | 0 | 0 | 400 | 200 |" in text
    assert "truncated at max length 64" in text


def test_no_credential_reaches_the_card(tmp_path, monkeypatch):
    secret = "hf_" + "a1B2" * 8
    monkeypatch.setenv("MY_SERVICE_TOKEN", "s3cr3t-value-123")
    cfg = config(train=f"https://user:{secret}@example.com/data.jsonl")
    cfg.data.template = "Use s3cr3t-value-123: {prompt}"  # an environment secret inside a config value
    text = model_card(run_dir(tmp_path), cfg, False)
    assert secret not in text and "s3cr3t-value-123" not in text and REDACTED in text
    card = load(tmp_path, text)  # still parses: redaction never breaks the YAML
    assert card.data.pipeline_tag == "text-generation"
