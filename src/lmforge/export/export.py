"""Exporting a run: a self-contained Hugging Face directory (merged or adapter-only) with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from lmforge.atomic import atomic_dir
from lmforge.errors import UserError
from lmforge.eval.target import load_target
from lmforge.models.peft import is_adapter_dir


def export_run(run_dir: Path, out: Path, merge_lora: bool = False) -> Path:
    """Write `out/`: weights (safetensors), config, tokenizer, generation config, README.md model card.

    A LoRA run is exported as its adapter (loadable with peft on top of the base model) unless
    `merge_lora`, which folds the adapter into the base weights for a plain transformers model.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "final").is_dir() or not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir}: not a finished run directory (no final/ or config.yaml)")
    adapter = is_adapter_dir(run_dir / "final")
    if merge_lora and not adapter:
        raise UserError(f"--merge-lora: {run_dir} was fully fine-tuned; it has no adapter to merge")
    model, tokenizer, config = load_target(run_dir)
    merged = False
    if adapter and merge_lora:
        model = model.merge_and_unload()
        merged = True
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(str(tmp))
        if adapter and not merged:
            base = model.get_base_model()
            base.config.architectures = [type(base).__name__]
            base.config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        for name in ("eval.json", "config.yaml", "data_report.json"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, tmp / f"lmforge_{name}")
        (tmp / "README.md").write_text(model_card(run_dir, config, adapter and not merged))
    return Path(out)


def model_card(run_dir: Path, config, adapter_only: bool) -> str:
    """README.md: base model, data, training settings, final metrics, intended use, how to load."""
    final = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    base = config.model.name_or_path or f"none: trained from scratch ({config.model.preset or 'explicit sizes'})"
    data = config.data
    auto = _auto_class(config.model.task)
    if adapter_only:
        how = f"from peft import AutoPeft{auto[4:]}\nmodel = AutoPeft{auto[4:]}.from_pretrained(PATH)"
    else:
        how = f"from transformers import {auto}, AutoTokenizer\nmodel = {auto}.from_pretrained(PATH)"
    how += "\ntokenizer = AutoTokenizer.from_pretrained(PATH)"
    metrics = "\n".join(
        f"| {split} | {name} | {value:.4f} |"
        for split in ("validation", "test")
        for name, value in final.get(split, {}).items()
        if isinstance(value, float)
    )
    settings = yaml.safe_dump(
        {"train": config.train.model_dump(mode="json"), "lora": config.lora.model_dump() if config.lora else None},
        sort_keys=False,
    )
    return f"""---
library_name: {"peft" if adapter_only else "transformers"}
tags: [lmforge, {config.model.task}]
---

# {config.name}

Trained with lmforge ({"LoRA adapter" if adapter_only else "full weights"}).

- **Base model:** {base}
- **Task:** {config.model.task}
- **Data:** {data.train} (format {data.format}, max length {data.max_length})
- **Trained for:** {final.get("step", "?")} steps, stopped by {final.get("stop_reason", "?")}

## Final metrics

| split | metric | value |
|---|---|---|
{metrics}

## Intended use

A {config.model.task} model fine-tuned on the data above; evaluate it on your own data before use.
It inherits the limitations and licence of its base model and data.

## How to load

```python
{how}
```

## Training settings

```yaml
{settings}```
"""


def _auto_class(task: str) -> str:
    return {
        "causal-lm": "AutoModelForCausalLM",
        "seq2seq": "AutoModelForSeq2SeqLM",
        "classification": "AutoModelForSequenceClassification",
    }[task]
