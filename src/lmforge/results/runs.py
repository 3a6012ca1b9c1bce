"""Runs as tables: every run under a directory as one row (`load_runs`, `lmforge runs`), a run's
logged metrics (`load_metrics`) and its per-example predictions (`load_predictions`).

A run's row holds what its files say, and only that:

  run, name, started, state, step, stop_reason, duration_s       every row
  sweep, trial, reason                                            sweep trials (runs/sweeps/<sweep>/trial-NNNN/)
  problem                                                         runs whose files cannot be read
  restored_best_step and other eval.json values                   finished runs
  validation/loss, test/accuracy, generation/bleu, ...            eval.json's final metrics
  train.lr, lora.r, model.name_or_path, ...                       the whole config, dotted (lists as JSON text)

States, from the files a run leaves (src/lmforge/run.py writes them):

  finished    final/ and eval.json
  pruned      eval.json with stop_reason pruned (a sweep's loser)
  paused      tracking.json status KILLED (a signal or max_time; resume from its checkpoints)
  crashed     tracking.json status FAILED (an error ended it)
  failed      a sweep trial the sweep gave up on (its outcome.json or trials.csv says why: `reason`)
  running     none of these: still training, or killed outright (SIGKILL, power loss), which leaves
              the same files
  unreadable  a file the row needs is not valid JSON/YAML (`problem` says which and why)
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import json
import math
import operator
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lmforge.errors import UserError
from lmforge.results.predictions import read_jsonl

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "tracking.json", "trial.yaml")
"""Files of which one makes a directory a run (a sweep trial that failed early has trial.yaml alone).
Not eval.json alone: `lmforge eval` writes one beside its predictions (runs/evaluations/), no run."""
BASE_COLUMNS = ("run", "name", "started", "state", "step", "stop_reason", "duration_s")
"""Columns every table has, even an empty one."""
OPTIONAL_COLUMNS = ("sweep", "trial", "reason", "problem")
"""Columns a table has when a run has a value for them."""
EVAL_SCALARS = ("step", "stop_reason", "restored_best_step")
"""eval.json's top-level values kept under their own names (its sections become `section/metric`)."""
METRIC_SECTIONS = ("validation", "test", "generation")
"""The sections of eval.json whose values the console table shows (every section is in the DataFrame)."""
BOOKKEEPING = ("step", "tokens", "examples")
"""Metric names that count rather than measure; the console table leaves them out."""
FORMATS = ("table", "csv", "json", "parquet")
_STAMP = re.compile(r"-(\d{8}-\d{6})(?:-\d+)?$")
_TRIAL = re.compile(r"^trial-(\d+)(\.out-of-memory)?$")
_SWEEP_STATES = {"complete": "finished", "pruned": "pruned", "failed": "failed", "paused": "paused"}
"""The sweep's words for a trial's state (trials.csv, outcome.json), as this table says them."""


class Unreadable(Exception):
    """A run file that is not what lmforge writes; the message names the file and the problem."""


# ---------------------------------------------------------------------------------- runs


