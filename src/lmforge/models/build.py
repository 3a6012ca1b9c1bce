"""Building the model: a new one from a preset/explicit sizes (a Llama, a T5, or any causal-LM family
transformers knows, by model.architecture), or a pretrained one from disk."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import typing
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from lmforge.config import Config, looks_local, resolved_architecture
from lmforge.errors import UserError
from lmforge.models.presets import family as family_of

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


# --------------------------------------------------------------------------- other families from scratch

SIZE_FIELDS = {
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}
"""lmforge's size settings and the standard Hugging Face name of each; a family's config class maps
the standard name to its own through its attribute_map (GPT-2: hidden_size -> n_embd)."""

OTHER_NAMES = {
    "intermediate_size": ("n_inner", "ffn_dim", "d_ff", "ffn_hidden_size"),
    "num_key_value_heads": ("num_kv_heads", "n_head_kv", "multi_query_group_num"),
}
"""The same size in families whose attribute_map does not map it (GPT-2's MLP width is n_inner)."""

OWNED_FIELDS = {
    "model_type": "model.architecture",
    "dtype": "model.dtype",
    "torch_dtype": "model.dtype",
    "attn_implementation": "model.attention",
    "_attn_implementation": "model.attention",
    "use_cache": "nothing (training runs without a KV cache, generation with one)",
}
"""Config fields that lmforge sets from its own settings: refused in model.config."""

ROPE_KEYWORDS = {"rope_theta", "rope_scaling", "partial_rotary_factor"}
"""Keywords that rotary families' configs take and move into their rope_parameters field."""

WELL_KNOWN = ("llama", "gpt2", "qwen2", "qwen3", "mistral", "gemma", "phi", "gpt_neox", "olmo", "starcoder2")
"""Families named in the error for an unknown model.architecture."""


def architecture_of(config: Config) -> str:
    """The Hugging Face model_type of a causal LM built from scratch (`presets.family`)."""
    return family_of(config.model.architecture, config.model.preset)


def builds_family(config: Config) -> bool:
    """Whether the model is built from scratch through its family's config class (`family_config`):
    any causal LM but a Llama sized by lmforge's settings alone (`llama_config`, kept as it was so
    that the same seed gives the same weights)."""
    m = config.model
    return m.name_or_path is None and m.task == "causal-lm" and (architecture_of(config) != "llama" or bool(m.config))


def architecture_problems(config: Config) -> list[str]:
    """What is wrong with model.architecture / model.config / model.dropout of a causal LM built from
    scratch (config time: no tokenizer yet), each naming the setting and the fix."""
    problems: list[str] = []
    family = architecture_of(config)
    cls = _config_class(family, problems)
    if cls is not None:
        values = _family_values(config, cls, problems)
        try:
            AutoConfig.for_model(family, **values)
        except Exception as exc:  # the class's own validation: a value of the wrong type, a bad combination
            problems.append(f"model.config: {cls.__name__} refuses these settings: {_first_line(exc)}")
        if not problems:
            problems += _probe_problems(config, cls, values)
    return problems


PROBE_PARAMETERS = 50_000_000
"""The largest one-block model `_probe_problems` builds (200 MB in fp32); past it, training's check alone runs."""


def _probe_problems(config: Config, cls: type[PreTrainedConfig], values: dict[str, Any]) -> list[str]:
    """What training's check of a new model (`check_new_model`: it runs, is causal, keeps packed
    examples apart, suits the attention and the chunked loss) refuses, said at config time: the check
    runs on one block of the configured sizes with a 256-token vocabulary (no tokenizer yet). Skipped
    where that block has over PROBE_PARAMETERS parameters. The global RNGs are left as they were."""
    probe = dict(values)
    probe[_own_name(cls, "num_hidden_layers") or "num_hidden_layers"] = 1
    probe.setdefault(_own_name(cls, "vocab_size") or "vocab_size", 256)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        probe.setdefault(name, None)  # the class's defaults (GPT-2's 50256) lie outside that vocabulary
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model_config = AutoConfig.for_model(cls.model_type, **probe)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())
        if size > PROBE_PARAMETERS:
            return []
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_config(model_config).to(DTYPES.get(config.model.dtype, torch.float32))
    except Exception:  # noqa: BLE001  one block alone that the class refuses: the full model is built in training
        return []
    finally:
        transformers.logging.set_verbosity(verbosity)
    try:
        check_new_model(model, config)
    except UserError as exc:
        return [str(exc)]
    return []


