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
from lmforge.errors import UserError
from lmforge.export.card import LOCAL_DATASET_TYPE, check_license, local_base_warning, model_card
from lmforge.export.export import export_run
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
        assert "datasets" not in data  # data/train.jsonl is a local file, no Hub dataset id
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
    datasets = {r.dataset_split: (r.dataset_name, r.dataset_type) for r in card.data.eval_results}
    assert datasets == {  # validation was split off train; local files are named, their type is no Hub id
        "validation": ("train.jsonl", LOCAL_DATASET_TYPE),
        "test": ("test.jsonl", LOCAL_DATASET_TYPE),
    }
    assert card.data.model_name == "card-test"
    assert card.data.to_dict()["model-index"][0]["name"] == "card-test"


def test_a_checkpoints_card_has_no_model_index_and_says_why_it_has_no_metrics(tmp_path):
    card = load(tmp_path, model_card(run_dir(tmp_path), config(), False, checkpoint_step=20))
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "20 steps (a checkpoint taken during training)" in card.text
    metrics = card.text.split("## Final metrics")[1].split("##")[0]
    assert metrics.strip() == "No final metrics: a checkpoint taken at step 20 during training."
    full = load(tmp_path, model_card(run_dir(tmp_path / "full"), config(), False)).text
    assert "| split | metric | value |\n|---|---|---|\n| validation | loss | 2.5000 |" in full


def test_datasets_name_hub_ids_only_and_the_model_index_names_local_files(tmp_path):
    train = ["hub:org/corpus:train", {"path": "more/extra.csv", "weight": 2.0}, "shards/*.jsonl"]
    cfg = config(train=train, test="hub:org/corpus:test", validation="data/spelling.jsonl")
    card = load(tmp_path, model_card(run_dir(tmp_path), cfg, False))
    assert card.data.datasets == ["org/corpus"]  # the Hub links these as dataset ids: no file names
    assert "more/extra.csv" in card.text  # the body still names every source
    datasets = {r.dataset_split: (r.dataset_name, r.dataset_type) for r in card.data.eval_results}
    assert datasets == {
        "validation": ("spelling.jsonl", LOCAL_DATASET_TYPE),
        "test": ("org/corpus", "org/corpus"),
    }


@pytest.mark.parametrize("value", ["mit", "apache-2.0", "cc-by-4.0", "llama3", "other", "gpl-3.0+"])
def test_a_hub_licence_id_is_accepted(value):
    assert check_license(value) == value


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("MIT", "Hub licence ids are lowercase; use --license mit"),
        ("Apache-2.0", "use --license apache-2.0"),
        ("not a license!!", "give one such as --license mit"),
        ("", "give one such as --license mit"),
        ("-mit", "give one such as --license mit"),
    ],
)
def test_a_licence_that_is_no_hub_id_is_refused_with_the_fix(value, fix):
    with pytest.raises(UserError, match="^--license ") as refused:
        check_license(value)
    assert repr(value) in str(refused.value) and fix in str(refused.value)


def test_export_refuses_a_bad_licence_before_reading_the_run(tmp_path):
    with pytest.raises(UserError, match="use --license mit"):  # not "no such file": nothing was read
        export_run(tmp_path / "nowhere", tmp_path / "out", license="MIT")
    assert not (tmp_path / "out").exists()


def test_a_model_trained_from_scratch_is_worded_as_such(tmp_path):
    text = load(tmp_path, model_card(run_dir(tmp_path), config(base=None), False)).text
    use = text.split("## Intended use")[1].split("##")[0]
    assert "trained from scratch" in use and "licence of its training data" in use
    assert "fine-tuned" not in use and "base model" not in use
    tuned = load(tmp_path, model_card(run_dir(tmp_path / "b"), config(), False)).text
    assert "fine-tuned" in tuned.split("## Intended use")[1].split("##")[0]


def test_an_adapter_of_a_local_base_says_so_where_it_is_loaded(tmp_path):
    base = tmp_path / "my-base"
    base.mkdir()
    record = {"path": str(base), "given_as": "my-base", "fingerprint": None}
    run = run_dir(tmp_path, base_record=record)
    warning = local_base_warning(run)
    assert warning is not None and str(base) in warning and "--merge-lora" in warning
    adapter = load(tmp_path, model_card(run, config(base=str(base), lora=True), True)).text
    how = adapter.split("## How to load")[1].split("```")[0]
    assert how.strip() == f"**Note:** {warning}"
    merged = load(tmp_path, model_card(run, config(base=str(base), lora=True), False)).text
    assert "**Note:**" not in merged  # merged into the base: it stands alone


def test_no_local_base_warning_for_a_hub_base_or_without_an_adapter(tmp_path):
    hub = run_dir(tmp_path / "hub", base_record={"path": "org/base", "given_as": "org/base", "fingerprint": None})
    assert local_base_warning(hub) is None
    assert local_base_warning(run_dir(tmp_path / "full")) is None
    assert "**Note:**" not in model_card(hub, config(lora=True), True)


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
