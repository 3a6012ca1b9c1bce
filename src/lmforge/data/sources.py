"""Finding data files and reading them as records, with errors that name file and line.

Every reader yields `Record`s: a dict of fields plus where it came from ("file:line", or
"file row N" for formats without lines). A record that cannot be read at all (malformed JSON, not
an object) is yielded as a `Record` with `problem` set, so the caller decides, per
`data.on_invalid`, whether that is an error or a counted drop.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from lmforge.data.qdrant import QdrantSource, is_qdrant
from lmforge.errors import DataError

HUB_PREFIX = "hub:"  # hub:org/name or hub:org/name:split, read with datasets.load_dataset (needs network)
TEXT_SUFFIXES = (".txt", ".text")
SUPPORTED_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Record:
    fields: dict[str, Any]
    where: str
    """file:line (or file row N) of the record."""
    problem: str | None = None
    """Why the record could not be read; fields is empty then."""
    reason: str = field(default="", compare=False)
    """Short drop reason for the report, e.g. malformed_json."""


@dataclass(frozen=True)
class Source:
    path: Path | QdrantSource
    """A file or directory, a hub: name, or a Qdrant collection (data.qdrant)."""
    weight: float = 1.0
    """Sampling weight: 2 repeats every record twice, 0.5 keeps half of them (chosen by hash)."""


def resolve_sources(spec: Any, field_name: str) -> list[Source]:
    """Expand the config's data.train/validation/test into files with weights.

    Accepts a path, glob or directory; a list of these; or a list of {path, weight} mappings.
    A directory saved by `datasets.Dataset.save_to_disk` is one source.
    """
    entries = spec if isinstance(spec, list) else [spec]
    sources: list[Source] = []
    for entry in entries:
        weight = 1.0
        if isinstance(entry, dict):
            entry, weight = entry["path"], float(entry.get("weight", 1.0))
        elif hasattr(entry, "path"):  # a SourceSpec from the config
            entry, weight = entry.path, entry.weight
        if str(entry).startswith(HUB_PREFIX):
            sources.append(Source(Path(entry), weight))
            continue
        if is_qdrant(entry):
            from lmforge.data import qdrant

            sources.append(Source(qdrant.parse(entry, field_name), weight))
            continue
        sources.extend(Source(p, weight) for p in resolve_paths(entry, field_name))
    return list(dict.fromkeys(sources))


def resolve_paths(spec: str | list[str], field: str, base_dir: Path | None = None) -> list[Path]:
    """Expand a file, glob, directory or list of these into a sorted, de-duplicated file list."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for entry in entries:
        if not str(entry).strip():
            raise DataError(f"{field} is empty: give a file, a glob or a directory")
        path = Path(entry).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{field}: the pattern {entry!r} matches no files (looked in {Path.cwd()})")
            files.extend(matches)
        elif is_saved_dataset(path):
            files.append(path)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
            if not matches:
                raise DataError(f"{field}: the directory {entry!r} holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{field}: no such file or directory: {entry!r} (looked for {path.resolve()})")
    for path in files:
        if not is_saved_dataset(path) and path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} for {field}; use one of "
                f"{', '.join(SUPPORTED_SUFFIXES)} or a directory saved with datasets' save_to_disk"
            )
    return list(dict.fromkeys(files))


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_info.json").is_file() and (path / "state.json").is_file()


def hub_name(path: Path) -> tuple[str, str] | None:
    """(dataset name, split) of a hub source, or None for files."""
    text = str(path)
    if not text.startswith(HUB_PREFIX):
        return None
    name, _, split = text[len(HUB_PREFIX) :].partition(":")
    return name, split or "train"