def family_config(config: Config, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The transformers config of a new causal LM of model.architecture's family: lmforge's sizes
    under the family's names, the tokenizer's vocabulary and special tokens, model.dropout on every
    dropout field, then model.config's fields over all of it."""
    problems: list[str] = []
    family = architecture_of(config)
    cls = _config_class(family, problems)
    if cls is None:
        raise UserError("; ".join(problems))
    values = _family_values(config, cls, problems)
    vocab_field = _own_name(cls, "vocab_size") or "vocab_size"
    vocab = values.setdefault(vocab_field, len(tokenizer))
    if vocab < len(tokenizer):
        problems.append(
            f"model.config.{vocab_field}={vocab} is below the tokenizer's {len(tokenizer)} tokens: raise it or "
            f"remove it (the default is the tokenizer's size)"
        )
    if problems:
        raise UserError("; ".join(problems))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values.setdefault(name, getattr(tokenizer, name))
    return AutoConfig.for_model(family, **values)


def dropout_fields(model_config: PreTrainedConfig) -> list[str]:
    """The dropout probabilities a family's config holds: the fields whose name holds "dropout" or
    "pdrop" and whose value is a probability (or unset where the class types it as a number)."""
    found = []
    for name, value in model_config.to_dict().items():
        if "dropout" not in name and "pdrop" not in name:
            continue
        typed = _declared(type(model_config)).get(name)
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if numeric or (value is None and (typed is float or float in typing.get_args(typed))):
            found.append(name)
    return sorted(found)


def set_dropout(model_config: PreTrainedConfig, probability: float) -> list[str]:
    """Set every dropout field of `model_config` (`dropout_fields`) to `probability`; returns their names."""
    names = dropout_fields(model_config)
    if not names:
        raise UserError(_no_dropout(type(model_config)))
    for name in names:
        setattr(model_config, name, probability)
    return names


def _config_class(family: str, problems: list[str]) -> type[PreTrainedConfig] | None:
    """The config class of a causal-LM family, or None with the problem said."""
    if family not in CONFIG_MAPPING_NAMES:
        class_names = {name.lower(): model_type for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()}
        match = class_names.get(family.lower()) or next(
            iter(difflib.get_close_matches(family.lower().replace("-", "_"), list(CONFIG_MAPPING_NAMES), n=1)), None
        )
        hint = f"; did you mean {match}?" if match else ""
        known = ", ".join(name for name in WELL_KNOWN if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        problems.append(
            f"model.architecture: unknown model type {family!r}{hint} (a Hugging Face model_type, as in a "
            f"config.json; causal LMs include {known})"
        )
        return None
    cls = CONFIG_MAPPING[family]
    if family not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        seq2seq = family in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        problems.append(
            f"model.architecture={family}: transformers has no causal LM of this family (no AutoModelForCausalLM "
            f"class{'; it is an encoder-decoder' if seq2seq else ''}), and model.task=causal-lm needs one; pick a "
            "decoder family such as llama, gpt2 or qwen2"
            + ("; a new encoder-decoder is model.preset=t5-tiny with model.task=seq2seq" if seq2seq else "")
        )
        return None
    if cls.sub_configs:
        text = getattr(cls.sub_configs.get("text_config"), "model_type", None)
        hint = f": model.architecture={text}" if text in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else ""
        problems.append(
            f"model.architecture={family} is a composite (multimodal) model of several configs; build its text "
            f"model instead{hint}"
        )
        return None
    model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family], None)
    if model_class is not None and "position_ids" not in inspect.signature(model_class.forward).parameters:
        problems.append(
            f"model.architecture={family}: {model_class.__name__} takes no position ids, which lmforge feeds every "
            "causal LM (they keep packed examples apart); pick a transformer family such as llama, gpt2 or qwen2"
        )
        return None
    return cls


def _declared(cls: type[PreTrainedConfig]) -> dict[str, dataclasses.Field]:
    """The fields a config class declares (transformers 5 configs are dataclasses), its own and its base's."""
    return {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}


