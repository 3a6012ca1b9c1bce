"""Record formats: each turns one record into text segments, each segment trained on or not.

A format is a plain function registered in FORMATS. Tokenization (tokenize.py) joins the
segments, tokenizes the whole text once and marks every token that overlaps a trained segment,
using the tokenizer's character offsets, so masks are exact for any tokenizer.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmforge.config import DataConfig

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


class FormatProblem(Exception):
    """A record that does not fit its format; `reason` is its drop category in the report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def column(data: DataConfig, name: str) -> str:
    """The record field that holds the format's `name` field (data.columns maps them)."""
    return data.columns.get(name, data.text_field if name == "text" else name)


def label_of(record: dict[str, Any], data: DataConfig) -> str | None:
    """The class name of a classification record, or None if it has none."""
    value = record.get(column(data, "label"))
    return None if value is None or str(value).strip() == "" else str(value)


def class_names(labels: set[str]) -> list[str]:
    """Class names in class-id order: numeric order when every label is an integer (so that the
    argmax index of a model trained on labels 0..N-1 is the label itself), else string order."""
    if labels and all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=lambda label: (int(label), label))
    return sorted(labels)


_INTEGER = re.compile(r"\s*[+-]?\d+\s*")


def field_text(record: dict[str, Any], data: DataConfig, name: str, allow_empty: bool = False) -> str:
    key = column(data, name)
    if key not in record:
        fields = ", ".join(map(str, record)) or "none"
        hint = f"set data.columns.{name}" if name != "text" else "set data.text_field"
        raise FormatProblem("missing_column", f"no field {key!r} (fields: {fields}); {hint} to the field to use")
    value = record[key]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise FormatProblem("wrong_type", f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise FormatProblem(f"empty_{name}", f"field {key!r} is empty")
    return value


def difficulty_of(record: dict[str, Any], name: str) -> float:
    """The difficulty that data.curriculum.column names in a record: a number (from a .csv, its text).

    Raises:
        FormatProblem: the record has no such field, or it holds no finite number.
    """
    if name not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise FormatProblem(
            "missing_difficulty",
            f"no field {name!r} (fields: {fields}); data.curriculum.column names the field holding the difficulty",
        )
    value = record[name]
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise FormatProblem(
            "bad_difficulty", f"field {name!r} (data.curriculum.column) must hold a finite number, got {value!r}"
        )
    return number


def text_format(record: dict[str, Any], data: DataConfig, tokenizer) -> list[Segment]:
    return [Segment(field_text(record, data, "text"), True)]


def prompt_completion_format(record: dict[str, Any], data: DataConfig, tokenizer) -> list[Segment]:
    prompt = field_text(record, data, "prompt")
    completion = field_text(record, data, "completion")
    template = data.template or "{prompt}"
    try:
        rendered = template.format_map({**record, "prompt": prompt})
    except KeyError as exc:
        raise FormatProblem("missing_column", f"data.template uses {{{exc.args[0]}}}, which the record lacks") from None
    return [Segment(rendered, data.loss_on == "all"), Segment(completion, True)]


def alpaca_format(record: dict[str, Any], data: DataConfig, tokenizer) -> list[Segment]:
    instruction = field_text(record, data, "instruction")
    extra = field_text(record, data, "input", allow_empty=True) if column(data, "input") in record else ""
    output = field_text(record, data, "output")
    template = data.template or (ALPACA_WITH_INPUT if extra.strip() else ALPACA_NO_INPUT)
    prompt = template.format_map({**record, "instruction": instruction, "input": extra})
    return [Segment(prompt, data.loss_on == "all"), Segment(output, True)]


# --------------------------------------------------------------------------- chat

ROLES = ("system", "user", "assistant")


CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama-3": (
        "{% for message in messages %}{% if loop.first %}<|begin_of_text|>{% endif %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}{% if not messages %}<|begin_of_text|>{% endif %}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (  # no system turn: the system message opens the first user turn
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = none %}{% endif %}"
        "{% for message in messages %}{% set opens = loop.first and system is not none %}"
        "<start_of_turn>{{ 'model' if message['role'] == 'assistant' and not opens else 'user' }}\n"
        "{% if opens %}{{ system }}\n\n{% endif %}{{ message['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if system is not none and not messages %}<start_of_turn>user\n{{ system }}<end_of_turn>\n{% endif %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}"
        "{{ {'system': '<system>: ', 'user': '<human>: ', 'assistant': '<assistant>: '}[message['role']] }}"
        "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>: {% endif %}"
    ),
}
"""lmforge's built-in chat templates, in the Jinja that tokenizers carry: training renders them as
it renders a tokenizer's own, and the model's saved tokenizer gets the one it was trained with, so
`tokenizer.apply_chat_template` (and `lmforge generate --chat`) prompt it exactly as trained."""


CHAT_MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "plain": (),
}
"""The markers each built-in chat template writes: a tokenizer lmforge trains gets them as special
tokens; with another tokenizer each may be several ordinary tokens (warned)."""


def split_markers(data: DataConfig, tokenizer) -> list[str]:
    """The built-in chat template's markers that the tokenizer cuts into several tokens."""
    if data.format != "chat" or data.chat_template not in CHAT_MARKERS:
        return []
    return [m for m in CHAT_MARKERS[data.chat_template] if len(tokenizer(m, add_special_tokens=False)["input_ids"]) > 1]


def chat_template_of(data: DataConfig, tokenizer) -> str:
    """The Jinja chat template data.chat_template names: the tokenizer's own for auto (chatml when
    it has none), else a built-in."""
    if data.chat_template == "auto":
        return getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATES["chatml"]
    return CHAT_TEMPLATES[data.chat_template]


