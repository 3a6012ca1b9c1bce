"""From config to tokenized, packed, cached splits.

The cache is keyed by fingerprints, so a second run with the same inputs reads Arrow files
(memory-mapped) instead of tokenizing again:

    <cache>/tokenizers/<fp>/   a tokenizer trained on the training split
    <cache>/data/<fp>/         train/ validation/ test/ (datasets), report.json, samples.json

Each entry is written to a temporary directory and renamed into place, with report.json written
last: an entry without it is incomplete and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, load_from_disk
from transformers import PreTrainedTokenizerBase

from lmforge.atomic import atomic_dir
from lmforge.config import Config, DataConfig
from lmforge.data.packing import pack_documents
from lmforge.data.sources import Document, file_digest, read_documents, resolve_paths
from lmforge.errors import DataError
from lmforge.models.tokenizer import load_tokenizer, tokenizer_digest, train_bpe_tokenizer

DATA_VERSION = 1  # bump when the meaning of cached data changes
SPLITS = ("train", "validation", "test")
MAX_SAMPLES = 32  # held-out documents kept for generation prompts


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, Dataset]
    """Packed blocks per split, column input_ids; test may be absent."""
    report: dict[str, Any]
    """Documents, tokens and blocks per split."""
    samples: list[str] = field(default_factory=list)
    """Held-out documents to take generation prompts and references from."""
    cache_hit: bool = False


def cache_root(config: Config) -> Path:
    root = config.data.cache_dir or os.path.join("~", ".cache", "lmforge")
    return Path(root).expanduser()


def prepare_data(config: Config, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenizer and packed splits for a config, from the cache when the inputs are unchanged."""
    data = config.data
    files = {
        "train": resolve_paths(data.train, "data.train"),
        "validation": resolve_paths(data.validation, "data.validation") if data.validation else [],
        "test": resolve_paths(data.test, "data.test") if data.test else [],
    }
    source_fp = _digest(
        {
            "version": DATA_VERSION,
            "format": data.format,
            "text_field": data.text_field,
            "txt_documents": data.txt_documents,
            "validation_fraction": data.validation_fraction if not data.validation else None,
            "test_fraction": data.test_fraction if not data.test else None,
            "files": {split: [file_digest(p) for p in paths] for split, paths in files.items()},
        }
    )
    documents: dict[str, list[Document]] | None = None

    def get_documents() -> dict[str, list[Document]]:
        nonlocal documents
        if documents is None:
            documents = _read_splits(files, data)
        return documents

    tokenizer = _get_tokenizer(config, source_fp, get_documents, log)
    packed_dir = cache_root(config) / "data" / _digest([source_fp, tokenizer_digest(tokenizer), data.max_length])
    if not (packed_dir / "report.json").is_file():
        log("tokenizing and packing the corpus")
        _build_packed(packed_dir, get_documents(), tokenizer, data.max_length)
        hit = False
    else:
        hit = True
    report = json.loads((packed_dir / "report.json").read_text())
    splits = {s: load_from_disk(str(packed_dir / s)) for s in SPLITS if (packed_dir / s).is_dir()}
    samples = json.loads((packed_dir / "samples.json").read_text())
    return PreparedData(tokenizer, splits, report, samples, cache_hit=hit)


