"""From records to tokenized examples: labels from character offsets, length handling, counting.

An example is (input_ids, labels) where labels[i] is input_ids[i] on trained tokens and
IGNORE_INDEX elsewhere. labels[0] is always IGNORE_INDEX: nothing precedes the first token, and in
a packed row the token before it belongs to another example.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

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
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, trained = _mark_trained(segments, encoded["input_ids"], encoded["offset_mapping"], tokenizer, add_bos)
    return ids.tolist(), trained.tolist()


def encode_batch(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each text, without special tokens.

    A fast tokenizer's Rust backend is called directly when it would do what the transformers call
    does (no truncation or padding configured): turning each encoding into Python dicts took as long
    as the tokenizing itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [e.offsets for e in encodings]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return encoded["input_ids"], encoded["offset_mapping"]


def _mark_trained(segments: list[Segment], ids, offsets, tokenizer, add_bos: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) as arrays, with BOS/EOS added, from the tokenizer's ids and character offsets."""
    offsets = np.fromiter(chain.from_iterable(offsets), np.int64, 2 * len(ids)).reshape(-1, 2)
    trained = np.zeros(len(ids), dtype=bool)
    start = 0
    for segment in segments:
        end = start + len(segment.text)
        if segment.trained and end > start:
            # A token is trained if any of its characters are: a token that straddles the
            # prompt/answer boundary cannot be predicted without predicting part of the answer.
            trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
        start = end
    head = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token_id
    last = ids[-1] if ids else (head[-1] if head else None)
    # EOS teaches the model to stop; it is trained like the end of the text
    tail = [eos] if eos is not None and last != eos else []
    ids = np.asarray([*head, *ids, *tail], dtype=np.int64)
    if head or tail:
        trained = np.concatenate(([False] * len(head), trained, [bool(segments) and segments[-1].trained] * len(tail)))
    return ids, trained


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of text by default (Llama-style tokenizers do)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def labels_of(ids: Sequence[int], trained: Sequence[bool]) -> list[int]:
    return _labels(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)).tolist()


def _labels(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """The token where it is trained, IGNORE_INDEX elsewhere and always at position 0."""
    labels = np.where(trained, ids, IGNORE_INDEX)
    if len(labels):
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
    return chunk_examples([record], data, tokenizer, add_bos, counts, label_ids)


def chunk_examples(
    records: list[Record],
    data: DataConfig,
    tokenizer,
    add_bos: bool,
    counts: Counts,
    label_ids: dict[str, int] | None = None,
) -> list[Example]:
    """The examples of several records, in order, counted in `counts`; the texts of causal-LM
    formats go through the tokenizer in one batch call."""
    counts.records += len(records)
    parsed = [(r, segments) for r in records if (segments := segments_of(r, data, tokenizer, counts)) is not None]
    if data.format == "seq2seq":
        return [e for r, segments in parsed for e in _seq2seq_example(segments, data, tokenizer, r.where, counts)]
    if data.format == "classification":
        return [
            e
            for r, segments in parsed
            for e in _classification_example(segments, data, tokenizer, r.where, counts, label_ids or {})
        ]
    if not parsed:
        return []
    texts = ["".join(s.text for s in segments) for _, segments in parsed]
    examples = []
    for (record, segments), ids, offsets in zip(parsed, *encode_batch(tokenizer, texts), strict=True):
        ids, trained = _mark_trained(segments, ids, offsets, tokenizer, add_bos)
        examples += _causal_examples(ids, trained, data, record.where, counts)
    return examples


def _causal_examples(
    ids: np.ndarray, trained: np.ndarray, data: DataConfig, where: str, counts: Counts
) -> list[Example]:
    if not trained[1:].any():  # e.g. an empty answer after the template: nothing to learn
        counts.dropped["fully_masked"] += 1
        return []
    examples = []
    for piece_ids, piece_trained in _fit_length(ids, trained, data, where, counts):
        labels = _labels(piece_ids, piece_trained)
        targets = int((labels != IGNORE_INDEX).sum())
        if targets == 0:  # truncation cut the whole answer: never keep a prompt without it
            counts.dropped["no_trained_tokens_left"] += 1
            continue
        examples.append(Example(piece_ids.tolist(), labels.tolist()))
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
