"""Streaming evaluation: running sums over batches, never all logits at once.

Language models (causal and seq2seq): loss per target token, perplexity, token accuracy.
Classifiers: loss per example, accuracy, macro-F1, and the confusion matrix.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from torch import nn

from lmforge.data.loader import IGNORE_INDEX, eval_batches, fetch, to_device
from lmforge.engine.losses import (
    at_least_fp32,
    causal_lm_inputs,
    hidden_states_out,
    linear_cross_entropy_each,
    linear_cross_entropy_hits,
    next_token_targets,
    scoring_chunk_size,
    seq2seq_logits,
    target_rows,
)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    pad_id: int,
    batch_size: int,
    max_batches: int | None = None,
    accelerator=None,
    task: str = "causal-lm",
    num_labels: int | None = None,
    details: dict[str, Any] | None = None,
    loss_chunk_size: int | str | None = "auto",
) -> dict[str, float]:
    """Metrics of `model` on a prepared dataset.

    Only running sums stay between batches. A causal LM with a plain linear head is scored from the
    hidden states of its targets, `loss_chunk_size` rows at a time (as train.loss_chunk_size; the
    training loop passes what it resolved), so a batch's full logits never exist; other models hold
    one batch's logits at a time. Under several processes each evaluates its share of batches and
    the sums are added up.

    Args:
        details: if given, receives extras that are not single numbers (the confusion matrix).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    autocast = accelerator.autocast if accelerator else nullcontext  # the head runs outside the model's forward
    chunk_size = scoring_chunk_size(loss_chunk_size, model, task)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, targets
    confusion = torch.zeros((num_labels or 1, num_labels or 1), dtype=torch.float64, device=device)
    sums = {True: (totals, confusion), False: (totals.clone(), confusion.clone())}  # False: not scored
    for indices, counted in _in_step(eval_batches(dataset, batch_size, max_batches, rank, world), model, world):
        totals, confusion = sums[counted]
        batch = to_device(fetch(dataset, indices, pad_id, task), device)
        if task == "classification":
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"]
            loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
            predictions = logits.argmax(-1)
            confusion.index_put_((labels, predictions), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
            totals += torch.stack([loss.double(), (predictions == labels).sum().double(), torch.tensor(len(labels))])
            continue
        if task == "seq2seq":
            logits, targets = at_least_fp32(seq2seq_logits(model, batch)), batch["labels"]  # (B, T, V), (B, T)
        else:
            if chunk_size is not None:  # scored from the hidden states of the targets, chunk by chunk
                with causal_lm_inputs(model, batch) as inputs, hidden_states_out(model) as head, autocast():
                    hidden = model(**inputs).logits  # (B, T, H): the identity head passed them through
                    states, picked = target_rows(hidden, batch["labels"], batch.get("target_index"))  # (N, H), (N,)
                    loss, correct = linear_cross_entropy_hits(states, head.weight, head.bias, picked, chunk_size)
                totals += torch.stack([loss.double(), correct.double(), torch.full_like(loss, picked.numel()).double()])
                continue
            targets = next_token_targets(batch["labels"])  # (B, T)
            with causal_lm_inputs(model, batch) as inputs:  # as in training: packed examples stay isolated
                logits = at_least_fp32(model(**inputs).logits)  # (B, T, V)
        mask = targets != IGNORE_INDEX
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & mask).sum()
        totals += torch.stack([loss.double(), correct.double(), mask.sum().double()])
    totals, confusion = sums[True]
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
        confusion = accelerator.reduce(confusion, reduction="sum")
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    if task == "classification":
        matrix = confusion.long().tolist()
        if details is not None:
            details["confusion_matrix"] = matrix
        return {
            "loss": loss_sum / count if count else float("nan"),
            "accuracy": correct / count if count else float("nan"),
            "macro_f1": macro_f1(matrix),
            "examples": int(count),
        }
    if count == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
    mean = loss_sum / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "token_accuracy": correct / count,
        "tokens": int(count),
    }


@dataclass
class RowScores:
    """Per-row results of one batch whose rows are single examples."""

    loss: torch.Tensor
    """(B,) float64: the summed loss of each row's targets, in nats."""
    targets: torch.Tensor
    """(B,) target tokens of each row (1 for a classifier's row)."""
    correct: torch.Tensor
    """(B,) targets whose highest-scoring token (class) is right."""
    probabilities: torch.Tensor | None = None
    """(B, C) class probabilities, for classifiers."""


