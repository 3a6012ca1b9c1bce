"""lmforge.results.runs: what --filter, --sort and --columns keep, and the words of their errors."""

import fcntl
import math

import pandas as pd
import pytest

from lmforge.errors import UserError
from lmforge.results.runs import (
    differing_settings,
    filter_runs,
    lock_held,
    metric_columns,
    output_format,
    pick_columns,
    sort_runs,
)

NAN = math.nan


@pytest.fixture
def table() -> pd.DataFrame:
    """Four runs as load_runs types them; d's config could not be read."""
    return pd.DataFrame(
        {
            "run": ["runs/a", "runs/b", "runs/c", "runs/d"],
            "name": ["spelling-lora", "spelling-full", "quickstart", "broken"],
            "started": pd.to_datetime(["2026-11-01 10:00", "2026-11-02 10:00", "2026-11-03 10:00", None]),
            "state": ["finished", "paused", "finished", "unreadable"],
            "step": [50.0, 20.0, 400.0, NAN],
            "test/accuracy": [0.7, NAN, 0.9, NAN],
            "test/tokens": [100.0, NAN, 100.0, NAN],
            "intervals/test/loss/low": [1.0, NAN, 2.0, NAN],
            "seed": [1.0, 1.0, 1.0, NAN],
            "lora.r": [8.0, 16.0, NAN, NAN],
            "lora.use_dora": pd.array([True, False, None, None], dtype="boolean"),
            "train.lr": [3e-3, 1e-3, 3e-3, NAN],
        }
    )


def kept(table: pd.DataFrame, *filters: str) -> list[str]:
    return [run.removeprefix("runs/") for run in filter_runs(table, filters)["run"]]


def test_numbers_compare_as_numbers_and_a_missing_value_matches_only_not_equal(table):
    assert kept(table, "lora.r>=8") == ["a", "b"]
    assert kept(table, "lora.r > 8") == ["b"]
    assert kept(table, "lora.r<1e1") == ["a"]
    assert kept(table, "lora.r==16") == kept(table, "lora.r=16") == ["b"]
    assert kept(table, "lora.r!=8") == ["b", "c", "d"]
    assert kept(table, "train.lr<=0.001") == ["b"]


def test_text_matches_by_equality_or_regular_expression(table):
    assert kept(table, "name~spelling") == ["a", "b"]
    assert kept(table, "name~^spell.*lora$") == ["a"]
    assert kept(table, "state = finished") == ["a", "c"]
    assert kept(table, "state!=finished") == ["b", "d"]
    assert kept(table, "run~runs/[bc]") == ["b", "c"]


def test_yes_no_settings_and_times(table):
    assert kept(table, "lora.use_dora=true") == kept(table, "lora.use_dora=Yes") == ["a"]
    assert kept(table, "lora.use_dora!=true") == ["b", "c", "d"]
    assert kept(table, "started>=2026-11-02") == ["b", "c"]
    assert kept(table, "started<2026-11-01T12:00") == ["a"]


def test_every_filter_must_hold(table):
    assert kept(table, "name~spelling", "lora.r>=8", "state=finished") == ["a"]
    assert kept(table) == ["a", "b", "c", "d"]
    assert kept(table, "name~spelling", "state=unreadable") == []


@pytest.mark.parametrize("text", ["lora.r", "lora.r>=", ">=8", "", "lora.r 8"])
def test_a_malformed_filter_names_the_form_expected(table, text):
    with pytest.raises(UserError, match=r"expected KEY OP VALUE with OP one of >= <= != == = > < ~"):
        filter_runs(table, [text])


def test_an_unknown_key_names_the_nearest_columns(table):
    with pytest.raises(UserError, match=r"--filter lora\.rr: no such column; did you mean lora\.r"):
        filter_runs(table, ["lora.rr>=8"])
    with pytest.raises(UserError, match=r"--filter zzz: no such column; columns include run, name"):
        filter_runs(table, ["zzz=1"])


def test_a_value_that_does_not_fit_its_column_is_named(table):
    with pytest.raises(UserError, match=r"lora\.r holds numbers, and 'big' is not a number"):
        filter_runs(table, ["lora.r>=big"])
    with pytest.raises(UserError, match=r"lora\.use_dora holds yes/no values, and 'maybe' is not true or false"):
        filter_runs(table, ["lora.use_dora=maybe"])
    with pytest.raises(UserError, match=r"started holds times, and 'soon' is not a time"):
        filter_runs(table, ["started>soon"])
    with pytest.raises(UserError, match=r"'\[' is not a regular expression"):
        filter_runs(table, ["name~["])


def test_sort_descending_puts_missing_values_last(table):
    order = sort_runs(table, ["-test/accuracy"])["run"].tolist()
    assert order == ["runs/c", "runs/a", "runs/b", "runs/d"]
    order = sort_runs(table, ["train.lr", "-step"])["run"].tolist()
    assert order == ["runs/b", "runs/c", "runs/a", "runs/d"]
    with pytest.raises(UserError, match=r"--sort test/acuracy: no such column; did you mean test/accuracy"):
        sort_runs(table, ["-test/acuracy"])


def test_columns_are_picked_in_the_order_given(table):
    assert list(pick_columns(table, "state, lora.r,run").columns) == ["state", "lora.r", "run"]
    assert pick_columns(table, None) is table
    with pytest.raises(UserError, match=r"--columns lora\.alpha: no such column"):
        pick_columns(table, "run,lora.alpha")
    with pytest.raises(UserError, match=r"expected column names separated by commas"):
        pick_columns(table, " , ")


def test_the_table_shows_settings_that_differ_and_measured_metrics(table):
    assert differing_settings(table) == ["lora.r", "lora.use_dora", "train.lr"]  # seed: 1 wherever it was read
    # a and c: train.lr the same; d, whose config could not be read, makes nothing differ
    assert differing_settings(table[table["run"] != "runs/b"]) == ["lora.r", "lora.use_dora"]
    assert differing_settings(table[table["run"].isin(["runs/c", "runs/d"])]) == []
    assert metric_columns(table) == ["test/accuracy"]  # not counts, not intervals


@pytest.mark.parametrize(
    ("fmt", "out", "expected"),
    [(None, None, "table"), ("csv", None, "csv"), (None, "runs.parquet", "parquet"), (None, "r.JSON", "json")],
)
def test_the_format_comes_from_format_or_the_out_suffix(fmt, out, expected, tmp_path):
    assert output_format(fmt, tmp_path / out if out else None) == expected


@pytest.mark.parametrize(
    ("fmt", "out", "message"),
    [
        ("xml", None, r"--format xml: expected one of table, csv, json, parquet"),
        ("parquet", None, r"--format parquet writes a binary file: name it with --out FILE\.parquet"),
        ("table", "t.csv", r"--out writes csv, json or parquet; the table is printed"),
        (None, "t.txt", r"say which format to write with --format csv, json or parquet"),
    ],
)
def test_a_format_that_cannot_be_written_is_named(fmt, out, message, tmp_path):
    with pytest.raises(UserError, match=message):
        output_format(fmt, tmp_path / out if out else None)


def test_a_held_run_lock_is_seen_without_taking_it(tmp_path):
    lock = tmp_path / ".lock"
    assert not lock_held(lock)  # no such file
    with lock.open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert lock_held(lock)
        fcntl.flock(held, fcntl.LOCK_UN)
        assert not lock_held(lock)
