"""From config to tokenized, packed, cached splits, and a report of everything that was done.

The cache is keyed by fingerprints, so a second run with the same inputs memory-maps Arrow files
instead of tokenizing again:

    <cache>/tokenizers/<fp>/   a tokenizer trained on the training split
    <cache>/data/<fp>/         train.arrow validation.arrow test.arrow, report.json, samples.json

Rows are written to Arrow as they are made (nothing holds a whole split in memory), in a
temporary directory that is renamed into place with report.json written last.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, List, Value
from datasets.arrow_writer import ArrowWriter
from transformers import PreTrainedTokenizerBase

from lmforge.atomic import atomic_dir
from lmforge.config import Config, DataConfig
from lmforge.data.curriculum import difficulty_levels
from lmforge.data.formats import CHAT_MARKERS, chat_template_of, class_names, label_of
from lmforge.data.loader import padding_fraction, training_order
from lmforge.data.packing import best_fit_decreasing, pack_within_levels
from lmforge.data.sources import Record, Source, read_records, resolve_sources, source_digest
from lmforge.data.tokenize import (
    Counts,
    Example,
    Scoring,
    adds_bos,
    chunk_examples,
    has_difficulty,
    prompt_and_reference,
    record_examples,
    rendered_text,
    segments_of,
)
from lmforge.errors import DataError, RecordError
from lmforge.models.tokenizer import load_tokenizer, tokenizer_digest, train_bpe_tokenizer

DATA_VERSION = 4  # bump when the meaning of cached data changes
SPLITS = ("train", "validation", "test")
MAX_SAMPLES = 32  # held-out records kept for generation prompts
CHUNK = 256  # records per worker task, at most
CHUNK_CHARS = 1 << 18  # characters of text per worker task, at most
ROW_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "lengths": List(Value("int32")),
        "num_tokens": Value("int32"),
    }
)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, Dataset]
    """Rows per split (input_ids, labels, lengths of the packed examples, num_tokens; with
    data.curriculum, the training rows' difficulty level, easiest rows first); test may be absent."""
    report: dict[str, Any]
    """What was read, dropped, truncated, trained on, per split."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """Held-out records to sample from: {"text"} or {"prompt", "reference"}."""
    cache_hit: bool = False

    @property
    def labels(self) -> list[str] | None:
        """Classification: class names in id order."""
        return self.report.get("labels")


def cache_root(config: Config) -> Path:
    return Path(config.data.cache_dir or os.path.join("~", ".cache", "lmforge")).expanduser()


def prepare_data(config: Config, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer and packed splits for a config, from the cache when the inputs are unchanged."""
    data = config.data
    stages = _stage_sources(data)
    sources = _sources(data, stages)
    settings = data.model_dump(
        include={"format", "columns", "template", "chat_template", "loss_on", "text_field", "txt_documents"}
    )
    source_fp = _digest(
        {
            "version": DATA_VERSION,
            "settings": settings,
            "validation_fraction": None if data.validation else data.validation_fraction,
            "test_fraction": None if data.test else data.test_fraction,
            "files": {s: [(source_digest(x.path), x.weight) for x in v] for s, v in sources.items()},
        }
    )
    splits = SplitReader(sources, data, stages)
    try:
        return _prepare(config, source_fp, splits, log)
    except RecordError as exc:  # how many records are like it decides the advice
        raise RecordError(f"{exc}{_invalid_advice(splits, data)}") from None


def _stage_sources(data: DataConfig) -> list[list[Source]]:
    """The training sources of each data.curriculum stage; without stages, one: data.train's."""
    stages = data.curriculum.stages if data.curriculum is not None else None
    if not stages:
        return [resolve_sources(data.train, "data.train")]
    return [resolve_sources(stage.data, f"data.curriculum.stages.{i}.data") for i, stage in enumerate(stages)]


def _sources(data: DataConfig, stages: list[list[Source]]) -> dict[str, list[Source]]:
    return {
        "train": [source for stage in stages for source in stage],
        "validation": resolve_sources(data.validation, "data.validation") if data.validation else [],
        "test": resolve_sources(data.test, "data.test") if data.test else [],
    }


def split_records(data: DataConfig, split: str) -> Iterator[Record]:
    """The records of one split, streamed in file order, exactly those `prepare_data` puts in it
    (held-out records are chosen from the training files by the same hash)."""
    stages = _stage_sources(data)
    yield from SplitReader(_sources(data, stages), data, stages).records(split)


def _prepare(config: Config, source_fp: str, splits: SplitReader, log: Callable[[str], None]) -> PreparedData:
    data = config.data
    tokenizer = _get_tokenizer(config, source_fp, splits, log)
    if data.format == "chat":  # saved with the model, so that it is prompted as it was trained
        tokenizer.chat_template = chat_template_of(data, tokenizer)
    rows_fp = [
        tokenizer.chat_template if data.format == "chat" else None,
        source_fp,
        tokenizer_digest(tokenizer),
        data.max_length,
        data.too_long,
        data.on_invalid,
        data.packs,
        data.labels,
        data.max_target_length,
    ]
    if data.curriculum is not None:  # (appended: the caches of runs without one keep their keys)
        rows_fp.append(_curriculum_fp(config, splits))
    directory = cache_root(config) / "data" / _digest(rows_fp)
    hit = (directory / "report.json").is_file()
    if not hit:
        log("tokenizing and packing the data")
        _build(directory, splits, data, tokenizer, config.seed)
    report = json.loads((directory / "report.json").read_text())
    datasets = {s: Dataset.from_file(str(directory / f"{s}.arrow")) for s in SPLITS if s in report["splits"]}
    lengths = datasets["train"].data.column("num_tokens").to_numpy().tolist()
    order = training_order(lengths, config, 0)
    report["splits"]["train"]["padding_fraction"] = padding_fraction(lengths, order, config.train.micro_batch_size)
    samples = json.loads((directory / "samples.json").read_text())
    return PreparedData(tokenizer, datasets, report, samples, cache_hit=hit)


def _curriculum_fp(config: Config, splits: SplitReader) -> dict[str, Any]:
    """The data.curriculum settings that change the training rows (levels and packing), and which
    training sources make each stage (their contents are in the source fingerprint already: the
    training sources are the stages' in order); the schedule (start, schedule, steps) is the
    loader's and changes no row."""
    curriculum = config.data.curriculum
    if curriculum.stages:
        return {"stage_sources": [len(stage) for stage in splits.stages]}
    return {"column": curriculum.column, "levels": curriculum.levels, "seed": config.seed}


def tokenize_files(
    paths: list[Path], data: DataConfig, tokenizer: PreTrainedTokenizerBase, labels: list[str] | None = None
) -> Dataset:
    """Rows of whole files (no split, no cache, no packing), encoded as training encodes them: for
    `lmforge eval --data`. `labels`: a classifier's class names in id order."""
    add_bos, counts, rows = row_bos(tokenizer, data), Counts(), []
    label_ids = {name: i for i, name in enumerate(labels)} if labels else None
    for path in paths:
        for record in read_records(path, data.txt_documents):
            rows += [_row([e]) for e in record_examples(record, data, tokenizer, add_bos, counts, label_ids)]
    if not rows:
        raise DataError(f"{', '.join(map(str, paths))}: no examples to evaluate on")
    return Dataset.from_list(rows, features=ROW_FEATURES)


def row_bos(tokenizer: PreTrainedTokenizerBase, data: DataConfig) -> bool:
    """Whether causal-LM rows get the tokenizer's BOS in front (encoder inputs get the tokenizer's
    own special tokens instead)."""
    return adds_bos(tokenizer) and data.format not in ("seq2seq", "classification")


# --------------------------------------------------------------------------- splitting


class SplitReader:
    """Streams the records of each split; held-out splits are chosen by a hash of each record."""

    def __init__(self, sources: dict[str, list[Source]], data: DataConfig, stages: list[list[Source]]) -> None:
        self.sources, self.data = sources, data
        self.stages = stages
        """The training sources of each data.curriculum stage (one, data.train's, without stages)."""
        self.held_out = {
            "test": data.test_fraction if not sources["test"] else 0.0,
            "validation": data.validation_fraction if not sources["validation"] else 0.0,
        }

    def routed(self) -> Iterator[tuple[str, int, Record]]:
        """(split, stage, record) for every record of every split, reading each file once; the stage
        is the data.curriculum stage whose files hold the record (0 without stages)."""
        yield from self._from_training_files()
        for split in ("validation", "test"):
            for record in self._read(split):
                yield split, 0, record

    def records(self, split: str) -> Iterator[Record]:
        if split != "train" and self.sources[split]:
            yield from self._read(split)
        elif split == "train" or self.held_out[split]:
            yield from (record for s, _, record in self._from_training_files() if s == split)

    def _from_training_files(self) -> Iterator[tuple[str, int, Record]]:
        """(split, stage, record) for the records of the training files, training records as many
        times as their source's weight says."""
        for stage, sources in enumerate(self.stages):
            for source in sources:
                for record in read_records(source.path, self.data.txt_documents):
                    split = self._split_of(record)
                    for _ in range(_copies(record, source.weight) if split == "train" else 1):
                        yield split, stage, record

    def _read(self, split: str) -> Iterator[Record]:
        for source in self.sources[split]:
            yield from read_records(source.path, self.data.txt_documents)

    def _split_of(self, record: Record) -> str:
        if record.problem is not None:
            return "train"  # unreadable records are reported once, with the training data
        return hash_split(record.fields, self.held_out["test"], self.held_out["validation"])


def hash_split(fields: dict[str, Any], test_fraction: float, validation_fraction: float) -> str:
    """The split of a record. It depends only on the record's content: stable across runs, file
    order and machines, and duplicates always land together, so they cannot leak across splits."""
    u = _unit_hash(fields)
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + validation_fraction else "train"


def _unit_hash(fields: dict[str, Any], salt: str = "") -> float:
    blob = salt + json.dumps(fields, sort_keys=True, default=str, ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") / 2**64


def _copies(record: Record, weight: float) -> int:
    """How many times a training record is used: floor(weight), plus one more with probability
    equal to the fraction, decided by hash so that it is the same on every run."""
    whole, fraction = divmod(weight, 1.0)
    return int(whole) + (1 if fraction and _unit_hash(record.fields, "weight") < fraction else 0)


# --------------------------------------------------------------------------- tokenizer


def _get_tokenizer(config: Config, source_fp: str, splits: SplitReader, log) -> PreTrainedTokenizerBase:
    if config.model.name_or_path:
        need_eos = config.model.task != "classification"
        from lmforge.publish.push import local_model

        where = local_model(config.model.name_or_path, config.storage, log)  # s3://: pulled into the cache
        return load_tokenizer(where, config.model.trust_remote_code, need_eos)
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    tok = config.tokenizer
    directory = cache_root(config) / "tokenizers" / _digest([source_fp, tok.vocab_size, tok.min_frequency])
    if not (directory / "tokenizer.json").is_file():
        log(f"training a byte-level BPE tokenizer (vocab {tok.vocab_size}) on the training split")
        texts = (t for r in splits.records("train") if (t := rendered_text(r, config.data, None)) is not None)
        markers = CHAT_MARKERS.get(config.data.chat_template, ()) if config.data.format == "chat" else ()
        tokenizer = train_bpe_tokenizer(_nonempty(texts, config.data), tok.vocab_size, tok.min_frequency, markers)
        with atomic_dir(directory) as tmp:
            tokenizer.save_pretrained(str(tmp))
    return load_tokenizer(directory)


def _nonempty(texts: Iterator[str], data: DataConfig) -> Iterator[str]:
    seen = False
    for text in texts:
        seen = True
        yield text
    if not seen:
        raise DataError(f"data.train: the corpus is empty: no usable {data.format} records in {data.train}")


# --------------------------------------------------------------------------- building


def _build(directory: Path, splits: SplitReader, data: DataConfig, tokenizer, seed: int = 0) -> None:
    report: dict[str, Any] = {"max_length": data.max_length, "packing": data.packs, "splits": {}}
    label_ids = None
    if data.format == "classification":
        labels = data.labels or class_names({x for r in splits.records("train") if (x := label_of(r.fields, data))})
        report["labels"] = labels
        label_ids = {name: i for i, name in enumerate(labels)}
    with atomic_dir(directory) as tmp:
        counts = _write_examples(splits.routed(), tmp, data, tokenizer, label_ids, seed)
        for split in SPLITS:
            examples_path = tmp / f"{split}.examples.arrow"
            if counts[split].examples == 0:
                examples_path.unlink()
                _check_empty(split, counts[split], splits, data)
                continue
            examples = Dataset.from_file(str(examples_path))
            levels = _levels(examples, data) if split == "train" and data.curriculum is not None else None
            rows = _write_rows(examples, tmp / f"{split}.arrow", data, levels)
            if levels is not None:
                report["curriculum"] = _curriculum_report(examples, levels[0], rows, data)
            del examples
            examples_path.unlink()
            report["splits"][split] = _split_report(counts[split], rows, data.max_length)
        samples = []
        for record in splits.records("validation" if report["splits"].get("validation") else "test"):
            if len(samples) == MAX_SAMPLES:
                break
            if record.problem is None and (sample := prompt_and_reference(record, data, tokenizer)):
                samples.append(sample)
        (tmp / "samples.json").write_text(json.dumps(samples, ensure_ascii=False))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))


