"""eval.metrics_plugins: what a plugin may return, and how each mistake is reported."""

import math

import numpy as np
import pytest

from lmforge.errors import UserError
from lmforge.results.plugins import Plugin, load_plugins, run_plugins

PREDICTIONS, REFERENCES, INPUTS = ["a b", "c"], ["a b", "d"], ["x", "y"]


def run(*functions, reserved=("bleu",)):
    plugins = [Plugin(f"m:{f.__name__}", f) for f in functions]
    return run_plugins(plugins, PREDICTIONS, REFERENCES, INPUTS, reserved=reserved)


def test_corpus_and_per_example_values_numpy_included():
    def good(p, r, i):
        return {"hits": [float(x == y) for x, y in zip(p, r, strict=True)], "n": np.float32(2), "arr": np.array([1, 3])}

    corpus, each, errors = run(good)
    assert errors == {}
    assert each == {"hits": [1.0, 0.0], "arr": [1.0, 3.0]}
    assert corpus == {"n": 2.0, "hits": 0.5, "arr": 2.0}


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ({"x": [1.0]}, "expected a finite number or a list of 2 finite numbers (one per example), got a list of 1"),
        ({"x": ["a", "b"]}, "got a list of 2 holding 'a'"),
        ({"x": [math.nan, 1.0]}, "got a list of 2 holding nan"),
        ({"x": math.inf}, "got inf"),
        ({"x": None}, "got None"),
        ({"bleu": 99.0}, "metric name 'bleu' is taken"),
        ({"": 1.0}, "metric name '': use letters"),
        ([1, 2], "returned list, expected a dict"),
    ],
)
def test_bad_values_are_reported_with_the_plugins_name(returned, message):
    def bad(p, r, i):
        return returned

    corpus, each, errors = run(bad)
    assert corpus == {} and each == {}
    assert message in errors["m:bad"]


def test_a_failing_plugin_loses_nothing_of_the_others_even_on_sys_exit():
    def exits(p, r, i):
        raise SystemExit(3)

    def fine(p, r, i):
        return {"ok": 1.0}

    def clash(p, r, i):
        return {"ok": 2.0}  # a name an earlier plugin returned

    corpus, _, errors = run(exits, fine, clash)
    assert corpus == {"ok": 1.0}
    assert errors["m:exits"] == "SystemExit: 3" and "'ok' is taken" in errors["m:clash"]


def test_load_plugins_names_every_problem_with_suggestions():
    with pytest.raises(UserError) as error:
        load_plugins(["json:dump", "json:lods", "no_such_module_x:f", "nocolon"])
    text = str(error.value)
    assert "eval.metrics_plugins[0]" not in text  # json.dump exists
    assert "json has no function 'lods'; did you mean loads" in text
    assert "cannot import 'no_such_module_x'" in text
    assert "eval.metrics_plugins[3] ('nocolon'): expected 'module:function'" in text
