"""Judging predictions: the metrics of predictions.jsonl rows with bootstrap intervals, a candidate
against a baseline on the same examples (paired bootstrap, fixed and broken examples), runs that
differ only in seed, and error analysis (confusions and calibration for classifiers; worst, failed,
empty, truncated and repetitive answers for generation).

The rows are those `results.predictions` writes. Loss metrics cover every row; generation metrics
cover the rows with a greedy answer (the first eval.generate.max_examples).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmforge.errors import UserError
from lmforge.results import stats

BUILT_IN_SCORES = {"exact_match", "bleu", "chrf", "correct"}
"""Per-example scores that a corpus metric already covers (BLEU and chrF are scored over the corpus)."""
DIRECTED = {"loss", "accuracy", "macro_f1", "exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL"}
"""Metrics whose better direction lmforge knows (and the judge's, judge_<criterion>: higher is
better); a plugin's metric has none, so its verdict is "higher" or "lower", never "better" or "worse"."""
SIGNIFICANCE = 0.05
"""The level at which a comparison's verdict calls a difference better or worse."""


def metrics_of(rows: list[dict], labels: list[str] | None = None, split: str = "test") -> dict[str, stats.Metric]:
    """The corpus metrics of predictions rows as additive per-example statistics, keyed as in
    eval.json ("test/loss", "generation/bleu", a plugin's "generation/<name>").

    Args:
        rows: predictions.jsonl rows, all of one split.
        labels: a classifier's class names (macro-F1 needs the number of classes).
        split: the rows' split, which names the loss and a classifier's metrics.
    """
    if not rows:
        return {}
    found: dict[str, stats.Metric] = {}
    scored = [r for r in rows if r["tokens"] > 0]
    if scored:
        found[f"{split}/loss"] = stats.mean_loss([r["loss_sum"] for r in scored], [r["tokens"] for r in scored])
    if "label" in rows[0]:
        names = labels or sorted({r["label"] for r in rows} | {r["predicted"] for r in rows})
        index = {name: i for i, name in enumerate(names)}
        found[f"{split}/accuracy"] = stats.accuracy([r["label"] == r["predicted"] for r in rows])
        found[f"{split}/macro_f1"] = stats.macro_f1(
            [index[r["label"]] for r in rows], [index[r["predicted"]] for r in rows], len(names)
        )
        section, answered = split, rows
    else:
        answered = [r for r in rows if "prediction" in r]
        section = "generation"
        if answered:
            predictions, references = [r["prediction"] for r in answered], [r["reference"] for r in answered]
            found["generation/exact_match"] = stats.exact_match([r["scores"]["exact_match"] for r in answered])
            found["generation/bleu"] = stats.bleu(predictions, references)
            found["generation/chrf"] = stats.chrf(predictions, references)
    for name in _per_example_scores(answered):
        found[f"{section}/{name}"] = stats.mean([r["scores"][name] for r in answered], name=name)
    for name in _graded_scores(answered):  # a judge grades some answers: the mean over those it graded
        values = [r.get("scores", {}).get(name) for r in answered]
        found[f"{section}/{name}"] = stats.mean_of_present(values, name=name)
    return found


def _graded_scores(rows: list[dict]) -> list[str]:
    """judge_ score names some rows have and others lack (answers the judge did not grade)."""
    names = {name for r in rows for name in r.get("scores", {}) if name.startswith("judge_")}
    return sorted(n for n in names if not all(n in r.get("scores", {}) for r in rows))


def _per_example_scores(rows: list[dict]) -> list[str]:
    """Score names every row has, besides those a corpus metric covers (ROUGE-L, plugin values)."""
    if not rows or "scores" not in rows[0]:
        return []
    common = set(rows[0]["scores"])
    for row in rows[1:]:
        common &= set(row.get("scores", {}))
    return sorted(common - BUILT_IN_SCORES)