def load_runs(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Every run under `path` as one row (see the module docstring for the columns and states).

    Args:
        path: a runs directory, a sweep directory or one run directory; searched recursively.
            Symbolic links (runs/<name>-latest) are not followed, so no run is listed twice, and
            a run's own subdirectories (checkpoints/, final/) are not searched.

    Returns:
        One row per run, sorted by `started`, then `run` (the directory as found under `path`).
        Numbers are numeric columns (missing: NaN), `started` is a datetime column, a yes/no
        setting with missing values is a nullable boolean column, and a setting whose type differs
        between runs is text. A run whose files cannot be read has state `unreadable` and a
        `problem`; it never raises.

    Raises:
        UserError: `path` is not a directory.
    """
    root = Path(path)
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise UserError(
            f"{root}: {what} (looked for {root.resolve()}); give a runs directory, a sweep directory or a run directory"
        )
    sweeps: dict[Path, dict[int, dict[str, str]]] = {}
    rows = [read_run(run_dir, sweeps) for run_dir in find_run_dirs(root)]
    return _as_table(rows)


TRACKER_STORES = frozenset({"mlartifacts", "mlruns", "wandb", "comet", "tensorboard"})
"""Directories trackers keep under runs/: MLflow's copies of a run's files look like a run."""


def find_run_dirs(root: Path) -> list[Path]:
    """The run directories at or under `root`, in name order; symbolic links, hidden entries
    (names starting with a dot: atomic writes in progress) and trackers' stores (TRACKER_STORES:
    MLflow keeps copies of config.yaml and metrics.jsonl there) are skipped."""
    if is_run_dir(root):
        return [root]
    found: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or entry.is_symlink() or not entry.is_dir() or entry.name in TRACKER_STORES:
            continue
        with contextlib.suppress(PermissionError):  # a directory this user may not list holds no run of theirs
            found.extend(find_run_dirs(entry))
    return found


def is_run_dir(path: Path) -> bool:
    """A run directory holds one of RUN_MARKERS, or checkpoints/."""
    return any((path / name).is_file() for name in RUN_MARKERS) or (path / "checkpoints").is_dir()


def read_run(run_dir: Path, sweeps: dict[Path, dict[int, dict[str, str]]] | None = None) -> dict[str, Any]:
    """One run directory as a row: what each of its files says, its state, and every file that
    could not be read in `problem` (then state `unreadable`).

    Args:
        sweeps: the trials.csv rows of each sweep directory read so far, by trial number (a cache
            shared by the runs of one listing).
    """
    problems: list[str] = []

    def attempt(read: Callable[[], Any], default: Any) -> Any:
        try:
            return read()
        except (Unreadable, OSError) as exc:  # OSError: a file this user may not read
            problems.append(str(exc))
            return default

    config = attempt(lambda: _read_config(run_dir), {})
    results = attempt(lambda: _read_mapping(run_dir / "eval.json"), {})
    tracking = attempt(lambda: _read_mapping(run_dir / "tracking.json"), {})
    first, last = attempt(lambda: _metrics_ends(run_dir / "metrics.jsonl"), (None, None))
    state, told = _state(run_dir, results, tracking)
    row: dict[str, Any] = {
        "run": str(run_dir),
        "name": config.get("name") or _STAMP.sub("", run_dir.name),
        "started": _started(run_dir, first),
        "state": state,
        "step": results.get("step", _newest_step(run_dir, last)),
        "stop_reason": results.get("stop_reason"),
        "duration_s": round(last["time"] - first["time"], 3) if first and last else None,
    }
    trial = _TRIAL.match(run_dir.name)
    if trial and _in_sweep(run_dir):
        row.update(attempt(lambda: _trial_fields(run_dir, state, told, sweeps), {}))
    row.update({k: results[k] for k in EVAL_SCALARS if k in results and k not in row})
    row.update(_flat_metrics(results))
    row.update(_flat_config(config))
    if problems:
        row["state"], row["problem"] = "unreadable", "; ".join(problems)
    return row


def _newest_step(run_dir: Path, last: dict[str, Any] | None) -> int | None:
    """Where a run without eval.json stands: its newest checkpoint's step (a paused run resumes
    there) or its last logged point, whichever is later."""
    steps = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
    logged = [last["step"]] if last else []
    return max(steps + logged) if steps or logged else None


def _state(run_dir: Path, results: dict[str, Any], tracking: dict[str, Any]) -> tuple[str, bool]:
    """(state, whether the files said it): with no status, no results and no held lock the run
    is taken to be running, which a sweep's own record may correct."""
    if results.get("stop_reason") == "pruned":
        return "pruned", True
    if results and (run_dir / "final").is_dir():
        return "finished", True
    if lock_held(run_dir / ".lock"):  # a resumed run or a sweep trial training now (tracking.json still says KILLED)
        return "running", True
    said = {"FINISHED": "finished", "KILLED": "paused", "FAILED": "crashed"}.get(tracking.get("status"))
    return said or "running", said is not None  # RUNNING is no verdict: a process killed outright leaves it


def lock_held(path: Path) -> bool:
    """Whether a process holds the flock of `path` (lmforge.run.run_lock: a resumed run or a sweep
    trial while it trains), read from /proc/locks so that looking never takes the lock. False where
    that cannot be told (no such file, no /proc/locks, a lock held on another machine)."""
    try:
        info = path.stat()
        locks = Path("/proc/locks").read_text()
    except OSError:
        return False
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(line.split()[1:2] == ["FLOCK"] and device in line.split() for line in locks.splitlines())


