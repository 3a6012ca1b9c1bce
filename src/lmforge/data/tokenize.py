"""From records to tokenized examples: labels from character offsets, length handling, counting.

An example is (input_ids, labels) where labels[i] is input_ids[i] on trained tokens and
IGNORE_INDEX elsewhere. labels[0] is always IGNORE_INDEX: nothing precedes the first token, and in
a packed row the token before it belongs to another example.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np

from lmforge.config import DataConfig
from lmforge.data.formats import FORMATS, FormatProblem, Segment, chat_messages, difficulty_of
from lmforge.data.sources import Record
from lmforge.errors import DataError, RecordError

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: Sequence[int]
    labels: Sequence[int]
    """Lists, or int32 arrays for causal-LM examples."""
    difficulty: float = 0.0
    """data.curriculum's score of the example's record (training examples of a curriculum run)."""
    tie: int = 0
    """A seeded hash of the record, which orders records of equal difficulty (0 when not scored)."""


@dataclass(frozen=True)
class Scoring:
    """How the training examples of a chunk of records are scored for data.curriculum."""

    column: str | None = None
    """The record field holding the difficulty; None: the record's length in tokens."""
    stage: int | None = None
    """With stages: the stage the records were read for, which is their difficulty."""
    seed: int = 0
    """Seeds the hash of each record that breaks ties between equal difficulties."""


def record_tie(fields: dict[str, Any], seed: int) -> int:
    """A 64-bit hash of a record's content seeded with `seed`: equal difficulties are ordered by it,
    not by where the records sit in the files (copies of a record get the same one)."""
    blob = f"{seed}\0" + json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big")


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
    ((ids, trained),) = encode_marked([segments], tokenizer, add_bos)
    return ids.tolist(), trained.tolist()


def encode_marked(segment_lists: list[list[Segment]], tokenizer, add_bos: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, trained) per list of segments, with BOS/EOS added; the texts go through the
    tokenizer in one batch call.

    A fast tokenizer's Rust backend is called directly when it would do what the transformers call
    does (no truncation or padding configured): turning every encoding into Python lists of ids and
    offsets took as long as the tokenizing itself. Its offsets are then only looked at where a
    trained segment begins and ends (`_trained_spans`)."""
    texts = ["".join(s.text for s in segments) for segments in segment_lists]
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        encodings = backend.encode_batch(texts, add_special_tokens=False)
        return [_marked(segments, e.ids, bos, eos, e) for segments, e in zip(segment_lists, encodings, strict=True)]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    columns = zip(segment_lists, encoded["input_ids"], encoded["offset_mapping"], strict=True)
    return [_marked(segments, ids, bos, eos, offsets=offsets) for segments, ids, offsets in columns]


def _marked(
    segments: list[Segment], ids: list[int], bos: int | None, eos: int | None, encoding=None, offsets=None
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) of one text's tokens, from a Rust encoding or from the offsets of every
    token, with BOS in front (when given) and EOS at the end (unless the text ends with it).
    EOS teaches the model to stop: it is trained like the end of the text."""
    head = int(_needs_bos(ids, bos))  # a chat template may write BOS itself
    last = ids[-1] if ids else bos
    tail = int(eos is not None and last != eos)
    n = len(ids)
    out = np.empty(head + n + tail, dtype=np.int32)
    out[head : head + n] = ids
    trained = np.zeros(head + n + tail, dtype=bool)
    if encoding is not None:
        _trained_spans(segments, encoding, trained[head : head + n])
    else:
        trained[head : head + n] = _trained_from_offsets(segments, offsets, n)
    if head:
        out[0] = bos
    if tail:
        out[-1] = eos
        trained[-1] = bool(segments) and segments[-1].trained
    return out, trained


def _segment_bounds(segments: list[Segment]) -> list[tuple[int, int]]:
    """[start, end) character spans of the non-empty trained segments in the joined text."""
    bounds, start = [], 0
    for segment in segments:
        end = start + len(segment.text)
        if segment.trained and end > start:
            bounds.append((start, end))
        start = end
    return bounds


def _trained_from_offsets(segments: list[Segment], offsets, n: int) -> np.ndarray:
    """Per token, whether any of its characters lie in a trained segment. A token that straddles
    the prompt/answer boundary cannot be predicted without predicting part of the answer, so it is
    trained."""
    offsets = np.fromiter(chain.from_iterable(offsets), np.int64, 2 * n).reshape(-1, 2)
    trained = np.zeros(n, dtype=bool)
    for start, end in _segment_bounds(segments):
        trained |= (offsets[:, 0] < end) & (offsets[:, 1] > start)
    return trained


