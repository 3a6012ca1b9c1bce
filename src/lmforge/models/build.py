"""Building the model: a new one from a preset/explicit sizes, or a pretrained one from disk."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)

from lmforge.config import Config, looks_local, resolved_architecture
from lmforge.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_CLASSES = {
    "causal-lm": AutoModelForCausalLM,
    "seq2seq": AutoModelForSeq2SeqLM,
    "classification": AutoModelForSequenceClassification,
}


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


def t5_config(config: Config, tokenizer: PreTrainedTokenizerBase) -> T5Config:
    """A from-scratch T5 sized by the lmforge config (hidden_size = d_model, num_layers each side)."""
    arch = resolved_architecture(config)
    t5 = T5Config(
        vocab_size=len(tokenizer),
        d_model=arch["hidden_size"],
        d_ff=arch["intermediate_size"],
        d_kv=arch["hidden_size"] // arch["num_heads"],
        num_layers=arch["num_layers"],
        num_decoder_layers=arch["num_layers"],
        num_heads=arch["num_heads"],
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # transformers 5 always ties T5's head to its embeddings (std 1); it scales the decoder's output
    # by d_model^-0.5 unless told tie_word_embeddings=False, and without that scale the logits have
    # std sqrt(d_model): an initial loss of 60+ where ln(vocab) is 8.
    t5.scale_decoder_outputs = True
    return t5


def build_model(config: Config, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None) -> PreTrainedModel:
    """A model ready to train. Seed the RNGs first: new weights (a whole new model, or a new
    classification head) come from them.

    Args:
        labels: class names in id order, for model.task=classification.
    """
    m = config.model
    dtype = DTYPES.get(m.dtype, torch.float32)
    if m.name_or_path is None and m.task == "seq2seq":
        model = T5ForConditionalGeneration(t5_config(config, tokenizer)).to(dtype)
    elif m.name_or_path is None:
        model = LlamaForCausalLM._from_config(llama_config(config, tokenizer), attn_implementation="sdpa")
        model = model.to(dtype)
    else:
        from lmforge.models.peft import quantization_config

        quantization = quantization_config(config)
        from lmforge.publish.push import local_model

        where = local_model(m.name_or_path, config.storage)  # s3://: the copy pulled into the cache
        model = load_pretrained(where, dtype, m.trust_remote_code, m.task, labels, quantization)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions is not None and config.data.max_length > positions:
            raise UserError(
                f"data.max_length ({config.data.max_length}) exceeds the {positions} positions of "
                f"{m.name_or_path}; lower data.max_length"
            )
    if m.task == "causal-lm":
        select_attention(model, config)
    if m.freeze:
        freeze(model, m.freeze)
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # no KV cache while training
    if config.lora is not None:
        from lmforge.models.peft import apply_lora

        model = apply_lora(model, config)
    return model


def select_attention(model: PreTrainedModel, config: Config) -> str:
    """Set the attention implementation model.attention asks for (auto leaves a model that cannot use
    varlen as it was loaded); returns the one in use."""
    from lmforge.models import attention

    wanted = config.model.attention
    if wanted in ("auto", "varlen"):
        reason = attention.varlen_unsupported(model)
        if reason is None and wanted == "auto" and config.train.compile:
            reason = "train.compile is on (varlen cuts batches by their position ids, which breaks the graph)"
        if reason is None:
            model.set_attn_implementation(attention.NAME)
        elif wanted == "varlen":
            raise UserError(f"model.attention=varlen: {reason}; use model.attention=sdpa")
    else:
        model.set_attn_implementation(wanted)
    return model.config._attn_implementation


_BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|block)\.(\d+)\.")
_RANGE = re.compile(r"^layers\.(\d+)(?:-(\d+))?$")


def freeze(model: torch.nn.Module, patterns: list[str]) -> None:
    """Keep matching parameters fixed.

    Patterns: "embeddings" (every embedding table), "layers.A-B" / "layers.A" (transformer blocks A..B,
    whatever the architecture calls them: layers, layer, h, block), or a parameter-name prefix.
    """
    embedding_params = {
        id(p) for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()
    }
    for pattern in patterns:
        matched = 0
        blocks = _RANGE.match(pattern)
        for name, param in model.named_parameters():
            if pattern == "embeddings":
                hit = id(param) in embedding_params
            elif blocks:
                first, last = int(blocks.group(1)), int(blocks.group(2) or blocks.group(1))
                index = _BLOCK.search(name)
                hit = index is not None and first <= int(index.group(1)) <= last
            else:
                hit = name.startswith(pattern)
            if hit:
                param.requires_grad_(False)
                matched += 1
        if not matched:
            examples = ", ".join(n for n, _ in list(model.named_parameters())[:4])
            raise UserError(f"model.freeze: {pattern!r} matches no parameter (names look like: {examples})")


ADAPTER_TASKS = {"SEQ_CLS": "classification", "SEQ_2_SEQ_LM": "seq2seq", "CAUSAL_LM": "causal-lm"}


def task_of(path: str | Path) -> str:
    """The task of a saved HF model: an adapter's task_type, else its config's architecture."""
    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        task_type = json.loads(adapter.read_text()).get("task_type")
        if task_type in ADAPTER_TASKS:
            return ADAPTER_TASKS[task_type]
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read its model config.json ({str(exc).splitlines()[0]})") from None
    architectures = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal-lm"


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    task: str = "causal-lm",
    labels: list[str] | None = None,
    quantization=None,
):
    """Load an HF-format model directory for `task` (safetensors preferred)."""
    local = Path(path).expanduser()
    local_path = looks_local(str(path))
    if local_path and not (local / "config.json").is_file():
        found = "no such directory" if not local.is_dir() else "no config.json there"
        raise UserError(f"{path}: not a Hugging Face model directory ({found}; looked for {local.resolve()})")
    extra = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
        extra["device_map"] = {"": 0}
    if task == "classification" and labels:
        extra = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    try:
        return AUTO_CLASSES[task].from_pretrained(
            str(local.resolve()) if local_path else str(path),  # links resolved: an adapter records this
            dtype=dtype or "auto",
            trust_remote_code=trust_remote_code,
            use_safetensors=None,
            **extra,
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a {task} model from {path}: {exc}") from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)