def _started(run_dir: Path, first: dict[str, Any] | None) -> datetime | None:
    """When the run began: the time in its directory's name (local time, as lmforge names it),
    else its first logged point's, to the second."""
    stamp = _STAMP.search(run_dir.name)
    if stamp:
        with contextlib.suppress(ValueError):  # digits that are no time: a name like lmforge's, not its
            return datetime.strptime(stamp.group(1), "%Y%m%d-%H%M%S")
    return datetime.fromtimestamp(int(first["time"])) if first else None


def _in_sweep(run_dir: Path) -> bool:
    parent = run_dir.parent
    return (run_dir / "trial.yaml").is_file() or (parent / "trials.csv").is_file() or (parent / "sweep.yaml").is_file()


def _trial_fields(
    run_dir: Path, state: str, told: bool, sweeps: dict[Path, dict[int, dict[str, str]]] | None
) -> dict[str, Any]:
    """sweep, trial, reason, and the state where the sweep knows better than the run's files: a
    trial the sweep gave up on is `failed`, and one whose files tell nothing is what the sweep says
    (its outcome.json, else trials.csv). A first attempt that ran out of memory
    (trial-NNNN.out-of-memory/) failed; its trial ran again in trial-NNNN/.

    Args:
        told: whether the run's files said its state (`_state`).
    """
    number, retried = int(_TRIAL.match(run_dir.name).group(1)), run_dir.name.endswith(".out-of-memory")
    cache = sweeps if sweeps is not None else {}
    if run_dir.parent not in cache:
        cache[run_dir.parent] = _sweep_trials(run_dir.parent / "trials.csv")
    listed = {} if retried else cache[run_dir.parent].get(number, {})
    outcome = _read_mapping(run_dir / "outcome.json")
    said = "failed" if retried else listed.get("state") or outcome.get("state")
    reason = listed.get("reason") or outcome.get("reason") or ""
    if retried and not reason:
        reason = f"out of memory; the trial ran again in trial-{number:04d}/"
    fields: dict[str, Any] = {"sweep": run_dir.parent.name, "trial": number, "reason": reason or None}
    if (said == "failed" and state not in ("finished", "pruned")) or (not told and said in _SWEEP_STATES):
        fields["state"] = _SWEEP_STATES[said]
    return fields


def _sweep_trials(path: Path) -> dict[int, dict[str, str]]:
    """A sweep's trials.csv rows by trial number; none when the sweep has not written it yet."""
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as rows:
            return {int(row["number"]): row for row in csv.DictReader(rows)}
    except (ValueError, KeyError, csv.Error, UnicodeDecodeError) as exc:
        raise Unreadable(f"{path.name}: {exc}") from None


# ------------------------------------------------------------------------------ reading files


