"""Exporting a run: a self-contained Hugging Face directory (merged or adapter-only) with a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from lmforge.atomic import check_target, owned_dir
from lmforge.errors import UserError
from lmforge.eval.generation import HINTS_FILE
from lmforge.eval.target import load_target, resolve_target
from lmforge.models.peft import BASE_FILE, save_base_config, verify_base, write_base_record


def export_run(target: Path, out: Path, merge_lora: bool = False, force: bool = False) -> Path:
    """Write `out/`: weights (safetensors), config, tokenizer, generation config, README.md model card,
    from a finished run, a paused run (its newest checkpoint) or a checkpoint directory.

    A LoRA run is exported as its adapter (loadable with peft on top of the base model) unless
    `merge_lora`, which folds the adapter into the base weights for a plain transformers model.
    `out` may be new, empty or an earlier export; another directory only with `force`, and nothing
    lmforge did not write is deleted (`atomic.owned_dir`).

    Raises:
        UserError: a run that cannot be exported, or an `out` that holds other files.
    """
    check_target(Path(out), force)  # before minutes of loading, not after
    kind, model_dir = resolve_target(Path(target))
    if kind == "model":
        raise UserError(f"{target}: a model directory already; export takes a run, a paused run or a checkpoint")
    run_dir = model_dir.parent if kind == "run" else model_dir.parent.parent
    model, tokenizer, config = load_target(Path(target))
    adapter = config.lora is not None
    if merge_lora and not adapter:
        raise UserError(f"--merge-lora: {target} was fully fine-tuned; it has no adapter to merge")
    merged = False
    if adapter and merge_lora:
        model = model.merge_and_unload()
        merged = True
    step = None if kind == "run" else json.loads((model_dir / "trainer_state.json").read_text())["step"]
    with owned_dir(Path(out), force=force) as tmp:
        model.save_pretrained(str(tmp))
        if adapter and not merged:
            save_base_config(model, tmp)
            for record_path in (model_dir / BASE_FILE, run_dir / BASE_FILE):
                if record_path.is_file():
                    record = json.loads(record_path.read_text())
                    if kind == "checkpoint":  # its own weights were loaded: the adapter needs the same base
                        fix = "; or export with --merge-lora: the checkpoint holds every weight"
                        verify_base(record, model_dir, record_path, fix)
                    write_base_record(tmp, record)
                    break
        tokenizer.save_pretrained(str(tmp))
        if (model_dir / HINTS_FILE).is_file():
            shutil.copy(model_dir / HINTS_FILE, tmp / HINTS_FILE)
        for name in ("eval.json", "config.yaml", "data_report.json") if step is None else ("data_report.json",):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, tmp / f"lmforge_{name}")
        if step is not None:
            shutil.copy(model_dir / "config.yaml", tmp / "lmforge_config.yaml")
        (tmp / "README.md").write_text(model_card(run_dir, config, adapter and not merged, checkpoint_step=step))
    return Path(out)


def model_card(run_dir: Path, config, adapter_only: bool, checkpoint_step: int | None = None) -> str:
    """README.md: base model, data, training settings, final metrics, intended use, how to load.
    A checkpoint's card has no final metrics and says which step it is."""
    final = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
    trained = f"{final.get('step', '?')} steps, stopped by {final.get('stop_reason', '?')}"
    if checkpoint_step is not None:
        final, trained = {}, f"{checkpoint_step} steps (a checkpoint taken during training)"
    base = config.model.name_or_path or f"none: trained from scratch ({config.model.preset or 'explicit sizes'})"
    if (run_dir / BASE_FILE).is_file():  # an adapter: the base it was trained on, resolved
        record = json.loads((run_dir / BASE_FILE).read_text())
        fingerprint = f"; weights fingerprint {record['fingerprint'][:12]}" if record.get("fingerprint") else ""
        base = f"{record['path']} (given as {record['given_as']}{fingerprint})"
    data = config.data
    how = load_snippet(config.model.task, adapter_only)
    results = {split: final.get(split, {}) for split in ("validation", "test", "generation")}
    metrics = "\n".join(
        f"| {split} | {name} | {value:.4f} |"
        for split, values in results.items()
        for name, value in values.items()
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
- **Trained for:** {trained}

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
{prompt_format(config)}
## Training settings

```yaml
{settings}```
"""


CARD_PATH = "."
"""Where the model card's snippet loads from: the directory the card is in."""


def load_snippet(task: str, adapter_only: bool) -> str:
    """Python that loads the exported directory in plain transformers/peft and uses it once; the
    tests run it against every kind of export."""
    auto = _auto_class(task)
    lines = [f'PATH = "{CARD_PATH}"  # this directory: run from it, or give its path']
    if adapter_only and task == "classification":
        lines += [  # peft builds the base with its default 2 classes unless told the run's
            f"from peft import AutoPeft{auto[4:]}",
            "from transformers import AutoConfig, AutoTokenizer",
            "",
            "labels = AutoConfig.from_pretrained(PATH).id2label  # the class names, saved beside the adapter",
            f"model = AutoPeft{auto[4:]}.from_pretrained(",
            "    PATH, num_labels=len(labels), id2label=labels, label2id={name: i for i, name in labels.items()}",
            ")",
        ]
    elif adapter_only:
        lines += [f"from peft import AutoPeft{auto[4:]}", "from transformers import AutoTokenizer", ""]
        lines += [f"model = AutoPeft{auto[4:]}.from_pretrained(PATH)  # the base model is found from the adapter"]
    else:
        lines += [f"from transformers import {auto}, AutoTokenizer", "", f"model = {auto}.from_pretrained(PATH)"]
    lines += ["tokenizer = AutoTokenizer.from_pretrained(PATH)", ""]
    if task == "classification":
        lines += [
            'inputs = tokenizer("Your text here", return_tensors="pt")',
            "print(model.config.id2label[model(**inputs).logits.argmax(-1).item()])",
        ]
    else:
        lines += [
            'inputs = tokenizer("Your prompt here", return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=32)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
    return "\n".join(lines)


def prompt_format(config) -> str:
    """The card's section on the text format the model was trained on (prompts must match it)."""
    data = config.data
    if data.format in ("text", "classification"):
        return ""
    if data.format == "chat":
        rendering = (
            "the tokenizer's own chat template (saved with it: `tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)`)"
            if data.chat_template == "auto"
            else f"lmforge's `{data.chat_template}` chat template"
        )
        return f"\n## Prompt format\n\nChat messages, rendered with {rendering}.\n"
    template = (
        data.template
        or {"prompt-completion": "{prompt}", "alpaca": "the Alpaca template", "seq2seq": "{source}"}[data.format]
    )
    return (
        f"\n## Prompt format\n\nPrompts were rendered with `{template!r}` (format {data.format}); prompt the "
        "model the same way, and let it write the answer's first token (a trailing space of the template "
        "belongs to the answer's first token).\n"
    )


def _auto_class(task: str) -> str:
    return {
        "causal-lm": "AutoModelForCausalLM",
        "seq2seq": "AutoModelForSeq2SeqLM",
        "classification": "AutoModelForSequenceClassification",
    }[task]
