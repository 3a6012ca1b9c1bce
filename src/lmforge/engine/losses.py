"""Loss steps: the one place where model families differ inside the training loop.

A loss step returns the *sum* of token losses and the number of target tokens, never a mean:
the loop divides by the target tokens of the whole optimizer step (all micro-batches, all
processes), so every token weighs the same however the tokens are spread over micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.data.loader import IGNORE_INDEX
from lmforge.errors import UserError


def at_least_fp32(scores: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 scores in fp32 for a stable log-softmax; fp32/fp64 as they are."""
    return scores if scores.dtype in (torch.float32, torch.float64) else scores.float()


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) labels -> (B, T) targets: position t predicts token t+1, the last position nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies and the number of targets.

    Args:
        logits: (B, T, V) scores for the token after each position.
        labels: (B, T) token ids, IGNORE_INDEX where there is nothing to predict.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them (and their
    # gradient) for nothing. The last position predicts nothing.
    targets = next_token_targets(labels)  # (B, T)
    scores = at_least_fp32(logits)  # (B, T, V), fp32 for a stable log-softmax
    loss = F.cross_entropy(
        scores.reshape(-1, scores.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (targets != IGNORE_INDEX).sum()


def chunked_causal_lm_loss_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sum as `causal_lm_loss_sum`, from the last hidden states, without ever holding the
    full (B, T, V) logits: only positions with a target are scored, `chunk_size` at a time, and
    each chunk's logits are recomputed in backward instead of kept (activation checkpointing).

    Args:
        hidden: (B, T, H) final hidden states.
        labels: (B, T) token ids, IGNORE_INDEX where there is nothing to predict.
        head: the output projection (H -> V).
        chunk_size: target positions scored at once; peak extra memory ~ chunk_size x V x 4 bytes.
    """
    targets = next_token_targets(labels).reshape(-1)  # (B*T,)
    states = hidden.reshape(-1, hidden.size(-1))  # (B*T, H)
    keep = targets != IGNORE_INDEX
    states, targets = states[keep], targets[keep]  # (N, H), (N,): masked prompts cost nothing
    total = at_least_fp32(hidden.new_zeros(()))
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, states[chunk], targets[chunk], head, use_reentrant=False)
    return total, keep.sum()


def _chunk_loss(states: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(at_least_fp32(head(states)), targets, reduction="sum")  # (n, V) logits live only here


@contextmanager
def hidden_states_out(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model's forward returns final hidden states in place of logits (its
    output projection is swapped for an identity); yields that projection. Going through the
    model's own forward keeps distributed wrappers (DDP hooks) and adapters (LoRA) in the path."""
    base = model.module if hasattr(model, "module") else model  # DDP
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # peft
    head = base.get_output_embeddings()
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(base.config, name, None) not in (None, 1, 1.0):
            raise UserError(
                f"train.loss_chunk_size: {type(base).__name__} transforms its logits ({name}); "
                "chunked loss does not support that yet: unset train.loss_chunk_size"
            )
    base.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def count_targets(batch: dict[str, torch.Tensor], task: str = "causal-lm") -> torch.Tensor:
    """Targets of a batch, known before the forward pass: tokens for LMs, rows for classifiers."""
    if task == "classification":
        return torch.tensor(batch["labels"].numel())
    labels = batch["labels"][:, 1:] if task == "causal-lm" else batch["labels"]
    return (labels != IGNORE_INDEX).sum()


def causal_lm_step(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    # No attention mask and no KV cache: that is what keeps packed examples apart (see collate).
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if chunk_size is None:
        return causal_lm_loss_sum(model(**inputs).logits, batch["labels"])
    with hidden_states_out(model) as head:
        hidden = model(**inputs).logits  # (B, T, H): the identity head passed the hidden states through
    return chunked_causal_lm_loss_sum(hidden, batch["labels"], head, chunk_size)


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


def loss_step_for(task: str, chunk_size: int | None = None) -> LossStep:
    """The loss step of a task; causal LMs with `chunk_size` use the chunked loss."""
    if task == "causal-lm" and chunk_size is not None:
        return partial(causal_lm_step, chunk_size=chunk_size)
    return LOSS_STEPS[task]


LossStep = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
LOSS_STEPS: dict[str, LossStep] = {
    "causal-lm": causal_lm_step,
    "seq2seq": seq2seq_step,
    "classification": classification_step,
}
