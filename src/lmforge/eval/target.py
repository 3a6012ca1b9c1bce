"""Evaluating and sampling from what training produced: a run directory or a model directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import yaml

from lmforge.config import Config, DataConfig
from lmforge.data.prepare import prepare_data, tokenize_files
from lmforge.data.sources import resolve_paths
from lmforge.errors import UserError
from lmforge.eval.evaluate import evaluate
from lmforge.models.build import load_pretrained, task_of
from lmforge.models.peft import adapter_base, is_adapter_dir
from lmforge.models.tokenizer import load_tokenizer


def load_target(target: Path):
    """(model, tokenizer, run config or None) from a run directory or an HF model directory."""
    target = Path(target)
    run_config = None
    model_dir = target
    if (target / "config.yaml").is_file() and (target / "final").is_dir():
        model_dir = target / "final"
        run_config = Config.model_validate(yaml.safe_load((target / "config.yaml").read_text()))
    elif not (target / "config.json").is_file():
        raise UserError(f"{target}: neither a run directory (with final/) nor a model directory (with config.json)")
    model = load_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, need_eos=task_of(model_dir) != "classification")
    return model, tokenizer, run_config


def load_model_dir(model_dir: Path):
    """A full model directory, or an adapter directory on top of its base model."""
    if not is_adapter_dir(model_dir):
        return load_pretrained(model_dir, task=task_of(model_dir))
    from peft import PeftModel

    base_path = adapter_base(model_dir)
    task = task_of(model_dir)  # the base's config is saved beside the adapter
    labels = None
    if task == "classification":
        id2label = json.loads((model_dir / "config.json").read_text())["id2label"]
        labels = [id2label[str(i)] for i in range(len(id2label))]
    base = load_pretrained(base_path, task=task, labels=labels)
    return PeftModel.from_pretrained(base, str(model_dir))


def evaluate_target(
    target: Path,
    data: list[str] | None,
    split: str,
    max_length: int | None,
    batch_size: int,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Metrics of a trained model on files (`data`) or on its run's own split."""
    model, tokenizer, run_config = load_target(target)
    if data:
        data_cfg = run_config.data if run_config else DataConfig(train=data)
        if max_length:
            data_cfg = data_cfg.model_copy(update={"max_length": max_length})
        dataset = tokenize_files(resolve_paths(data, "--data"), data_cfg, tokenizer)
    else:
        if run_config is None:
            raise UserError(f"{target} is a model directory, not a run: pass --data FILE to evaluate on")
        if max_length:
            run_config.data.max_length = max_length
        prepared = prepare_data(run_config, log=log)
        if split not in prepared.splits:
            raise UserError(f"the run has no {split!r} split; known: {', '.join(prepared.splits)}")
        dataset = prepared.splits[split]
    task = task_of(model_dir_of(target))
    labels = list(model.config.id2label.values()) if task == "classification" else None
    return evaluate(model, dataset, tokenizer.pad_token_id, batch_size, task=task, num_labels=len(labels or []) or None)


def model_dir_of(target: Path) -> Path:
    target = Path(target)
    return target / "final" if (target / "final").is_dir() and (target / "config.yaml").is_file() else target
