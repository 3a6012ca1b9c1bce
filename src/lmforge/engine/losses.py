"""Loss steps: the one place where model families differ inside the training loop.

A loss step returns the *sum* of token losses and the number of target tokens, never a mean:
the loop divides by the target tokens of the whole optimizer step (all micro-batches, all
processes), so every token weighs the same however the tokens are spread over micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.data.loader import IGNORE_INDEX
from lmforge.errors import UserError
from lmforge.models import attention


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
    hidden: torch.Tensor,
    labels: torch.Tensor,
    head: nn.Module,
    chunk_size: int,
    target_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sum as `causal_lm_loss_sum`, from the last hidden states, without ever holding the
    full (B, T, V) logits: only positions with a target are scored, `chunk_size` at a time.

    A plain linear head goes through `linear_cross_entropy`, which takes each chunk's gradients in
    the same pass (nothing is recomputed); any other head (adapters, quantized layers) is
    checkpointed chunk by chunk, its logits recomputed in backward.

    Args:
        hidden: (B, T, H) final hidden states.
        labels: (B, T) token ids, IGNORE_INDEX where there is nothing to predict.
        head: the output projection (H -> V).
        chunk_size: target positions scored at once; peak extra memory ~ chunk_size x V x 4 bytes.
        target_index: the flat (B*T) positions that have a target, as the collator gives them
            (see `target_rows`).
    """
    states, targets = target_rows(hidden, labels, target_index)  # masked prompts cost nothing
    count = torch.full((), targets.numel(), device=hidden.device)
    if _plain_linear(head):
        return linear_cross_entropy(states, head.weight, head.bias, targets, chunk_size), count
    total = at_least_fp32(hidden.new_zeros(()))
    for start in range(0, targets.numel(), chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(_chunk_loss, states[chunk], targets[chunk], head, use_reentrant=False)
    return total, count


def target_rows(
    hidden: torch.Tensor, labels: torch.Tensor, target_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, H) final hidden states of the positions that have a next token to predict, and those (N,)
    tokens. `target_index` (the collator's) names the positions; without it they are found on the
    device, which a GPU must then report back (N decides the shapes that follow)."""
    targets = next_token_targets(labels).reshape(-1)  # (B*T,)
    if target_index is None:
        target_index = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, target_index), targets.index_select(0, target_index)


def _plain_linear(head: nn.Module | None) -> bool:
    """Whether the head is exactly x @ weight.T + bias (no subclass, adapter or hook), which
    `linear_cross_entropy` can compute without calling it."""
    return type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks


def _chunk_loss(states: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(at_least_fp32(head(states)), targets, reduction="sum")  # (n, V) logits live only here


def linear_cross_entropy(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """sum(cross_entropy(states @ weight.T + bias, targets)) in fp32, `chunk_size` rows at a time.

    The matmuls run in the autocast dtype when autocast is on (as the head would), the softmax in
    fp32. When gradients are wanted, each chunk's are taken while its logits are at hand: backward
    then only scales them, so the logits are neither kept nor recomputed, and the log-softmax
    backward, the one-hot scatter and the casts of (N, V) tensors of the plain loss all go away."""
    dtype = _compute_dtype(weight)  # before autocast is switched off for the function's own casts
    with _no_autocast(states.device.type):
        return _LinearCrossEntropy.apply(states, weight, bias, targets, chunk_size, dtype, torch.is_grad_enabled())


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the weight's."""
    device = weight.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if autocast else weight.dtype


def _no_autocast(device: str):
    """Autocast off for `device` (nothing to switch off on one that has none, such as meta)."""
    return torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()


ROWS = 64


def _chunk_logits(
    states: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, targets: torch.Tensor, chunk_size: int, exact
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(start, targets, rows, logits) of each chunk of `chunk_size` rows: the rows in w's dtype and
    padded to a multiple of ROWS, the logits (rows x V) in `exact`. The number of targets changes
    every step, and a new matmul shape costs a new oneDNN primitive on CPU (slow to make, kept
    forever): the padding keeps the shapes few."""
    for start in range(0, targets.numel(), chunk_size):
        t = targets[start : start + chunk_size]
        h = F.pad(states[start : start + chunk_size].to(w.dtype), (0, 0, 0, -len(t) % ROWS))
        yield start, t, h, F.linear(h, w, b).to(exact)


def _cross_entropy_in_place(
    logits: torch.Tensor, targets: torch.Tensor, softmax: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed cross-entropy of the first len(targets) rows of `logits` (fp32, (n + pad, V)), and
    with `softmax` every row's softmax, written over the logits. One exponential serves both: half
    the passes over the logits of torch.logsumexp followed by exp(logits - lse)."""
    n = len(targets)
    peak = logits.amax(dim=-1, keepdim=True)
    picked = logits[:n].gather(1, targets[:, None])
    probs = logits.sub_(peak).exp_()
    norm = probs.sum(dim=-1, keepdim=True)
    loss = (norm[:n].log() + peak[:n] - picked).sum()
    return loss, probs.mul_(norm.reciprocal()) if softmax else None


@torch.no_grad()
def linear_cross_entropy_hits(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For evaluation: the summed cross-entropy of states @ weight.T + bias against `targets` (as
    `linear_cross_entropy`) and the number of rows whose highest score is their target, `chunk_size`
    rows at a time: no (tokens x vocab) logits for the whole batch."""
    dtype = _compute_dtype(weight)
    exact = torch.promote_types(dtype, torch.float32)
    w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
    total = torch.zeros((), dtype=exact, device=states.device)
    hits = torch.zeros((), dtype=torch.long, device=states.device)
    with _no_autocast(states.device.type):
        for _, t, _, logits in _chunk_logits(states, w, b, targets, chunk_size, exact):
            hits += (logits[: len(t)].argmax(-1) == t).sum()
            total += _cross_entropy_in_place(logits, t, softmax=False)[0]
    return total, hits


@torch.no_grad()
def linear_cross_entropy_each(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For per-example scoring: the (N,) cross-entropy of each row of states @ weight.T + bias
    against its target (nats, in the exact dtype of `linear_cross_entropy`) and whether its highest
    score is the target, `chunk_size` rows at a time: no (tokens x vocab) logits for the whole batch."""
    dtype = _compute_dtype(weight)
    exact = torch.promote_types(dtype, torch.float32)
    w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
    losses, hits = [], []
    with _no_autocast(states.device.type):
        for _, t, _, logits in _chunk_logits(states, w, b, targets, chunk_size, exact):
            logits = logits[: len(t)]
            hits.append(logits.argmax(-1) == t)
            losses.append(F.cross_entropy(logits, t, reduction="none"))
    if not losses:
        return states.new_zeros(0, dtype=exact), torch.zeros(0, dtype=torch.bool, device=states.device)
    return torch.cat(losses), torch.cat(hits)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_size, dtype, grads):
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        exact = torch.promote_types(dtype, torch.float32)  # softmax and sums: fp32, or fp64 for fp64 models
        # fp16 would flush the small probabilities of the gradient to zero (a grad scaler protects
        # the plain loss's backward, but these gradients are taken unscaled): fp32 for them
        grad_dtype = exact if dtype == torch.float16 else dtype
        grad_w = w if grad_dtype == dtype else weight.to(grad_dtype)
        want = [grads and t is not None and t.requires_grad for t in (states, weight, bias)]
        grad_states = torch.empty_like(states) if want[0] else None
        grad_weight = torch.zeros_like(weight, dtype=exact) if want[1] else None
        grad_bias = torch.zeros_like(bias, dtype=exact) if want[2] else None
        total = torch.zeros((), dtype=exact, device=states.device)
        for start, t, h, logits in _chunk_logits(states, w, b, targets, chunk_size, exact):
            n = len(t)
            loss, probs = _cross_entropy_in_place(logits, t, softmax=any(want))
            total += loss
            if not any(want):
                continue
            grad = probs  # d loss / d logits = softmax - one-hot
            grad[n:] = 0
            grad[torch.arange(n, device=t.device), t] -= 1
            if grad_bias is not None:
                grad_bias += grad.sum(0)
            grad = grad.to(grad_dtype)
            if grad_states is not None:
                grad_states[start : start + n] = (grad @ grad_w)[:n]
            if grad_weight is not None:
                grad_weight += (grad.T @ h.to(grad_dtype)).to(exact)
        ctx.save_for_backward(grad_states, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_states, grad_weight, grad_bias = ctx.saved_tensors
        return (
            grad_states * grad_output.to(grad_states.dtype) if grad_states is not None else None,
            (grad_weight * grad_output).to(ctx.dtypes[0]) if grad_weight is not None else None,
            (grad_bias * grad_output).to(ctx.dtypes[1]) if grad_bias is not None else None,
            None,
            None,
            None,
            None,
        )


AUTO_CHUNK_LOGITS = {"cpu": 1 << 23, "cuda": 1 << 26}
"""Logits per chunk for loss_chunk_size auto, by device. CPU: 8M (32 MB in fp32), measured fastest
(1024 and 2048 rows at vocab 32k were slower: RESULTS session 7). CUDA: 64M (256 MB in fp32), not
measured yet: a chunk costs ~30 kernel launches (~0.2 ms of host time), and 256 rows of vocab 32k
at hidden 768 (the 120M model) are ~0.15 ms of work for an H100 (three matmuls of 13 GFLOP, a few
passes over 33 MB), so small chunks would leave the GPU waiting on Python; 2048 rows at vocab 32k
(512 at 128k) put 8 times more work behind each launch, for a bounded 256 MB. Liger's fused loss
sizes its chunks like the hidden states (512 rows here), with a handful of fused kernels a chunk."""


def resolve_loss_chunk_size(setting: int | str | None, model: nn.Module, task: str, plain_only: bool) -> int | None:
    """train.loss_chunk_size as a number of tokens, or None for the plain loss. auto chunks a causal
    LM whose head is a plain linear layer and whose logits are not transformed, unless
    `plain_only` (the model is sharded or compiled), into `auto_chunk_size` tokens for the head's
    device."""
    if setting != "auto":
        return setting
    base = _unwrapped(model)
    head = base.get_output_embeddings() if task == "causal-lm" else None
    if plain_only or not _plain_linear(head) or _logit_transform(base):
        return None
    return auto_chunk_size(head.out_features, head.weight.device.type)


def auto_chunk_size(vocab: int, device: str) -> int:
    """Tokens a chunk for about AUTO_CHUNK_LOGITS[device] logits: a power of two, at least 64."""
    budget = AUTO_CHUNK_LOGITS.get(device, AUTO_CHUNK_LOGITS["cpu"])
    return 1 << max(6, (budget // vocab).bit_length() - 1)


def describe_loss(chunk_size: int | None, model: nn.Module, task: str) -> str | None:
    """How a causal LM's loss is computed, for the run's plan (None for other tasks)."""
    if task != "causal-lm":
        return None
    if chunk_size is None:
        return "plain cross-entropy on full logits"
    if _plain_head(model):
        return f"fused cross-entropy from hidden states, {chunk_size:,} targets per chunk, no full logits"
    return f"cross-entropy in checkpointed chunks of {chunk_size:,} targets, no full logits"


def scoring_chunk_size(setting: int | str | None, model: nn.Module, task: str) -> int | None:
    """Rows an evaluation scores at once from hidden states (`linear_cross_entropy_hits`), or None
    to take the model's logits: a causal LM whose head is a plain linear layer, as for training."""
    if task != "causal-lm" or not _plain_head(model):
        return None
    return resolve_loss_chunk_size(setting, model, task, plain_only=False)


def _plain_head(model: nn.Module) -> bool:
    """Whether the (unwrapped) model's output projection is a plain linear layer."""
    return _plain_linear(_unwrapped(model).get_output_embeddings())


def _unwrapped(model: nn.Module) -> nn.Module:
    base = _inside_ddp(model)
    base = getattr(base, "_orig_mod", base)  # torch.compile
    return base.get_base_model() if hasattr(base, "get_base_model") else base  # peft


def _inside_ddp(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _compiled(model: nn.Module) -> bool:
    """Whether the model (inside any DDP wrapper) is torch.compile's wrapper."""
    return hasattr(_inside_ddp(model), "_orig_mod")


def _logit_transform(base: nn.Module) -> str | None:
    for name in ("final_logit_softcapping", "logit_scale"):
        if getattr(base.config, name, None) not in (None, 1, 1.0):
            return name
    return None


class _Passthrough(nn.Identity):
    """The identity in place of an output projection. It has no bias, for the families whose
    set_output_embeddings reads one (BERT and 40-odd others keep the projection's bias apart)."""

    bias = None


@contextmanager
def hidden_states_out(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the model's forward returns final hidden states in place of logits (its
    output projection is swapped for an identity); yields that projection. Going through the
    model's own forward keeps distributed wrappers (DDP hooks) and adapters (LoRA) in the path."""
    base = _unwrapped(model)
    head = base.get_output_embeddings()
    if name := _logit_transform(base):
        raise UserError(
            f"train.loss_chunk_size: {type(base).__name__} transforms its logits ({name}); "
            "chunked loss does not support that yet: set train.loss_chunk_size to auto or null"
        )
    base.set_output_embeddings(_Passthrough())
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


@contextmanager
def causal_lm_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> Iterator[dict]:
    """The forward inputs of a collated causal LM batch, for a forward inside the block.

    No attention mask and no KV cache: that is what keeps packed examples apart (see collate). With
    lmforge's varlen attention and the examples' lengths known on the host (the collator's
    `segments`), the attention is planned from those, and an all-True mask that the varlen attention
    knows stands in for transformers' packing check: the forward never reads the device back."""
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    base = _unwrapped(model)
    if "segments" not in batch or base.config._attn_implementation != attention.NAME:
        yield inputs
        return
    with attention.known_segments(batch["segments"], batch["position_ids"], mask=not _compiled(model)) as full_mask:
        if full_mask is not None:
            inputs["attention_mask"] = full_mask
        yield inputs


def causal_lm_step(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    with causal_lm_inputs(model, batch) as inputs:
        if chunk_size is None:
            return causal_lm_loss_sum(model(**inputs).logits, batch["labels"])
        with hidden_states_out(model) as head:
            hidden = model(**inputs).logits  # (B, T, H): the identity head passed the hidden states through
    return chunked_causal_lm_loss_sum(hidden, batch["labels"], head, chunk_size, batch.get("target_index"))


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
