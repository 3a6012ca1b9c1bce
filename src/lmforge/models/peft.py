"""Low-rank adapters (LoRA, DoRA, rsLoRA) through peft, and the QLoRA precondition."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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
    return (Path(path) / "adapter_config.json").is_file()


BASE_FILE = "lmforge_base.json"
"""Beside an adapter: the base model it was trained on, resolved, with a fingerprint of its weights."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WHOLE_FILE_LIMIT = 256 << 20
SAMPLES, SAMPLE_BYTES = 64, 1 << 16


def weights_fingerprint(directory: Path) -> str:
    """sha256 over a model directory's weight files: each file's name, size and bytes (files over
    256 MiB: their first MiB, which holds the safetensors header, and 64 samples of 64 KiB spread
    evenly over the rest, so that a 15 GB base is checked in well under a second; a different
    training run of the same architecture differs in every sample)."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(directory).iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            if size <= WHOLE_FILE_LIMIT:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
                continue
            digest.update(f.read(1 << 20))
            for i in range(SAMPLES):
                f.seek((1 << 20) + (size - (1 << 20) - SAMPLE_BYTES) * i // (SAMPLES - 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def base_record(name_or_path: str) -> dict[str, str | None]:
    """What an adapter records of its base: the directory with links resolved (a `-latest` link
    moves on; the adapter must not), as given, and its weights' fingerprint (None for a hub id)."""
    local = Path(name_or_path).expanduser()
    if not local.is_dir():
        return {"path": name_or_path, "given_as": name_or_path, "fingerprint": None}
    resolved = local.resolve()
    return {"path": str(resolved), "given_as": name_or_path, "fingerprint": weights_fingerprint(resolved)}


def write_base_record(adapter_dir: Path, record: dict[str, str | None]) -> None:
    """The record beside the adapter, and the resolved path in adapter_config.json, so that peft's
    own loaders find the base from any working directory."""
    (Path(adapter_dir) / BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    config_path = Path(adapter_dir) / "adapter_config.json"
    adapter = json.loads(config_path.read_text())
    adapter["base_model_name_or_path"] = record["path"]
    config_path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter directory was trained on, checked to be the same weights.

    Raises:
        UserError: the base is gone, or its weights are not the ones the adapter was trained on.
    """
    adapter_dir = Path(adapter_dir)
    record_path = adapter_dir / BASE_FILE
    if not record_path.is_file():  # an adapter from elsewhere (or an older lmforge): peft's own record
        return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return verify_base(json.loads(record_path.read_text()), adapter_dir, record_path)


def verify_base(record: dict, adapter_dir: Path, record_path: Path, fix: str = "") -> str:
    """The base a record (`base_record`) names, checked to be there with the same weights.

    Raises:
        UserError: the base is gone, or its weights are not the recorded ones; `fix` ends the message.
    """
    path, expected = record["path"], record.get("fingerprint")
    if expected is None:
        return path
    given = f" (given as {record['given_as']})" if record.get("given_as") not in (None, path) else ""
    if not Path(path).is_dir():
        raise UserError(
            f"{adapter_dir}: the base model this adapter was trained on, {path}{given}, is gone; restore it "
            f"there (or edit {record_path} to where it is now){fix}"
        )
    found = weights_fingerprint(Path(path))
    if found != expected:
        raise UserError(
            f"{adapter_dir}: the base model at {path}{given} is not the one this adapter was trained on (its "
            f"weights changed: fingerprint {found[:12]}, trained on {expected[:12]}); an adapter on another "
            f"base gives wrong outputs. Restore that base, or train the adapter again{fix}"
        )
    return path


def _class_name(model) -> str:
    """The model's class name; under FSDP2, which swaps in a subclass `FSDP<Name>`, the original's."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def save_base_config(model, directory: Path) -> None:
    """The config.json of the model under any adapter, its class named in `architectures`, into
    `directory`: beside an adapter it tells its base's task, labels and class, so that a checkpoint,
    a final/ and an export load as models. A model without a Hugging Face config writes nothing."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(inner, "config") and hasattr(inner.config, "save_pretrained"):
        inner.config.architectures = [_class_name(inner)]
        inner.config.save_pretrained(str(directory))