def _read_mapping(path: Path) -> dict[str, Any]:
    """A JSON object file; {} when there is none."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Unreadable(f"{path.name}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path.name}: expected a JSON object, found {type(value).__name__}")
    return value


def _read_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml (a trial that failed before its run began has only trial.yaml); {} when neither."""
    path = next((p for p in (run_dir / "config.yaml", run_dir / "trial.yaml") if p.is_file()), None)
    if path is None:
        return {}
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise Unreadable(f"{path.name}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(value, dict):
        raise Unreadable(f"{path.name}: expected a mapping of settings, found {type(value).__name__}")
    return value


def _metrics_ends(path: Path, tail: int = 1 << 16) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The first and last points of metrics.jsonl, reading only its ends. A last line cut off by a
    crash is passed over; any other line that is not a JSON point is a problem."""
    if not path.is_file():
        return None, None
    with path.open("rb") as file:
        head = file.readline()
        file.seek(max(0, file.seek(0, os.SEEK_END) - tail))
        lines = file.read().splitlines()
    if not head.strip():
        return None, None
    complete = lines if lines and lines[-1].endswith(b"}") else lines[:-1]
    return _point(head, path), _point(complete[-1], path) if complete else None


def _point(line: bytes, path: Path) -> dict[str, Any]:
    try:
        point = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Unreadable(f"{path.name}: a line is not valid JSON ({exc})") from None
    if not isinstance(point, dict) or not all(_kind(point.get(k)) == "number" for k in ("step", "time")):
        raise Unreadable(f"{path.name}: a line is not a point with a numeric step and time: {line[:80]!r}")
    return point


def _flat_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """eval.json's sections as `section/name` (validation/loss, test/accuracy, generation/bleu);
    lists (the confusion matrix) are left out."""
    flat: dict[str, Any] = {}
    for section, values in results.items():
        if isinstance(values, dict):
            for name, value in _flat_dict(values, f"{section}/").items():
                if not isinstance(value, list):
                    flat[name] = value
        elif section not in EVAL_SCALARS and not isinstance(values, list):
            flat[section] = values
    return flat


def _flat_dict(values: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat_dict(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as dotted keys (lmforge.config.flatten), lists as their JSON text."""
    from lmforge.config import flatten

    flat = flatten(config)
    return {k: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v for k, v in flat.items()}


# ------------------------------------------------------------------------------- typing columns


def _as_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with one type per column (see `load_runs`), sorted by start time."""
    import pandas as pd

    table = pd.DataFrame.from_records(rows, columns=_column_order(rows))
    for column in table.columns:
        table[column] = _typed(table[column])
    table["started"] = pd.to_datetime(table["started"])
    return table.sort_values(["started", "run"], na_position="last", kind="stable").reset_index(drop=True)


def _column_order(rows: list[dict[str, Any]]) -> list[str]:
    """Base columns, the optional ones some row has, eval.json's values, then the config's, each
    group in order of appearance."""
    seen = [k for k in dict.fromkeys(key for row in rows for key in row) if k not in (*BASE_COLUMNS, *OPTIONAL_COLUMNS)]
    settings = _config_keys(seen)
    results = [k for k in seen if k not in settings]
    return [*BASE_COLUMNS, *(c for c in OPTIONAL_COLUMNS if any(c in row for row in rows)), *results, *settings]


def _typed(column: pd.Series) -> pd.Series:
    """One type per column: numbers numeric, yes/no with gaps nullable boolean, none at all NaN,
    a mix of types as text."""
    import pandas as pd

    present = [v for v in column if not _missing(v)]
    kinds = {_kind(v) for v in present}
    if not present:
        return pd.Series(math.nan, index=column.index, dtype="float64")
    if kinds == {"number"}:
        return pd.to_numeric(column)
    if kinds == {"bool"}:
        return column.astype("boolean") if len(present) < len(column) else column.astype(bool)
    if len(kinds) > 1:
        return column.map(lambda v: math.nan if _missing(v) else _text(v)).astype("str")
    return column


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "time" if isinstance(value, datetime) else "text"


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or (not isinstance(value, list | dict) and bool(pd.isna(value)))


def _text(value: Any) -> str:
    """A cell as text: yes/no as true/false, whole floats without .0."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


# ------------------------------------------------------------------------- metrics, predictions


def load_metrics(run: str | os.PathLike[str]) -> pd.DataFrame:
    """A run's metrics.jsonl as a table: `step`, `time` (seconds since the epoch) and one column
    per metric, one row per step in the order the steps were first logged.

    A step is logged on several lines (training, evaluation, test, generation metrics each on
    theirs), and a resumed run logs again the steps after its checkpoint: each step's row holds the
    last value logged for each of its metrics, and the time of its last line. Values written as
    text ("nan", "inf": a diverging run) are numbers again. A last line cut off by a crash is
    passed over.

    Raises:
        UserError: the run has no metrics.jsonl, or a line of it is not a JSON point (file:line).
    """
    import pandas as pd

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no such file; is {run} a run directory (runs/<name>-<time>/)?")
    steps: dict[Any, dict[str, Any]] = {}
    for point in read_jsonl(path, required=("step", "time")):
        values = {k: _number(v) if k not in ("step", "time") else v for k, v in point.items()}
        steps.setdefault(point["step"], {}).update(values)  # a value logged again replaces the earlier one
    if not steps:
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "time": pd.Series(dtype="float64")})
    return pd.DataFrame.from_records(list(steps.values()))