def intervals(
    rows: list[dict], labels=None, split: str = "test", resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """95% percentile bootstrap intervals of every metric of `rows` ({"value", "low", "high"})."""
    if resamples == 0:
        return {}
    return {
        name: {k: v for k, v in stats.bootstrap_interval(metric, resamples, seed).items() if k != "resamples"}
        for name, metric in metrics_of(rows, labels, split).items()
    }


def compare(
    candidate: list[dict], baseline: list[dict], labels=None, split: str = "test", resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The candidate against the baseline on the same examples: per metric the paired bootstrap
    (difference, 95% interval, p-value: `stats.paired_bootstrap`), whether it is better, and the
    examples each fixed and broke (right in one and wrong in the other: exact match, or a
    classifier's class).

    Raises:
        UserError: the two sets of predictions are not of the same examples in the same order.
    """
    ids = [r["id"] for r in candidate]
    if ids != [r["id"] for r in baseline]:
        missing = sorted(set(ids) ^ {r["id"] for r in baseline})[:3]
        raise UserError(
            "the candidate's and the baseline's predictions are not of the same examples "
            f"({len(candidate)} against {len(baseline)} rows{'; e.g. ' + ', '.join(missing) if missing else ''}); "
            "evaluate both on the same split or --data files"
        )
    candidate, baseline = _answered_by_both(candidate, baseline)
    mine, theirs = metrics_of(candidate, labels, split), metrics_of(baseline, labels, split)
    tests = {}
    for name in mine.keys() & theirs.keys():
        tests[name] = _paired(mine[name], theirs[name], resamples, seed)
        if name.split("/")[-1] not in DIRECTED and not name.split("/")[-1].startswith("judge_"):
            tests[name]["better"] = None
            tests[name]["verdict"] = tests[name]["verdict"].replace("better", "higher").replace("worse", "lower")
    return {"metrics": dict(sorted(tests.items())), **fixed_and_broken(candidate, baseline)}


def _answered_by_both(candidate: list[dict], baseline: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows with the answers only one side has left out (runs with different
    eval.generate.max_examples): generation metrics are compared on the examples both answered."""
    both = ["prediction" in a and "prediction" in b for a, b in zip(candidate, baseline, strict=True)]
    if all(both) or "label" in (candidate[0] if candidate else {}):
        return candidate, baseline

    def only(rows):
        return [r if kept or "prediction" not in r else _unanswered(r) for r, kept in zip(rows, both, strict=True)]

    return only(candidate), only(baseline)


def _unanswered(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("prediction", "scores")}


def _paired(candidate: stats.Metric, baseline: stats.Metric, resamples: int, seed: int) -> dict[str, Any]:
    """`stats.paired_bootstrap` with the verdict: "better" or "worse" where p < SIGNIFICANCE, else
    "no significant difference"; with no resamples, the values and the difference alone."""
    if resamples == 0:
        mine, theirs = candidate.value(), baseline.value()
        result = {"candidate": mine, "baseline": theirs, "difference": mine - theirs, "verdict": "not tested"}
        return result | {"higher_is_better": candidate.higher_is_better}
    result = stats.paired_bootstrap(candidate, baseline, resamples, seed)
    if result["difference"] == 0 and result["low"] == result["high"] == 0:
        result["p_value"] = 1.0  # no resample differs: nothing to test (sacrebleu's count would give 1/(R+1))
    higher = candidate.higher_is_better
    result["higher_is_better"] = higher
    result["better"] = (result["difference"] > 0) == higher and result["difference"] != 0
    significant = result["p_value"] < SIGNIFICANCE
    result["verdict"] = ("better" if result["better"] else "worse") if significant else "no significant difference"
    return result


def _right(row: dict) -> bool | None:
    if "label" in row:
        return row["label"] == row["predicted"]
    if "prediction" in row:
        return row["scores"]["exact_match"] == 1.0
    return None


def fixed_and_broken(candidate: list[dict], baseline: list[dict], limit: int = 50) -> dict[str, Any]:
    """Examples right in the candidate and wrong in the baseline (fixed), and the other way round
    (broken), with both answers; counts of all, lists of the first `limit`."""
    fixed, broken = [], []
    for mine, theirs in zip(candidate, baseline, strict=True):
        right, was_right = _right(mine), _right(theirs)
        if right is None or was_right is None or right == was_right:
            continue
        entry = {
            "id": mine["id"],
            "input": mine["input"],
            "reference": mine.get("reference"),
            "candidate": mine.get("prediction"),
            "baseline": theirs.get("prediction"),
        }
        (fixed if right else broken).append(entry)
    return {
        "fixed": len(fixed),
        "broken": len(broken),
        "fixed_examples": fixed[:limit],
        "broken_examples": broken[:limit],
    }


def seed_groups(values: dict[str, Sequence[float]], baseline: str | None = None) -> dict[str, Any]:
    """Runs that differ only in seed, grouped: each group's mean, standard deviation and 95%
    t-interval (`stats.seed_summary`); with a baseline group, Welch's t-test of every other group
    against it, p-values Holm-corrected over those tests (`stats.holm`).

    Args:
        values: group name -> one metric's value of each run of the group.
        baseline: the group the others are tested against.
    """
    summary: dict[str, Any] = {"groups": {name: stats.seed_summary(v) for name, v in values.items()}}
    if baseline is None:
        return summary
    others = [name for name in values if name != baseline and len(values[name]) > 1]
    if len(values[baseline]) < 2:
        return summary
    tests = {name: stats.welch_test(values[name], values[baseline]) for name in others}
    testable = [n for n in others if math.isfinite(tests[n]["p_value"])]  # no variance in either group: no test
    for name in others:
        tests[name]["p_holm"] = math.nan
    for name, adjusted in zip(testable, stats.holm([tests[n]["p_value"] for n in testable]), strict=True):
        tests[name]["p_holm"] = adjusted
    summary["against"], summary["tests"] = baseline, tests
    return summary


# --------------------------------------------------------------------------- error analysis


def classification_errors(rows: list[dict], labels: list[str] | None = None, top: int = 10, bins: int = 10) -> dict:
    """A classifier's errors: the confusion matrix, per-class precision, recall, F1 and support,
    the most frequent confusions, the most confident wrong answers, and calibration: expected
    calibration error (Guo et al. 2017, "On Calibration of Modern Neural Networks": the
    example-weighted mean |accuracy - confidence| over `bins` equal-width confidence bins) with the
    bins of its reliability diagram."""
    names = labels or sorted({r["label"] for r in rows} | {r["predicted"] for r in rows})
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for r in rows:
        matrix[index[r["label"]], index[r["predicted"]]] += 1
    per_class = {}
    for i, name in enumerate(names):
        tp, predicted, actual = matrix[i, i], matrix[:, i].sum(), matrix[i].sum()
        precision = tp / predicted if predicted else math.nan
        recall = tp / actual if actual else math.nan
        f1 = 2 * tp / (predicted + actual) if predicted + actual else math.nan
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
    confusions = Counter((r["label"], r["predicted"]) for r in rows if r["label"] != r["predicted"])
    wrong = sorted((r for r in rows if r["label"] != r["predicted"]), key=lambda r: -r["probabilities"][r["predicted"]])
    return {
        "labels": names,
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "top_confusions": [{"label": a, "predicted": b, "count": n} for (a, b), n in confusions.most_common(top)],
        "confident_wrong": [
            {"id": r["id"], "input": r["input"], "label": r["label"], "predicted": r["predicted"]}
            | {"confidence": r["probabilities"][r["predicted"]]}
            for r in wrong[:top]
        ],
        "calibration": calibration([max(r["probabilities"].values()) for r in rows], [_right(r) for r in rows], bins),
    }


def calibration(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins (equal-width on [0, 1]; an
    example with confidence exactly 1 falls in the last bin). ECE = sum_b n_b/N |acc_b - conf_b|."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = which == b
        n = int(members.sum())
        if n == 0:
            continue
        accuracy, mean_confidence = correct[members].mean(), confidence[members].mean()
        ece += n / len(confidence) * abs(accuracy - mean_confidence)
        table.append({"low": b / bins, "high": (b + 1) / bins, "count": n})
        table[-1].update(accuracy=float(accuracy), confidence=float(mean_confidence))
    return {"ece": float(ece), "bins": table}


def generation_errors(rows: list[dict], top: int = 10, buckets: int = 4) -> dict:
    """A generator's errors: the worst examples by loss, exact-match failures against their
    references, metrics by input-length bucket (quantiles of the input length in characters),
    and the counts of empty, truncated and repetitive answers."""
    answered = [r for r in rows if "prediction" in r]
    worst = sorted((r for r in rows if r["tokens"]), key=lambda r: -r["loss"])[:top]
    failures = [r for r in answered if r["scores"]["exact_match"] < 1.0]
    return {
        "worst_by_loss": [_brief(r) for r in worst],
        "exact_match_failures": [_brief(r) for r in failures[:top]],
        "failures": len(failures),
        "answered": len(answered),
        "by_input_length": by_length(rows, buckets),
        "empty": sum(r.get("empty", False) for r in answered),
        "truncated": sum(r.get("truncated", False) for r in answered),
        "repetitive": sum(r.get("repetitive", False) for r in answered),
    }


def _brief(row: dict) -> dict:
    return {k: row[k] for k in ("id", "input", "reference", "prediction", "loss") if k in row}


def by_length(rows: list[dict], buckets: int = 4) -> list[dict]:
    """Rows grouped by input length (characters) into up to `buckets` quantile buckets: each with
    its range, count, mean loss per token, and exact match where answered."""
    if not rows:
        return []
    lengths = np.array([len(r["input"]) for r in rows])
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, buckets + 1)))
    out = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = i == len(edges) - 2
        members = [r for r, n in zip(rows, lengths, strict=True) if low <= n < high or (last and n == high)]
        if not members:
            continue
        tokens = sum(r["tokens"] for r in members)
        bucket = {
            "chars": f"{math.ceil(low)}-{math.floor(high) if last else math.ceil(high) - 1}",
            "count": len(members),
        }
        bucket["loss"] = sum(r["loss_sum"] for r in members) / tokens if tokens else math.nan
        answered = [r for r in members if "prediction" in r]
        if answered:
            bucket["exact_match"] = sum(r["scores"]["exact_match"] for r in answered) / len(answered)
        out.append(bucket)
    return out
