"""Gradient accumulation must not change the optimizer step: 1 x 8 == 8 x 1 == 3 x 3 (3+3+2 rows),
with rows of different lengths, so micro-batches hold different numbers of target tokens."""

import copy
import io

import pytest
import torch
from rich.console import Console

from conftest import RecordingTracker, rows_dataset
from lmforge.data.prepare import PreparedData, prepare_data
from lmforge.engine.loop import train
from lmforge.models.build import build_model
from lmforge.tracking.base import Trackers


@pytest.fixture
def ragged(tiny_config):
    """8 training rows of lengths 5..32 cut from real text, plus a validation split."""
    # Adam's first update is lr * g / (|g| + eps): for gradients near eps it is steep, so float
    # rounding of the gradient (summation order differs between 1x8 and 8x1) moves those weights
    # visibly. eps=1e-6 keeps that map smooth; gradients well above eps are unaffected.
    config = tiny_config(
        "train.max_steps=1", "train.max_grad_norm=null", "train.weight_decay=0.1", "train.adam_eps=1e-6"
    )
    prepared = prepare_data(config, log=lambda _: None)
    rows = prepared.splits["train"]["input_ids"]
    lengths = [32, 5, 17, 9, 32, 12, 6, 25]
    train_rows = [rows[i][:n] for i, n in enumerate(lengths)]
    data = PreparedData(
        prepared.tokenizer,
        {"train": rows_dataset(train_rows), "validation": prepared.splits["validation"]},
        prepared.report,
    )
    torch.manual_seed(0)
    model = build_model(config, prepared.tokenizer)
    return config, data, model


def one_step(config, data, model, micro_batch_size, grad_accum):
    config = config.model_copy(deep=True)
    config.train.micro_batch_size, config.train.grad_accum = micro_batch_size, grad_accum
    recorder = RecordingTracker()
    quiet = Console(file=io.StringIO())
    result = train(copy.deepcopy(model), data, config, Trackers(recorder, [], None, print), console=quiet)
    assert result.state.step == 1
    assert result.state.target_tokens_seen == sum(n - 1 for n in data.splits["train"]["num_tokens"])
    ((_, loss),) = recorder.series("train/loss")
    return loss, {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_accumulation_invariance(ragged):
    config, data, model = ragged
    loss_8x1, weights_8x1 = one_step(config, data, model, micro_batch_size=8, grad_accum=1)
    before = model.state_dict()
    for mbs, accum in [(1, 8), (3, 3), (2, 4)]:
        loss, weights = one_step(config, data, model, micro_batch_size=mbs, grad_accum=accum)
        assert loss == pytest.approx(loss_8x1, rel=1e-6), (mbs, accum)
        # atol is 0.2% of one step (lr = 1e-3): only rounding of near-zero gradients shows at all
        # (varlen attention groups a micro-batch's examples by length, so matmul shapes differ)
        for name, value in weights.items():
            torch.testing.assert_close(value, weights_8x1[name], rtol=0, atol=2e-6, msg=lambda m, n=name: f"{n}: {m}")
        diffs = torch.cat([(weights[n] - weights_8x1[n]).abs().flatten() for n in weights])
        assert diffs.mean() < 1e-9, (mbs, accum, diffs.mean())
    # and the step really moved the weights, so equality above is not vacuous
    moved = [n for n, v in weights_8x1.items() if not torch.equal(v, before[n])]
    assert len(moved) == len(weights_8x1)


def test_loss_is_mean_over_step_tokens_not_mean_of_micro_batch_means(ragged):
    """The logged step loss equals the token-weighted mean computed directly from the model."""
    from lmforge.data.loader import collate
    from lmforge.engine.losses import causal_lm_loss_sum

    config, data, model = ragged
    loss, _ = one_step(config, data, model, micro_batch_size=1, grad_accum=8)
    total, count, means = 0.0, 0, []
    with torch.no_grad():
        for row in data.splits["train"]:
            batch = collate([row], data.tokenizer.pad_token_id)
            s, n = causal_lm_loss_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"])
            total, count = total + s.item(), count + int(n)
            means.append(s.item() / int(n))
    assert loss == pytest.approx(total / count, rel=1e-5)
    assert abs(loss - sum(means) / len(means)) > 1e-3  # the naive mean of means differs here


def test_chunked_loss_gives_the_same_step_through_the_loop(ragged):
    """train.loss_chunk_size changes memory, not the optimizer step."""
    config, data, model = ragged
    loss, weights = one_step(config, data, model, micro_batch_size=4, grad_accum=2)
    chunked = config.model_copy(deep=True)
    chunked.train.loss_chunk_size = 16
    chunk_loss, chunk_weights = one_step(chunked, data, model, micro_batch_size=4, grad_accum=2)
    assert chunk_loss == pytest.approx(loss, rel=1e-6)
    # fp32 sums in another order (the fp64 gradients are equal to 1e-10: test_chunked_loss); Adam's
    # m / sqrt(v) turns float rounding in a near-zero gradient into ~1e-6 of a weight
    for name, value in chunk_weights.items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=3e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step(ragged):
    """train.compile changes speed, not the step (inductor may reorder float sums: a tolerance)."""
    config, data, model = ragged
    loss, weights = one_step(config, data, model, micro_batch_size=4, grad_accum=2)
    compiled = config.model_copy(deep=True)
    compiled.train.compile = True
    compiled_loss, compiled_weights = one_step(compiled, data, model, micro_batch_size=4, grad_accum=2)
    assert compiled_loss == pytest.approx(loss, rel=1e-5)
    assert set(compiled_weights) == set(weights)  # no "_orig_mod." prefixes reach checkpoints or final/
    for name, value in compiled_weights.items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
