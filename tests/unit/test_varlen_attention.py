"""varlen attention: each packed example attends within itself, equal to running it alone, with the
same gradients as transformers' masked sdpa; anything it does not handle goes to sdpa unchanged."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lmforge.config import Config
from lmforge.errors import UserError
from lmforge.models import attention
from lmforge.models.build import select_attention

SEGMENTS = ([10, 25, 5], [40], [1, 2, 3, 34], [7, 7, 7, 7, 12])  # rows of 40 tokens, one of them a single example


def tiny(kind="llama", **extra):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=2, use_sliding_window=False, **extra))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, num_key_value_heads=2, sliding_window=16, **extra))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2, **extra))
    model.config.use_cache = False
    return model


def batch(segments=SEGMENTS, vocab=300):
    torch.manual_seed(1)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in segments])
    return torch.randint(0, vocab, positions.shape), positions


def forward_backward(model, impl, ids, positions):
    model.set_attn_implementation(impl)
    model.zero_grad()
    out = model(input_ids=ids, position_ids=positions, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_segment_lengths_split_at_restarts_and_row_ends():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 9, 10], [0, 1, 2, 3, 0, 1]])
    assert attention.segment_lengths(positions) == [3, 2, 1, 6, 4, 2]


def test_one_plan_per_forward(monkeypatch):
    """The layers share one plan: the batch is cut into buckets once per forward, not per layer."""
    calls = []
    plan_for = attention.plan_for
    monkeypatch.setattr(attention, "plan_for", lambda *args: calls.append(1) or plan_for(*args))
    model = tiny()
    model.set_attn_implementation(attention.NAME)
    ids, positions = batch()
    model(input_ids=ids, position_ids=positions)
    model(input_ids=ids, position_ids=positions.clone())
    assert model.config.num_hidden_layers == 2 and len(calls) == 2


def test_bf16_plans_use_a_few_fixed_shapes():
    """For the bf16 kernels, examples up to the limit are bucketed by powers of two (at least 16),
    padded to them, and cut into groups of a power of four (each matmul shape costs oneDNN a cached
    primitive); longer ones keep their edges and exact widths, in groups of a power of four too."""
    _, positions = batch()  # lengths 10, 25, 5 | 40 | 1, 2, 3, 34 | 7, 7, 7, 7, 12
    assert attention.plan_for(positions).shapes == [(10, 12), (1, 25), (2, 40)]
    assert attention.plan_for(positions, 20).shapes == [(4, 16), (4, 16), (1, 16), (1, 16), (1, 25), (1, 40), (1, 40)]
    assert attention.plan_for(positions, 64).shapes == [(4, 16), (4, 16), (1, 16), (1, 16), (1, 32), (1, 64), (1, 64)]
    assert [attention._powers_of_four(n) for n in (1, 3, 4, 13, 70)] == [
        [1],
        [1, 1, 1],
        [4],
        [4, 4, 4, 1],
        [64, 4, 1, 1],
    ]


def test_flat_plan_gives_the_examples_offsets():
    """For the CUDA varlen kernel: no buckets, the offsets of the examples in the flat tokens."""
    _, positions = batch()  # lengths 10, 25, 5 | 40 | 1, 2, 3, 34 | 7, 7, 7, 7, 12
    plan = attention.plan_for(positions, flat=True)
    lengths = [10, 25, 5, 40, 1, 2, 3, 34, 7, 7, 7, 7, 12]
    assert plan.cu_seqlens.dtype == torch.int32 and plan.shapes == []
    assert plan.cu_seqlens.tolist() == [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert plan.max_length == 40
    assert attention.plan_for(torch.arange(40).expand(3, -1), flat=True).whole_rows


def flash_varlen_usable() -> bool:
    return (
        torch.cuda.is_available()
        and torch.cuda.get_device_capability() >= (8, 0)
        and attention._flash_varlen_kernel() is not None
    )


@pytest.mark.skipif(not flash_varlen_usable(), reason="needs an Ampere+ GPU and torch.nn.attention.varlen")
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-autocast", "bf16-weights"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cuda_flat_kernel_matches_masked_sdpa(monkeypatch, kind, weights):
    """On CUDA in bf16 (autocast over fp32 weights, or bf16 weights) the packed batch goes to
    torch's FlashAttention-2 varlen kernel in one call (grouped key/value heads included) and
    agrees with transformers' masked sdpa to bf16 precision."""
    used = []
    flat_dtype = attention._flat_kernel_dtype
    monkeypatch.setattr(attention, "_flat_kernel_dtype", lambda *a: used.append(flat_dtype(*a)) or used[-1])
    torch.manual_seed(0)
    model = tiny(kind).to("cuda", weights)
    ids, positions = (t.cuda() for t in batch())
    results = {}
    for impl in ("sdpa", attention.NAME):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=weights == torch.float32):
            results[impl] = forward_backward(model, impl, ids, positions)
    # with fp32 weights query and key come in fp32 (rotary cos/sin in the embeddings' dtype)
    assert used and all(dtype == torch.bfloat16 for dtype in used)
    (logits_sdpa, grads_sdpa), (logits_varlen, grads_varlen) = results["sdpa"], results[attention.NAME]
    torch.testing.assert_close(logits_varlen.float(), logits_sdpa.float(), rtol=0.02, atol=0.02)
    for name, grad in grads_sdpa.items():
        scale = grad.abs().max().item()
        assert (grads_varlen[name] - grad).abs().max().item() <= 0.05 * scale + 1e-6, name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_examples_equal_each_example_alone(kind):
    torch.manual_seed(0)
    model = tiny(kind).double().eval()
    ids, positions = batch()
    model.set_attn_implementation(attention.NAME)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions).logits
        model.set_attn_implementation("sdpa")
        for b, row in enumerate(SEGMENTS):
            start = 0
            for n in row:
                alone = model(input_ids=ids[b : b + 1, start : start + n]).logits[0]
                torch.testing.assert_close(packed[b, start : start + n], alone, rtol=0, atol=1e-12)
                start += n