def _levels(examples: Dataset, data: DataConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(level, difficulty rank) of each training example; with stages the level is the stage, and
    a stage without any example is an error."""
    difficulty = examples.data.column("difficulty").to_numpy()
    curriculum = data.curriculum
    if curriculum.stages:
        level = difficulty.astype(np.int32)
        empty = sorted(set(range(len(curriculum.stages))) - set(np.unique(level).tolist()))
        if empty:
            raise DataError(
                f"data.curriculum.stages.{empty[0]}.data: no training example in this stage's records (all were "
                "held out or dropped; see lmforge data inspect); give the stage more data or remove it"
            )
        return level, None
    return difficulty_levels(difficulty, examples.data.column("tie").to_numpy(), curriculum.levels)


def _curriculum_report(examples: Dataset, level: np.ndarray, rows: Dataset, data: DataConfig) -> dict[str, Any]:
    """Per level: its examples, rows, tokens and (without stages) the difficulties it spans."""
    curriculum = data.curriculum
    by = "stages" if curriculum.stages else f"column {curriculum.column}" if curriculum.column else "length"
    difficulty = examples.data.column("difficulty").to_numpy()
    row_level = rows.data.column("level").to_numpy()
    row_tokens = rows.data.column("num_tokens").to_numpy()
    levels = []
    for k in range(len(curriculum.stages) if curriculum.stages else curriculum.levels):
        mine = difficulty[level == k]
        entry = {
            "level": k,
            "examples": len(mine),
            "rows": int(np.count_nonzero(row_level == k)),
            "tokens": int(row_tokens[row_level == k].sum()),
        }
        if not curriculum.stages and len(mine):
            entry["difficulty"] = [float(mine.min()), float(mine.max())]
        levels.append(entry)
    return {"by": by, "levels": levels}


def _check_empty(split: str, counts: Counts, splits: SplitReader, data: DataConfig) -> None:
    """Say why a split has no example: no record, or every record dropped (and what drops them)."""
    dropped = f" ({_describe_drops(counts)}{drop_advice(counts.dropped, data)})" if counts.dropped else ""
    if split == "train":
        if counts.records == 0:
            names = ", ".join(str(s.path) for s in splits.sources["train"])
            raise DataError(f"data.train: the corpus is empty: no text in {names}")
        raise DataError(f"data.train: none of the {counts.records} records gave a training example{dropped}")
    fraction = splits.held_out.get(split)
    if fraction and counts.records == 0:
        raise DataError(
            f"data: the {split} split is empty: no record fell in the {fraction:.0%} held out by hash; "
            f"give data.{split} a file or raise data.{split}_fraction"
        )
    if fraction or split == "validation":
        raise DataError(f"data: none of the {counts.records} records of the {split} split gave an example{dropped}")


SAMPLED_RECORDS = 500


def _invalid_advice(splits: SplitReader, data: DataConfig) -> str:
    """What to do about an invalid record: drop such records when few are (counted over the first
    SAMPLED_RECORDS training records), fix the settings when most are."""
    lenient = data.model_copy(update={"on_invalid": "drop"})
    column = data.curriculum.column if data.curriculum is not None else None
    counts, seen = Counts(), 0
    for record in splits.records("train"):
        # (formats read no tokenizer, but a chat's own template)
        if segments_of(record, lenient, None, counts) is not None:
            has_difficulty(record, lenient, column, counts)
        seen += 1
        if seen == SAMPLED_RECORDS:
            break
    bad = sum(counts.dropped.values())
    if seen and bad / seen <= 0.2:
        return f"; or set data.on_invalid=drop to skip such records ({bad} of the first {seen} are)"
    return (
        f". {bad} of the first {seen} records fail this way: the settings do not fit this data; check data.format "
        "(and data.columns, data.template) against a record, e.g. with lmforge data inspect"
    )


DROP_FIXES = {
    "too_long": "raise data.max_length (now {max_length}) or set data.on_too_long=truncate",
    "no_trained_tokens_left": "raise data.max_length (now {max_length}): truncation cut their whole answer",
    "fully_masked": "nothing is left to train on after the template: check data.template and data.loss_on",
    "unknown_label": "list every class in data.labels",
}


def drop_advice(dropped: Counter | dict, data: DataConfig) -> str:
    """'; <the fix>' for the most common reason records were dropped, or '' when the fix is the data's."""
    if not dropped:
        return ""
    reason = max(dropped, key=dropped.get)
    fix = DROP_FIXES.get(reason)
    if fix is None:
        fix = "the records do not fit data.format / data.columns: see the first one with data.on_invalid=error"
    return "; " + fix.format(max_length=data.max_length)


def _describe_drops(counts: Counts) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.dropped.items())) + " dropped"


