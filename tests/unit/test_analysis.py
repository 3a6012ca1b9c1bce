"""Error analysis and comparisons of predictions rows, against values worked out by hand."""

import pytest
from scipy import stats as scipy_stats

from lmforge.errors import UserError
from lmforge.results import analysis


def classifier_row(i, label, predicted, confidence):
    other = {"a": "b", "b": "a"}[predicted]
    return {
        "index": i,
        "id": f"x:{i}",
        "input": "t" * (i + 1),
        "label": label,
        "predicted": predicted,
        "prediction": predicted,
        "probabilities": {predicted: confidence, other: 1 - confidence},
        "loss_sum": 0.5,
        "tokens": 1,
        "scores": {"correct": float(label == predicted)},
    }


ROWS = [
    classifier_row(0, "a", "a", 0.95),
    classifier_row(1, "a", "a", 0.85),
    classifier_row(2, "a", "b", 0.9),
    classifier_row(3, "b", "b", 0.55),
    classifier_row(4, "b", "a", 0.65),
    classifier_row(5, "b", "a", 0.6),
]


def test_classification_errors_by_hand():
    found = analysis.classification_errors(ROWS, ["a", "b"], bins=10)
    assert found["confusion_matrix"] == [[2, 1], [2, 1]]
    # a: tp 2, predicted 4, actual 3; b: tp 1, predicted 2, actual 3
    assert found["per_class"]["a"] == {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3}
    assert found["per_class"]["b"] == pytest.approx({"precision": 0.5, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert found["top_confusions"][0] == {"label": "b", "predicted": "a", "count": 2}
    assert [w["id"] for w in found["confident_wrong"]] == ["x:2", "x:4", "x:5"]  # 0.9, 0.65, 0.6
    # bins of width 0.1: [0.5,0.6): 0.55 right; [0.6,0.7): 0.65, 0.6 wrong; [0.8,0.9): 0.85 right;
    # [0.9,1.0]: 0.95 right, 0.9 wrong
    ece = (1 * abs(1 - 0.55) + 2 * abs(0 - 0.625) + 1 * abs(1 - 0.85) + 2 * abs(0.5 - 0.925)) / 6
    assert found["calibration"]["ece"] == pytest.approx(ece)
    assert [b["count"] for b in found["calibration"]["bins"]] == [1, 2, 1, 2]


def test_a_confidence_of_one_falls_in_the_last_bin():
    assert analysis.calibration([1.0, 0.0], [True, False], bins=4)["bins"][-1]["high"] == 1.0


def test_accuracy_interval_and_classifier_metrics():
    metrics = analysis.metrics_of(ROWS, ["a", "b"])
    assert metrics["test/accuracy"].value() == pytest.approx(0.5)
    assert metrics["test/macro_f1"].value() == pytest.approx((4 / 7 + 0.4) / 2)
    found = analysis.intervals(ROWS, ["a", "b"], resamples=200)
    assert found["test/accuracy"]["low"] <= 0.5 <= found["test/accuracy"]["high"]


def test_compare_needs_the_same_examples():
    with pytest.raises(UserError, match="not of the same examples"):
        analysis.compare(ROWS, ROWS[:-1], ["a", "b"])


def test_fixed_and_broken():
    better = [dict(r, predicted=r["label"], prediction=r["label"]) for r in ROWS]
    found = analysis.compare(better, ROWS, ["a", "b"], resamples=100)
    assert found["fixed"] == 3 and found["broken"] == 0
    assert {e["id"] for e in found["fixed_examples"]} == {"x:2", "x:4", "x:5"}
    assert found["metrics"]["test/accuracy"]["difference"] == pytest.approx(0.5)
    assert found["metrics"]["test/accuracy"]["better"]


def test_seed_groups_welch_and_holm():
    values = {"base": [0.50, 0.52, 0.51], "a": [0.60, 0.61, 0.59], "b": [0.52, 0.50, 0.53]}
    found = analysis.seed_groups(values, baseline="base")
    for name in ("a", "b"):
        expected = scipy_stats.ttest_ind(values[name], values["base"], equal_var=False).pvalue
        assert found["tests"][name]["p_value"] == pytest.approx(expected)
    p = sorted(found["tests"][n]["p_value"] for n in ("a", "b"))
    assert found["tests"]["a"]["p_holm"] == pytest.approx(min(1.0, 2 * p[0]))  # the smaller p, times 2
    assert found["tests"]["b"]["p_holm"] == pytest.approx(max(min(1.0, 2 * p[0]), p[1]))
    assert found["groups"]["a"]["mean"] == pytest.approx(0.6)


def test_metrics_by_input_length():
    rows = [{"input": "x" * n, "tokens": 2, "loss_sum": float(n)} for n in (1, 2, 3, 4, 5, 6, 7, 8)]
    buckets = analysis.by_length(rows, buckets=2)
    assert [b["count"] for b in buckets] == [4, 4]
    assert buckets[0]["loss"] == pytest.approx((1 + 2 + 3 + 4) / 8)


def test_seed_groups_without_variance_are_not_tested():
    found = analysis.seed_groups({"base": [0.0, 0.0], "a": [0.0, 0.0], "b": [0.1, 0.3]}, baseline="base")
    assert found["tests"]["a"]["p_holm"] != found["tests"]["a"]["p_holm"]  # NaN: nothing to test
    assert found["tests"]["b"]["p_holm"] == pytest.approx(found["tests"]["b"]["p_value"])  # one test: no correction


def test_a_judge_metric_is_the_mean_over_the_graded_answers_and_is_compared():
    def rows(grades):
        return [
            {"id": i, "tokens": 2, "loss_sum": 1.0, "prediction": "a", "reference": "a", "input": "q",
             "scores": {"exact_match": 1.0, **({"judge_relevance": g} if g is not None else {})}}
            for i, g in enumerate(grades)
        ]  # fmt: skip

    mine, theirs = rows([5, None, 3, 4]), rows([2, 2, None, None])  # a judge graded some answers only
    metric = analysis.metrics_of(mine)["generation/judge_relevance"]
    assert float(metric.score(metric.stats.sum(0))) == 4.0  # (5 + 3 + 4) / 3
    comparison = analysis.compare(mine, theirs, resamples=200)
    assert "generation/judge_relevance" in str(comparison)


def test_peft_target_modules_are_exported_sorted(tmp_path):
    import json

    from lmforge.export.export import _sort_target_modules

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "k_proj"], "r": 4}))
    _sort_target_modules(path)
    assert json.loads(path.read_text())["target_modules"] == ["k_proj", "q_proj", "v_proj"]
