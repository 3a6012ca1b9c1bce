"""A training step never reads a value back from the device inside its forward, loss or backward.

On a GPU such a read (`.item()`, `.tolist()`, `bool()`, a boolean index, whose size is a value) waits
for all the work queued before it, and the GPU then idles while Python queues the next. The checks
run on the meta device, which has shapes and no values: there every such read raises. Nothing is
faked: the model, the collator and the loss are the ones training uses."""

import pytest
import torch
from test_varlen_attention import tiny as tiny_llama

from lmforge.data.loader import HOST_KEYS, collate, to_device
from lmforge.engine.losses import causal_lm_inputs, causal_lm_step
from lmforge.models import attention

META = torch.device("meta")


def rows(segments):
    """Collator rows: examples of these lengths per row, the first token of each example masked."""
    out = []
    for lengths in segments:
        ids = list(range(1, sum(lengths) + 1))
        labels, start = list(ids), 0
        for n in lengths:
            labels[start] = -100
            start += n
        out.append({"input_ids": ids, "labels": labels, "lengths": lengths})
    return out


PACKED = ([10, 25, 5], [3, 4], [1, 2, 3, 30])  # rows of 40, 7 (then padding) and 36 tokens
WHOLE_ROWS = ([40], [40])


def tiny(attn: str = attention.NAME):
    torch.manual_seed(0)
    model = tiny_llama()  # 2 layers of 64, 4 heads sharing 2 key/value heads, vocabulary 300
    model.set_attn_implementation(attn)
    return model


def tiny_on_meta(attn: str = attention.NAME):
    return tiny(attn).to(META)


@pytest.mark.parametrize("segments", [PACKED, WHOLE_ROWS], ids=["packed", "whole-rows"])
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["plain-loss", "fused-loss"])
def test_a_training_step_never_reads_the_device(segments, chunk_size):
    model = tiny_on_meta()
    batch = to_device(collate(rows(segments), pad_id=0), META)
    assert batch["segments"].device.type == "cpu"  # the host's own knowledge stays there
    loss, _ = causal_lm_step(model, batch, chunk_size)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the loop clips before its one sync
    assert loss.device == META and all(p.grad is not None for p in model.parameters())


def test_without_the_hosts_lengths_the_forward_reads_the_device():
    """The check above can fail: a batch without `segments` makes transformers' packing check and
    the varlen plan read the position ids back, which the meta device refuses."""
    model = tiny_on_meta()
    batch = to_device(collate(rows(PACKED), pad_id=0), META)
    del batch["segments"]
    with pytest.raises(RuntimeError, match="meta"):
        causal_lm_step(model, batch, 16)


def test_the_fused_loss_without_target_positions_reads_the_device():
    """Likewise the fused loss, when it must find the positions that have a target itself."""
    model = tiny_on_meta()
    batch = to_device(collate(rows(PACKED), pad_id=0), META)
    del batch["target_index"]
    with pytest.raises(NotImplementedError, match="nonzero"):
        causal_lm_step(model, batch, 16)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["plain-loss", "fused-loss"])
def test_the_hosts_lengths_give_the_same_loss_and_gradients(bf16, chunk_size):
    """Planned from `segments` or from the position ids read back, the step is the same, bit for bit."""
    model = tiny()
    batch = collate(rows(PACKED), pad_id=0)
    read_back = {k: v for k, v in batch.items() if k not in ("segments", "target_index")}
    results = []
    for b in (batch, read_back):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, count = causal_lm_step(model, b, chunk_size)
        loss.backward()
        results.append((loss.detach(), int(count), [p.grad.clone() for p in model.parameters()]))
    (loss, count, grads), (loss_back, count_back, grads_back) = results
    # targets: tokens 1.. of each row, less the masked example starts: 39 - 2, 6 - 1, 35 - 3
    assert count == count_back == 37 + 5 + 32
    torch.testing.assert_close(loss, loss_back, rtol=0, atol=0)
    for grad, grad_back in zip(grads, grads_back, strict=True):
        torch.testing.assert_close(grad, grad_back, rtol=0, atol=0)


def test_only_varlen_gets_the_all_true_mask():
    """sdpa would read an attention mask as "no packing" and let packed examples see each other: the
    stand-in mask goes to lmforge's varlen attention only."""
    batch = collate(rows(PACKED), pad_id=0)
    with causal_lm_inputs(tiny_on_meta("sdpa"), batch) as inputs:
        assert "attention_mask" not in inputs
    with causal_lm_inputs(tiny_on_meta(), batch) as inputs:
        assert inputs["attention_mask"].dtype == torch.bool and inputs["attention_mask"].all()
    assert attention._known is None  # the batch is forgotten after its forward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("segments", [PACKED, WHOLE_ROWS], ids=["packed", "whole-rows"])
@pytest.mark.parametrize("chunk_size", [None, 16], ids=["plain-loss", "fused-loss"])
def test_a_cuda_training_step_never_synchronizes(segments, chunk_size):
    """The same on a GPU, in bf16 as it trains there, with torch reporting every synchronising call."""
    model = tiny().cuda()
    pinned = {k: v if k in HOST_KEYS else v.pin_memory() for k, v in collate(rows(segments), pad_id=0).items()}
    model(input_ids=pinned["input_ids"].cuda())  # kernels loaded and caches made outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = to_device(pinned, torch.device("cuda"))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = causal_lm_step(model, batch, chunk_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_other_families_step_without_reading_the_device(family):
    """GPT-2 passes a view of the all-True mask on to the attention: varlen still knows it (the same
    memory) instead of checking it on the device; Qwen2 as Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 300}
    if family == "qwen2":  # (its default is 32 key/value heads)
        sizes.update(num_key_value_heads=2, intermediate_size=128)
    config = AutoConfig.for_model(family, **sizes, max_position_embeddings=128, n_positions=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.set_attn_implementation(attention.NAME)
    model = model.to(META)
    batch = to_device(collate(rows(PACKED), pad_id=0), META)
    loss, _ = causal_lm_step(model, batch, 16)
    loss.backward()
    assert loss.device == META
