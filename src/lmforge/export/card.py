"""The model card (README.md) of a final/ directory or an export: Hugging Face Hub metadata built
with huggingface_hub's ModelCardData (base model and its relation, datasets, licence, library,
pipeline tag, tags, the final metrics as a model-index) above a body that says what was trained,
on what, how well, and how to load it.

Nothing secret reaches a card: the training settings come from the redacted config, and every
value and the body pass through `lmforge.secrets` on the way.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load, try_to_load_from_cache

from lmforge.config import Config, looks_local, redacted_dict
from lmforge.data.sources import HUB_PREFIX, hub_name
from lmforge.errors import UserError
from lmforge.models.peft import BASE_FILE
from lmforge.secrets import redact_text

PIPELINE_TAGS = {
    "causal-lm": "text-generation",
    "seq2seq": "text2text-generation",
    "classification": "text-classification",
}
"""The Hub's pipeline tag (and model-index task type) of each model.task."""

METRIC_SPLITS = ("validation", "test", "generation")
"""The sections of eval.json whose numbers are the card's final metrics."""

LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
"""A Hub licence id: lowercase letters, digits, '.', '-' and '+' (apache-2.0, mit, cc-by-4.0, llama3, other)."""

LOCAL_DATASET_TYPE = "custom"
"""The model-index `dataset.type` of data that is no Hub dataset (a local file, a mixture): the Hub
documents `type` as a Hub dataset id and has none for a private file, so a neutral word that names
none stands in, and `dataset.name` carries the file's name."""


def check_license(value: str) -> str:
    """`value` if it is a Hub licence id (lowercase: apache-2.0, mit, cc-by-4.0, llama3, other).

    Raises:
        UserError: any other value, with the lowercase form when that one would do.
    """
    if LICENSE_ID.fullmatch(value):
        return value
    if LICENSE_ID.fullmatch(value.lower()):
        raise UserError(f"--license {value!r}: Hub licence ids are lowercase; use --license {value.lower()}")
    raise UserError(
        f"--license {value!r}: not a Hub licence id (lowercase letters, digits, '.', '-', '+'); "
        "give one such as --license mit or --license apache-2.0, or --license other"
    )


def local_base_warning(directory: Path) -> str | None:
    """One line saying that an adapter's base model is a directory on this machine, which a reader
    of the published adapter does not have; None when there is no such adapter.

    `lmforge push` prints it; the model card's "How to load" section says the same.

    Args:
        directory: a run directory, a checkpoint or an export: whatever holds lmforge_base.json
            beside the adapter (an export made with --merge-lora holds none: it stands alone).

    Returns:
        The warning, naming the base's path and the fix, or None for a Hub base, a merged model,
        a full fine-tune or a model trained from scratch.
    """
    base = _read_json(Path(directory) / BASE_FILE).get("path")
    if not base or _is_hub_id(base, None):
        return None
    return redact_text(
        f"This LoRA adapter's base model is a local directory ({base}): whoever loads the adapter "
        "needs that directory at the same path; export or push with --merge-lora for a standalone model."
    )


def model_card(
    run_dir: Path,
    config: Config,
    adapter_only: bool,
    checkpoint_step: int | None = None,
    license: str | None = None,
) -> str:
    """README.md of a run's model: Hub metadata, then base model, data, training settings, final
    metrics, data report, intended use, how to load, prompt format.

    Args:
        run_dir: the run directory (eval.json, data_report.json and lmforge_base.json are read from it).
        config: the run's resolved config.
        adapter_only: the model is saved as a LoRA adapter (False for full weights and merged LoRA).
        checkpoint_step: the step of a checkpoint taken during training: the card then has no
            final metrics and says which step it is.
        license: the Hub licence id (e.g. apache-2.0); None carries the base model's, when its
            README.md (local, or in the Hugging Face cache) names one, and else leaves it out.

    Returns:
        The card's text; `huggingface_hub.ModelCard.load` reads its metadata back.
    """
    final = _read_json(run_dir / "eval.json")
    trained = f"{final.get('step', '?')} steps, stopped by {final.get('stop_reason', '?')}"
    if checkpoint_step is not None:
        final, trained = {}, f"{checkpoint_step} steps (a checkpoint taken during training)"
    report = _read_json(run_dir / "data_report.json")
    base = recorded_base(run_dir, config)
    metadata = card_metadata(config, adapter_only, final, base, report.get("working_dir"), license)
    body = redact_text(_body(run_dir, config, adapter_only, final, trained, report, checkpoint_step))
    return str(ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}"))


def recorded_base(run_dir: Path, config: Config) -> str | None:
    """The base model a run started from: an adapter's as lmforge_base.json recorded it (resolved
    path, or the Hub id), a full fine-tune's as the config names it, None when trained from scratch."""
    record = _read_json(run_dir / BASE_FILE)
    return record.get("path") or config.model.name_or_path


