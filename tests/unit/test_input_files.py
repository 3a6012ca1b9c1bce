"""Input files as people save them: byte-order marks, bytes that are not UTF-8, numeric labels."""

import json

import pytest

from lmforge.data.formats import class_names
from lmforge.data.sources import read_records
from lmforge.errors import DataError

ROWS = [{"prompt": "one?", "completion": "1"}, {"prompt": "two?", "completion": "2"}]
BOM = b"\xef\xbb\xbf"


def _files(tmp_path) -> dict[str, bytes]:
    return {
        "d.csv": b"prompt,completion\r\none?,1\r\ntwo?,2\r\n",
        "d.jsonl": b"".join(json.dumps(r).encode() + b"\n" for r in ROWS),
        "d.json": json.dumps(ROWS).encode(),
    }


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json"])
def test_a_utf8_byte_order_mark_is_read_as_utf8(tmp_path, name):
    """Excel's and Notepad's "UTF-8" puts EF BB BF in front: the first field must not carry it."""
    path = tmp_path / name
    path.write_bytes(BOM + _files(tmp_path)[name])
    assert [r.fields for r in read_records(path)] == ROWS


def test_a_text_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(BOM + b"first\n\nsecond\n")
    assert [r.fields["text"] for r in read_records(path, "paragraph")] == ["first", "second"]
    assert [r.fields["text"] for r in read_records(path, "file")] == ["first\n\nsecond"]


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json"])
def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path, name):
    raw = _files(tmp_path)[name]
    at = raw.index(b"two")  # second record: line 3 of the CSV, 2 of the JSONL, 1 of the JSON
    path = tmp_path / name
    path.write_bytes(raw[:at] + b"\xe9" + raw[at + 1 :])  # latin-1 e-acute
    line = raw.count(b"\n", 0, at) + 1
    column = at - (raw.rfind(b"\n", 0, at) + 1) + 1
    with pytest.raises(DataError) as info:
        list(read_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: not valid UTF-8: byte 0xe9 at column {column} (byte offset {at} ")


def test_integer_labels_keep_numeric_order():
    assert class_names({str(i) for i in range(12)}) == [str(i) for i in range(12)]
    assert class_names({"-1", "1", "0"}) == ["-1", "0", "1"]
    assert class_names({"10", "2", "b"}) == ["10", "2", "b"]  # not all integers: string order
    assert class_names({"neg", "pos"}) == ["neg", "pos"]


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl", "d.json"])
def test_a_utf16_file_with_its_byte_order_mark_is_read(tmp_path, name):
    """Excel's "Unicode text" and Windows' Notepad "Unicode" save UTF-16 with a byte-order mark."""
    path = tmp_path / name
    path.write_bytes(_files(tmp_path)[name].decode().encode("utf-16"))
    assert [r.fields for r in read_records(path)] == ROWS


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("semicolons.csv", "prompt;completion\none?;1\ntwo?;2\n"),  # Excel where the decimal mark is a comma
        ("tabs.tsv", "prompt\tcompletion\none?\t1\ntwo?\t2\n"),
        ("quoted.csv", 'prompt,completion\n"one?",1\n"two?",2\n'),
    ],
)
def test_csv_delimiters_as_spreadsheets_write_them(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert [r.fields for r in read_records(path)] == ROWS


def test_utf32_with_its_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(_files(tmp_path)["d.csv"].decode().encode("utf-32"))
    assert [r.fields for r in read_records(path)] == ROWS


@pytest.mark.parametrize("name", ["d.csv", "d.jsonl"])
def test_utf16_without_its_mark_is_an_encoding_error_not_garbled_fields(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(_files(tmp_path)[name].decode().encode("utf-16-le"))
    with pytest.raises(
        DataError, match=r":1: a NUL byte at byte offset 1: .*UTF-16 or UTF-32 without a byte-order mark"
    ):
        list(read_records(path))