def _number(value: Any) -> Any:
    """A metric value; one written as text ("nan", "inf") as the number it names."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_predictions(run: str | os.PathLike[str]) -> pd.DataFrame:
    """A run's predictions.jsonl: one row per evaluated example (index, id, input, reference,
    prediction, loss, tokens; for a classifier label, predicted, probabilities), in file order.
    `scores` ({name: value}) become `score/<name>` columns; `probabilities` ({label: p}) stays a
    dict in its column.

    Raises:
        UserError: the run has no predictions.jsonl (runs made before lmforge wrote them have
            none), or a line of it is not a JSON object (file:line).
    """
    import pandas as pd

    path = Path(run) / "predictions.jsonl"
    if not path.is_file():
        raise UserError(
            f"{path}: no such file; {run} has no per-example predictions (runs made before lmforge wrote "
            "predictions.jsonl have none)"
        )
    records = list(read_jsonl(path))
    scores = [record.pop("scores", None) or {} for record in records]
    table = pd.DataFrame.from_records(records)
    if any(scores):
        table = table.join(pd.DataFrame(scores, index=table.index).add_prefix("score/"))
    return table


# ----------------------------------------------------------------------------- filter and sort

_FILTER = re.compile(r"^\s*(?P<key>[^<>=!~]*?)\s*(?P<op>>=|<=|!=|==|=|>|<|~)\s*(?P<value>.*?)\s*$")
_COMPARE = {
    ">=": operator.ge,
    "<=": operator.le,
    "!=": operator.ne,
    "==": operator.eq,
    "=": operator.eq,
    ">": operator.gt,
    "<": operator.lt,
}
FILTER_FORM = "KEY OP VALUE with OP one of >= <= != == = > < ~ (e.g. 'lora.r>=8', state=finished, name~spelling)"


@dataclass(frozen=True)
class RunFilter:
    """One `--filter`: a column, an operator and the value as typed."""

    key: str
    op: str
    value: str
    text: str

    @classmethod
    def parse(cls, text: str) -> RunFilter:
        """Read `KEY OP VALUE`.

        Raises:
            UserError: `text` is not of that form.
        """
        match = _FILTER.match(text)
        if not match or not match["key"] or not match["value"]:
            raise UserError(f"--filter {text!r}: expected {FILTER_FORM}")
        return cls(match["key"], match["op"], match["value"], text)


def check_columns(table: pd.DataFrame, keys: Iterable[str], option: str) -> None:
    """Every key a column of `table`.

    Raises:
        UserError: naming each unknown key and the known columns nearest to it.
    """
    known = [str(c) for c in table.columns]
    problems = []
    for key in keys:
        if key in known:
            continue
        near = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(near)}?" if near else f"columns include {', '.join(known[:8])}, ..."
        problems.append(f"{option} {key}: no such column; {hint}")
    if problems:
        raise UserError("; ".join(problems) + " (every column: lmforge runs --format csv | head -1)")


def filter_runs(table: pd.DataFrame, filters: Iterable[str]) -> pd.DataFrame:
    """The rows for which every filter holds (see `RunFilter`; `~` searches the text for a regular
    expression; numbers are compared as numbers, `started` as a time; a missing value matches
    only `!=`).

    Raises:
        UserError: a malformed filter, an unknown column, or a value that cannot be compared with
            its column (a word for a numeric column, a bad regular expression).
    """
    parsed = [RunFilter.parse(text) for text in filters]
    check_columns(table, [f.key for f in parsed], "--filter")
    keep = None
    for run_filter in parsed:
        mask = _mask(table[run_filter.key], run_filter)
        keep = mask if keep is None else keep & mask
    return table if keep is None else table[keep].reset_index(drop=True)


def _mask(column: pd.Series, run_filter: RunFilter) -> pd.Series:
    import pandas as pd

    op, missing = run_filter.op, run_filter.op == "!="
    if op == "~":
        try:
            pattern = re.compile(run_filter.value)
        except re.error as exc:
            raise UserError(
                f"--filter {run_filter.text!r}: {run_filter.value!r} is not a regular expression ({exc})"
            ) from None
        return column.map(lambda v: not _missing(v) and pattern.search(_text(v)) is not None).astype(bool)
    compare = _COMPARE[op]
    if pd.api.types.is_bool_dtype(column):
        result = compare(column, _filter_value(run_filter, _as_bool, "yes/no values", "true or false"))
    elif pd.api.types.is_datetime64_any_dtype(column):
        when = _filter_value(run_filter, pd.Timestamp, "times", "a time such as 2026-11-30 or 2026-11-30T21:00")
        result = compare(column, when)
    elif pd.api.types.is_numeric_dtype(column):
        result = compare(column, _filter_value(run_filter, float, "numbers", "a number"))
    else:
        result = column.map(lambda v: missing if _missing(v) else compare(_text(v), run_filter.value))
    return result.astype("boolean").fillna(missing).astype(bool) & (column.notna() | missing)


def _filter_value(run_filter: RunFilter, convert: Callable[[str], Any], holds: str, expected: str) -> Any:
    try:
        return convert(run_filter.value)
    except ValueError:
        raise UserError(
            f"--filter {run_filter.text!r}: {run_filter.key} holds {holds}, and {run_filter.value!r} is not {expected}"
        ) from None


def _as_bool(text: str) -> bool:
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if text.lower() not in words:
        raise ValueError(text)
    return words[text.lower()]


def sort_runs(table: pd.DataFrame, keys: Iterable[str]) -> pd.DataFrame:
    """Sorted by each key in turn (`-key`: descending); missing values last.

    Raises:
        UserError: an unknown column.
    """
    keys = list(keys)
    if not keys:
        return table
    names = [key.removeprefix("-") for key in keys]
    check_columns(table, names, "--sort")
    ascending = [not key.startswith("-") for key in keys]
    return table.sort_values(names, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


def pick_columns(table: pd.DataFrame, columns: str | None) -> pd.DataFrame:
    """Only the comma-separated `columns`, in that order (None: every column).

    Raises:
        UserError: an unknown column.
    """
    if columns is None:
        return table
    names = [name.strip() for name in columns.split(",") if name.strip()]
    if not names:
        raise UserError(f"--columns {columns!r}: expected column names separated by commas, e.g. name,state,lora.r")
    check_columns(table, names, "--columns")
    return table[names]


# ------------------------------------------------------------------------------- lmforge runs


def list_runs(
    directory: Path,
    filters: list[str],
    sort: list[str],
    fmt: str | None,
    out: Path | None,
    columns: str | None,
    console: Console,
    err_console: Console,
) -> None:
    """`lmforge runs`: the runs under `directory`, filtered and sorted, as a table on `console` or
    exported (csv and json to standard output or `out`, parquet to `out`). No runs at all, or none
    that pass the filters, is said on `err_console` and is no error; a csv then has its header
    alone, a json is `[]`.

    Raises:
        UserError: a bad format, filter, sort key or column, or no such directory.
    """
    fmt = output_format(fmt, out)
    table = load_runs(directory)
    found = len(table)
    if not found:  # nothing to filter: the columns every table has, and no rows
        err_console.print(f"no runs in {directory}", markup=False)
        if fmt == "table":
            return
    else:
        table = pick_columns(sort_runs(filter_runs(table, filters), sort), columns)
    if fmt != "table":
        text = export_runs(table, fmt, out)
        if text is None:
            err_console.print(f"wrote {len(table)} run(s) to {out}", markup=False)
        else:
            sys.stdout.write(text)
    elif table.empty:
        err_console.print(f"no runs match the filters ({found} in {directory})", markup=False)
    else:
        print_runs(table, directory, console, list(table.columns) if columns else None)


# --------------------------------------------------------------------------------- the table


def config_columns(table: pd.DataFrame) -> list[str]:
    """The columns that are config settings."""
    return _config_keys([str(c) for c in table.columns])


def _config_keys(keys: Iterable[str]) -> list[str]:
    """The keys that are config settings: their first part a top-level config key, no `/` in them."""
    from lmforge.config import Config

    return [k for k in keys if k.split(".")[0] in Config.model_fields and "/" not in k]


def differing_settings(table: pd.DataFrame) -> list[str]:
    """The settings whose values differ between the runs whose config was read (a missing setting
    is a value too); `name` is left out, as the run's directory names it."""
    settings = [c for c in config_columns(table) if c != "name"]
    readable = table[settings].notna().any(axis=1)
    rows = table.loc[readable, settings]
    return [c for c in settings if rows[c].nunique(dropna=False) > 1]