def card_metadata(
    config: Config,
    adapter_only: bool,
    final: dict,
    base: str | None,
    working_dir: str | None = None,
    license: str | None = None,
) -> ModelCardData:
    """The card's Hub metadata.

    `base_model` is set only for a base the Hub knows (an "org/name" id that is no local directory,
    relative paths taken from `working_dir`, where the run started): the Hub refuses a card whose
    base_model is no model id, so a local base is named in the card's text only. Its relation:
    adapter (a LoRA adapter), merge (LoRA merged into the base), finetune (full fine-tune).
    """
    hub_base = base if base and _is_hub_id(base, working_dir) else None
    if license is None and base:
        license = base_license(base, working_dir)
    task = config.model.task
    tags = ["lmforge", task, *(["lora"] if adapter_only else [])]
    relation = None
    if hub_base:
        relation = "finetune" if config.lora is None else "adapter" if adapter_only else "merge"
    results = eval_results(config, final)
    return ModelCardData(
        base_model=redact_text(hub_base) if hub_base else None,
        base_model_relation=relation,
        datasets=hub_datasets(config, ("train", "validation", "test")) or None,
        license=license,
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag=PIPELINE_TAGS[task],
        tags=tags,
        model_name=config.name if results else None,
        eval_results=results or None,
    )


def data_names(config: Config, splits: tuple[str, ...]) -> list[str]:
    """The names of the data sources of `splits`, as far as they mean something beside the model:
    a Hub dataset's id (hub:org/name), a file's or directory's name; a glob names nothing.
    Redacted, in order, each once."""
    names = [name for _, name in _sources(config, splits)]
    return list(dict.fromkeys(redact_text(name) for name in names if name))


def hub_datasets(config: Config, splits: tuple[str, ...]) -> list[str]:
    """The Hub dataset ids (hub:org/name sources) of `splits`: the card's `datasets:` metadata,
    which the Hub links as dataset ids. Local files are left out (the card's text names them).
    Redacted, in order, each once."""
    names = [name for on_hub, name in _sources(config, splits) if on_hub]
    return list(dict.fromkeys(redact_text(name) for name in names if name))


def _sources(config: Config, splits: tuple[str, ...]) -> list[tuple[bool, str]]:
    """(is a Hub dataset, its id or the file's name) of each source of `splits`; globs left out."""
    found: list[tuple[bool, str]] = []
    for split in splits:
        spec = getattr(config.data, split)
        entries = spec if isinstance(spec, list) else [spec] if spec else []
        for entry in entries:
            text = str(getattr(entry, "path", entry))
            if text.startswith(HUB_PREFIX):
                found.append((True, hub_name(Path(text))[0]))
            elif not any(c in text for c in "*?["):
                found.append((False, Path(text).name or text))
    return found


def eval_results(config: Config, final: dict) -> list[EvalResult]:
    """eval.json's final numbers as model-index entries: one per split and metric (floats only:
    token and example counts are no metrics; NaN and infinities are left out).

    `dataset.name` names the split's sources (Hub ids and file names); `dataset.type` is the Hub
    dataset id when the split is one Hub dataset, else `LOCAL_DATASET_TYPE`."""
    task = PIPELINE_TAGS[config.model.task]
    results = []
    for section in METRIC_SPLITS:
        values = final.get(section)
        if not isinstance(values, dict):
            continue
        split = section
        if section == "generation":  # greedy answers to the test split's prompts (else validation's)
            split = values.get("split") or ("test" if "test" in final else "validation")
        splits = (split,) if getattr(config.data, split) else ("train",)  # split off train
        names, hub_ids = data_names(config, splits), hub_datasets(config, splits)
        dataset = " + ".join(names) or config.name
        dataset_type = hub_ids[0] if names == hub_ids and len(hub_ids) == 1 else LOCAL_DATASET_TYPE
        results += [
            EvalResult(
                task_type=task,
                dataset_type=dataset_type,
                dataset_name=dataset,
                dataset_split=split,
                metric_type=metric,
                metric_value=value,
                metric_name=f"{split} {metric}",
            )
            for metric, value in values.items()
            if isinstance(value, float) and math.isfinite(value)
        ]
    return results


def base_license(base: str, working_dir: str | None = None) -> str | None:
    """The licence id in the base model's README.md metadata: a local base's own file, a Hub base's
    copy in the Hugging Face cache (nothing is downloaded); None when there is none."""
    local = Path(base).expanduser()
    if not local.is_absolute() and working_dir:
        local = Path(working_dir) / local
    readme: Path | None = local / "README.md"
    if not readme.is_file():
        cached = try_to_load_from_cache(base, "README.md") if _is_hub_id(base, working_dir) else None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None:
        return None
    try:
        found = (metadata_load(readme) or {}).get("license")
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):  # a broken card names no licence
        return None
    return found if isinstance(found, str) and found else None


