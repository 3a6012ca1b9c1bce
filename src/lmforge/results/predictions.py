"""Per-example results: every evaluated example with its input, reference, greedy prediction, loss
and scores, streamed to predictions.jsonl.

One line per record of the evaluated split that training would have kept (a record the data
settings drop is not an example; a document cut into several pieces is one line, its loss summed
over the pieces). Records are read, encoded exactly as training encodes them, scored and written a
chunk at a time: nothing holds the whole split, and no batch's full logits exist for a causal LM
with a plain head (`eval.evaluate.score_rows`).

A line holds:
  index, id (the record's own "id" field, else its file:line), where (file:line), input, reference,
  loss (nats per target token), loss_sum, tokens (target tokens), token_accuracy, pieces (examples);
  with a greedy answer (`eval.generate.max_examples` first generative records): prediction,
  new_tokens, truncated (hit max_new_tokens), empty, repetitive, and scores {exact_match, bleu,
  chrf, rouge1, rouge2, rougeL, plugin values, judge_<criterion> (eval.judge, for the answers it
  graded)};
  for classifiers: label, predicted, probabilities {label: p}, and scores {correct, plugin values}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.config import DataConfig, EvalConfig, JudgeConfig
from lmforge.data.loader import collate, collate_encoder, to_device
from lmforge.data.prepare import row_bos
from lmforge.data.sources import Record
from lmforge.data.tokenize import Counts, Example, prompt_and_reference, record_examples
from lmforge.engine.losses import scoring_chunk_size
from lmforge.errors import UserError
from lmforge.eval.evaluate import score_rows
from lmforge.eval.generation import generate_each, held_out_prompt
from lmforge.eval.judge import judge_answers, metric_name
from lmforge.eval.metrics import generation_summary, is_repetitive, sentence_scores
from lmforge.results.plugins import Plugin, run_plugins

PREDICTIONS = "predictions.jsonl"
BUILT_IN_METRICS = frozenset(
    {"exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "empty", "truncated", "repetitive", "examples"}
    | {"split", "loss", "perplexity", "token_accuracy", "tokens", "accuracy", "macro_f1", "correct"}
)
"""Names lmforge's own metrics and counts use: a plugin may not return them (it would overwrite them)."""
RECORDS_PER_CHUNK = 256
INPUT_CHARS = 2000
"""A document's input is kept to its first 2000 characters (its id names the whole of it)."""


@dataclass
class PredictionSummary:
    """What a predictions pass found, for eval.json: counts and corpus metrics."""

    split: str
    examples: int = 0
    """Lines written (records kept)."""
    pieces: int = 0
    """Examples, counting each piece of a long document (the data report's count)."""
    dropped: dict[str, int] = field(default_factory=dict)
    generation: dict[str, float] = field(default_factory=dict)
    """Corpus generation metrics of the greedy answers (and their counts), plugin values included."""
    classification: dict[str, float] = field(default_factory=dict)
    """Plugin values of a classifier's predictions."""
    plugin_errors: dict[str, str] = field(default_factory=dict)
    """Plugin name -> what it raised."""
    judge: dict[str, Any] = field(default_factory=dict)
    """eval.judge's counts: {graded, unparsable, failed, model} (its means are generation metrics)."""


@dataclass
class _Item:
    record: Record
    examples: list[Example]
    sample: dict[str, Any]
    loss: float = 0.0
    tokens: int = 0
    correct: int = 0
    probabilities: list[float] | None = None