def _fields(cls: type[PreTrainedConfig]) -> set[str]:
    """The names of the fields a config class takes: declared, or (an older style of class) its keywords."""
    return set(_declared(cls)) or set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _own_name(cls: type[PreTrainedConfig], standard: str) -> str | None:
    """The name `cls` gives a standard field (hidden_size -> n_embd for GPT-2), None if it has none."""
    fields = _fields(cls)
    if standard in fields:
        return standard
    if standard in cls.attribute_map:
        return cls.attribute_map[standard]
    return next((name for name in OTHER_NAMES.get(standard, ()) if name in fields), None)


def _default(cls: type[PreTrainedConfig], name: str) -> Any:
    """A field's default in the class, None if it has none."""
    field = _declared(cls).get(name)
    return field.default if field is not None and field.default is not dataclasses.MISSING else None


def _family_values(config: Config, cls: type[PreTrainedConfig], problems: list[str]) -> dict[str, Any]:
    """The fields of `cls` that lmforge's settings give (all but the tokenizer's), problems said."""
    m = config.model
    values = _sized_fields(config, cls, problems)
    configured = _configured_fields(config, cls, problems)
    values.update(configured)
    hidden, heads = (values.get(_own_name(cls, n) or n) for n in ("hidden_size", "num_attention_heads"))
    kv_field = _own_name(cls, "num_key_value_heads")
    if kv_field is not None and values.get(kv_field) is None and heads is not None:
        values[kv_field] = heads  # lmforge's default, not the family's full-size one
    if "head_dim" in _fields(cls) and "head_dim" not in configured and _ints(hidden, heads):
        values["head_dim"] = hidden // heads  # Qwen3's and Gemma's default is fixed (128, 256), not derived
    rotary = _default(cls, "rotary_dim")
    if "rotary_dim" not in configured and _ints(hidden, heads, rotary) and rotary > hidden // heads:
        values["rotary_dim"] = hidden // heads  # GPT-J's and CodeGen's 64 is a full-size head's
    if "is_decoder" in _fields(cls) and "is_decoder" not in configured:
        values["is_decoder"] = True  # BERT-like families attend both ways unless told they decode
    positions = _own_name(cls, "max_position_embeddings")
    if positions is not None and positions not in values and isinstance(_default(cls, positions), int):
        values[positions] = max(_default(cls, positions), config.data.max_length)
    if m.dropout is not None:
        names = dropout_fields(cls())
        if not names:
            problems.append(_no_dropout(cls))
        values.update({name: m.dropout for name in names if name not in configured})
    _check_sizes(config, cls, values, configured, problems)
    return values


def _sized_fields(config: Config, cls: type[PreTrainedConfig], problems: list[str]) -> dict[str, Any]:
    """lmforge's sizes (the preset's, then explicit ones) under the family's names."""
    sizes = resolved_architecture(config, defaults=False)
    values = {}
    for ours, standard in SIZE_FIELDS.items():
        if ours not in sizes:
            continue
        target = _own_name(cls, standard)
        if target is not None:
            values[target] = sizes[ours]
        elif ours == "num_kv_heads" and sizes[ours] == sizes.get("num_heads"):
            continue  # every head its own key/value head: what a family without grouped-query attention does
        else:
            extra = "; this family has no grouped-query attention" if ours == "num_kv_heads" else ""
            problems.append(
                f"model.{ours}: {cls.model_type} models have no such size ({cls.__name__} has no {standard}){extra}; "
                f"remove model.{ours}"
            )
    return values


def _configured_fields(config: Config, cls: type[PreTrainedConfig], problems: list[str]) -> dict[str, Any]:
    """model.config under the class's own field names; unknown names refused with the nearest known one."""
    fields, aliases = _fields(cls), cls.attribute_map
    configured: dict[str, Any] = {}
    for name, value in config.model.config.items():
        if name in OWNED_FIELDS:
            problems.append(f"model.config.{name}: lmforge sets it from {OWNED_FIELDS[name]}; remove it here")
            continue
        target = aliases.get(name, name)
        if target not in fields and not _consumed(cls, name, value):
            known = sorted(fields | set(aliases) | (ROPE_KEYWORDS if "rope_parameters" in fields else set()))
            match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
            hint = f"; did you mean {match[0]}?" if match else f"; its fields: {', '.join(sorted(fields))}"
            problems.append(f"model.config.{name}: {cls.__name__} has no such field{hint}")
            continue
        if target in configured:
            problems.append(f"model.config gives {target} twice (as {name} and as another name of it); keep one")
        configured[target] = value
    return configured