def metric_columns(table: pd.DataFrame) -> list[str]:
    """The final metrics (METRIC_SECTIONS) that some run has, without counts (BOOKKEEPING)."""
    return [
        c
        for c in table.columns
        if str(c).split("/")[0] in METRIC_SECTIONS
        and str(c).rsplit("/", 1)[-1] not in BOOKKEEPING
        and table[c].notna().any()
    ]


def runs_table(table: pd.DataFrame, root: Path, columns: list[str] | None = None) -> Table:
    """A rich table: each run's directory (relative to `root`), state and step, the settings that
    differ between the runs and their final metrics; or exactly `columns`."""
    from rich.table import Table

    shown = columns or ["run", "state", "step", *differing_settings(table), *metric_columns(table)]
    metrics = set(metric_columns(table))
    grid = Table(box=None, header_style="bold", pad_edge=False)
    for column in shown:
        numeric = column != "run" and _is_numeric(table[column])
        grid.add_column(column, justify="right" if numeric else "left", no_wrap=column == "run")
    for _, row in table.iterrows():
        cells = [_relative(row[c], root) if c == "run" else _cell(row[c], c in metrics) for c in shown]
        grid.add_row(*cells)
    return grid


def print_runs(table: pd.DataFrame, root: Path, console: Console, columns: list[str] | None = None) -> None:
    """The table on `console` (at its natural width when the console is not a terminal, so that a
    file or pipe gets whole lines), then why each failed, crashed or unreadable run stopped."""
    from rich.console import Console
    from rich.markup import escape

    if not console.is_terminal:  # as wide as the table needs: a rich table squeezes cells to fit
        console = Console(file=console.file, width=1 << 16, highlight=False, soft_wrap=True)
    console.print(runs_table(table, root, columns))
    if "run" not in table.columns or "state" not in table.columns:
        return
    for _, row in table.iterrows():
        why = row.get("problem") if _present(row.get("problem")) else row.get("reason")
        if row["state"] in ("failed", "crashed", "unreadable") and _present(why):
            console.print(f"{escape(_relative(row['run'], root))} {row['state']}: {escape(str(why))}", highlight=False)


