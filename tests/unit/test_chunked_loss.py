"""Chunked cross-entropy from hidden states equals the plain loss, in value and in gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.data.loader import IGNORE_INDEX
from lmforge.engine.losses import (
    at_least_fp32,
    auto_chunk_size,
    causal_lm_step,
    chunked_causal_lm_loss_sum,
    describe_loss,
    hidden_states_out,
    linear_cross_entropy,
    linear_cross_entropy_hits,
    resolve_loss_chunk_size,
    scoring_chunk_size,
)
from lmforge.errors import UserError


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").double()  # exact comparisons


def packed_batch() -> dict[str, torch.Tensor]:
    """Two rows of packed examples with masked prompts and padding, as collate builds them."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 300, (2, 24), generator=generator)
    labels = input_ids.clone()
    labels[0, :5] = IGNORE_INDEX  # a prompt
    labels[0, 12:15] = IGNORE_INDEX  # the next example's prompt
    labels[1, 20:] = IGNORE_INDEX  # padding
    position_ids = torch.cat([torch.arange(12), torch.arange(12)]).repeat(2, 1)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_loss_and_gradients_equal_the_plain_ones(tie, chunk_size):
    plain, chunked = tiny_llama(tie), None
    chunked = copy.deepcopy(plain)
    batch = packed_batch()
    loss, targets = causal_lm_step(plain, batch)
    loss.backward()
    chunk_loss, chunk_targets = causal_lm_step(chunked, batch, chunk_size=chunk_size)
    chunk_loss.backward()
    assert int(chunk_targets) == int(targets) == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert chunk_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    for (name, a), (_, b) in zip(plain.named_parameters(), chunked.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert isinstance(chunked.get_output_embeddings(), torch.nn.Linear)  # the head is back in place


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_evaluation_scores_from_hidden_states_equal_full_logits(chunk_size):
    """linear_cross_entropy_hits: the summed loss and the argmax hits of the full logits, chunk by
    chunk, with a bias, and ties broken as argmax breaks them (the first highest score)."""
    torch.manual_seed(0)
    states, weight, bias = torch.randn(70, 16).double(), torch.randn(40, 16).double(), torch.randn(40).double()
    weight[7] = weight[3]  # rows 3 and 7 always tie
    bias[7] = bias[3]
    targets = torch.randint(0, 40, (70,))
    logits = states @ weight.T + bias
    targets[:10] = logits[:10].argmax(-1)  # some hits for certain
    targets[10:20] = 7  # a tie's second row: hit only if argmax said 7
    loss, hits = linear_cross_entropy_hits(states, weight, bias, targets, chunk_size)
    expected = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert int(hits) == int((logits.argmax(-1) == targets).sum()) >= 10


def test_evaluation_scores_plain_linear_heads_of_causal_lms_only():
    model = tiny_llama(tie=False)
    assert scoring_chunk_size("auto", model, "causal-lm") == resolve_loss_chunk_size("auto", model, "causal-lm", False)
    assert scoring_chunk_size(None, model, "causal-lm") is None
    assert scoring_chunk_size("auto", model, "seq2seq") is None
    model.lm_head.register_forward_hook(lambda *args: None)  # an explicit size, but a head to call
    assert scoring_chunk_size(128, model, "causal-lm") is None


def test_only_target_positions_are_scored():
    """A batch whose every label is masked costs no logits at all and gives a zero loss."""
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.full((2, 5), IGNORE_INDEX)
    loss, targets = chunked_causal_lm_loss_sum(hidden, labels, head, chunk_size=4)
    assert loss.item() == 0.0 and int(targets) == 0


def test_models_that_transform_their_logits_are_refused():
    model = tiny_llama(tie=False)
    model.config.final_logit_softcapping = 30.0
    refused = pytest.raises(UserError, match="train.loss_chunk_size: LlamaForCausalLM transforms its logits")
    with refused, hidden_states_out(model):
        pass
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)


