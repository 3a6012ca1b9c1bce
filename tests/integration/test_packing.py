"""Packing parity: a packed row's per-token losses equal each example's losses alone, in training
and in evaluation mode, and the loop logs the same loss and makes the same update either way; for
the Llama presets, and for GPT-2 and Qwen2 built from scratch (model.architecture)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from rich.console import Console

from conftest import RecordingTracker
from lmforge.data.loader import IGNORE_INDEX, collate
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.engine.loop import train
from lmforge.engine.losses import causal_lm_inputs
from lmforge.eval.evaluate import evaluate
from lmforge.models.build import build_model
from lmforge.tracking.base import Trackers


def token_losses(model, batch):
    """(B, T-1) per-token losses, 0 where there is no target, from the inputs training gives the model."""
    with causal_lm_inputs(model, batch) as inputs:
        out = model(**inputs)
    logits, targets = out.logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return loss, targets != IGNORE_INDEX


FAMILIES = {
    "llama": [],
    "gpt2": ["model.preset=gpt2-tiny", "model.dropout=0"],  # dropout 0: train-mode forwards are deterministic
    "qwen2": ["model.preset=qwen2-tiny"],
}
EVERY_FAMILY = [(family, attention) for family in FAMILIES for attention in ("varlen", "sdpa")]


@pytest.fixture(params=[("llama", "varlen"), ("llama", "sdpa")], ids=str)
def setup(tiny_config, request):
    """Both attention implementations that training uses must keep packed examples apart (tests
    parametrized with EVERY_FAMILY: of each family's new model)."""
    family, attention = request.param
    config = tiny_config(
        *FAMILIES[family],
        "data.max_length=64",
        "train.max_steps=1",
        "train.micro_batch_size=16",
        f"model.attention={attention}",
    )
    prepared = prepare_data(config, log=lambda _: None)
    ids = prepared.splits["train"]["input_ids"]
    # six examples of different lengths, with prompt-like masked prefixes
    examples = []
    for i, n in enumerate([9, 23, 14, 31, 6, 17]):
        tokens = ids[i][:n]
        labels = [IGNORE_INDEX] * (1 + i % 3) + tokens[1 + i % 3 :]
        examples.append({"input_ids": tokens, "labels": labels, "lengths": [n], "num_tokens": n})
    torch.manual_seed(0)
    model = build_model(config, prepared.tokenizer)
    assert model.config._attn_implementation.removeprefix("lmforge_") == attention
    return config, prepared, model, examples


def pack(examples, groups):
    rows = []
    for group in groups:
        chosen = [examples[i] for i in group]
        rows.append(
            {
                "input_ids": [t for e in chosen for t in e["input_ids"]],
                "labels": [t for e in chosen for t in e["labels"]],
                "lengths": [e["lengths"][0] for e in chosen],
                "num_tokens": sum(e["num_tokens"] for e in chosen),
            }
        )
    return rows


@pytest.mark.parametrize("setup", EVERY_FAMILY, indirect=True, ids=str)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_row_losses_equal_each_example_alone(setup, mode):
    _, prepared, model, examples = setup
    model.train(mode == "train")
    model.config.use_cache = mode == "eval"  # as a saved model has it: the loss path must not use a cache
    pad = prepared.tokenizer.pad_token_id
    (row,) = pack(examples, [range(len(examples))])
    with torch.no_grad():
        packed, mask = token_losses(model, collate([row], pad))
        start = 0
        for example in examples:
            alone, alone_mask = token_losses(model, collate([example], pad))
            n = example["lengths"][0]
            # inside the packed row, example k's token j is predicted at position start+j-1
            ours = packed[0, start : start + n - 1][mask[0, start : start + n - 1]]
            torch.testing.assert_close(ours, alone[0][alone_mask[0]], rtol=1e-5, atol=1e-5)
            assert not mask[0, start - 1] if start else True  # no target across the boundary
            start += n


def test_an_attention_mask_would_break_isolation(setup):
    """The check above can fail: passing an attention mask makes sdpa's examples see each other.
    varlen treats an all-ones mask as no mask and stays isolated."""
    config, prepared, model, examples = setup
    (row,) = pack(examples, [range(len(examples))])
    batch = collate([row], prepared.tokenizer.pad_token_id)
    with torch.no_grad():
        isolated = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        mixed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=torch.ones_like(batch["input_ids"]),
            use_cache=False,
        ).logits
    first = examples[0]["lengths"][0]
    torch.testing.assert_close(isolated[0, :first], mixed[0, :first])  # the first example sees nothing before
    if config.model.attention == "varlen":
        torch.testing.assert_close(isolated, mixed)
    else:
        assert (isolated[0, first:] - mixed[0, first:]).abs().max() > 1e-3  # later ones now see earlier examples


def test_evaluate_gives_the_same_metrics_packed_or_not(setup):
    _, prepared, model, examples = setup
    model.config.use_cache = True
    pad = prepared.tokenizer.pad_token_id
    packed = Dataset.from_list(pack(examples, [[0, 1, 2], [3, 4, 5]]))
    alone = Dataset.from_list(examples)
    a, b = evaluate(model, packed, pad, batch_size=2), evaluate(model, alone, pad, batch_size=4)
    assert a["tokens"] == b["tokens"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["token_accuracy"] == b["token_accuracy"]


@pytest.mark.parametrize("chunk_size", ["auto", 3])
def test_evaluate_from_hidden_states_equals_evaluate_from_logits(setup, chunk_size):
    """Evaluation scores a causal LM's targets from its hidden states (no full logits): the same
    metrics as from the model's logits."""
    _, prepared, model, examples = setup
    pad = prepared.tokenizer.pad_token_id
    packed = Dataset.from_list(pack(examples, [[0, 1, 2], [3, 4, 5]]))
    scored = evaluate(model, packed, pad, batch_size=2, loss_chunk_size=chunk_size)
    from_logits = evaluate(model, packed, pad, batch_size=2, loss_chunk_size=None)
    assert scored["tokens"] == from_logits["tokens"] > 0
    assert scored["loss"] == pytest.approx(from_logits["loss"], rel=1e-6)
    assert scored["token_accuracy"] == from_logits["token_accuracy"]
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is back


@pytest.mark.parametrize("setup", EVERY_FAMILY, indirect=True, ids=str)
def test_the_loop_logs_the_same_loss_and_update_packed_or_not(setup):
    config, prepared, model, examples = setup
    # as in the invariance test: eps 1e-6 keeps Adam's first step smooth in near-zero gradients,
    # whose rounding differs between the two layouts
    config.train.adam_eps = 1e-6
    results = []
    for rows in (pack(examples, [[0, 3], [1, 2, 4], [5]]), examples):
        data = PreparedData(
            prepared.tokenizer, {"train": Dataset.from_list(rows), "validation": prepared.splits["validation"]}, {}
        )
        recorder = RecordingTracker()
        result = train(
            copy.deepcopy(model), data, config, Trackers(recorder, [], None, print), console=Console(file=io.StringIO())
        )
        ((_, loss),) = recorder.series("train/loss")
        results.append((loss, result.model.state_dict(), result.state.target_tokens_seen))
    (packed_loss, packed_weights, packed_targets), (alone_loss, alone_weights, alone_targets) = results
    assert packed_targets == alone_targets
    assert packed_loss == pytest.approx(alone_loss, rel=1e-5)
    for name, value in packed_weights.items():
        torch.testing.assert_close(value, alone_weights[name], rtol=0, atol=1e-6)