def _consumed(cls: type[PreTrainedConfig], name: str, value: Any) -> bool:
    """Whether the class reads a keyword that is none of its fields (rope_theta, which Qwen2's config
    moves into rope_parameters): an unknown one it keeps as a plain attribute."""
    try:
        return name not in vars(cls(**{name: value}))
    except Exception:  # it reacted to the value: the whole config's build reports what is wrong
        return True


def _check_sizes(
    config: Config, cls: type[PreTrainedConfig], values: dict[str, Any], configured: dict[str, Any], problems: list[str]
) -> None:
    """The sizes a family cannot do without (its defaults are a full-size model), and their arithmetic."""
    names = {ours: _own_name(cls, standard) for ours, standard in SIZE_FIELDS.items()}
    needed = ["hidden_size", "num_layers", "num_heads"]
    if names["intermediate_size"] is not None and _default(cls, names["intermediate_size"]) is not None:
        needed.append("intermediate_size")  # GPT-2's n_inner defaults to 4 x hidden_size
    missing = [ours for ours in needed if names[ours] is None or values.get(names[ours]) is None]
    if missing:
        theirs = ", ".join(names[ours] or SIZE_FIELDS[ours] for ours in missing)
        problems.append(
            f"model: a new {cls.model_type} model needs its sizes ({cls.__name__}'s defaults are a full-size model): "
            f"give model.preset, or model.{', model.'.join(missing)} (or {theirs} in model.config)"
        )
        return
    hidden, heads = values[names["hidden_size"]], values[names["num_heads"]]
    kv = values.get(names["num_kv_heads"]) if names["num_kv_heads"] else None

    def setting(ours: str) -> str:  # the name the user gave the size: model.config.n_embd, else model.hidden_size
        theirs = next((name for name in configured if cls.attribute_map.get(name, name) == names[ours]), None)
        return f"model.config.{theirs}" if theirs else f"model.{ours}"

    if "head_dim" not in configured and _ints(hidden, heads) and hidden % heads:  # else the class says it
        problems.append(f"{setting('hidden_size')} ({hidden}) must be divisible by {setting('num_heads')} ({heads})")
    if _ints(heads, kv) and heads % kv:
        problems.append(f"{setting('num_heads')} ({heads}) must be divisible by {setting('num_kv_heads')} ({kv})")
    rotary = values.get("rotary_dim")
    if "rotary_dim" in configured and _ints(hidden, heads, rotary) and rotary > hidden // heads:
        problems.append(
            f"model.config.rotary_dim ({rotary}) exceeds the head size ({hidden} / {heads} = {hidden // heads}): "
            f"lower it to at most {hidden // heads}, or remove it (the default is the smaller of 64 and the head size)"
        )
    field = names["max_position_embeddings"]
    positions = values.get(field) if field else None
    if _ints(positions) and config.data.max_length > positions:
        setting = f"model.config.{field}" if field in configured else "model.max_position_embeddings"
        problems.append(
            f"data.max_length ({config.data.max_length}) exceeds the model's {positions} positions ({setting}): "
            f"lower data.max_length or raise {setting}"
        )


def _ints(*values: Any) -> bool:
    """Whether all are positive integers (model.config's values are checked by the class, later)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _no_dropout(cls: type[PreTrainedConfig]) -> str:
    return (
        f"model.dropout: {cls.model_type} models have no dropout ({cls.__name__} has no field whose name holds "
        "dropout or pdrop); remove model.dropout"
    )


def _first_line(exc: Exception) -> str:
    """An exception's message on one line (a strict config's validation error spans several)."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:400] or type(exc).__name__


def build_model(config: Config, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None) -> PreTrainedModel:
    """A model ready to train. Seed the RNGs first: new weights (a whole new model, or a new
    classification head) come from them.

    Args:
        labels: class names in id order, for model.task=classification.
    """
    m = config.model
    dtype = DTYPES.get(m.dtype, torch.float32)
    if m.name_or_path is None and m.task == "seq2seq":
        t5 = t5_config(config, tokenizer)
        if m.dropout is not None:
            set_dropout(t5, m.dropout)
        model = T5ForConditionalGeneration(t5).to(dtype)
    elif builds_family(config):
        # transformers picks the attention it has (sdpa where the family supports it); select_attention below
        model = AutoModelForCausalLM.from_config(family_config(config, tokenizer)).to(dtype)
    elif m.name_or_path is None:
        llama = llama_config(config, tokenizer)
        if m.dropout is not None:
            set_dropout(llama, m.dropout)
        model = LlamaForCausalLM._from_config(llama, attn_implementation="sdpa")
        model = model.to(dtype)
    else:
        model = _pretrained(config, labels, dtype)
    if builds_family(config):
        check_new_model(model, config)  # selects the attention, checking it against the family's own
    elif m.task == "causal-lm":
        check_packing(model, config, select_attention(model, config))
    if m.freeze:
        freeze(model, m.freeze)
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # no KV cache while training
    if config.lora is not None:
        from lmforge.models.peft import apply_lora

        model = apply_lora(model, config)
    return model


