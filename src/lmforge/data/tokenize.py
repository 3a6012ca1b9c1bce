"""From records to tokenized examples: labels from character offsets, length handling, counting.

An example is (input_ids, labels) where labels[i] is input_ids[i] on trained tokens and
IGNORE_INDEX elsewhere. labels[0] is always IGNORE_INDEX: nothing precedes the first token, and in
a packed row the token before it belongs to another example.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import DataConfig
from lmforge.data.formats import FORMATS, FormatProblem, Segment
from lmforge.data.sources import Record
from lmforge.errors import DataError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Counts:
    """What happened to the records of one split; the data report is made of these."""

    records: int = 0
    examples: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0
    split_into_pieces: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    labels: Counter = field(default_factory=Counter)
    """Examples per class (classification)."""

    def merge(self, other: Counts) -> None:
        self.records += other.records
        self.examples += other.examples
        self.dropped.update(other.dropped)
        self.truncated += other.truncated
        self.split_into_pieces += other.split_into_pieces
        self.tokens += other.tokens
        self.trained_tokens += other.trained_tokens
        self.lengths.extend(other.lengths)
        self.labels.update(other.labels)


def encode_segments(segments: list[Segment], tokenizer, add_bos: bool) -> tuple[list[int], list[bool]]:
    """Token ids of the joined segments and, per token, whether it overlaps a trained segment."""
    text = "".join(s.text for s in segments)
    spans, start = [], 0
    for segment in segments:
        end = start + len(segment.text)
        if segment.trained and end > start:
            spans.append((start, end))
        start = end
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    # A token is trained if any of its characters are: a token that straddles the prompt/answer
    # boundary cannot be predicted without predicting part of the answer.
    trained = [
        any(s < span_end and e > span_start for span_start, span_end in spans) for s, e in encoded["offset_mapping"]
    ]
    if add_bos and tokenizer.bos_token_id is not None:
        ids, trained = [tokenizer.bos_token_id, *ids], [False, *trained]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)  # teaches the model to stop; trained like the end of the text
        trained.append(bool(segments) and segments[-1].trained)
    return ids, trained


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by default (Llama-style tokenizers do)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def labels_of(ids: list[int], trained: list[bool]) -> list[int]:
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    if labels:
        labels[0] = IGNORE_INDEX
    return labels


def segments_of(record: Record, data: DataConfig, tokenizer, counts: Counts | None = None) -> list[Segment] | None:
    """The record's segments, or None if it is invalid and data.on_invalid is drop (then counted).

    Raises:
        DataError: naming file, line and problem, when data.on_invalid is error.
    """
    try:
        if record.problem is not None:
            raise FormatProblem(record.reason, record.problem)
        return FORMATS[data.format](record.fields, data, tokenizer)
    except FormatProblem as problem:
        if data.on_invalid == "error":
            raise DataError(f"{record.where}: {problem}; or set data.on_invalid=drop to skip such records") from None
        if counts is not None:
            counts.dropped[problem.reason] += 1
        return None


def record_examples(
    record: Record, data: DataConfig, tokenizer, add_bos: bool, counts: Counts, label_ids: dict[str, int] | None = None
) -> list[Example]:
    """The examples of one record (one, several pieces, or none if dropped), counted in `counts`."""
    counts.records += 1
    segments = segments_of(record, data, tokenizer, counts)
    if segments is None:
        return []
    if data.format == "seq2seq":
        return _seq2seq_example(segments, data, tokenizer, record.where, counts)
    if data.format == "classification":
        return _classification_example(segments, data, tokenizer, record.where, counts, label_ids or {})
    ids, trained = encode_segments(segments, tokenizer, add_bos)
    if not any(trained[1:]):  # e.g. an empty answer after the template: nothing to learn
        counts.dropped["fully_masked"] += 1
        return []
    examples = []
    for piece_ids, piece_trained in _fit_length(ids, trained, data, record.where, counts):
        labels = labels_of(piece_ids, piece_trained)
        targets = sum(label != IGNORE_INDEX for label in labels)
        if targets == 0:  # truncation cut the whole answer: never keep a prompt without it
            counts.dropped["no_trained_tokens_left"] += 1
            continue
        examples.append(Example(piece_ids, labels))
        counts.examples += 1
        counts.tokens += len(piece_ids)
        counts.trained_tokens += targets
        counts.lengths.append(len(piece_ids))
    return examples


def _encode_with_eos(text: str, tokenizer) -> list[int]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


def _seq2seq_example(segments, data: DataConfig, tokenizer, where: str, counts: Counts) -> list[Example]:
    """input_ids: the source for the encoder; labels: the target the decoder learns to produce.
    The decoder's inputs are the labels shifted right, made by the model itself."""
    source = _encode_with_eos(segments[0].text, tokenizer)
    target = _encode_with_eos(segments[1].text, tokenizer)
    target_limit = data.max_target_length or data.max_length
    if len(source) > data.max_length or len(target) > target_limit:
        if data.too_long == "error":
            raise DataError(
                f"{where}: source {len(source)} / target {len(target)} tokens, more than data.max_length="
                f"{data.max_length} / data.max_target_length={target_limit}; raise them or set data.on_too_long"
            )
        if data.too_long == "drop":
            counts.dropped["too_long"] += 1
            return []
        counts.truncated += 1
        source, target = source[: data.max_length], target[:target_limit]
    counts.examples += 1
    counts.tokens += len(source) + len(target)
    counts.trained_tokens += len(target)
    counts.lengths.append(len(source))
    return [Example(source, target)]


