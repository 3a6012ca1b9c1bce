"""`lmforge init`: a commented config for a common job, and a small data file it can train on
at once when the one it names is not there yet.

Each template (`<name>.yaml` beside this file) names its data file; when that file does not
exist, `write_starter` writes a sample of a few hundred records of the template's format there,
made from the docstrings of Python's own standard library (real text on every machine with
Python), so that `lmforge train FILE --quick-test` runs straight after `lmforge init`. The user
then points data.train at their own data.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

HERE = Path(__file__).parent


@dataclass(frozen=True)
class Template:
    description: str
    data: str
    """The data file the config names (relative to the working directory)."""
    model: str | None
    """The model it starts from (a Hugging Face Hub id, --model replaces it); None: built from scratch."""
    sample: Callable[[], Iterator[str]]
    """Lines of the sample data file."""


MODULES = (
    "math",
    "statistics",
    "os.path",
    "shutil",
    "re",
    "string",
    "textwrap",
    "itertools",
    "functools",
    "json",
    "random",
    "bisect",
    "heapq",
    "difflib",
    "calendar",
    "base64",
    "html",
    "urllib.parse",
    "collections",
    "pathlib",
    "datetime",
    "csv",
)
"""Standard-library modules whose documented functions and classes make the sample data."""
LABELS = ("math", "statistics", "shutil", "os.path", "random")
"""The classify sample's classes: which module a function is from, told by its documentation."""


@dataclass(frozen=True)
class Documented:
    module: str
    name: str
    signature: str
    doc: str

    @property
    def summary(self) -> str:
        """The docstring's first sentence, on one line."""
        first = re.split(r"\n\s*\n", self.doc.strip())[0]
        text = " ".join(first.split())
        return re.split(r"(?<=[.!?])\s", text)[0]


def documented() -> list[Documented]:
    """The public functions and classes of MODULES with a docstring whose first paragraph is plain
    prose (no signature line), in module and name order."""
    found = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, item in sorted(vars(module).items()):
            kinds = (inspect.isfunction, inspect.isbuiltin, inspect.ismethod, inspect.isclass)
            if name.startswith("_") or not any(kind(item) for kind in kinds):
                continue
            if getattr(item, "__module__", None) not in (module.__name__, None) and not inspect.isbuiltin(item):
                continue
            doc = inspect.getdoc(item) or ""
            if len(doc) < 20 or doc.lstrip().startswith(name + "("):
                continue
            try:
                signature = str(inspect.signature(item))
            except (TypeError, ValueError):
                signature = "(...)"
            found.append(Documented(module_name, name, signature, doc))
    return found


def _jsonl(records: Iterator[dict]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False) + "\n"


def pretrain_text() -> Iterator[str]:
    """Plain text: every docstring, its paragraphs as documents (blank lines between)."""
    for item in documented():
        yield f"{item.module}.{item.name}{item.signature}\n\n{item.doc.strip()}\n\n"


def sft_pairs() -> Iterator[str]:
    """{"question": "What does math.isqrt do?", "answer": "<first sentence of its docstring>"}"""
    return _jsonl({"question": f"What does {d.module}.{d.name} do?", "answer": d.summary} for d in documented())


def chat_dialogues() -> Iterator[str]:
    """{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}: the sft pairs as chats."""
    return _jsonl(
        {
            "messages": [
                {"role": "user", "content": f"What does {d.module}.{d.name}{d.signature} do?"},
                {"role": "assistant", "content": d.summary},
            ]
        }
        for d in documented()
    )


def seq2seq_pairs() -> Iterator[str]:
    """{"signature": "textwrap.shorten(text, width, **kwargs)", "summary": "<first sentence>"}"""
    return _jsonl({"signature": f"{d.module}.{d.name}{d.signature}", "summary": d.summary} for d in documented())


def classify_texts() -> Iterator[str]:
    """{"text": "<a function's documentation, without its name>", "label": "<its module>"} for the
    modules in LABELS."""
    for d in documented():
        if d.module in LABELS:
            text = " ".join(d.doc.split())[:400].replace(d.name, "this function")
            yield json.dumps({"text": text, "label": d.module}) + "\n"


TEMPLATES: dict[str, Template] = {
    "pretrain": Template(
        "a small Llama pretrained from scratch, with its own BPE tokenizer", "data/pretrain.txt", None, pretrain_text
    ),
    "sft": Template(
        "full supervised fine-tuning on prompt -> completion pairs, loss on the completion",
        "data/sft.jsonl",
        "HuggingFaceTB/SmolLM2-135M",
        sft_pairs,
    ),
    "lora": Template(
        "LoRA fine-tuning on prompt -> completion pairs: small adapters, the base frozen",
        "data/sft.jsonl",
        "HuggingFaceTB/SmolLM2-135M",
        sft_pairs,
    ),
    "chat": Template(
        "chat fine-tuning on conversations, loss on the assistant's turns",
        "data/chat.jsonl",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        chat_dialogues,
    ),
    "seq2seq": Template(
        "an encoder-decoder (T5) trained to write a target from a source",
        "data/seq2seq.jsonl",
        "google-t5/t5-small",
        seq2seq_pairs,
    ),
    "classify": Template(
        "an encoder (BERT-style) fine-tuned as a text classifier",
        "data/classify.jsonl",
        "sentence-transformers/all-MiniLM-L6-v2",
        classify_texts,
    ),
}


def render(name: str, model: str | None = None) -> str:
    """The template's config text, its model replaced by `model` where given.

    Raises:
        UserError: an unknown template, or --model for the pretrain template (it builds its model).
    """
    if name not in TEMPLATES:
        raise UserError(f"--template {name!r}: no such template; choose one of {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    if model is not None and template.model is None:
        raise UserError(f"--model: the {name} template builds its model from scratch; leave --model out")
    text = (HERE / f"{name}.yaml").read_text(encoding="utf-8")
    if template.model is not None:
        chosen = model or template.model
        text = text.replace(f"name_or_path: {template.model}", f"name_or_path: {json.dumps(chosen)}", 1)
    return text


def write_starter(name: str, out: Path, model: str | None = None, force: bool = False) -> list[str]:
    """Write the template's config to `out` and, where its data file is missing, the sample data;
    returns what was done, one line each.

    Raises:
        UserError: `out` exists (without force), or see `render`.
    """
    text = render(name, model)
    if out.exists() and not force:
        raise UserError(f"{out} exists; choose another --out, or --force to replace it")
    data = Path(TEMPLATES[name].data)
    for parent in (*reversed(data.parents), data):  # checked before anything is written
        if parent.exists() and not (parent.is_dir() if parent != data else parent.is_file()):
            kind = "a file" if parent.is_file() else "a directory" if parent.is_dir() else "no regular file"
            raise UserError(
                f"{parent.resolve()} is {kind}: the template's sample data goes in {data.resolve()}; move it away "
                "or run lmforge init in another directory"
            )
    if out.is_dir():
        raise UserError(f"--out {out}: a directory; give the config file's path, e.g. {out / (name + '.yaml')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    done = [f"wrote {out} ({TEMPLATES[name].description})"]
    if data.exists():
        done.append(f"{data} exists: the config trains on it as it is")
    else:
        data.parent.mkdir(parents=True, exist_ok=True)
        lines = list(TEMPLATES[name].sample())
        data.write_text("".join(lines), encoding="utf-8")
        what = "the documentation" if data.suffix == ".txt" else f"{len(lines):,} records from the documentation"
        done.append(
            f"wrote {data}: sample data, {what} of functions of Python's standard library; point data.train at "
            "your own data"
        )
    return done