def _pretrained(config: Config, labels: list[str] | None, dtype: torch.dtype) -> PreTrainedModel:
    """The pretrained model model.name_or_path names, model.dropout on its dropout fields."""
    from lmforge.models.peft import quantization_config
    from lmforge.publish.push import local_model

    m = config.model
    quantization = quantization_config(config)
    where = local_model(m.name_or_path, config.storage)  # s3://: the copy pulled into the cache
    overrides = {}
    if m.dropout is not None:  # given to from_pretrained, they are in the config the modules are built from
        saved = _saved_config(where, m.trust_remote_code)
        overrides = dict.fromkeys(set_dropout(saved, m.dropout), m.dropout)
    model = load_pretrained(where, dtype, m.trust_remote_code, m.task, labels, quantization, overrides)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and config.data.max_length > positions:
        raise UserError(
            f"data.max_length ({config.data.max_length}) exceeds the {positions} positions of "
            f"{m.name_or_path}; lower data.max_length"
        )
    return model


def _saved_config(path: str | Path, trust_remote_code: bool) -> PreTrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read its model config.json ({_first_line(exc)})") from None


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
        try:
            model.set_attn_implementation(wanted)
        except (ValueError, ImportError) as exc:  # a family without sdpa (Bloom, ...)
            raise UserError(f"model.attention={wanted}: {_first_line(exc)}; use model.attention=auto") from None
    return model.config._attn_implementation


PROBE_POSITIONS = (0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6)
"""Two examples packed in one row, as the collator gives them: 5 tokens, then 7 restarting at 0."""


def check_new_model(model: PreTrainedModel, config: Config) -> str:
    """Select the attention (`select_attention`) of a new model of another family, checking on a packed
    row of two examples (`PROBE_POSITIONS`) what lmforge assumes of a causal LM; returns the attention
    in use. With the family's own attention: the model runs, and is causal (the first example's logits
    are its logits alone: nothing after a token changes them). The attention selected gives the
    family's own logits on each example (else model.attention=auto keeps the family's own), and with
    data.packing keeps the examples of a row apart (the second one's logits are its logits alone; else
    auto falls back to the family's own, and packing is refused if that does not either). Where the
    loss is chunked, the logits are the output layer on the hidden states. A few forwards of at most
    12 tokens in eval mode; no RNG is drawn."""
    family, wanted = architecture_of(config), config.model.attention
    probe = _Probe(model, family)
    own = model.config._attn_implementation
    reference = probe.alone()
    if not probe.same(probe.packed()[: probe.first], reference[0]):
        raise UserError(
            f"model.architecture={family}: the new model is not causal (a token's logits change with the tokens "
            "after it), so it cannot learn to predict them; check model.config (is_decoder?) or pick a decoder "
            "family such as llama, gpt2 or qwen2"
        )
    in_use = select_attention(model, config)
    if in_use != own and not all(map(probe.same, probe.alone(), reference)):
        if wanted != "auto":
            raise UserError(
                f"model.attention={wanted}: {family} models compute their attention otherwise than this kernel "
                "does (their logits differ); use model.attention=auto"
            )
        model.set_attn_implementation(in_use := own)
    if config.data.packing is not False and not probe.same(probe.packed()[probe.first :], reference[1]):
        if wanted == "auto" and in_use != own:
            model.set_attn_implementation(in_use := own)
        if in_use != own or not probe.same(probe.packed()[probe.first :], reference[1]):
            raise UserError(
                f"data.packing: with {in_use.removeprefix('lmforge_')} attention, {family} models let the examples "
                "packed in a row see each other (their attention ignores the position ids); set data.packing=false"
                + ("" if wanted == "auto" else ", or model.attention=auto")
            )
    from lmforge.engine.losses import resolve_loss_chunk_size

    if resolve_loss_chunk_size(config.train.loss_chunk_size, model, "causal-lm", False) and not probe.plain_head():
        raise UserError(
            f"train.loss_chunk_size: the logits of {family} models are not their output layer applied to their "
            "hidden states (with these settings), as the chunked loss takes them; set train.loss_chunk_size=null"
        )
    return in_use