_worker_state: dict[str, Any] = {}


def _init_worker(data: DataConfig, tokenizer, add_bos: bool, label_ids: dict[str, int] | None, seed: int = 0) -> None:
    _worker_state.update(data=data, tokenizer=tokenizer, add_bos=add_bos, label_ids=label_ids, seed=seed)


def _examples_of_chunk(chunk: tuple[str, int, list[Record]]) -> tuple[str, dict[str, np.ndarray], Counts]:
    split, stage, records = chunk
    counts = Counts()
    s = _worker_state
    data, scoring = s["data"], None
    if split == "train" and data.curriculum is not None:  # scored for the curriculum: training rows only
        scoring = Scoring(data.curriculum.column, stage if data.curriculum.stages else None, s["seed"])
    examples = chunk_examples(records, data, s["tokenizer"], s["add_bos"], counts, s["label_ids"], scoring)
    return split, _flat_columns(examples), counts


def _flat_columns(examples: list[Example]) -> dict[str, np.ndarray]:
    """Examples as flat int32 arrays and lengths: cheap to send from a worker and to write."""

    def flat(lists):
        return np.concatenate(lists, dtype=np.int32, casting="unsafe") if lists else np.zeros(0, np.int32)

    return {
        "input_ids": flat([e.input_ids for e in examples]),
        "labels": flat([e.labels for e in examples]),
        "id_lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int32),
        "label_lengths": np.array([len(e.labels) for e in examples], dtype=np.int32),
        "difficulty": np.array([e.difficulty for e in examples], dtype=np.float64),
        "tie": np.array([e.tie for e in examples], dtype=np.uint64),
    }


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.int32()))


