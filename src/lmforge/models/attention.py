"""Variable-length attention for packed rows: each example attends within itself, at its own cost.

transformers keeps the examples of a packed row apart with a block-diagonal mask. Every row then
pays for the full T x T attention, in the masked kernels, which cannot skip the blocks above the
diagonal. Here the examples of a batch are cut out of the flat (batch x time) tokens, grouped into
buckets of similar length, each bucket is one causal (unmasked) attention call (`_causal_attention`:
sdpa, or bf16 matmuls under CPU bf16 autocast), and the outputs are put back in place: the cost
follows sum(n_i^2) over the examples instead of B x T^2, and nothing of size T x T is stored.

On a CUDA GPU (Ampere or newer, fp16/bf16) the buckets are not needed: torch's own FlashAttention-2
varlen kernel (torch 2.10+) takes the flat tokens and the examples' offsets in one call, with no
padding at all. Where that kernel is missing, the buckets go to sdpa's CUDA kernels.

An example is a maximal run of consecutive position ids, so lmforge's packed rows (positions restart
at 0 for each example) and ordinary unpacked batches are both handled. Anything else (a KV cache, a
padding mask, output_attentions) falls back to transformers' sdpa, with the mask sdpa would get.
Where the host knows the examples' lengths (`known_segments`: training and evaluation batches carry
them from the collator), the plan is made from those, and the position ids are never read back from
the device: on a GPU such a read waits for all the work queued before it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "lmforge_varlen"
BUCKET_EDGES = (16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
"""Examples up to each edge share a bucket (padded to the bucket's longest): at most 1.5x apart."""


@dataclass(frozen=True)
class Plan:
    shapes: list[tuple[int, int]]
    """(examples, padded length) of each bucket."""
    gather: torch.Tensor
    """Flat token index of every slot of every bucket, bucket after bucket (S x L slots each);
    slots past an example's end repeat its last token."""
    restore: torch.Tensor
    """Flat token t's output is the output of slot restore[t]."""
    whole_rows: bool = False
    """Every row is one example (full blocks of pretraining text): plain causal attention, no gathering."""
    cu_seqlens: torch.Tensor | None = None
    """For the flat kernel (`_flash_varlen_kernel`) instead of buckets: (examples + 1,) int32 offsets of the
    examples in the flat tokens."""
    max_length: int = 0
    """The longest example, with `cu_seqlens`."""


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the examples of a (B, T) batch, in flat order: a new example starts at every row
    start and wherever the position id is not the previous one plus one."""
    batch, width = position_ids.shape
    flat = position_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1] + 1
    starts[::width] = True
    first = starts.nonzero().squeeze(1).tolist()
    return [end - start for start, end in zip(first, first[1:] + [batch * width], strict=True)]


def plan_for(position_ids: torch.Tensor, fixed_up_to: int = 0, flat: bool = False) -> Plan:
    """`plan_from_lengths` for the examples the (B, T) position ids show: reading them back from a
    GPU waits for the device."""
    return plan_from_lengths(
        np.asarray(segment_lengths(position_ids)), position_ids.shape[0], position_ids.device, fixed_up_to, flat
    )


def plan_from_lengths(
    lengths: np.ndarray, rows: int, device: torch.device, fixed_up_to: int = 0, flat: bool = False
) -> Plan:
    """How to cut a batch of `rows` rows whose examples have these lengths (flat order, as
    `segment_lengths` gives them) into buckets of examples, computed once per forward and shared by all
    layers. All buckets are gathered with one index (and scattered back with one): each gather's
    backward zero-fills a tensor of the whole batch, so one per bucket cost more than the buckets.

    With `fixed_up_to` (the bf16 matmul kernels), examples up to that many tokens are bucketed by
    powers of two instead, padded to them, and every bucket is cut into groups of a power of four
    examples, so that the shapes come from a small set: the bf16 matmul kernels (oneDNN) build and
    keep a primitive per shape, ~0.6 MB each. With a new shape at every step the process grew by
    1.2 GB in 50 steps of the SFT benchmark; these shapes are 11 over the same steps. Longer buckets
    keep their widths, which the blockwise kernel pads to whole blocks.

    With `flat`, no buckets: the examples' offsets for a kernel that takes the flat tokens as they are."""
    if len(lengths) == rows:
        return Plan([], torch.empty(0), torch.empty(0), whole_rows=True)
    if flat:
        offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        return Plan([], torch.empty(0), torch.empty(0), cu_seqlens=_to(offsets, device), max_length=int(lengths.max()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    edges = np.asarray(BUCKET_EDGES)
    # beyond the last edge, a bucket per length
    keys = np.where(lengths <= edges[-1], edges[np.minimum(np.searchsorted(edges, lengths), len(edges) - 1)], lengths)
    powers = np.maximum(16, 2 ** np.ceil(np.log2(lengths))).astype(np.int64)
    keys = np.where(powers <= fixed_up_to, powers, keys)
    shapes, gathers = [], []
    restore = np.empty(int(lengths.sum()), dtype=np.int64)
    offset = 0
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        width = int(key) if key <= fixed_up_to else int(lengths[members].max())
        groups = np.split(members, np.cumsum(_powers_of_four(len(members)))[:-1]) if fixed_up_to else [members]
        for group in groups:
            slots = np.arange(width)[None, :]
            ends = lengths[group][:, None]
            gather = starts[group][:, None] + np.minimum(slots, ends - 1)
            is_real = slots < ends
            restore[gather[is_real]] = offset + (np.arange(len(group))[:, None] * width + slots)[is_real]
            shapes.append((len(group), width))
            gathers.append(gather.reshape(-1))
            offset += len(group) * width
    return Plan(shapes, _to(torch.from_numpy(np.concatenate(gathers)), device), _to(torch.from_numpy(restore), device))


def _to(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory, queued behind the work already there
    rather than waiting for it (a copy from pageable memory would)."""
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def _powers_of_four(n: int) -> list[int]:
    """n as a sum of powers of four, largest first: 13 -> [4, 4, 4, 1]."""
    parts, power = [], 1
    while power * 4 <= n:
        power *= 4
    while n:
        parts += [power] * (n // power)
        n, power = n % power, power // 4
    return parts


_last_plan: tuple[torch.Tensor, int, int, int, bool, Plan] | None = None


@torch.compiler.disable  # the identity and version checks must run at every call, not once when traced
def _cached_plan(position_ids: torch.Tensor, batch: int, fixed_up_to: int, flat: bool) -> Plan:
    """Every layer of one forward gets the same position_ids tensor: plan once per forward, from
    the lengths the host knows (`known_segments`) when it knows them for these position ids."""
    global _last_plan
    key = (position_ids, position_ids._version, batch, fixed_up_to, flat)
    if _last_plan is None or _last_plan[0] is not key[0] or _last_plan[1:5] != key[1:]:
        lengths = _known.lengths_for(position_ids, batch) if _known is not None else None
        if lengths is None:
            plan = plan_for(position_ids.expand(batch, -1), fixed_up_to, flat)
        else:
            plan = plan_from_lengths(lengths, batch, position_ids.device, fixed_up_to, flat)
        _last_plan = (*key, plan)
    return _last_plan[5]


@dataclass(frozen=True)
class _Known:
    """What the host knows of the batch being run (`known_segments`)."""

    lengths: np.ndarray
    positions: torch.Tensor
    full_mask: torch.Tensor | None

    def lengths_for(self, position_ids: torch.Tensor, batch: int) -> np.ndarray | None:
        """The examples' lengths, if `position_ids` are those of the known batch (the same memory,
        which a view or an expand keeps)."""
        known = self.positions
        if position_ids.data_ptr() != known.data_ptr() or (batch, position_ids.shape[-1]) != tuple(known.shape):
            return None
        return self.lengths

    def is_full_mask(self, mask: torch.Tensor) -> bool:
        """Whether `mask` is the all-True mask handed out (the same memory: GPT-2 passes a view of it)."""
        full = self.full_mask
        return full is not None and (
            mask is full
            or (mask.data_ptr() == full.data_ptr() and mask.numel() == full.numel() and mask.dtype == full.dtype)
        )


_known: _Known | None = None


@contextmanager
def known_segments(
    segments: torch.Tensor, position_ids: torch.Tensor, mask: bool = True
) -> Iterator[torch.Tensor | None]:
    """Within the block, a forward over `position_ids` takes its examples' lengths from `segments`
    (host memory, flat order, as `segment_lengths` would read them off the device) rather than reading
    the position ids back from the device, which on a GPU waits for all the work queued before it.

    With `mask`, yields an all-True (B, T) mask for the forward's `attention_mask`: a mask keeps
    transformers from checking the position ids for packing (another read-back), and `varlen_mask`
    knows this one and turns it into no mask, which is what the position ids alone would have given.
    Only for varlen attention (sdpa would take it as "no packing"), and not under torch.compile, where
    transformers skips that check anyway and the identity test would be traced."""
    global _known
    if int(segments.sum()) != position_ids.numel():
        raise ValueError(f"segments of {int(segments.sum())} tokens for position ids {tuple(position_ids.shape)}")
    full = torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device) if mask else None
    previous, _known = _known, _Known(segments.numpy(), position_ids, full)
    try:
        yield full
    finally:
        _known = previous


FIXED_SHAPES_UP_TO = 512
"""Under CPU bf16 autocast, examples up to this length are bucketed by powers of two (`plan_for`): the
bf16 matmul kernels keep a primitive per shape."""

BLOCK = 256
"""Under CPU bf16 autocast, attention runs in bf16 matmuls on blocks of this many query rows: one
block (`_math_causal_attention`) up to this length, then `_blockwise_causal_attention`. Forward and
backward of 12 heads of 64 against torch's CPU flash kernel (in fp32, its fastest): 2.5x faster up to
256 tokens, 2.2x at 512 and 1024, 1.7x at 2048 and 4096. 256 rows beat 128 and 512 from 1024 on."""

KEEP_PROBABILITIES_UP_TO = 512
"""Blockwise attention up to this length keeps its blocks' probabilities for backward (plain
autograd: 23 against 32 ms for 4 x 512 tokens, 12 heads), longer recomputes them."""


def _causal_attention(q, k, v, scaling: float, dropout: float) -> torch.Tensor:
    """(S, H, L, D) causal attention of each of S independent sequences."""
    kind, length = q.device.type, q.shape[2]
    if kind == "cpu" and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        with torch.autocast(kind, enabled=False):
            if dtype == torch.bfloat16 and (length <= BLOCK or not dropout):
                # contiguous in the same pass: the kernels' reshapes are then views, not copies
                q, k, v = (t.to(dtype, memory_format=torch.contiguous_format) for t in (q, k, v))
                if length <= BLOCK:
                    return _math_causal_attention(q, k, v, scaling, dropout)
                return _blockwise_causal_attention(q, k, v, scaling)
            # attention dropout on longer sequences: torch's CPU flash kernel, faster in fp32 than in
            # bf16 (measured); fp32 batched matmuls also keep oneDNN's per-shape cache small
            out = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), is_causal=True, dropout_p=dropout, scale=scaling
            )
        return out.to(dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, scale=scaling)


def _bf16_matmuls(q: torch.Tensor) -> bool:
    """Whether attention runs in bf16 matmuls (`_causal_attention`): CPU bf16 autocast."""
    kind = q.device.type
    return kind == "cpu" and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == torch.bfloat16


def _math_causal_attention(q, k, v, scaling: float, dropout: float) -> torch.Tensor:
    """softmax(q k^T * scaling + causal mask) v with bf16 matmuls, as transformers' eager attention
    computes it under autocast (bf16 scores, softmax accumulated in fp32, bf16 probabilities), but
    scaling and masking inside the first matmul (baddbmm) and the softmax in bf16 in and out: on CPU
    torch's flash kernel spends most of its time outside its small matmuls, this does not. For up to
    BLOCK tokens: the (L x L) probabilities are kept for backward."""
    size, heads, length, dim = q.shape
    q, k, v = (t.reshape(size * heads, length, dim) for t in (q, k, v))
    probs = _block_probs(q, k, 0, scaling)  # one block: length <= BLOCK
    if dropout:
        probs = F.dropout(probs, dropout)
    return torch.bmm(probs, v).view(size, heads, length, dim)


def _blockwise_causal_attention(q, k, v, scaling: float) -> torch.Tensor:
    """What `_math_causal_attention` computes, BLOCK query rows at a time against the keys up to each
    block's last row: the blocks above the diagonal are never computed. Past KEEP_PROBABILITIES_UP_TO
    tokens nothing of size L x L is kept for backward, which recomputes each block's probabilities
    (one matmul more than keeping them, and as fast from 1024 tokens on, where keeping them would
    cost L^2 / 2 x heads x 2 bytes a layer). The length is padded to a whole number of blocks (keys
    after a row are masked anyway), so that the matmul shapes come from a small set (oneDNN keeps a
    primitive per shape)."""
    size, heads, length, dim = q.shape
    padded = length + -length % BLOCK
    if padded > length:
        q, k, v = (F.pad(t, (0, 0, 0, padded - length)) for t in (q, k, v))
    q, k, v = (t.reshape(size * heads, padded, dim) for t in (q, k, v))
    if padded <= KEEP_PROBABILITIES_UP_TO:
        out = _attend_blocks(q, k, v, scaling)  # autograd keeps each block's probabilities
    else:
        out = _BlockwiseCausalAttention.apply(q, k, v, scaling)
    return out.view(size, heads, padded, dim)[:, :, :length]


def _attend_blocks(q, k, v, scaling: float) -> torch.Tensor:
    """(N, L, D) bf16 causal attention, L a multiple of BLOCK, block after block."""
    blocks = range(0, q.shape[1], BLOCK)
    return torch.cat([torch.bmm(_block_probs(q, k, start, scaling), v[:, : start + BLOCK]) for start in blocks], dim=1)


class _BlockwiseCausalAttention(torch.autograd.Function):
    """(N, L, D) bf16 causal attention, L a multiple of BLOCK; see `_blockwise_causal_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, scaling):
        ctx.save_for_backward(q, k, v)
        ctx.scaling = scaling
        return _attend_blocks(q, k, v, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        scaling = ctx.scaling
        grad_q = torch.empty_like(q)
        # key and value rows are seen by every block from theirs on: summed over blocks in fp32
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros_like(grad_k)
        for start in range(0, q.shape[1], BLOCK):
            end = start + BLOCK
            rows, keys, values, grad_rows = q[:, start:end], k[:, :end], v[:, :end], grad_out[:, start:end]
            probs = _block_probs(q, k, start, scaling)  # (N, BLOCK, end)
            grad_v[:, :end] += torch.bmm(probs.transpose(1, 2), grad_rows)
            grad_probs = torch.bmm(grad_rows, values.transpose(1, 2))
            grad_scores = torch.ops.aten._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_q[:, start:end] = torch.bmm(grad_scores, keys).mul_(scaling)
            grad_k[:, :end].add_(torch.bmm(grad_scores.transpose(1, 2), rows), alpha=scaling)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None


def _block_probs(q: torch.Tensor, k: torch.Tensor, start: int, scaling: float) -> torch.Tensor:
    """Attention probabilities of query rows start..start + BLOCK (fewer where q ends sooner) over
    the keys up to the last of them, (N, rows, start + rows)."""
    rows = q[:, start : start + BLOCK]
    n = rows.shape[1]
    mask = _causal_bias(BLOCK, q.dtype, q.device)[:n, :n]
    if start:
        mask = F.pad(mask, (start, 0))  # earlier blocks are all seen
    return torch.softmax(torch.baddbmm(mask, rows, k[:, : start + n].transpose(1, 2), alpha=scaling), dim=-1)


@functools.cache
def _causal_bias(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size): 0 on and below the diagonal, -inf above; sliced for shorter sequences."""
    return torch.full((size, size), float("-inf"), device=device).triu(1).to(dtype)


@functools.cache
def _flash_varlen_kernel():
    """torch's own FlashAttention-2 varlen kernel (`torch.nn.attention.varlen`, torch 2.10+, CUDA),
    as (attend, takes_scale), attend(q, k, v, cu_seqlens, max_length, scale) on (tokens, heads, dim)
    tensors; None where this torch has none. Its keywords changed between releases (is_causal in
    2.10, window_size after; scale and enable_gqa arrived later): they are read off its signature."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    takes_scale, takes_gqa = "scale" in params, "enable_gqa" in params

    def attend(q, k, v, cu_seqlens, max_length, scale):
        extra = dict(causal, scale=scale) if takes_scale else dict(causal)
        if k.shape[1] != q.shape[1]:
            if takes_gqa:
                extra["enable_gqa"] = True
            else:  # query head h reads key/value head h // groups, as repeat_kv arranges them
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **extra)

    return attend, takes_scale


def _flat_kernel_dtype(query: torch.Tensor, dropout: float, scaling: float) -> torch.dtype | None:
    """The dtype this call runs `_flash_varlen_kernel` in, or None if it cannot: fp16/bf16 (the
    weights', or autocast's) on an Ampere or newer GPU, a head size FlashAttention-2 takes, no
    attention dropout (the kernel has none) and, where the kernel takes no scale, the default one.

    Under autocast with fp32 weights, query and key arrive in fp32 (Llama's rotary cos/sin take the
    embeddings' dtype) and value in the autocast dtype: sdpa casts them under autocast, and so must
    this, as the kernel is not an autocast op."""
    if not query.is_cuda or dropout:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    kernel, dim = _flash_varlen_kernel(), query.shape[-1]
    if dtype not in (torch.float16, torch.bfloat16) or kernel is None or dim > 256 or dim % 8:
        return None
    if torch.cuda.get_device_capability(query.device) < (8, 0) or not (kernel[1] or scaling == dim**-0.5):
        return None
    return dtype


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (B, H, T, D) query/key/value -> (B, T, H, D) output."""
    position_ids = kwargs.get("position_ids")
    if (
        position_ids is None
        or attention_mask is not None
        or query.shape[2] != key.shape[2]  # decoding with a KV cache
        or kwargs.get("output_attentions")
        or kwargs.get("sliding_window") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, width, dim = query.shape
    if scaling is None:
        scaling = dim**-0.5
    flat_dtype = _flat_kernel_dtype(query, dropout, scaling)
    plan = _cached_plan(position_ids, batch, FIXED_SHAPES_UP_TO if _bf16_matmuls(query) else 0, flat_dtype is not None)
    if plan.cu_seqlens is not None:  # no buckets, no padding: the kernel takes the examples' offsets
        q, k, v = (
            t.transpose(1, 2).reshape(batch * width, t.shape[1], dim).to(flat_dtype) for t in (query, key, value)
        )
        out = _flash_varlen_kernel()[0](q, k, v, plan.cu_seqlens, plan.max_length, scaling)
        return out.view(batch, width, heads, dim), None
    groups = heads // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if plan.whole_rows:
        return _causal_attention(query, key, value, scaling, dropout).transpose(1, 2), None
    flat_q, flat_k, flat_v = (t.transpose(1, 2).reshape(batch * width, heads, -1) for t in (query, key, value))
    sizes = [size * length for size, length in plan.shapes]
    slots = [t.index_select(0, plan.gather).split(sizes) for t in (flat_q, flat_k, flat_v)]
    outputs = []
    for (size, length), q, k, v in zip(plan.shapes, *slots, strict=True):
        q, k, v = (t.view(size, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        out = _causal_attention(q, k, v, scaling, dropout)
        outputs.append(out.transpose(1, 2).reshape(size * length, heads, -1))
    merged = torch.cat(outputs).index_select(0, plan.restore)
    return merged.view(batch, width, heads, -1), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask when every token is real (examples are told apart by position ids); else sdpa's mask,
    which sends the call to sdpa."""
    if attention_mask is None or (_known is not None and _known.is_full_mask(attention_mask)):
        return None
    if bool(attention_mask.all()):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, varlen_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, varlen_mask)


def varlen_unsupported(model) -> str | None:
    """Why `model` cannot use varlen attention, or None if it can."""
    config = model.config
    if not getattr(model, "_supports_attention_backend", False):
        return f"{type(model).__name__} does not use transformers' attention interface"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models attend across the whole input"
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return "the model mixes attention types across layers"
    for name in ("attn_logit_softcapping", "attn_logit_softcap"):
        if getattr(config, name, None):
            return "the model soft-caps attention logits"
    return None