def source_digest(path: Path | QdrantSource) -> str:
    """sha256 of a file's bytes, of every file of a saved dataset directory, of a hub dataset's
    own fingerprint (which changes when the dataset does), or of a Qdrant collection's point ids
    and payloads."""
    if isinstance(path, QdrantSource):
        from lmforge.data import qdrant

        return qdrant.digest(path)
    digest = hashlib.sha256()
    if hub := hub_name(path):
        digest.update(_load_hub(*hub)._fingerprint.encode())
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def read_records(path: Path | QdrantSource, txt_documents: str = "paragraph") -> Iterator[Record]:
    """Yield every record of one source. Text files give {"text": document} records; a Qdrant
    collection's points give their payloads."""
    if isinstance(path, QdrantSource):
        from lmforge.data import qdrant

        for fields, where in qdrant.records(path):
            yield Record(fields, where)
    elif hub := hub_name(path):
        for number, row in enumerate(_load_hub(*hub)):
            yield Record(row, f"{hub[0]}[{hub[1]}] row {number}")
    elif is_saved_dataset(path):
        yield from _saved_dataset_records(path)
    elif path.suffix == ".parquet":
        yield from _parquet_records(path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_records(path, _lines(path))
    elif path.suffix in TEXT_SUFFIXES and txt_documents != "file":
        yield from _text_records(path, _lines(path), txt_documents)
    else:  # whole-document formats
        text = read_text(path)
        if path.suffix == ".json":
            yield from _json_records(path, text)
        elif path.suffix in (".csv", ".tsv"):
            yield from _csv_records(path, text)
        else:
            yield from _text_records(path, iter(text.splitlines(keepends=True)), "file")


def _lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 file, read one at a time (files larger than memory work), without the
    byte-order mark that Excel and Notepad write in front of "UTF-8" files. A file with a UTF-16
    byte-order mark (Excel's "Unicode text") is decoded whole.

    Raises:
        DataError: at the first byte that is not UTF-8, naming file, line, column and byte offset.
    """
    if _wide(path):
        yield from read_text(path).splitlines(keepends=True)
        return
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                _not_utf8(path, raw, exc.start, number, exc.start + 1, offset + exc.start)
            if "\x00" in line:
                _nul(path, number, offset + raw.index(b"\x00"))
            yield line.removeprefix(BOM) if number == 1 else line
            offset += len(raw)


WIDE_BOMS = {b"\xff\xfe\x00\x00": "utf-32", b"\x00\x00\xfe\xff": "utf-32", b"\xff\xfe": "utf-16", b"\xfe\xff": "utf-16"}
"""Byte-order marks of UTF-32 and UTF-16 (Excel's "Unicode text"), longest first."""


def read_text(path: Path) -> str:
    """A whole UTF-8 file as text, without a leading byte-order mark (UTF-16 and UTF-32 files with
    theirs are decoded too).

    Raises:
        DataError: at the first byte that is not UTF-8 (or a NUL byte: UTF-16 without its mark),
            naming file, line, column and byte offset.
    """
    raw = path.read_bytes()
    for mark, encoding in WIDE_BOMS.items():
        if raw.startswith(mark):
            try:
                return raw.decode(encoding)
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}: starts as {encoding.upper()} but byte offset {exc.start} is not; save it as UTF-8"
                ) from None
    try:
        text = raw.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        _not_utf8(path, raw, exc.start, line, column, exc.start)
    if "\x00" in text:
        at = raw.index(b"\x00")
        _nul(path, raw.count(b"\n", 0, at) + 1, at)
    return text


BOM = "\ufeff"


def _wide(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4).startswith(tuple(WIDE_BOMS))


def _nul(path: Path, line: int, offset: int) -> NoReturn:
    raise DataError(
        f"{path}:{line}: a NUL byte at byte offset {offset}: text files hold none; is it UTF-16 or UTF-32 without a "
        "byte-order mark? Save it as UTF-8, e.g. iconv -f utf-16le -t utf-8"
    )


def _not_utf8(path: Path, raw: bytes, index: int, line: int, column: int, offset: int) -> NoReturn:
    raise DataError(
        f"{path}:{line}: not valid UTF-8: byte 0x{raw[index]:02x} at column {column} (byte offset {offset} of the "
        "file); re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
    )


def _text_records(path: Path, lines: Iterator[str], unit: str) -> Iterator[Record]:
    """Documents of a text file: paragraphs (blank-line separated), lines, or the whole file."""
    buffer: list[str] = []
    start = 0
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if unit == "file":
            buffer.append(line)
            continue
        if unit == "line":
            if line.strip():
                yield Record({"text": line.strip()}, f"{path}:{number}")
            continue
        if line.strip():
            start = start or number
            buffer.append(line)
        elif buffer:
            yield Record({"text": "\n".join(buffer).strip()}, f"{path}:{start}")
            buffer, start = [], 0
    if buffer and "\n".join(buffer).strip():
        yield Record({"text": "\n".join(buffer).strip()}, f"{path}:{start or 1}")


def _jsonl_records(path: Path, lines: Iterator[str]) -> Iterator[Record]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record({}, where, f"malformed JSON: {exc.msg} (column {exc.colno})", "malformed_json")
            continue
        if not isinstance(record, dict):
            yield Record({}, where, f"expected a JSON object, got {type(record).__name__}", "not_an_object")
            continue
        yield Record(record, where)


def _json_records(path: Path, text: str) -> Iterator[Record]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: expected a JSON array of records (or {{"data": [...]}})')
    for number, record in enumerate(data):
        where = f"{path} record {number}"
        if isinstance(record, dict):
            yield Record(record, where)
        else:
            yield Record({}, where, f"expected a JSON object, got {type(record).__name__}", "not_an_object")


CSV_DELIMITERS = ",;\t|"
"""What a .csv's header may be separated by: Excel writes ';' where the decimal mark is a comma."""


def _csv_records(path: Path, text: str) -> Iterator[Record]:
    """Rows of a .csv (or .tsv: tabs), its delimiter read off the header line."""
    header_line = text.split("\n", 1)[0]
    if path.suffix == ".tsv":
        delimiter = "\t"
    else:  # the candidate the header holds most of; a one-column file has none
        delimiter = max(CSV_DELIMITERS, key=header_line.count) if any(c in header_line for c in CSV_DELIMITERS) else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = reader.fieldnames or []
    last_line = reader.line_num  # rows may span lines (quoted newlines): a row starts after the last
    for row in reader:
        where, last_line = f"{path}:{last_line + 1}", reader.line_num
        if None in row:  # more cells than header columns
            yield Record({}, where, f"{len(header) + len(row[None])} cells, the header has {len(header)}", "bad_row")
            continue
        yield Record(dict(row), where)


def _parquet_records(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield Record(row, f"{path} row {number}")
            number += 1


def _saved_dataset_records(path: Path) -> Iterator[Record]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: take its train split
        if "train" not in dataset:
            raise DataError(f"{path}: a DatasetDict without a 'train' split; point to one split's directory")
        dataset = dataset["train"]
    for number, row in enumerate(dataset):
        yield Record(row, f"{path} row {number}")


def _load_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown name: all the user's to fix
        raise DataError(f"{HUB_PREFIX}{name}:{split}: cannot load it from the Hugging Face Hub ({exc})") from None
