"""Chunked cross-entropy from hidden states equals the plain loss, in value and in gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmforge.data.loader import IGNORE_INDEX
from lmforge.engine.losses import causal_lm_step, chunked_causal_lm_loss_sum, hidden_states_out
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
