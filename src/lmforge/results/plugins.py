"""Custom metrics: `eval.metrics_plugins: ["my_module:my_metric"]`.

A plugin is a Python function `(predictions, references, inputs) -> dict[str, float | list[float]]`
called once with the lists of a final evaluation's greedy answers (a classifier's predicted and
true class names), their references and their inputs. Each returned key is a metric:
  - a number: a corpus-level value (eval.json, trackers, the report);
  - a list with one number per example: per-example values (each line of predictions.jsonl gets
    its own under "scores"; eval.json gets their mean).
A plugin that raises, or returns something else, is reported with its name and loses none of the
run's other results. The module is imported from the working directory first (where `lmforge`
was started), then from the Python path.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError

PluginFunction = Callable[[list[str], list[str], list[str]], dict]


@dataclass(frozen=True)
class Plugin:
    name: str
    """module:function, as configured."""
    function: PluginFunction


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
            problems.append(
                f"{where}: {module_name} has no function {function_name!r}"
                + (f" (it has: {', '.join(known[:8])})" if known else "")
            )
            continue
        plugins.append(Plugin(spec, function))
    if problems:
        raise UserError("; ".join(problems))
    return plugins


def run_plugins(
    plugins: list[Plugin], predictions: list[str], references: list[str], inputs: list[str]
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, str]]:
    """Call each plugin once on the whole lists.

    Returns:
        (corpus values, per-example values, errors): corpus values include the mean of each
        per-example metric; errors map a plugin's name to what went wrong.
    """
    corpus: dict[str, float] = {}
    per_example: dict[str, list[float]] = {}
    errors: dict[str, str] = {}
    n = len(predictions)
    for plugin in plugins:
        try:
            values = plugin.function(list(predictions), list(references), list(inputs))
            found_corpus, found_each = _check(values, n)
        except Exception as exc:  # noqa: BLE001 - a plugin's failure is reported, never fatal
            errors[plugin.name] = f"{type(exc).__name__}: {exc}"
            continue
        for key, each in found_each.items():
            found_corpus[key] = sum(each) / n if n else math.nan
        corpus.update(found_corpus)
        per_example.update(found_each)
    return corpus, per_example, errors


def _check(values, n: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    if not isinstance(values, dict):
        raise TypeError(f"returned {type(values).__name__}, expected a dict of metric name -> number or list")
    corpus, each = {}, {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(key, str):
            raise TypeError(f"{key!r}: expected a number or a list of {n} numbers, got {value!r}")
        if isinstance(value, int | float):
            corpus[key] = float(value)
        elif isinstance(value, list | tuple) and len(value) == n and all(isinstance(v, int | float) for v in value):
            each[key] = [float(v) for v in value]
        else:
            shown = f"a list of {len(value)}" if isinstance(value, list | tuple) else type(value).__name__
            raise TypeError(f"{key!r}: expected a number or a list of {n} numbers (one per example), got {shown}")
    return corpus, each