def write_predictions(
    path: Path,
    model: nn.Module,
    tokenizer,
    records: Iterable[Record],
    data: DataConfig,
    eval_cfg: EvalConfig,
    split: str,
    labels: list[str] | None = None,
    seed: int = 0,
    hints: dict | None = None,
    plugins: list[Plugin] | None = None,
    warn: Callable[[str], None] = print,
) -> PredictionSummary:
    """Score every record of `records` with `model` and write predictions.jsonl to `path` (written
    aside and renamed, so a crash leaves no half file).

    Args:
        records: the evaluated split's records, as `prepare.split_records` streams them.
        data: the data settings that encode them (the run's).
        labels: a classifier's class names, in id order.
        hints: `generation.read_hints` / `hints_of`: where greedy answers stop.
        plugins: `plugins.load_plugins(eval.metrics_plugins)`; one that raises is reported in the
            summary's plugin_errors and `warn`, and loses nothing else.
        eval_cfg: with a judge (eval.judge), the greedy answers are also graded by it
            (`eval.judge.judge_answers`); what it could not grade is counted, never fatal.

    Returns:
        The counts and corpus metrics for eval.json.
    """
    task = "classification" if data.format == "classification" else "seq2seq" if data.format == "seq2seq" else None
    task = task or "causal-lm"
    summary = PredictionSummary(split)
    counts = Counts()
    generated: list[dict] = []
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as out:
        index = 0
        for chunk in _chunks(records, RECORDS_PER_CHUNK):
            items = _encode(chunk, data, tokenizer, labels, counts)
            _score(model, items, task, tokenizer.pad_token_id, eval_cfg.batch_size or 8)
            rows = [_row(index + i, item, labels) for i, item in enumerate(items)]
            if task != "classification" and data.format != "text":
                room = max(0, eval_cfg.generate.max_examples - len(generated))
                _answer(model, tokenizer, rows[:room], items[:room], eval_cfg, seed, hints)
                generated += rows[:room]
            for row in rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            index += len(rows)
        summary.examples, summary.pieces = index, counts.examples
    summary.dropped = dict(counts.dropped)
    if generated:
        summary.generation = generation_summary(generated)
    reserved = BUILT_IN_METRICS
    if eval_cfg.judge is not None and generated:
        _apply_judge(tmp, eval_cfg.judge, generated, summary, warn)
        reserved = reserved | {metric_name(c) for c in eval_cfg.judge.criteria}
    if plugins:
        scored = generated if task != "classification" else None
        _apply_plugins(tmp, plugins, scored, summary, task, warn, reserved)
    tmp.replace(path)
    return summary


def _chunks(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _encode(records: list[Record], data: DataConfig, tokenizer, labels, counts: Counts) -> list[_Item]:
    """The records training would keep, with their examples (encoded as training does) and their
    prompt and reference."""
    label_ids = {name: i for i, name in enumerate(labels)} if labels else None
    add_bos = row_bos(tokenizer, data)
    items = []
    for record in records:
        if record.problem is not None:
            counts.dropped[record.reason or "unreadable"] += 1
            continue
        examples = record_examples(record, data, tokenizer, add_bos, counts, label_ids)
        if examples:
            items.append(_Item(record, examples, prompt_and_reference(record, data, tokenizer) or {}))
    return items


@torch.no_grad()
def _score(model: nn.Module, items: list[_Item], task: str, pad_id: int, batch_size: int) -> None:
    """Each item's summed loss, targets, hits (and class probabilities), its pieces scored one per
    row in batches of similar length."""
    device = next(model.parameters()).device
    chunk_size = scoring_chunk_size("auto", model, task)
    pieces = [(item, example) for item in items for example in item.examples]
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i][1].input_ids))  # little padding
    was_training = model.training
    model.eval()
    for first in range(0, len(order), batch_size):
        batch_pieces = [pieces[i] for i in order[first : first + batch_size]]
        batch = to_device(_collate([e for _, e in batch_pieces], task, pad_id), device)
        scores = score_rows(model, batch, task, chunk_size)
        loss, targets, correct = (t.tolist() for t in (scores.loss, scores.targets, scores.correct))
        probabilities = scores.probabilities.tolist() if scores.probabilities is not None else None
        for j, (item, _) in enumerate(batch_pieces):
            item.loss += loss[j]
            item.tokens += int(targets[j])
            item.correct += int(correct[j])
            if probabilities is not None:
                item.probabilities = probabilities[j]
    model.train(was_training)


def _collate(examples: list[Example], task: str, pad_id: int) -> dict[str, torch.Tensor]:
    if task == "causal-lm":
        rows = [{"input_ids": e.input_ids, "labels": e.labels, "lengths": [len(e.input_ids)]} for e in examples]
        return collate(rows, pad_id)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "num_tokens": len(e.input_ids)} for e in examples]
    return collate_encoder(rows, pad_id, task)


def _row(index: int, item: _Item, labels: list[str] | None) -> dict[str, Any]:
    record, sample = item.record, item.sample
    row: dict[str, Any] = {"index": index, "id": str(record.fields.get("id", record.where)), "where": record.where}
    if "text" in sample:  # a document: per-document loss
        row["input"] = sample["text"][:INPUT_CHARS]
    else:
        row["input"], row["reference"] = sample.get("prompt", ""), sample.get("reference")
    row["loss"] = item.loss / item.tokens if item.tokens else float("nan")
    row.update(loss_sum=item.loss, tokens=item.tokens, token_accuracy=item.correct / max(item.tokens, 1))
    row["pieces"] = len(item.examples)
    if labels is not None and item.probabilities is not None:
        truth = labels[int(item.examples[0].labels[0])]
        predicted = labels[int(np.argmax(item.probabilities))]
        row.update(label=truth, predicted=predicted, prediction=predicted, reference=truth)
        row["probabilities"] = dict(zip(labels, item.probabilities, strict=True))
        row["scores"] = {"correct": float(predicted == truth)}
    return row