def _is_numeric(column: pd.Series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _relative(run: str, root: Path) -> str:
    relative = os.path.relpath(run, root)
    return Path(run).name if relative == "." else relative


def _present(value: Any) -> bool:
    return not _missing(value) and value != ""


def _cell(value: Any, metric: bool) -> str:
    """A value as the table shows it: metrics to 4 significant digits, settings as the sweep
    leaderboard shows them (lmforge.sweep.results.short_value), whole numbers whole, times to the minute."""
    from lmforge.sweep.results import short_value

    if _missing(value):
        return ""
    if isinstance(value, bool):
        return _text(value)
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if metric and isinstance(value, float):
        return f"{value:.4g}"
    return short_value(value.replace("\n", "\\n") if isinstance(value, str) else value, 40)  # one line a row


# --------------------------------------------------------------------------------- exporting


def output_format(fmt: str | None, out: Path | None) -> str:
    """The format asked for: --format, else the --out file's suffix, else the console table.

    Raises:
        UserError: an unknown format, a table asked to go to a file, parquet without a file, or an
            --out suffix that names no format.
    """
    if fmt is None and out is not None:
        fmt = out.suffix.lstrip(".").lower()
        if fmt not in FORMATS[1:]:
            raise UserError(f"--out {out}: say which format to write with --format csv, json or parquet")
    fmt = fmt or "table"
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if fmt == "table" and out is not None:
        raise UserError("--out writes csv, json or parquet; the table is printed (add --format csv, json or parquet)")
    if fmt == "parquet" and out is None:
        raise UserError("--format parquet writes a binary file: name it with --out FILE.parquet")
    suffix = out.suffix.lstrip(".").lower() if out is not None else ""
    if suffix in FORMATS[1:] and suffix != fmt:
        raise UserError(f"--out {out} with --format {fmt}: the file's suffix says {suffix}; make them agree")
    return fmt


def export_runs(table: pd.DataFrame, fmt: str, out: Path | None) -> str | None:
    """Write the table as csv, json (a list of objects; times in ISO 8601, missing values null,
    infinite ones Infinity as Python writes them) or parquet to `out`; without `out`, return the csv
    or json text for standard output.

    Each reads back with pandas to the same rows and values: `read_csv(f, parse_dates=["started"])`,
    `read_json(f)` (then `pd.to_datetime` on `started`), `read_parquet(f)` (every type kept).
    """
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        table.to_parquet(out, index=False)
        return None
    text = table.to_csv(index=False) if fmt == "csv" else json.dumps(_records(table), indent=2) + "\n"
    if out is None:
        return text
    out.write_text(text, encoding="utf-8")
    return None


def _records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts: missing values null, times ISO 8601, numbers as Python numbers."""
    records = []
    for row in table.to_dict("records"):
        records.append({str(k): _json_value(v) for k, v in row.items()})
    return records


def _json_value(value: Any) -> Any:
    if _missing(value):
        return None
    if isinstance(value, datetime):
        return value.isoformat()
    return value.item() if hasattr(value, "item") else value
