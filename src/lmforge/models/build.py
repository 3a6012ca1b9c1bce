"""Building the model: a new one from a preset/explicit sizes, or a pretrained one from disk."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lmforge.config import Config, resolved_architecture
from lmforge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(config: Config, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The transformers config of a from-scratch Llama model sized by the lmforge config."""
    arch = resolved_architecture(config)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch["hidden_size"],
        intermediate_size=arch["intermediate_size"],
        num_hidden_layers=arch["num_layers"],
        num_attention_heads=arch["num_heads"],
        num_key_value_heads=arch["num_kv_heads"],
        max_position_embeddings=arch["max_position_embeddings"],
        tie_word_embeddings=arch["tie_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: Config, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A causal LM ready to train. Seed the RNGs first: a new model's initial weights come from them."""
    m = config.model
    dtype = DTYPES.get(m.dtype, torch.float32)
    if m.name_or_path is None:
        model = LlamaForCausalLM._from_config(llama_config(config, tokenizer), attn_implementation="sdpa")
        model = model.to(dtype)
    else:
        model = load_pretrained(m.name_or_path, dtype, m.trust_remote_code)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and config.data.max_length > positions:
            raise UserError(
                f"data.max_length ({config.data.max_length}) exceeds the {positions} positions of "
                f"{m.name_or_path}; lower data.max_length"
            )
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # no KV cache while training
    return model


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """Load an HF-format causal LM directory (safetensors preferred)."""
    local = Path(path).expanduser()
    looks_local = local.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        raise UserError(f"{path}: not a Hugging Face model directory (no config.json there)")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(local) if looks_local else str(path),
            dtype=dtype or "auto",
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a causal LM from {path}: {exc}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