def _answer(model, tokenizer, rows: list[dict], items: list[_Item], eval_cfg: EvalConfig, seed: int, hints) -> None:
    """Greedy answers to the rows' prompts, batched, with their per-example scores."""
    if not rows:
        return
    cfg = eval_cfg.generate.model_copy(update={"temperature": 0.0})
    hints = hints or {}
    if hints.get("stop"):
        cfg = cfg.model_copy(update={"stop": [*cfg.stop, *(s for s in hints["stop"] if s not in cfg.stop)]})
    prompts = [held_out_prompt(item.sample, tokenizer, cfg) for item in items]
    batch_size = eval_cfg.batch_size or 8
    answers = generate_each(model, tokenizer, prompts, cfg, seed, hints.get("answer_starts"), batch_size)
    for row, answer in zip(rows, answers, strict=True):
        row.update(prediction=answer.text, new_tokens=answer.new_tokens, truncated=answer.hit_limit)
        row.update(empty=not answer.text.strip(), repetitive=is_repetitive(answer.text))
        row["scores"] = sentence_scores(answer.text, row["reference"])


def _apply_judge(path: Path, judge: JudgeConfig, generated: list[dict], summary: PredictionSummary, warn) -> None:
    """The judge's grades of the greedy answers: per example in the rows of `path` (rewritten),
    their means in the summary's generation metrics, its counts in the summary's judge."""
    judged = judge_answers(generated, judge, warn)
    summary.judge = judged.counts()
    summary.generation.update(judged.means)
    if judged.graded:
        _rewrite(path, generated)


def _apply_plugins(
    path: Path,
    plugins: list[Plugin],
    generated: list[dict] | None,
    summary: PredictionSummary,
    task: str,
    warn,
    reserved: frozenset[str] = BUILT_IN_METRICS,
) -> None:
    """Run each plugin on the predictions, put its values in the summary and (per example) in the
    rows of `path`, rewritten."""
    if task == "classification":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        scored = rows
    else:
        rows, scored = None, generated or []
    if not scored:
        warn("eval.metrics_plugins: no example was answered (eval.generate.max_examples is 0): the plugins did not run")
        return
    corpus, per_example, errors = run_plugins(
        plugins,
        [r["prediction"] for r in scored],
        [r["reference"] for r in scored],
        [r["input"] for r in scored],
        reserved=reserved,
    )
    for name, message in errors.items():
        warn(f"eval.metrics_plugins: {name} failed: {message}; the other results are kept")
    summary.plugin_errors = errors
    (summary.classification if task == "classification" else summary.generation).update(corpus)
    if not per_example:
        return
    for i, row in enumerate(scored):
        row.setdefault("scores", {}).update({k: v[i] for k, v in per_example.items()})
    _rewrite(path, scored, rows)


def _rewrite(path: Path, changed: list[dict], rows: list[dict] | None = None) -> None:
    """`path` with the lines of the `changed` rows (by index) replaced by them; `rows`: all of
    its rows, when they are already read."""
    by_index = {r["index"]: r for r in changed}
    lines = path.read_text(encoding="utf-8").splitlines() if rows is None else None
    with path.open("w", encoding="utf-8") as out:
        for row in rows if rows is not None else (json.loads(line) for line in lines):
            out.write(json.dumps(by_index.get(row["index"], row), ensure_ascii=False) + "\n")


REQUIRED = {"index": int, "id": str, "input": str, "loss_sum": (int, float), "tokens": int}
"""What every line holds, with its type (what the analyses read)."""


def read_predictions(path: Path) -> list[dict]:
    """The rows of a predictions.jsonl.

    Raises:
        UserError: a line that is not a JSON object, named file:line.
    """
    rows = []
    for number, row in enumerate(read_jsonl(Path(path)), start=1):
        missing = [k for k in REQUIRED if not isinstance(row.get(k), REQUIRED[k])]
        if "prediction" in row and not isinstance(row["prediction"], str):
            missing.append("prediction")
        if missing:
            fields = ", ".join(missing)
            raise UserError(f"{path}:{number}: {fields} missing or of the wrong type; not a line lmforge wrote")
        rows.append(row)
    return rows


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSONL file (lmforge's metrics.jsonl, predictions.jsonl); a last line
    without its newline that does not parse was cut off by a crash and is passed over.

    Raises:
        UserError: any other line that is not a JSON object with the `required` keys (file:line).
    """
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                return
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict) or any(k not in record for k in required):
            keys = f" with {', '.join(required)}" if required else ""
            raise UserError(f"{path}:{number}: expected a JSON object{keys}, found {line[:80]}")
        yield record
