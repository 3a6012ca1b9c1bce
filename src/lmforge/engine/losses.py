"""Loss steps: the one place where model families differ inside the training loop.

A loss step returns the *sum* of token losses and the number of target tokens, never a mean:
the loop divides by the target tokens of the whole optimizer step (all micro-batches, all
processes), so every token weighs the same however the tokens are spread over micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.loader import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies and the number of targets.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) token ids, IGNORE_INDEX where there is nothing to predict.
    """
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    scores = logits[:, :-1].float()  # (B, T-1, V), fp32 for a stable log-softmax
    loss = F.cross_entropy(
        scores.reshape(-1, scores.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


def count_targets(batch: dict[str, torch.Tensor], task: str = "causal-lm") -> torch.Tensor:
    """Targets of a batch, known before the forward pass: tokens for LMs, rows for classifiers."""
    if task == "classification":
        return torch.tensor(batch["labels"].numel())
    labels = batch["labels"][:, 1:] if task == "causal-lm" else batch["labels"]
    return (labels != IGNORE_INDEX).sum()


def causal_lm_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    # No attention mask and no KV cache: that is what keeps packed examples apart (see collate).
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return causal_lm_loss_sum(logits, batch["labels"])


def seq2seq_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T_target, V) scores of each target token, teacher-forced: the decoder reads the target
    shifted right (the model's own decoder_start token first)."""
    decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=decoder_input_ids,
        use_cache=False,
    )
    return out.logits


def seq2seq_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = seq2seq_logits(model, batch).float()  # (B, T, V): position t scores target token t
    labels = batch["labels"]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (labels != IGNORE_INDEX).sum()


def classification_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, classes)
    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return loss, torch.tensor(batch["labels"].numel())


LossStep = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
LOSS_STEPS: dict[str, LossStep] = {
    "causal-lm": causal_lm_step,
    "seq2seq": seq2seq_step,
    "classification": classification_step,
}