def tokenize_files(paths: list[Path], data: DataConfig, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Tokenize and pack whole files (no splitting, no cache): for `lmforge eval --data`."""
    docs = [d for p in paths for d in read_documents(p, data.text_field, data.txt_documents)]
    if not docs:
        raise DataError(f"{', '.join(map(str, paths))}: no text to evaluate on")
    blocks, _ = pack_documents(_encode(tokenizer, [d.text for d in docs]), tokenizer.eos_token_id, max_length)
    return Dataset.from_dict({"input_ids": [b.tolist() for b in blocks]})


# --------------------------------------------------------------------------- steps


def _read_splits(files: dict[str, list[Path]], data: DataConfig) -> dict[str, list[Document]]:
    """Read every file; hold out validation/test documents by hash where no file is given."""
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for split, paths in files.items():
        for path in paths:
            out[split].extend(read_documents(path, data.text_field, data.txt_documents))
    if not out["train"]:
        names = ", ".join(str(p) for p in files["train"])
        raise DataError(f"data.train: the corpus is empty: no text in {names}")
    held_out = {
        "test": data.test_fraction if not files["test"] else 0.0,
        "validation": data.validation_fraction if not files["validation"] else 0.0,
    }
    total = len(out["train"])
    if any(held_out.values()):
        kept = []
        for doc in out["train"]:
            split = _hash_split(doc.text, held_out["test"], held_out["validation"])
            (kept if split == "train" else out[split]).append(doc)
        out["train"] = kept
    for split, fraction in held_out.items():
        if fraction and not out[split]:
            raise DataError(
                f"data: the {split} split is empty: none of the {total} training documents "
                f"fell in the {fraction:.0%} held out by hash; give data.{split} a file or raise "
                f"data.{split}_fraction"
            )
    if not out["train"]:
        raise DataError("data: no training documents remain after holding out validation/test")
    return out


def _hash_split(text: str, test_fraction: float, validation_fraction: float) -> str:
    # A document's split depends only on its text: stable across runs, file order and machines,
    # and duplicates always land together, so they cannot leak across splits.
    u = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _get_tokenizer(
    config: Config,
    source_fp: str,
    get_documents: Callable[[], dict[str, list[Document]]],
    log: Callable[[str], None],
) -> PreTrainedTokenizerBase:
    if config.model.name_or_path:
        return load_tokenizer(config.model.name_or_path, config.model.trust_remote_code)
    if config.tokenizer.path:
        return load_tokenizer(config.tokenizer.path)
    tok = config.tokenizer
    directory = cache_root(config) / "tokenizers" / _digest([source_fp, tok.vocab_size, tok.min_frequency])
    if not (directory / "tokenizer.json").is_file():
        log(f"training a byte-level BPE tokenizer (vocab {tok.vocab_size}) on the training split")
        texts = (d.text for d in get_documents()["train"])
        tokenizer = train_bpe_tokenizer(texts, tok.vocab_size, tok.min_frequency)
        with atomic_dir(directory) as tmp:
            tokenizer.save_pretrained(str(tmp))
    return load_tokenizer(directory)


def _build_packed(
    directory: Path, documents: dict[str, list[Document]], tokenizer: PreTrainedTokenizerBase, block: int
) -> None:
    report: dict[str, Any] = {"max_length": block, "vocab_size": len(tokenizer), "splits": {}}
    with atomic_dir(directory) as tmp:
        for split in SPLITS:
            docs = documents[split]
            if not docs:
                continue
            token_lists = _encode(tokenizer, [d.text for d in docs])
            blocks, dropped = pack_documents(token_lists, tokenizer.eos_token_id, block)
            Dataset.from_dict({"input_ids": [b.tolist() for b in blocks]}).save_to_disk(str(tmp / split))
            lengths = np.array([len(t) for t in token_lists])
            report["splits"][split] = {
                "documents": len(docs),
                "tokens": int(lengths.sum()) + len(docs),  # + one EOS per document
                "blocks": len(blocks),
                "tokens_dropped": dropped,
                "document_tokens": {
                    "min": int(lengths.min()),
                    "median": int(np.median(lengths)),
                    "max": int(lengths.max()),
                },
            }
        held_out = documents["validation"] or documents["test"]
        samples = [d.text[:4000] for d in held_out[:MAX_SAMPLES]]
        (tmp / "samples.json").write_text(json.dumps(samples))
        (tmp / "report.json").write_text(json.dumps(report, indent=2))


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], batch: int = 1000) -> list[list[int]]:
    ids: list[list[int]] = []
    for i in range(0, len(texts), batch):
        ids.extend(tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"])
    return ids


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:20]
