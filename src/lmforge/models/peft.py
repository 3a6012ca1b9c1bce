"""Low-rank adapters (LoRA, DoRA, rsLoRA) through peft, and the QLoRA precondition."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, TaskType, get_peft_model

from lmforge.config import Config
from lmforge.errors import UserError

TASK_TYPES = {"causal-lm": TaskType.CAUSAL_LM, "seq2seq": TaskType.SEQ_2_SEQ_LM, "classification": TaskType.SEQ_CLS}


def check_quantization(config: Config) -> None:
    """QLoRA needs CUDA and bitsandbytes: say so before anything is loaded."""
    lora = config.lora
    if lora is None or lora.quantize is None:
        return
    if not torch.cuda.is_available():
        raise UserError(
            f"lora.quantize={lora.quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; this machine has no CUDA. "
            "Remove lora.quantize to train LoRA on the unquantized model"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("lora.quantize needs bitsandbytes: pip install bitsandbytes") from None


def quantization_config(config: Config):
    """transformers' BitsAndBytesConfig for lora.quantize, or None."""
    if config.lora is None or config.lora.quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    if config.lora.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )


def apply_lora(model, config: Config) -> PeftModel:
    """Wrap `model` with adapters as config.lora says; only adapter (and modules_to_save) weights train."""
    lora = config.lora
    if lora.quantize is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.model.gradient_checkpointing)
    peft_config = PeftLoraConfig(
        task_type=TASK_TYPES[config.model.task],
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        modules_to_save=lora.modules_to_save,
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"lora.target_modules: {exc}; linear modules of this model: {', '.join(names)}") from None


def is_adapter_dir(path) -> bool:
    from pathlib import Path

    return (Path(path) / "adapter_config.json").is_file()