def _trained_spans(segments: list[Segment], encoding, trained: np.ndarray) -> None:
    """`_trained_from_offsets` from a Rust encoding, reading only the offsets of the tokens that a
    binary search visits: token offsets never go backwards (starts and ends are non-decreasing),
    so the tokens that overlap [start, end) are a contiguous run, from the first token that ends
    after `start` to the last one that begins before `end` (checked against the full rule over
    several tokenizers in the tests)."""
    n = len(trained)
    for start, end in _segment_bounds(segments):
        first = _first_above(encoding, n, 1, start)  # the first token that ends after start
        last = _first_above(encoding, n, 0, end - 1)  # the first token that begins at or after end
        trained[first:last] = True


def _first_above(encoding, n: int, side: int, value: int) -> int:
    """The first token whose offset start (side 0) or end (side 1) exceeds value, or n."""
    return bisect.bisect_right(range(n), value, key=lambda token: encoding.token_to_chars(token)[side])


FREE_PROMPT_PROBES = ("x", "a")
"""What a prompt is assumed to be continued by when its answer is unknown (`lmforge generate`, a
served request): a word, the usual case."""


def prompt_ids(
    prompt: str, tokenizer, add_bos: bool, continuations: Sequence[str] | None = None
) -> tuple[list[int], int]:
    """The token ids a causal LM is prompted with, and how many characters of `prompt` they cover.

    They are exactly the tokens of the training row of `prompt + continuation` (same call, same
    BOS rule) before its first trained token, so evaluation, generation and serving see what
    training saw. A template that ends in a space ("<assistant>: ") is the case this matters for:
    where the vocabulary joins the space to the answer's first token (" Paris"), the prompt stops
    before it and the model writes it; where it does not (" ", "5"), the space stays in the prompt.

    Args:
        continuations: the answer (one, known: held-out samples), or answers like the run's
            (the starts of its held-out answers, for a prompt whose answer is unknown): the cut
            most of them give is taken. None: a word is assumed to follow (FREE_PROMPT_PROBES),
            and trailing white space that the pre-tokenizer would join to it is left out.

    Returns:
        (ids, covered): covered <= len(prompt); prompt[covered:] is left for the model to write.
    """
    given = [c for c in continuations or () if c]
    probes = given or list(FREE_PROMPT_PROBES)
    rows = encode_marked([[Segment(prompt, False), Segment(c, True)] for c in probes], tokenizer, add_bos)
    cuts = [int(np.argmax(trained)) if trained.any() else len(ids) for ids, trained in rows]
    if given:  # the cut most answers give (ties: the longer prompt)
        kept = max(set(cuts), key=lambda cut: (cuts.count(cut), cut))
        ids = rows[cuts.index(kept)][0]
    else:  # the prefix every probe leaves in place
        ids, kept = rows[0][0], min(cuts)
        for other, _ in rows[1:]:
            kept = next((i for i in range(kept) if other[i] != ids[i]), kept)
    encoded = tokenizer(prompt + probes[0], add_special_tokens=False, return_offsets_mapping=True)
    head = int(_needs_bos(encoded["input_ids"], tokenizer.bos_token_id if add_bos else None))
    ends = [end for _, end in encoded["offset_mapping"]]
    if not given:
        kept = min(kept, head + bisect.bisect_right(ends, _last_word_start(prompt, tokenizer)))
    text_tokens = kept - head
    covered = min(ends[text_tokens - 1], len(prompt)) if text_tokens > 0 else 0
    return ids[:kept].tolist(), covered