def _classification_example(
    segments, data: DataConfig, tokenizer, where: str, counts: Counts, label_ids: dict[str, int]
) -> list[Example]:
    label = segments[1].text
    if label not in label_ids:
        problem = f"label {label!r} is not one of the training labels {sorted(label_ids)}; list them in data.labels"
        if data.on_invalid == "error":
            raise DataError(f"{where}: {problem}")
        counts.dropped["unknown_label"] += 1
        return []
    ids = list(tokenizer(segments[0].text, add_special_tokens=True)["input_ids"])
    if len(ids) > data.max_length:
        if data.too_long == "error":
            raise DataError(f"{where}: {len(ids)} tokens, more than data.max_length={data.max_length}")
        if data.too_long == "drop":
            counts.dropped["too_long"] += 1
            return []
        counts.truncated += 1
        ids = tokenizer(segments[0].text, add_special_tokens=True, truncation=True, max_length=data.max_length)[
            "input_ids"
        ]
    counts.examples += 1
    counts.tokens += len(ids)
    counts.trained_tokens += 1
    counts.lengths.append(len(ids))
    counts.labels[label] += 1
    return [Example(list(ids), [label_ids[label]])]


def _fit_length(ids, trained, data: DataConfig, where: str, counts: Counts) -> list[tuple[list[int], list[bool]]]:
    limit = data.max_length
    if len(ids) <= limit:
        return [(ids, trained)]
    policy = data.too_long
    if policy == "error":
        raise DataError(
            f"{where}: {len(ids)} tokens, more than data.max_length={limit}; raise data.max_length or set "
            "data.on_too_long to truncate or drop"
        )
    if policy == "drop":
        counts.dropped["too_long"] += 1
        return []
    if policy == "split":
        counts.split_into_pieces += 1
        return [
            (ids[i : i + limit], trained[i : i + limit])
            for i in range(0, len(ids), limit)
            if len(ids[i : i + limit]) > 1
        ]
    counts.truncated += 1  # truncate: keep the start; a record whose answer was cut entirely is dropped
    return [(ids[:limit], trained[:limit])]


def rendered_text(record: Record, data: DataConfig, tokenizer) -> str | None:
    """The whole text of a record as the format renders it (for tokenizer training), or None."""
    segments = segments_of(record, data, tokenizer)
    return None if segments is None else "".join(s.text for s in segments)


def prompt_and_reference(record: Record, data: DataConfig, tokenizer) -> dict[str, Any] | None:
    """For sampling: the untrained prefix as prompt and the last trained segment as reference."""
    try:
        segments = FORMATS[data.format](record.fields, data, tokenizer)
    except FormatProblem:
        return None
    if data.format == "text":
        return {"text": segments[0].text}
    if data.format == "classification":
        return {"prompt": segments[0].text, "reference": segments[1].text}
    last = max(i for i, s in enumerate(segments) if s.trained)
    return {"prompt": "".join(s.text for s in segments[:last]), "reference": segments[last].text}
