"""Finding corpus files and reading them as documents, with errors that name file and line."""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import DataError

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class Document:
    text: str
    where: str
    """file:line of the document's start."""


def resolve_paths(spec: str | list[str], field: str, base_dir: Path | None = None) -> list[Path]:
    """Expand a file, glob, directory or list of these into a sorted, de-duplicated file list.

    Args:
        spec: what the config gave.
        field: the config field, for error messages (e.g. "data.train").
        base_dir: relative paths are taken from here (default: the working directory).
    """
    entries = [spec] if isinstance(spec, str) else list(spec)
    files: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{field}: the pattern {entry!r} matches no files")
            files.extend(matches)
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUPPORTED_SUFFIXES)
            if not matches:
                raise DataError(f"{field}: the directory {entry!r} holds no {', '.join(SUPPORTED_SUFFIXES)} files")
            files.extend(matches)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{field}: no such file or directory: {entry!r}")
    for path in files:
        if path.suffix not in SUPPORTED_SUFFIXES:
            raise DataError(
                f"{path}: unsupported file type {path.suffix!r} for {field}; use one of {', '.join(SUPPORTED_SUFFIXES)}"
            )
    return list(dict.fromkeys(files))


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_documents(path: Path, text_field: str, txt_documents: str) -> Iterator[Document]:
    """Yield the non-empty documents of one file.

    Raises:
        DataError: for bytes that are not UTF-8, malformed JSON, or a record without a text field.
    """
    text = _decode(path)
    if path.suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(path, text, text_field)
    else:
        yield from _text_documents(path, text, txt_documents)


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
            "re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _text_documents(path: Path, text: str, unit: str) -> Iterator[Document]:
    text = text.replace("\r\n", "\n")
    if unit == "file":
        if text.strip():
            yield Document(text.strip(), f"{path}:1")
        return
    pattern = _PARAGRAPH_BREAK if unit == "paragraph" else re.compile(r"\n")
    start = 0
    line = 1
    for match in [*pattern.finditer(text), None]:
        end = match.start() if match else len(text)
        chunk = text[start:end]
        if chunk.strip():
            leading = len(chunk) - len(chunk.lstrip("\n \t"))
            yield Document(chunk.strip(), f"{path}:{line + chunk.count(chr(10), 0, leading)}")
        if match is None:
            break
        line += text.count("\n", start, match.end())
        start = match.end()


def _jsonl_documents(path: Path, text: str, text_field: str) -> Iterator[Document]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: malformed JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        if text_field not in record:
            fields = ", ".join(record) or "none"
            raise DataError(
                f"{path}:{number}: no field {text_field!r} (fields: {fields}); "
                "set data.text_field to the field that holds the text"
            )
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: field {text_field!r} must be a string, got {type(value).__name__}")
        if value.strip():
            yield Document(value, f"{path}:{number}")