@pytest.mark.parametrize("segments", [SEGMENTS, ([40], [40], [40])], ids=["packed", "whole-rows"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_loss_and_every_gradient_equal_masked_sdpa(kind, segments):
    torch.manual_seed(0)
    model = tiny(kind).double()
    ids, positions = batch(segments)
    logits_sdpa, grads_sdpa = forward_backward(model, "sdpa", ids, positions)
    logits_varlen, grads_varlen = forward_backward(model, attention.NAME, ids, positions)
    torch.testing.assert_close(logits_varlen, logits_sdpa, rtol=0, atol=1e-12)
    for name, grad in grads_sdpa.items():
        torch.testing.assert_close(grads_varlen[name], grad, rtol=0, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("block", [attention.BLOCK, 8], ids=["one-block", "blockwise"])
@pytest.mark.parametrize("edges", [attention.BUCKET_EDGES, (4, 8)])
def test_bf16_autocast_matches_sdpa(monkeypatch, edges, block):
    """Under CPU bf16 autocast varlen agrees with transformers' sdpa to bf16 precision, whether every
    bucket is one block of bf16 matmuls or longer ones go blockwise. Few bucket edges force a bucket
    per length beyond the last one."""
    monkeypatch.setattr(attention, "BUCKET_EDGES", edges)
    monkeypatch.setattr(attention, "BLOCK", block)
    torch.manual_seed(0)
    model = tiny()
    ids, positions = batch()
    results = {}
    for impl in ("sdpa", attention.NAME):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[impl] = forward_backward(model, impl, ids, positions)
    (logits_sdpa, grads_sdpa), (logits_varlen, grads_varlen) = results["sdpa"], results[attention.NAME]
    torch.testing.assert_close(logits_varlen.float(), logits_sdpa.float(), rtol=0.02, atol=0.02)
    for name, grad in grads_sdpa.items():
        scale = grad.abs().max().item()
        assert (grads_varlen[name] - grad).abs().max().item() <= 0.05 * scale + 1e-6, name


def reference_causal_attention(q, k, v, scaling):
    """fp64, written out: scores, causal mask, softmax, weighted values."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) * scaling
    length = q.shape[-2]
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    "kernel, length",
    [("_math_causal_attention", n) for n in (1, 7, 16)]
    + [("_blockwise_causal_attention", n) for n in (17, 32, 33, 48, 130)],
)
def test_bf16_matmul_attention_is_causal_attention(monkeypatch, kernel, length):
    """The bf16 kernels (scale and mask inside one baddbmm, softmax in bf16; one block, or blocks of
    16 query rows with their probabilities kept (up to 32 tokens) or recomputed in backward, over
    lengths that are and are not whole blocks) against fp64 causal attention: outputs and the
    gradients of q, k and v, to bf16 precision."""
    monkeypatch.setattr(attention, "BLOCK", 16)
    monkeypatch.setattr(attention, "KEEP_PROBABILITIES_UP_TO", 32)
    torch.manual_seed(0)
    shape = (3, 4, length, 32)
    inputs = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    grad_out = torch.randn(shape, dtype=torch.float64)
    fast = [t.to(torch.bfloat16).requires_grad_() for t in inputs]
    args = (32**-0.5, 0.0) if kernel == "_math_causal_attention" else (32**-0.5,)
    out = getattr(attention, kernel)(*fast, *args)
    out.backward(grad_out.to(torch.bfloat16))
    exact = [t.clone().requires_grad_() for t in inputs]
    expected = reference_causal_attention(*exact, 32**-0.5)
    expected.backward(grad_out)
    assert out.dtype == torch.bfloat16 and out.shape == shape
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0.03)
    for got, want in zip(fast, exact, strict=True):
        scale = want.grad.abs().max().item()
        assert got.grad.dtype == torch.bfloat16
        assert (got.grad.double() - want.grad).abs().max().item() <= 0.03 * scale


def test_bf16_autocast_attends_in_one_block_then_blockwise(monkeypatch):
    """Under CPU bf16 autocast, buckets up to BLOCK go to one block of bf16 matmuls, longer ones
    blockwise; attention dropout on longer ones, and fp32 (no autocast) always, to the flash kernel."""
    calls = {"_math_causal_attention": [], "_blockwise_causal_attention": []}
    for name, shapes in calls.items():
        kernel = getattr(attention, name)
        monkeypatch.setattr(
            attention, name, lambda q, *a, k=kernel, s=shapes: s.append(tuple(q.shape[::2])) or k(q, *a)
        )
    monkeypatch.setattr(attention, "BLOCK", 20)
    model = tiny()
    ids, positions = batch()
    model.set_attn_implementation(attention.NAME)
    model(input_ids=ids, position_ids=positions)
    assert calls == {"_math_causal_attention": [], "_blockwise_causal_attention": []}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, position_ids=positions)
    shapes = attention.plan_for(positions, attention.FIXED_SHAPES_UP_TO).shapes
    assert sorted(set(calls["_math_causal_attention"])) == sorted({s for s in shapes if s[1] <= 20})
    assert sorted(set(calls["_blockwise_causal_attention"])) == sorted({s for s in shapes if s[1] > 20})
    blockwise = len(calls["_blockwise_causal_attention"])
    assert blockwise
    q = torch.randn(2, 4, 21, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dropped = attention._causal_attention(q, q, q, 0.25, dropout=0.5)
    assert dropped.dtype == torch.bfloat16 and len(calls["_blockwise_causal_attention"]) == blockwise


def test_generation_with_cache_and_padding_is_sdpa_generation():
    """Decoding (a KV cache) and left padding (a mask) go to sdpa: the same tokens come out."""
    torch.manual_seed(0)
    model = tiny().eval()
    model.config.use_cache = True
    ids = torch.randint(2, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second prompt
    outputs = {}
    for impl in ("sdpa", attention.NAME):
        model.set_attn_implementation(impl)
        for name, m in (("padded", mask), ("full", torch.ones_like(ids))):
            kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            outputs[impl, name] = model.generate(input_ids=ids, attention_mask=m, **kwargs)
    assert torch.equal(outputs["sdpa", "padded"], outputs[attention.NAME, "padded"])
    assert torch.equal(outputs["sdpa", "full"], outputs[attention.NAME, "full"])


def config_with(*overrides):
    data = {"model": {"preset": "llama-tiny"}, "data": {"train": "x.txt"}}
    for item in overrides:
        key, value = item.split("=")
        section, field = key.split(".")
        data.setdefault(section, {})[field] = value
    return Config.model_validate(data)


def test_auto_picks_varlen_where_it_can():
    assert select_attention(tiny(), config_with()) == attention.NAME
    assert select_attention(tiny(), config_with("train.compile=true")) == "sdpa"
    assert select_attention(tiny(), config_with("model.attention=eager")) == "eager"
    sliding = tiny("mistral")
    assert select_attention(sliding, config_with()) == "sdpa"  # left as loaded
    with pytest.raises(UserError, match="sliding-window attention; use model.attention=sdpa"):
        select_attention(sliding, config_with("model.attention=varlen"))


def test_saved_config_does_not_name_varlen(tmp_path):
    """A model trained with varlen loads anywhere: its config.json names no attention implementation."""
    model = tiny()
    model.set_attn_implementation(attention.NAME)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert attention.NAME not in json.dumps(saved)
    assert LlamaForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"