def _is_hub_id(name: str, working_dir: str | None) -> bool:
    """Whether a base is a Hugging Face Hub id rather than a directory on this machine."""
    relative = Path(working_dir) / name if working_dir else Path(name)
    return not looks_local(name) and not relative.exists()


def _scratch_family(config: Config) -> str:
    """How a model built from scratch was built: its family (a Hugging Face model_type) and preset."""
    from lmforge.models.presets import PRESET_TASKS, family

    m = config.model
    kind = "t5" if PRESET_TASKS.get(m.preset or "") == "seq2seq" else family(m.architecture, m.preset)
    return f"{kind}, {f'preset {m.preset}' if m.preset else 'explicit sizes'}"


def _body(
    run_dir: Path, config: Config, adapter_only: bool, final: dict, trained: str, report: dict, step: int | None
) -> str:
    """The card's Markdown below the metadata."""
    base = config.model.name_or_path or f"none: trained from scratch ({_scratch_family(config)})"
    record = _read_json(run_dir / BASE_FILE)
    if record:  # an adapter: the base it was trained on, resolved
        fingerprint = f"; weights fingerprint {record['fingerprint'][:12]}" if record.get("fingerprint") else ""
        base = f"{record['path']} (given as {record['given_as']}{fingerprint})"
    data = config.data
    sources = data.train if isinstance(data.train, str) else ", ".join(str(getattr(e, "path", e)) for e in data.train)
    task = config.model.task
    warning = local_base_warning(run_dir) if adapter_only else None
    note = f"\n**Note:** {warning}\n" if warning else ""
    settings = redacted_dict(config)
    settings = yaml.safe_dump({"train": settings["train"], "lora": settings["lora"]}, sort_keys=False)
    return f"""
# {config.name}

Trained with lmforge ({"LoRA adapter" if adapter_only else "full weights"}).

- **Base model:** {base}
- **Task:** {task}
- **Data:** {sources} (format {data.format}, max length {data.max_length})
- **Trained for:** {trained}

## Final metrics

{metrics_table(final, step)}
{data_summary(report)}
## Intended use

{intended_use(config)}

## How to load
{note}
```python
{load_snippet(task, adapter_only)}
```
{prompt_format(config)}
## Training settings

```yaml
{settings}```
"""


def metrics_table(final: dict, step: int | None = None) -> str:
    """The card's table of eval.json's final numbers, or a sentence saying why there are none
    (a checkpoint or paused run taken at `step`, or a run that recorded none)."""
    rows = [
        f"| {split} | {name} | {value:.4f} |"
        for split in METRIC_SPLITS
        for name, value in (final.get(split) or {}).items()
        if isinstance(value, float)
    ]
    if rows:
        return "| split | metric | value |\n|---|---|---|\n" + "\n".join(rows)
    if step is not None:
        return f"No final metrics: a checkpoint taken at step {step} during training."
    return "No final metrics: the run's eval.json holds no validation or test numbers."


def intended_use(config: Config) -> str:
    """The card's "Intended use" paragraph: a fine-tune inherits its base model's limitations and
    licence, a model trained from scratch only its data's."""
    task = config.model.task
    if config.model.name_or_path:
        return (
            f"A {task} model fine-tuned on the data above; evaluate it on your own data before use.\n"
            "It inherits the limitations and licence of its base model and data."
        )
    return (
        f"A small {task} model trained from scratch on the data above only, with no pretrained base: it "
        "knows nothing beyond that data.\nEvaluate it on your own data before use; it inherits the "
        "limitations and licence of its training data."
    )


def data_summary(report: dict) -> str:
    """The card's section on what data preparation kept and dropped, from data_report.json's
    `splits` (records read, examples kept, records dropped by reason, truncated, tokens);
    empty without a report."""
    splits = report.get("splits") or {}
    if not splits:
        return ""
    rows = []
    for name, s in splits.items():
        dropped = s.get("dropped") or {}
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.items())
        rows.append(
            f"| {name} | {s.get('records', 0):,} | {s.get('examples', 0):,} | {sum(dropped.values()):,}"
            f"{f' ({reasons})' if reasons else ''} | {s.get('truncated', 0):,} | {s.get('tokens', 0):,} "
            f"| {s.get('trained_tokens', 0):,} |"
        )
    packing = "packed" if report.get("packing") else "not packed"
    return (
        f"\n## Data\n\nRecords read, examples kept (a long record may become several pieces), records dropped, "
        f"records truncated at max length {report.get('max_length', '?')}, tokens and tokens trained on "
        f"({packing}).\n\n| split | records | examples | dropped | truncated | tokens | trained tokens |\n"
        f"|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


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


def prompt_format(config: Config) -> str:
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


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}
