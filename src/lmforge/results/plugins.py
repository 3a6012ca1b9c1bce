"""Custom metrics: `eval.metrics_plugins: ["my_module:my_metric"]`.

A plugin is a Python function `(predictions, references, inputs) -> dict[str, float | list[float]]`
called once with the lists of a final evaluation's greedy answers (a classifier's predicted and
true class names), their references and their inputs. Each returned key is a metric:
  - a number: a corpus-level value (eval.json, trackers, the report);
  - a list with one number per example: per-example values (each line of predictions.jsonl gets
    its own under "scores"; eval.json gets their mean).
Values must be finite numbers (Python or numpy; a 1-D array works as a list). A name must be
letters, digits, `_ . -`, and not one of lmforge's own metrics (exact_match, bleu, accuracy, ...:
a plugin cannot overwrite them), nor one another plugin returned. A plugin that raises (even
SystemExit), or returns something else, is reported with its name and loses none of the run's
other results. The module is imported from the working directory first (where `lmforge`
was started), then from the Python path.
"""

from __future__ import annotations

import difflib
import importlib
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

PluginFunction = Callable[[list[str], list[str], list[str]], dict]


@dataclass(frozen=True)
class Plugin:
    name: str
    """module:function, as configured."""
    function: PluginFunction


def plugins_for(config) -> list[Plugin]:
    """A run's eval.metrics_plugins, imported up front (a typo fails before training, not after).

    Raises:
        UserError: plugins on a text run (no answers to score) or with eval.predictions off, or
            any problem `load_plugins` finds.
    """
    if not config.eval.metrics_plugins:
        return []
    if config.data.format == "text":
        raise UserError(
            "eval.metrics_plugins: a text (pretraining) run has no answers for a metric to score; "
            "plugins score the greedy answers of prompt/completion, chat, seq2seq and classification data"
        )
    if not config.eval.predictions:
        raise UserError("eval.metrics_plugins needs eval.predictions: true (plugins score the predictions)")
    return load_plugins(config.eval.metrics_plugins)


def load_plugins(specs: list[str], field: str = "eval.metrics_plugins") -> list[Plugin]:
    """Import every configured plugin, before anything runs.

    Raises:
        UserError: naming each entry that is malformed, whose module cannot be imported (with the
            import error), or that is not a callable in it.
    """
    plugins, problems = [], []
    here = str(Path.cwd())
    if here not in sys.path:
        sys.path.insert(0, here)
    for i, spec in enumerate(specs):
        where = f"{field}[{i}] ({spec!r})"
        module_name, _, function_name = spec.partition(":")
        if not module_name or not function_name:
            problems.append(f"{where}: expected 'module:function', e.g. 'my_metrics:keyword_recall'")
            continue
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a plugin module that fails to import is the user's error to see
            problems.append(f"{where}: cannot import {module_name!r}: {type(exc).__name__}: {exc}")
            continue
        function = getattr(module, function_name, None)
        if not callable(function):
            known = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
            near = difflib.get_close_matches(function_name, known, n=3)
            problems.append(
                f"{where}: {module_name} has no function {function_name!r}"
                + (f"; did you mean {', '.join(near)}?" if near else "")
            )
            continue
        plugins.append(Plugin(spec, function))
    if problems:
        raise UserError("; ".join(problems))
    return plugins


def run_plugins(
    plugins: list[Plugin],
    predictions: list[str],
    references: list[str],
    inputs: list[str],
    reserved: Iterable[str] = (),
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """Call each plugin once on the whole lists.

    Args:
        reserved: names of lmforge's own metrics, which a plugin may not return.

    Returns:
        (corpus values, per-example values, errors): corpus values include the mean of each
        per-example metric; errors map a plugin's name to what went wrong (then none of its values
        are kept).
    """
    corpus: dict[str, float] = {}
    per_example: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    taken = set(reserved)
    n = len(predictions)
    for plugin in plugins:
        try:
            values = plugin.function(list(predictions), list(references), list(inputs))
            found_corpus, found_each = _check(values, n, taken)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's failure is reported, never fatal
            errors[plugin.name] = f"{type(exc).__name__}: {exc}"
            continue
        for key, each in found_each.items():
            found_corpus[key] = sum(each) / n if n else math.nan
        taken |= set(found_corpus)
        corpus.update(found_corpus)
        per_example.update(found_each)
    return corpus, per_example, errors


_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _check(values, n: int, taken: set[str]) -> tuple[dict[str, float], dict[str, list[float]]]:
    if not isinstance(values, dict):
        raise TypeError(f"returned {type(values).__name__}, expected a dict of metric name -> number or list")
    corpus, each = {}, {}
    for key, value in values.items():
        if not isinstance(key, str) or not _NAME.match(key):
            raise TypeError(f"metric name {key!r}: use letters, digits, '_', '.' or '-'")
        if key in taken:
            raise TypeError(f"metric name {key!r} is taken (by lmforge or an earlier plugin): rename it")
        if hasattr(value, "tolist"):  # numpy scalars and arrays
            value = value.tolist()
        if _finite(value):
            corpus[key] = float(value)
        elif isinstance(value, list | tuple) and len(value) == n and all(_finite(v) for v in value):
            each[key] = [float(v) for v in value]
        else:
            raise TypeError(f"{key!r}: expected a finite number or a list of {n} finite numbers (one per example), "
                            f"got {_shown(value)}")  # fmt: skip
    return corpus, each


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value) -> str:
    if isinstance(value, list | tuple):
        odd = [v for v in value if not _finite(v)]
        return f"a list of {len(value)}" + (f" holding {odd[0]!r}" if odd else "")
    return repr(value) if isinstance(value, int | float | str | None) else type(value).__name__