def _chunks(routed: Iterator[tuple[str, int, Record]]) -> Iterator[tuple[str, int, list[Record]]]:
    """Records grouped into worker tasks of one split (and curriculum stage) each, in order within
    each split; a task holds CHUNK records or CHUNK_CHARS characters of text, so long documents
    still spread over the workers."""
    chunks: dict[tuple[str, int], list[Record]] = {}
    sizes: dict[tuple[str, int], int] = {}
    for split, stage, record in routed:
        key = (split, stage)
        chunk = chunks.setdefault(key, [])
        chunk.append(record)
        sizes[key] = sizes.get(key, 0) + sum(len(v) for v in record.fields.values() if isinstance(v, str))
        if len(chunk) == CHUNK or sizes[key] >= CHUNK_CHARS:
            yield split, stage, chunk
            chunks[key], sizes[key] = [], 0
    for (split, stage), chunk in chunks.items():
        if chunk:
            yield split, stage, chunk


EXAMPLE_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "length": Value("int32"),
        "difficulty": Value("float64"),
        "tie": Value("uint64"),
    }
)
"""Tokenized examples before packing; difficulty and tie: data.curriculum's (0 when not scored)."""


def _write_examples(
    routed: Iterator[tuple[str, int, Record]], directory: Path, data: DataConfig, tokenizer, label_ids=None, seed=0
) -> dict[str, Counts]:
    """Tokenized examples of every split, to <split>.examples.arrow in `directory`; their counts."""
    add_bos = row_bos(tokenizer, data)
    features = EXAMPLE_FEATURES
    counts = {split: Counts() for split in SPLITS}
    with ExitStack() as stack:
        writers = {
            split: stack.enter_context(ArrowWriter(features=features, path=str(directory / f"{split}.examples.arrow")))
            for split in SPLITS
        }
        if data.num_proc > 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
            # Forked workers share the parent's heap until they write to it, and a garbage
            # collection in a worker writes to every object it visits: frozen objects are not
            # visited, so the workers do not copy the parent's hundreds of MB of torch objects.
            gc.freeze()
            stack.callback(gc.unfreeze)
            pool = stack.enter_context(
                get_context("fork").Pool(data.num_proc, _init_worker, (data, tokenizer, add_bos, label_ids, seed))
            )
            _drain(pool.imap(_examples_of_chunk, _chunks(routed)), writers, counts)
        else:
            _init_worker(data, tokenizer, add_bos, label_ids, seed)
            _drain(map(_examples_of_chunk, _chunks(routed)), writers, counts)
        for writer in writers.values():
            writer.finalize()
    return counts