def _last_word_start(prompt: str, tokenizer) -> int:
    """Where trailing white space that the pre-tokenizer glues to a following word starts in
    `prompt` (GPT-2's and SentencePiece's glue one space), else len(prompt). In training such a
    space is inside the answer's first token wherever the vocabulary has the word with its space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = getattr(backend, "pre_tokenizer", None)
    if pre is None:
        return len(prompt)
    start = pre.pre_tokenize_str(prompt + FREE_PROMPT_PROBES[0])[-1][1][0]
    return start if start < len(prompt) and not prompt[start:].strip() else len(prompt)


def _needs_bos(ids, bos: int | None) -> bool:
    """Whether a row of these text ids gets BOS in front: at most one BOS, whoever writes it."""
    return bos is not None and (len(ids) == 0 or ids[0] != bos)


def ids_with_eos(text: str, tokenizer) -> list[int]:
    """A seq2seq source or target as training encodes it (and generation the encoder's input):
    the tokenizer's special tokens, then EOS unless it is already the last token."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return ids


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
        return _invalid(record, problem, data, counts)


def _invalid(record: Record, problem: FormatProblem, data: DataConfig, counts: Counts | None) -> None:
    """An invalid record: an error naming file and line, or (data.on_invalid=drop) a counted drop."""
    if data.on_invalid == "error":
        raise RecordError(f"{record.where}: {problem}") from None
    if counts is not None:
        counts.dropped[problem.reason] += 1


def has_difficulty(record: Record, data: DataConfig, column: str | None, counts: Counts | None = None) -> bool:
    """Whether a record has the difficulty data.curriculum.column asks for (always, when column is
    None); if not, it is invalid: an error, or (data.on_invalid=drop) False and counted.

    Raises:
        RecordError: naming file, line and problem, when data.on_invalid is error.
    """
    if column is None:
        return True
    try:
        difficulty_of(record.fields, column)
    except FormatProblem as problem:
        _invalid(record, problem, data, counts)
        return False
    return True


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
    scoring: Scoring | None = None,
) -> list[Example]:
    """The examples of several records, in order, counted in `counts`; the texts of causal-LM
    formats go through the tokenizer in one batch call.

    Args:
        scoring: training records of a curriculum run: every example gets its record's difficulty
            (the column's value, the stage, or the record's length in tokens: the pieces of a text
            cut at max_length all get the whole record's) and tie hash. A record without a number
            in the column is invalid (data.on_invalid).
    """
    counts.records += len(records)
    parsed = [
        (r, segments)
        for r in records
        if (segments := segments_of(r, data, tokenizer, counts)) is not None
        and (scoring is None or has_difficulty(r, data, scoring.column, counts))
    ]
    if data.format == "seq2seq":
        made = [_seq2seq_example(segments, data, tokenizer, r.where, counts) for r, segments in parsed]
        lengths = [sum(len(e.input_ids) + len(e.labels) for e in examples) for examples in made]
    elif data.format == "classification":
        made = [
            _classification_example(segments, data, tokenizer, r.where, counts, label_ids or {})
            for r, segments in parsed
        ]
        lengths = [sum(len(e.input_ids) for e in examples) for examples in made]
    else:
        marked = encode_marked([segments for _, segments in parsed], tokenizer, add_bos) if parsed else []
        made = [
            _causal_examples(ids, trained, data, record.where, counts)
            for (record, _), (ids, trained) in zip(parsed, marked, strict=True)
        ]
        lengths = [len(ids) for ids, _ in marked]  # the whole record's, before any cut to max_length
    if scoring is not None:
        for (record, _), examples, length in zip(parsed, made, lengths, strict=True):
            _score(examples, record, length, scoring)
    return [e for examples in made for e in examples]


def _score(examples: list[Example], record: Record, length: int, scoring: Scoring) -> None:
    """Give a record's examples its difficulty and tie hash."""
    if scoring.stage is not None:
        difficulty = float(scoring.stage)
    elif scoring.column is not None:
        difficulty = difficulty_of(record.fields, scoring.column)
    else:
        difficulty = float(length)
    tie = record_tie(record.fields, scoring.seed)
    for example in examples:
        example.difficulty, example.tie = difficulty, tie


def _causal_examples(
    ids: np.ndarray, trained: np.ndarray, data: DataConfig, where: str, counts: Counts
) -> list[Example]:
    if not trained[1:].any():  # e.g. an empty answer after the template: nothing to learn
        counts.dropped["fully_masked"] += 1
        return []
    examples = []
    for piece_ids, piece_trained in _fit_length(ids, trained, data, where, counts):
        labels = _labels(piece_ids, piece_trained)
        targets = int(np.count_nonzero(piece_trained[1:]))  # the labels that are not IGNORE_INDEX
        if targets == 0:  # truncation cut the whole answer: never keep a prompt without it
            counts.dropped["no_trained_tokens_left"] += 1
            continue
        examples.append(Example(piece_ids, labels))
        counts.examples += 1
        counts.tokens += len(piece_ids)
        counts.trained_tokens += targets
        counts.lengths.append(len(piece_ids))
    return examples


def _seq2seq_example(segments, data: DataConfig, tokenizer, where: str, counts: Counts) -> list[Example]:
    """input_ids: the source for the encoder; labels: the target the decoder learns to produce.
    The decoder's inputs are the labels shifted right, made by the model itself."""
    source = ids_with_eos(segments[0].text, tokenizer)
    target = ids_with_eos(segments[1].text, tokenizer)
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
    reference = segments[last].text
    if data.format == "chat":  # the answer, without the template's end of turn
        reference = [m for m in chat_messages(record.fields, data) if m["role"] == "assistant"][-1]["content"]
    return {"prompt": "".join(s.text for s in segments[:last]), "reference": reference}