def _plain_sum(states, weight, bias, targets):
    return torch.nn.functional.cross_entropy(
        at_least_fp32(torch.nn.functional.linear(states, weight, bias)), targets, reduction="sum"
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 1000])
def test_fused_linear_cross_entropy_with_bias_and_a_frozen_weight(chunk_size):
    """The fused path takes gradients in forward: states, bias and (when trained) weight must get
    the plain gradients; a frozen weight gets none."""
    generator = torch.Generator().manual_seed(2)
    states = torch.randn(70, 16, dtype=torch.float64, generator=generator)
    weight = torch.randn(40, 16, dtype=torch.float64, generator=generator)
    bias = torch.randn(40, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 40, (70,), generator=generator)
    for weight_trained in (True, False):
        trained = ((states, True), (weight, weight_trained), (bias, True))
        inputs = [t.clone().requires_grad_(grad) for t, grad in trained]
        plain = [t.clone().detach().requires_grad_(t.requires_grad) for t in inputs]
        fused = linear_cross_entropy(*inputs, targets, chunk_size)
        (fused * 3).backward()  # backward scales the stored gradients by the incoming one
        expected = _plain_sum(*plain, targets)
        (expected * 3).backward()
        assert fused.item() == pytest.approx(expected.item(), rel=1e-12)
        for got, want in zip(inputs, plain, strict=True):
            if want.grad is None:
                assert got.grad is None
            else:
                torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_fused_linear_cross_entropy_without_grad_and_under_bf16_autocast():
    generator = torch.Generator().manual_seed(3)
    states = torch.randn(200, 32, generator=generator, requires_grad=True)
    head = torch.nn.Linear(32, 500, bias=False)
    targets = torch.randint(0, 500, (200,), generator=generator)
    with torch.no_grad():
        full = linear_cross_entropy(states, head.weight, None, targets, 64)
        assert full.item() == pytest.approx(_plain_sum(states, head.weight, None, targets).item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(states, head.weight, None, targets, 64)
        plain = _plain_sum(states, head.weight, None, targets)  # the matmul in bf16, like the head would
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(plain.item(), rel=1e-3)
    assert abs(fused.item() - plain.item()) < abs(fused.item() - full.item())  # its matmul ran in bf16
    fused.backward()
    assert head.weight.grad.dtype == torch.float32 and states.grad.dtype == torch.float32


def test_auto_chunk_size_follows_the_vocabulary_and_steps_aside():
    model = tiny_llama(tie=False)  # vocab 300: 8M / 300 rounds down to 16384 tokens a chunk
    assert resolve_loss_chunk_size("auto", model, "causal-lm", plain_only=False) == 16384
    model.lm_head = torch.nn.Linear(64, 32_000, bias=False)
    assert resolve_loss_chunk_size("auto", model, "causal-lm", plain_only=False) == 256
    model.lm_head = torch.nn.Linear(64, 10_000_000, bias=False, device="meta")
    assert resolve_loss_chunk_size("auto", model, "causal-lm", plain_only=False) == 64  # the floor
    assert resolve_loss_chunk_size("auto", model, "causal-lm", plain_only=True) is None  # sharded or compiled
    assert resolve_loss_chunk_size(7, model, "causal-lm", plain_only=True) == 7  # an explicit size is kept
    assert resolve_loss_chunk_size(None, model, "causal-lm", plain_only=False) is None
    # CUDA takes 8 times more logits a chunk (fewer kernel launches per target), still a power of two
    assert [auto_chunk_size(v, "cuda") for v in (32_000, 50_257, 128_256)] == [2048, 1024, 512]
    assert [auto_chunk_size(v, "cpu") for v in (8192, 32_000, 128_256)] == [1024, 256, 64]

    class Adapted(torch.nn.Linear):  # e.g. a LoRA-wrapped or quantized head
        pass

    model.lm_head = Adapted(64, 300, bias=False)
    assert resolve_loss_chunk_size("auto", model, "causal-lm", plain_only=False) is None
    hooked = torch.nn.Linear(64, 300, bias=False)
    hooked.register_forward_hook(lambda module, args, out: out)  # a hook the fused loss would skip
    model.lm_head = hooked
    assert resolve_loss_chunk_size("auto", model, "causal-lm", plain_only=False) is None
    capped = tiny_llama(tie=False)
    capped.config.final_logit_softcapping = 30.0
    assert resolve_loss_chunk_size("auto", capped, "causal-lm", plain_only=False) is None


def test_the_plan_says_which_loss_runs():
    model = tiny_llama(tie=True)
    assert describe_loss(512, model, "causal-lm").startswith("fused cross-entropy from hidden states, 512 targets")
    assert describe_loss(None, model, "causal-lm") == "plain cross-entropy on full logits"
    model.lm_head = type("Adapted", (torch.nn.Linear,), {})(64, 300, bias=False)  # an explicit size, adapted head
    assert describe_loss(1024, model, "causal-lm").startswith("cross-entropy in checkpointed chunks of 1,024")
    assert describe_loss(None, model, "classification") is None


def test_fused_gradients_under_fp16_keep_small_probabilities():
    """In fp16 the gradient matmuls run in fp32: softmax probabilities below fp16's range would
    otherwise vanish from the weight gradient (the grad scaler cannot help, they are taken in forward)."""
    generator = torch.Generator().manual_seed(4)
    states = torch.randn(64, 32, generator=generator) * 4  # peaked softmax: many tiny probabilities
    weight = torch.randn(300, 32, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (64,), generator=generator)
    with torch.autocast("cpu", dtype=torch.float16):
        linear_cross_entropy(states, weight, None, targets, 16).backward()
    reference = weight.detach().clone().requires_grad_(True)
    _plain_sum(states, reference, None, targets).backward()
    assert int((weight.grad == 0).sum()) == int((reference.grad == 0).sum()) == 0  # fp16 gradients: 1911 zeros
    small = reference.grad.abs() < 1e-4
    relative = (weight.grad - reference.grad).abs() / reference.grad.abs()
    assert relative[small].median() < 0.05  # the logits themselves are fp16: not exact