def _drain(results, writers: dict[str, ArrowWriter], counts: dict[str, Counts]) -> None:
    for split, columns, chunk_counts in results:
        counts[split].merge(chunk_counts)
        if len(columns["id_lengths"]):
            writers[split].write_batch(
                {
                    "input_ids": _list_array(columns["input_ids"], columns["id_lengths"]),
                    "labels": _list_array(columns["labels"], columns["label_lengths"]),
                    "length": pa.array(columns["id_lengths"]),
                    "difficulty": pa.array(columns["difficulty"]),
                    "tie": pa.array(columns["tie"]),
                }
            )


def _row(examples: list[Example], seq2seq: bool = False) -> dict[str, Any]:
    return {
        "input_ids": [int(t) for e in examples for t in e.input_ids],
        "labels": [int(t) for e in examples for t in e.labels],
        "lengths": [len(e.input_ids) for e in examples],
        # tokens the model reads: for seq2seq the decoder reads the (shifted) target too
        "num_tokens": sum(len(e.input_ids) + (len(e.labels) if seq2seq else 0) for e in examples),
    }


class _ListColumn:
    """A list column of a memory-mapped Dataset, read through numpy views of its Arrow chunks (the
    token lists stay on disk until a row needs them)."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        chunks = dataset.data.table.column(name).chunks
        self.values = [chunk.values.to_numpy() for chunk in chunks]
        self.offsets = [chunk.offsets.to_numpy() for chunk in chunks]
        self.first = np.cumsum([0] + [len(chunk) for chunk in chunks])

    def take(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The lists at `indices`, concatenated, and their lengths."""
        chunk = np.searchsorted(self.first, indices, side="right") - 1
        local = np.asarray(indices) - self.first[chunk]
        pieces = [
            self.values[c][self.offsets[c][i] : self.offsets[c][i + 1]]
            for c, i in zip(chunk.tolist(), local.tolist(), strict=True)
        ]
        return np.concatenate(pieces), np.array([len(p) for p in pieces], dtype=np.int32)