def check_packing(model: PreTrainedModel, config: Config, in_use: str) -> None:
    """A causal LM whose packed rows go through an attention other than lmforge's varlen (which keeps
    the examples of a row apart by their position ids, as the collator gives them) must keep them apart
    too: checked on a packed row of two examples (`PROBE_POSITIONS`, eval mode, no RNG drawn). Most
    transformers families find packed examples from the position ids; some (OPT's sdpa and eager
    paths) ignore them, and their examples would see each other.

    Raises:
        UserError: the second example's logits in the packed row differ from its logits alone.
    """
    from lmforge.models import attention

    if not config.data.packs or in_use == attention.NAME:
        return
    family = getattr(model.config, "model_type", "these")
    probe = _Probe(model, family, pretrained=True)
    if not probe.same(probe.packed()[probe.first :], probe.alone()[1]):
        varlen = attention.varlen_unsupported(model) is None
        raise UserError(
            f"data.packing: with {in_use} attention, {family} models let the examples packed in a row see each "
            "other (their attention ignores the position ids); set data.packing=false"
            + (", or model.attention=auto (lmforge's varlen attention keeps them apart)" if varlen else "")
        )


class _Probe:
    """Forwards of `model` (eval mode, no gradients) on one packed row of two examples."""

    def __init__(self, model: PreTrainedModel, family: str, pretrained: bool = False) -> None:
        self.model, self.family, self.pretrained = model, family, pretrained
        self.positions = torch.tensor([PROBE_POSITIONS])
        self.first = PROBE_POSITIONS.index(0, 1)
        vocab = model.get_input_embeddings().num_embeddings
        self.ids = (torch.arange(len(PROBE_POSITIONS)) * 7 + 3).remainder(vocab)[None]
        self.tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2  # relative to the largest logit

    def packed(self) -> torch.Tensor:
        """(12, V) logits of the packed row."""
        return self._logits(self.ids, self.positions)

    def alone(self) -> list[torch.Tensor]:
        """The logits of each example in a row of its own."""
        first, ids, positions = self.first, self.ids, self.positions
        return [self._logits(ids[:, :first], positions[:, :first]), self._logits(ids[:, first:], positions[:, first:])]

    def plain_head(self) -> bool:
        """Whether the logits are the output layer's on the hidden states, as the chunked loss takes them."""
        from lmforge.engine.losses import hidden_states_out

        logits, head = self.packed(), self.model.get_output_embeddings()
        try:
            with hidden_states_out(self.model):
                hidden = self.packed()  # the identity head passed the hidden states through
        except AttributeError:  # a head that cannot be swapped (BERT's keeps its bias apart)
            self.model.set_output_embeddings(head)
            return False
        with torch.no_grad():
            return self.same(head(hidden.to(head.weight.dtype)).float(), logits)

    def same(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        return bool((a - b).abs().max() <= self.tolerance * b.abs().max().clamp_min(1e-3))

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                device = self.model.device
                output = self.model(input_ids=ids.to(device), position_ids=positions.to(device), use_cache=False)
                return output.logits[0].float().cpu()
        except Exception as exc:
            if self.pretrained:
                raise
            raise UserError(
                f"model.architecture={self.family}: a forward pass of the new model fails ({_first_line(exc)}); "
                "check its sizes and model.config"
            ) from None
        finally:
            self.model.train(training)


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
    overrides: dict[str, Any] | None = None,
):
    """Load an HF-format model directory for `task` (safetensors preferred).

    Args:
        overrides: fields of the saved config to change before the model is built (model.dropout's).
    """
    local = Path(path).expanduser()
    local_path = looks_local(str(path))
    if local_path and not (local / "config.json").is_file():
        found = "no such directory" if not local.is_dir() else "no config.json there"
        raise UserError(f"{path}: not a Hugging Face model directory ({found}; looked for {local.resolve()})")
    extra = dict(overrides or {})
    if quantization is not None:
        extra["quantization_config"] = quantization
        extra["device_map"] = {"": 0}
    if task == "classification" and labels:
        extra |= {
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