@torch.no_grad()
def score_rows(
    model: nn.Module, batch: dict[str, torch.Tensor], task: str, chunk_size: int | None, autocast=nullcontext
) -> RowScores:
    """Each row's loss, target count and hits, scored exactly as `evaluate` scores the rows'
    examples (so the sums over rows equal its totals up to float rounding); a causal LM with a
    chunk size is scored from the hidden states of its targets, no full logits for the batch.

    Args:
        batch: a collated batch (`loader.collate` / `collate_encoder`) on the model's device.
        chunk_size: `scoring_chunk_size` of the model, or None for one batch's logits at once.
    """
    if task == "classification":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        return RowScores(loss.double(), torch.ones_like(labels), logits.argmax(-1) == labels, logits.softmax(-1))
    rows = batch["labels"].shape[0]
    if task == "causal-lm" and chunk_size is not None:
        with causal_lm_inputs(model, batch) as inputs, hidden_states_out(model) as head, autocast():
            hidden = model(**inputs).logits  # (B, T, H): the identity head passed them through
            index = batch.get("target_index")
            states, picked = target_rows(hidden, batch["labels"], index)  # (N, H), (N,)
            each, hits = linear_cross_entropy_each(states, head.weight, head.bias, picked, chunk_size)  # (N,), (N,)
        if index is None:
            index = (next_token_targets(batch["labels"]).reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
        row = index.to(each.device) // batch["labels"].shape[1]  # (N,): the row of each target
        zeros = torch.zeros(rows, dtype=torch.float64, device=each.device)
        return RowScores(
            zeros.index_add(0, row, each.double()),
            zeros.index_add(0, row, torch.ones_like(each, dtype=torch.float64)).long(),
            zeros.index_add(0, row, hits.double()).long(),
        )
    if task == "seq2seq":
        logits, targets = at_least_fp32(seq2seq_logits(model, batch)), batch["labels"]  # (B, T, V), (B, T)
    else:
        targets = next_token_targets(batch["labels"])  # (B, T)
        with causal_lm_inputs(model, batch) as inputs:
            logits = at_least_fp32(model(**inputs).logits)  # (B, T, V)
    mask = targets != IGNORE_INDEX
    loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return RowScores(loss.double().sum(1), mask.sum(1), ((logits.argmax(-1) == targets) & mask).sum(1))


def _in_step(batches, model: nn.Module, world: int):
    """(indices, counted) of this process's evaluation batches. A wrapped model's forward is a
    collective (FSDP gathers its weights from every process, DDP broadcasts its buffers), so the
    processes first agree on the largest count, and one with fewer batches runs its first batch
    again, unscored, until it has run as many forwards as the others."""
    mine = list(batches)
    most = len(mine)
    if world > 1:
        count = torch.tensor([len(mine)], device=next(model.parameters()).device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        most = int(count)
    for indices in mine:
        yield indices, True
    for _ in range(most - len(mine)):
        yield (mine[0] if mine else np.arange(1)), False


def evaluate_split(
    model: nn.Module, data, split: str, config, accelerator=None, details=None, loss_chunk_size="auto", whole=False
) -> dict[str, float]:
    """`evaluate` on one split of prepared data (a PreparedData) as the config sets it up; `whole`:
    every batch, whatever eval.max_batches says (the final test evaluation)."""
    labels = data.labels
    return evaluate(
        model,
        data.splits[split],
        data.tokenizer.pad_token_id,
        config.eval.batch_size or config.train.micro_batch_size,
        None if whole else config.eval.max_batches,
        accelerator,
        task=config.model.task,
        num_labels=len(labels) if labels else None,
        details=details,
        loss_chunk_size=loss_chunk_size,
    )


def macro_f1(confusion: list[list[int]]) -> float:
    """Unweighted mean of per-class F1 over classes that occur in the labels or the predictions.

    confusion[i][j] counts examples of true class i predicted as class j.
    """
    scores = []
    for c in range(len(confusion)):
        true_positive = confusion[c][c]
        predicted = sum(row[c] for row in confusion)
        actual = sum(confusion[c])
        if predicted == 0 and actual == 0:
            continue
        scores.append(2 * true_positive / (predicted + actual))
    return sum(scores) / len(scores) if scores else float("nan")


def describe(metrics: dict[str, float]) -> str:
    """One line, e.g. 'loss 2.3100  perplexity 10.07  token accuracy 0.412' (counts of answers as
    whole numbers; sizes, steps and text left out)."""
    parts = []
    for key, value in metrics.items():
        if key in ("tokens", "examples", "step") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        name = key.replace("_", " ")
        parts.append(
            f"{name} {value}"
            if isinstance(value, int)
            else f"{name} {value:.4f}"
            if key == "loss"
            else f"{name} {value:.3f}"
        )
    return "  ".join(parts)