ROWS_PER_BATCH = 1024


def _write_rows(
    examples: Dataset, path: Path, data: DataConfig, levels: tuple[np.ndarray, np.ndarray | None] | None = None
) -> Dataset:
    """Rows of packed (or single) examples. `levels`: (level, difficulty rank) of each example for
    data.curriculum: no row mixes levels, and rows are written easiest first, each with its level."""
    lengths = examples.data.column("length").to_numpy().tolist()  # the token lists stay on disk
    groups = _row_groups(lengths, data, levels)
    ids, labels = _ListColumn(examples, "input_ids"), _ListColumn(examples, "labels")
    features = ROW_FEATURES if levels is None else Features({**ROW_FEATURES, "level": Value("int32")})
    with ArrowWriter(features=features, path=str(path)) as writer:
        for first in range(0, len(groups), ROWS_PER_BATCH):
            batch = groups[first : first + ROWS_PER_BATCH]
            members = [i for group in batch for i in group]
            row_ids, id_lengths = ids.take(members)
            row_labels, label_lengths = labels.take(members)
            sizes = np.array([len(group) for group in batch])
            starts = np.r_[0, np.cumsum(sizes)[:-1]]
            # tokens the model reads: for seq2seq the decoder reads the (shifted) target too
            read = id_lengths + (label_lengths if data.format == "seq2seq" else 0)
            columns = {
                "input_ids": _list_array(row_ids, np.add.reduceat(id_lengths, starts)),
                "labels": _list_array(row_labels, np.add.reduceat(label_lengths, starts)),
                "lengths": _list_array(id_lengths, sizes),
                "num_tokens": pa.array(np.add.reduceat(read, starts), type=pa.int32()),
            }
            if levels is not None:  # a row's examples share one level
                columns["level"] = pa.array(levels[0][[group[0] for group in batch]], type=pa.int32())
            writer.write_batch(columns)
        writer.finalize()
    return Dataset.from_file(str(path))


