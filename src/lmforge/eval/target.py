"""Evaluating and sampling from what training produced: a run directory or a model directory."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

from transformers import AutoConfig

from lmforge.config import DataConfig, EvalConfig, override_data, saved_config
from lmforge.data.prepare import prepare_data, split_records, tokenize_files
from lmforge.data.sources import read_records, resolve_paths
from lmforge.engine.checkpoint import MANIFEST, latest_valid, verify
from lmforge.errors import DataError, UserError
from lmforge.eval.evaluate import evaluate
from lmforge.eval.generation import read_hints
from lmforge.models.build import DTYPES, load_pretrained, task_of
from lmforge.models.peft import adapter_base, is_adapter_dir
from lmforge.models.tokenizer import load_tokenizer
from lmforge.results.analysis import compare
from lmforge.results.plugins import load_plugins
from lmforge.results.predictions import PREDICTIONS, read_predictions, write_predictions


def load_target(target: Path):
    """(model, tokenizer, run config or None) from what a command was pointed at: a finished run
    (its final/), a paused or crashed run (its newest valid checkpoint), a checkpoint directory,
    or a Hugging Face model directory (full or adapter).

    Raises:
        UserError: naming what `target` is and what was expected.
    """
    target = Path(target)
    kind, model_dir = resolve_target(target)
    if kind == "checkpoint":
        return load_checkpoint_dir(model_dir)
    run_config = None
    if kind == "run":
        run_config = saved_config(target / "config.yaml")
    elif (model_dir / "lmforge_config.yaml").is_file():  # an export carries its run's config
        run_config = saved_config(model_dir / "lmforge_config.yaml")
    model = load_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, need_eos=task_of(model_dir) != "classification")
    return model, tokenizer, run_config


def resolve_target(target: Path) -> tuple[str, Path]:
    """("run", its final/), ("checkpoint", a checkpoint directory) or ("model", the directory).
    A command asks several times; a checkpoint's sha256 check runs once per process.

    Raises:
        UserError: `target` is none of these.
    """
    return _resolve(str(Path(target).resolve()))


@functools.lru_cache(maxsize=16)
def _resolve(path: str) -> tuple[str, Path]:
    target = Path(path)
    if not target.exists():
        raise UserError(f"{target}: no such file or directory (looked for {target.resolve()})")
    if (target / "config.yaml").is_file() and (target / "final").is_dir():
        return "run", target / "final"
    if (target / MANIFEST).is_file() or target.name.startswith("step-"):
        problem = verify(target)
        if problem is not None:
            raise UserError(f"{target}: not a usable checkpoint: {problem}")
        return "checkpoint", _model_checkpoint(target)
    if (target / "config.yaml").is_file() and (target / "checkpoints").is_dir():  # paused or crashed
        checkpoint = latest_valid(target / "checkpoints", lambda message: None)  # (verified)
        if checkpoint is None:
            raise UserError(f"{target}: the run has neither final/ nor a valid checkpoint yet")
        return "checkpoint", _model_checkpoint(checkpoint.path)
    if (target / "config.json").is_file():
        return "model", target
    raise UserError(
        f"{target}: neither a run directory (with final/ or checkpoints/), a checkpoint, nor a model "
        "directory (with config.json)"
    )


def _model_checkpoint(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise UserError(
            f"{path}: this checkpoint was written by an older lmforge, without its model config; resume "
            "the run from it (lmforge train CONFIG --resume ...) or use the run's final/"
        )
    return path


def load_checkpoint_dir(path: Path):
    """(model, tokenizer, run config) of a checkpoint: the architecture from its config.json (with
    the run's adapters when it trained LoRA) and every weight from its model.safetensors, no base
    model read; or, for a checkpoint of an adapter run's trainable weights, its base model (checked
    against the checkpoint's record of it, so a moved or changed base cannot slip in) under them.

    Raises:
        UserError: the weights do not fit; the base is gone or changed (`peft.verify_base`).
    """
    from lmforge.engine.checkpoint import holds_trainable_only, load_weights
    from lmforge.models.build import AUTO_CLASSES
    from lmforge.models.peft import BASE_FILE, verify_base

    run_config = saved_config(path / "config.yaml")
    task = task_of(path)
    if holds_trainable_only(path):
        record = json.loads((path / BASE_FILE).read_text())
        base = verify_base(record, path, path / BASE_FILE)
        labels = None
        if task == "classification":  # the run's classes, in its head's order, as the checkpoint's config.json has them
            id2label = json.loads((path / "config.json").read_text())["id2label"]
            labels = [id2label[str(i)] for i in range(len(id2label))]
        dtype = DTYPES.get(run_config.model.dtype)
        model = load_pretrained(base, dtype, run_config.model.trust_remote_code, task, labels)
    else:
        model = AUTO_CLASSES[task].from_config(AutoConfig.from_pretrained(str(path)))
    if run_config.lora is not None:
        from lmforge.models.peft import apply_lora

        model = apply_lora(model, run_config)
    try:
        load_weights(path, model)
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not fit the saved model config ({str(exc)[:300]})") from None
    model.config.use_cache = True
    tokenizer = load_tokenizer(path, need_eos=task != "classification")
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
    overrides: list[str] | None = None,
    out_dir: Path | None = None,
    baseline: Path | str | None = None,
    resamples: int = 1000,
) -> dict[str, float]:
    """Metrics of a trained model on files (`data`) or on its run's own split; with `out_dir`, also
    its predictions.jsonl there, and with `baseline` the baseline's (baseline.predictions.jsonl, on
    the same records encoded the same way) and comparison.json (`results.analysis.compare`).

    Args:
        overrides: dotted data.* settings (data.text_field=body) over the run's data settings, or
            over the defaults for the model's task when `target` is a bare model directory.
        baseline: a run, checkpoint or model directory, or "base": the run's model.name_or_path
            (the model before fine-tuning).
        resamples: of the paired bootstrap (0: no significance test).

    Raises:
        UserError: a target, a split, a baseline or data that cannot be evaluated, named with the fix.
    """
    model, tokenizer, run_config = load_target(target)
    task = task_of(model_dir_of(target))
    settings = run_config.data if run_config else DataConfig(train=data or "-", format=DEFAULT_FORMATS[task])
    if max_length:
        settings = settings.model_copy(update={"max_length": max_length})
    settings = override_data(settings, overrides or [])
    labels = [model.config.id2label[i] for i in range(len(model.config.id2label))] if task == "classification" else None
    other = _load_baseline(baseline, target, run_config, task, labels) if baseline is not None else None
    eval_cfg = (run_config.eval if run_config else EvalConfig()).model_copy(update={"batch_size": batch_size})
    plugins = []
    if out_dir is not None and eval_cfg.metrics_plugins:  # imported before the long passes, as training does
        with run_working_dir(target) if run_config else nullcontext():
            plugins = load_plugins(eval_cfg.metrics_plugins)
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        _check_out_dir(out_dir)
    dataset, split, records, where = _evaluated(target, data, split, settings, run_config, tokenizer, labels, log)
    metrics = evaluate(
        model, dataset, tokenizer.pad_token_id, batch_size, task=task, num_labels=len(labels or []) or None
    )
    if out_dir is None:
        return metrics
    out_dir.mkdir(parents=True, exist_ok=True)
    with where():
        hints = read_hints(model_dir_of(target))
        seed = run_config.seed if run_config else 0
        predict = functools.partial(
            write_predictions, records=None, data=settings, eval_cfg=eval_cfg, split=split, labels=labels, seed=seed,
            hints=hints, plugins=plugins, warn=log,
        )  # fmt: skip
        mine = predict(out_dir / PREDICTIONS, model, tokenizer, records=records())
        summary = {"target": str(target), "split": split, "metrics": metrics, "predictions": asdict(mine)}
        if other is not None:
            base_model, base_tokenizer, name = other
            if settings.format == "chat" and not getattr(base_tokenizer, "chat_template", None):
                base_tokenizer.chat_template = tokenizer.chat_template  # prompted as the candidate was
            theirs = predict(out_dir / BASELINE_PREDICTIONS, base_model, base_tokenizer, records=records())
            summary["baseline"] = {"target": name, "predictions": asdict(theirs)}
    (out_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    if other is not None:
        comparison = compare(
            read_predictions(out_dir / PREDICTIONS),
            read_predictions(out_dir / BASELINE_PREDICTIONS),
            labels,
            split,
            resamples,
        )
        comparison = {"candidate": str(target), "baseline": other[2], "split": split, **comparison}
        (out_dir / COMPARISON).write_text(json.dumps(comparison, indent=2, ensure_ascii=False))
    return metrics


def _evaluated(target, data, split, settings, run_config, tokenizer, labels, log):
    """(the tokenized dataset, the split's name, a function streaming its records again, a context
    in which their paths resolve): the --data files, or the run's own split.

    Raises:
        UserError: a model directory without --data, or a split the run does not have.
    """
    if data:
        paths = resolve_paths(data, "--data")
        dataset = tokenize_files(paths, settings, tokenizer, labels)
        return dataset, "data", lambda: (r for p in paths for r in read_records(p, settings.txt_documents)), nullcontext
    if run_config is None:
        raise UserError(f"{target} is a model directory, not a run: pass --data FILE to evaluate on")
    run_config.data = settings
    with run_working_dir(target):
        try:
            prepared = prepare_data(run_config, log=log)
        except DataError as exc:
            raise DataError(f"{exc}; or evaluate on other files with --data FILE") from None
    if split not in prepared.splits:
        raise UserError(f"the run has no {split!r} split; known: {', '.join(prepared.splits)}")
    return prepared.splits[split], split, lambda: split_records(settings, split), lambda: run_working_dir(target)


def _check_out_dir(out_dir: Path) -> None:
    """Raises UserError for an --out that is a run, checkpoint or model directory: its eval.json
    (or config) would be overwritten."""
    for marker, what in (("config.yaml", "a run or checkpoint"), ("config.json", "a model"), ("trial.yaml", "a trial")):
        if (out_dir / marker).is_file():
            raise UserError(
                f"--out {out_dir}: that is {what} directory; writing there would replace its eval.json: "
                "give a new directory (default: runs/evaluations/NAME-TIME/)"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: a file, not a directory")
    earlier = out_dir / "eval.json"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (earlier.is_file() and '"target"' in earlier.read_text()):
        raise UserError(
            f"--out {out_dir}: not empty and not an earlier evaluation; give a new directory "
            "(an earlier `lmforge eval --out` directory is replaced)"
        )


BASELINE_PREDICTIONS = "baseline.predictions.jsonl"
COMPARISON = "comparison.json"


def _base_of(target: Path, run_config) -> Path:
    """The model a run was fine-tuned from: the directory its adapter recorded at training time (a
    `-latest` link may have moved on since), else its model.name_or_path as the run resolves it.

    Raises:
        UserError: a run trained from scratch.
    """
    from lmforge.models.peft import BASE_FILE

    model_dir = model_dir_of(target)
    for record in (model_dir / BASE_FILE, model_dir.parent / BASE_FILE, model_dir.parent.parent / BASE_FILE):
        if record.is_file():
            return Path(json.loads(record.read_text())["path"])
    base = run_config.model.name_or_path if run_config else None
    if not base:
        why = "was trained from scratch" if run_config else "is a model directory with no record of a base"
        raise UserError(f"--baseline base: {target} {why}; it has no base model to compare with")
    with run_working_dir(target):
        return Path(base).resolve()


def _load_baseline(baseline: Path | str, target: Path, run_config, task: str, labels):
    """(model, tokenizer, name) of the baseline; "base" is the run's model.name_or_path.

    Raises:
        UserError: no base to take, or a baseline of another task or with other classes.
    """
    if str(baseline) == "base":
        baseline = _base_of(target, run_config)
    baseline = Path(baseline)
    if task_of(model_dir_of(baseline)) != task:
        raise UserError(f"--baseline {baseline}: a {task_of(model_dir_of(baseline))} model; {target} is {task}")
    model, tokenizer, _ = load_target(baseline)
    if labels is not None:
        theirs = [model.config.id2label[i] for i in range(len(model.config.id2label))]
        if theirs != labels:
            raise UserError(f"--baseline {baseline}: its classes {theirs} are not the candidate's {labels}")
    return model, tokenizer, str(baseline)


@contextmanager
def run_working_dir(target: Path) -> Iterator[None]:
    """Inside the directory a run was started from (data_report.json records it), where its
    config's relative data paths point; elsewhere they would point at nothing."""
    kind, model_dir = resolve_target(target)
    run_dir = model_dir.parent if kind == "run" else model_dir.parent.parent
    report = run_dir / "data_report.json"
    started = json.loads(report.read_text()).get("working_dir") if report.is_file() else None
    if not started or not Path(started).is_dir():
        yield
        return
    here = os.getcwd()
    os.chdir(started)
    try:
        yield
    finally:
        os.chdir(here)


DEFAULT_FORMATS = {"causal-lm": "text", "seq2seq": "seq2seq", "classification": "classification"}
"""The data format a bare model directory is evaluated with, by task (data.format=... changes it)."""


def model_dir_of(target: Path) -> Path:
    """The directory whose config.json describes the model `target` names."""
    return resolve_target(target)[1]