SHAREGPT = {"messages": "conversations", "role": "from", "content": "value", "user": "human", "assistant": "gpt"}
"""ShareGPT's names ({"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}),
recognised when a record has no messages field of its own."""


def chat_messages(record: dict[str, Any], data: DataConfig) -> list[dict[str, str]]:
    """The record's conversation as [{role: system|user|assistant, content}], whatever the record
    calls them: data.columns maps messages, role and content to its keys and system, user and
    assistant to its role names; ShareGPT's layout is recognised by itself."""
    names = dict(data.columns)
    if column(data, "messages") not in record and SHAREGPT["messages"] in record:
        names = {**SHAREGPT, **names}
    key = names.get("messages", "messages")
    messages = record.get(key)
    if messages is None:
        fields = ", ".join(map(str, record)) or "none"
        raise FormatProblem(
            "missing_column",
            f"no field {key!r} (fields: {fields}); set data.columns.messages to the field holding the turns",
        )
    if not isinstance(messages, list) or not messages:
        raise FormatProblem("bad_messages", f"field {key!r} must be a non-empty list of {{role, content}} messages")
    role_key, content_key = names.get("role", "role"), names.get("content", "content")
    roles = {names.get(role, role): role for role in ROLES}
    canonical = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            keys = ", ".join(map(str, message)) if isinstance(message, dict) else type(message).__name__
            raise FormatProblem(
                "bad_messages",
                f"message {i} must be an object with {role_key!r} and {content_key!r} (it has {keys}); "
                "map other keys with data.columns.role / data.columns.content",
            )
        role = roles.get(message[role_key])
        if role is None:
            raise FormatProblem(
                "bad_messages",
                f"message {i} has role {message[role_key]!r}; the roles are {', '.join(map(repr, roles))}: map yours "
                f"with data.columns.user / .assistant / .system, e.g. data.columns.assistant={message[role_key]}",
            )
        if not isinstance(message[content_key], str):
            raise FormatProblem("wrong_type", f"message {i} content must be a string")
        canonical.append({"role": role, "content": message[content_key]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in canonical):
        raise FormatProblem("no_assistant_turn", "no non-empty assistant message: nothing to train on")
    return canonical


def turn_end(tokenizer) -> str:
    """What the tokenizer's chat template writes after an assistant's message ('<|im_end|>' for
    chatml), without surrounding white space: generation stops there, and it is not part of the
    answer. '' when the template ends a turn with white space only."""
    sentinel = "\u2063answer\u2063"
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": sentinel}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    return rendered.split(sentinel, 1)[1].strip() if sentinel in rendered else ""


def chat_format(record: dict[str, Any], data: DataConfig, tokenizer) -> list[Segment]:
    messages = chat_messages(record, data)
    template = chat_template_of(data, tokenizer)
    if data.chat_template == "gemma" and messages[0]["role"] == "system":  # merged first, as the template does
        merged = (
            f"{messages[0]['content']}\n\n{messages[1]['content']}" if len(messages) > 1 else messages[0]["content"]
        )
        messages = [{"role": "user", "content": merged}, *messages[2:]]
    return _template_segments(messages, tokenizer, template, data.loss_on == "all")


def _template_segments(messages, tokenizer, template: str, train_all: bool) -> list[Segment]:
    """Segments from a Jinja chat template.

    Renders growing prefixes of the conversation: an assistant message spans from the end of the
    render that ends with the generation prompt to the end of the render that includes it. This
    is exact for any template whose renders of prefixes are prefixes of each other.
    """

    def render(msgs, generation_prompt: bool) -> str:
        if tokenizer is None:  # training the tokenizer itself: a built-in template needs none of its tokens
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template([msgs], chat_template=template, add_generation_prompt=generation_prompt)
            return rendered[0]
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = render(messages[:i], True) if i else ""
            if not before.startswith(done):
                raise FormatProblem("template", "the chat template does not render prefixes consistently")
            segments.append(Segment(before[len(done) :], train_all))
            done = before
        full = render(messages[: i + 1], False)
        if not full.startswith(done):
            raise FormatProblem(
                "template", "the tokenizer's chat template is not incremental; set data.chat_template to a built-in"
            )
        segments.append(Segment(full[len(done) :], train_all or message["role"] == "assistant"))
        done = full
    return segments


def seq2seq_format(record: dict[str, Any], data: DataConfig, tokenizer) -> list[Segment]:
    """[source (the encoder's input, rendered with data.template), target (what is generated)]."""
    source = field_text(record, data, "source")
    target = field_text(record, data, "target")
    rendered = (data.template or "{source}").format_map({**record, "source": source})
    return [Segment(rendered, False), Segment(target, True)]


def classification_format(record: dict[str, Any], data: DataConfig, tokenizer) -> list[Segment]:
    """[text, label]: the label segment's text is the class name."""
    text = field_text(record, data, "text")
    key = column(data, "label")
    if key not in record:
        fields = ", ".join(map(str, record)) or "none"
        raise FormatProblem("missing_column", f"no field {key!r} (fields: {fields}); set data.columns.label")
    label = record[key]
    if label is None or isinstance(label, (list, dict)) or str(label).strip() == "":
        raise FormatProblem("empty_label", f"field {key!r} holds no label")
    return [Segment(text, False), Segment(str(label), True)]


Format = Callable[[dict[str, Any], DataConfig, Any], list[Segment]]
FORMATS: dict[str, Format] = {
    "text": text_format,
    "prompt-completion": prompt_completion_format,
    "alpaca": alpaca_format,
    "chat": chat_format,
    "seq2seq": seq2seq_format,
    "classification": classification_format,
}
