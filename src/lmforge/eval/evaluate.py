"""Streaming evaluation: loss, perplexity and token accuracy without holding all logits."""

from __future__ import annotations

import math

import torch
from datasets import Dataset
from torch import nn

from lmforge.data.loader import IGNORE_INDEX, eval_batches, fetch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    pad_id: int,
    batch_size: int,
    max_batches: int | None = None,
    accelerator=None,
) -> dict[str, float]:
    """Token-weighted metrics over a packed causal-LM dataset.

    Only running sums stay between batches: one batch's logits exist at a time. Under several
    processes each evaluates its share of batches and the sums are added up.

    Returns:
        loss (mean nats per target token), perplexity, token_accuracy and tokens (targets counted).
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, targets
    for indices in eval_batches(dataset, batch_size, max_batches, rank, world):
        batch = fetch(dataset, indices, pad_id)
        input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        # as in training: no attention mask and no KV cache, so packed examples stay isolated
        out = model(input_ids=input_ids, position_ids=batch["position_ids"].to(device), use_cache=False)
        logits = out.logits[:, :-1].float()  # (B, T-1, V)
        targets = labels[:, 1:]  # (B, T-1)
        mask = targets != IGNORE_INDEX
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & mask).sum()
        totals += torch.stack([loss.double(), correct.double(), mask.sum().double()])
    if accelerator is not None and world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), "token_accuracy": float("nan"), "tokens": 0}
    mean = loss_sum / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "token_accuracy": correct / count,
        "tokens": int(count),
    }