def _row_groups(
    lengths: list[int], data: DataConfig, levels: tuple[np.ndarray, np.ndarray | None] | None
) -> list[list[int]]:
    """The examples of each row, in row order."""
    if levels is None:
        return best_fit_decreasing(lengths, data.max_length) if data.packs else [[i] for i in range(len(lengths))]
    level, rank = levels
    if data.packs:
        return pack_within_levels(lengths, level.tolist(), data.max_length, None if rank is None else rank.tolist())
    easiest_first = np.lexsort((np.arange(len(lengths)) if rank is None else rank, level))
    return [[int(i)] for i in easiest_first]


def _split_report(counts: Counts, rows: Dataset, max_length: int) -> dict[str, Any]:
    lengths = np.asarray(counts.lengths)
    edges = np.unique(np.linspace(0, max_length, 9).astype(int))
    histogram, _ = np.histogram(lengths, bins=edges)
    return {
        "records": counts.records,
        "examples": counts.examples,
        "dropped": dict(sorted(counts.dropped.items())),
        "truncated": counts.truncated,
        "split_into_pieces": counts.split_into_pieces,
        "tokens": counts.tokens,
        "trained_tokens": counts.trained_tokens,
        "rows": len(rows),
        "packing_efficiency": counts.tokens / (len(rows) * max_length),
        "example_tokens": {"min": int(lengths.min()), "median": int(np.median(lengths)), "max": int(lengths.max())},
        "length_histogram": {f"{lo}-{hi}": int(n) for lo, hi, n in zip(edges[:-1], edges[1:], histogram, strict=True)},
        **({"labels": dict(sorted(counts.labels.items()))} if counts.labels else {}),
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]
