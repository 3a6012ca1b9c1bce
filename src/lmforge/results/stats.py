"""Statistics for judging results: corpus metrics as additive statistics, bootstrap intervals and tests.

Every corpus metric here is a `Metric`: an (N, k) array of per-example *additive statistics* whose column sums
determine the corpus score, plus a function that scores summed rows. Accuracy is [correct, 1] per example
(score: sum(correct) / sum(1)); BLEU is sacrebleu's per-sentence [sys_len, ref_len, correct_1..4, total_1..4]
(score: sacrebleu's BLEU of the summed counts). A bootstrap resample is then only a weighted sum: R resamples of
N indices become an (R, N) count matrix, `counts @ stats` is (R, k), and scoring each row gives R corpus scores.
Single-run intervals, paired tests and every metric share that one code path.

The paired bootstrap reproduces `sacrebleu REF -i BASELINE CANDIDATE --paired-bs` exactly when given
`seed=SACREBLEU_SEED` (same generator, same index draw, same p-value); see `paired_bootstrap`.

Across runs that differ only in seed there are no per-example statistics to resample; `seed_summary` gives a
Student t-interval of the mean, `welch_test` compares two groups of runs, and `holm` adjusts a family of p-values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.stats
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.chrf import CHRF

SACREBLEU_SEED = 12345
"""sacrebleu's default seed for its resampling (the `SACREBLEU_SEED` environment variable, default '12345').
`paired_bootstrap(..., seed=SACREBLEU_SEED)` draws the very indices that `sacrebleu --paired-bs` draws."""

# Resamples scored per block in `_resampled_sums`: bounds the float (block, N) count matrix to ~64 MB at N = 32k.
_BLOCK_ELEMENTS = 8_000_000


@dataclass(frozen=True, eq=False)
class Metric:
    """A corpus metric as per-example additive statistics and a function of their sums.

    Equality is identity (`eq=False`): two metrics holding arrays have no meaningful `==`.

    Attributes:
        name: What is measured, e.g. "accuracy", "bleu"; a paired test requires both sides to share it.
        stats: (N, k) float64 per-example additive statistics; N >= 1 examples, k >= 1 statistics.
        score: Maps summed statistics (..., k) to corpus values (...), vectorised over the leading dims:
            `score(stats.sum(0))` is the full-sample value (a 0-d array), `score(sums)` with sums (R, k) gives
            R resampled values.
        higher_is_better: Direction of the metric (False for losses). The tests here are two-sided and do not
            use it; it tells readers of a result which sign of a difference is an improvement.

    Raises:
        ValueError: `stats` is not 2-D or has no rows or no columns.
    """

    name: str
    stats: np.ndarray
    score: Callable[[np.ndarray], np.ndarray]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        stats = np.asarray(self.stats, dtype=np.float64)
        if stats.ndim != 2 or stats.shape[0] == 0 or stats.shape[1] == 0:
            raise ValueError(
                f"metric {self.name!r}: stats must be an (N, k) array with N >= 1 examples and k >= 1 statistics, "
                f"got shape {stats.shape}; build metrics with the functions in lmforge.results.stats"
            )
        object.__setattr__(self, "stats", stats)

    @property
    def n(self) -> int:
        """Number of examples N."""
        return self.stats.shape[0]

    def value(self) -> float:
        """The corpus value on the full sample: `score` of the column sums."""
        return float(self.score(self.stats.sum(axis=0)))


# ---------------------------------------------------------------------------------------------------------------
# Input checks shared by the builders
# ---------------------------------------------------------------------------------------------------------------


def _vector(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """`values` as a non-empty, finite 1-D float64 array.

    Raises:
        ValueError: Not 1-D, empty, or holding NaN/inf; the message names the argument.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one value per example (1-D), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: a metric needs at least one example")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name}[{bad}] is {array[bad]}: every per-example value must be finite")
    return array


def _same_length(first: Sequence[object], second: Sequence[object], names: str) -> None:
    """Raise ValueError naming both arguments unless they have one entry per example each."""
    if len(first) != len(second):
        raise ValueError(f"{names} must have one entry per example each, got {len(first)} and {len(second)}")


def _with_ones(values: np.ndarray) -> np.ndarray:
    """(N,) -> (N, 2) statistics [value, 1]: their sums are (sum of values, N)."""
    return np.stack([values, np.ones_like(values)], axis=1)


def _ratio(summed: np.ndarray) -> np.ndarray:
    """(..., 2) -> (...): column 0 over column 1 (NaN where column 1 sums to 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return summed[..., 0] / summed[..., 1]


def _row_by_row(score_row: Callable[[list[float]], float]) -> Callable[[np.ndarray], np.ndarray]:
    """Lift a scorer of one summed row (a list of k numbers) to the vectorised (..., k) -> (...) form.

    For metrics scored by sacrebleu's own Python code (BLEU, chrF), which takes one row at a time: a Python loop
    over rows, ~10 us each, so 1,000 resamples cost ~10 ms.
    """

    def score(summed: np.ndarray) -> np.ndarray:
        summed = np.asarray(summed, dtype=np.float64)
        rows = summed.reshape(-1, summed.shape[-1])
        values = np.array([score_row(row.tolist()) for row in rows], dtype=np.float64)
        return values.reshape(summed.shape[:-1])

    return score


# ---------------------------------------------------------------------------------------------------------------
# Metric builders
# ---------------------------------------------------------------------------------------------------------------


def _zero_one(values: Sequence[bool] | Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """A 1-D array of 0/1 (or bools) as float64; ValueError naming the first other value."""
    array = _vector(values, name)
    bad = np.flatnonzero((array != 0) & (array != 1))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is {array[bad[0]]}: expected True/False or 1/0 per example")
    return array


def accuracy(correct: Sequence[bool] | Sequence[float] | np.ndarray) -> Metric:
    """Fraction of examples that are correct.

    Statistics (N, 2): [correct, 1]; score: sum(correct) / sum(1).

    Args:
        correct: (N,) bools or 0/1, one per example.

    Raises:
        ValueError: Empty, not 1-D, or a value other than 0/1.
    """
    return Metric("accuracy", _with_ones(_zero_one(correct, "correct")), _ratio)


def exact_match(matches: Sequence[bool] | Sequence[float] | np.ndarray) -> Metric:
    """Fraction of predictions that equal their reference: the maths of `accuracy` under its own name.

    Statistics (N, 2): [match, 1]; score: sum(match) / N.

    Args:
        matches: (N,) bools or 0/1, one per example.

    Raises:
        ValueError: Empty, not 1-D, or a value other than 0/1.
    """
    return Metric("exact_match", _with_ones(_zero_one(matches, "matches")), _ratio)


def mean_loss(
    loss_sums: Sequence[float] | np.ndarray,
    token_counts: Sequence[float] | np.ndarray,
) -> Metric:
    """Token-weighted mean loss: sum of per-token losses over sum of tokens, lower is better.

    Statistics (N, 2): [loss summed over the example's target tokens (nats), target tokens]; score:
    sum(loss) / sum(tokens). This is the loss per target token lmforge's evaluation reports, not the mean of
    per-example means (which would weight a 3-token example like a 3,000-token one).

    Args:
        loss_sums: (N,) per-example sums of token losses, in nats.
        token_counts: (N,) per-example numbers of target tokens, each > 0.

    Raises:
        ValueError: Empty, lengths differ, non-finite values, or an example with no tokens.
    """
    losses = _vector(loss_sums, "loss_sums")
    tokens = _vector(token_counts, "token_counts")
    _same_length(losses, tokens, "loss_sums and token_counts")
    empty = np.flatnonzero(tokens <= 0)
    if empty.size:
        raise ValueError(
            f"token_counts[{empty[0]}] is {tokens[empty[0]]}: every example needs at least one target token; "
            "drop examples without target tokens before building the metric"
        )
    return Metric("mean_loss", np.stack([losses, tokens], axis=1), _ratio, higher_is_better=False)


def _class_ids(ids: Sequence[int] | np.ndarray, name: str, num_classes: int) -> np.ndarray:
    """A 1-D array of class ids in [0, num_classes) as int64; ValueError naming the first bad id."""
    array = _vector(ids, name)
    bad = np.flatnonzero((array != np.round(array)) | (array < 0) | (array >= num_classes))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] is {array[bad[0]]}: class ids must be integers in [0, {num_classes})")
    return array.astype(np.int64)


def _macro_f1_score(summed: np.ndarray) -> np.ndarray:
    """(..., 3C) summed [tp, predicted, actual] counts -> (...) macro-F1 over the classes present.

    Per class c: F1_c = 2 tp_c / (predicted_c + actual_c), the harmonic mean of precision tp/predicted and recall
    tp/actual; classes with predicted_c + actual_c = 0 are left out of the mean (NaN if none are present).
    """
    true_positive, predicted, actual = np.split(summed, 3, axis=-1)  # each (..., C)
    denominator = predicted + actual
    present = denominator > 0
    f1 = np.divide(2 * true_positive, denominator, out=np.zeros_like(denominator), where=present)
    with np.errstate(invalid="ignore"):
        return f1.sum(axis=-1) / present.sum(axis=-1)


def macro_f1(
    true_ids: Sequence[int] | np.ndarray,
    predicted_ids: Sequence[int] | np.ndarray,
    num_classes: int,
) -> Metric:
    """Unweighted mean of per-class F1 over classes that occur in the labels or the predictions.

    Statistics (N, 3C), C = num_classes: per example the one-hots [true positive (C), predicted (C), actual (C)];
    summed, they are the confusion matrix's diagonal, column sums and row sums. Score: the mean over classes with
    predicted + actual > 0 of 2 tp / (predicted + actual), the same value `lmforge.eval.evaluate.macro_f1`
    computes from the confusion matrix.

    Args:
        true_ids: (N,) true class ids in [0, num_classes).
        predicted_ids: (N,) predicted class ids in [0, num_classes).
        num_classes: C, the number of classes (>= 1).

    Raises:
        ValueError: Empty, lengths differ, num_classes < 1, or an id outside [0, num_classes).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes is {num_classes}: a classifier has at least one class")
    truth = _class_ids(true_ids, "true_ids", num_classes)
    predicted = _class_ids(predicted_ids, "predicted_ids", num_classes)
    _same_length(truth, predicted, "true_ids and predicted_ids")
    eye = np.eye(num_classes)
    actual_onehot = eye[truth]  # (N, C)
    predicted_onehot = eye[predicted]  # (N, C)
    stats = np.concatenate([actual_onehot * predicted_onehot, predicted_onehot, actual_onehot], axis=1)
    return Metric("macro_f1", stats, _macro_f1_score)


def _texts(predictions: Sequence[str], references: Sequence[str]) -> None:
    """Raise ValueError unless predictions and references are equally long, non-empty lists of strings."""
    _same_length(predictions, references, "predictions and references")
    if not predictions:
        raise ValueError("predictions and references are empty: a metric needs at least one example")
    for name, texts in (("predictions", predictions), ("references", references)):
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise ValueError(f"{name}[{bad}] is {type(texts[bad]).__name__}, expected a string")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """Corpus BLEU (0-100) exactly as `sacrebleu.corpus_bleu(predictions, [references]).score`.

    sacrebleu's defaults: 13a tokenizer, mixed case, 'exp' smoothing, n-grams up to 4, one reference. Statistics
    (N, 10): sacrebleu's per-sentence sufficient statistics [sys_len, ref_len, correct_1..4, total_1..4], from
    `BLEU._extract_corpus_statistics` (the statistics `sacrebleu --paired-bs` resamples). Score: sacrebleu's
    `BLEU._compute_score_from_stats` of the summed row, i.e. brevity penalty times the geometric mean of the
    clipped n-gram precisions (Papineni et al., 2002, "BLEU: a Method for Automatic Evaluation of Machine
    Translation"; Post, 2018, "A Call for Clarity in Reporting BLEU Scores").

    Args:
        predictions: (N,) system outputs.
        references: (N,) one reference per output.

    Raises:
        ValueError: Empty, lengths differ, or a non-string entry.
    """
    return _sacrebleu_metric("bleu", BLEU(), predictions, references)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """Corpus chrF2 (0-100) exactly as `sacrebleu.corpus_chrf(predictions, [references]).score`.

    sacrebleu's defaults: character n-grams up to 6, no word n-grams, beta 2, whitespace ignored. Statistics
    (N, 18): sacrebleu's per-sentence [hyp, ref, match] n-gram counts for each order 1..6, from
    `CHRF._extract_corpus_statistics`. Score: sacrebleu's `CHRF._compute_score_from_stats` of the summed row, the
    F-beta of precision and recall averaged over the n-gram orders (Popović, 2015, "chrF: character n-gram
    F-score for automatic MT evaluation").

    Args:
        predictions: (N,) system outputs.
        references: (N,) one reference per output.

    Raises:
        ValueError: Empty, lengths differ, or a non-string entry.
    """
    return _sacrebleu_metric("chrf", CHRF(), predictions, references)


def _sacrebleu_metric(name: str, scorer, predictions: Sequence[str], references: Sequence[str]) -> Metric:
    """A sacrebleu metric from its per-sentence sufficient statistics, scored by sacrebleu itself."""
    _texts(predictions, references)
    stats = np.array(scorer._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.float64)
    return Metric(name, stats, _row_by_row(lambda row: scorer._compute_score_from_stats(row).score))


def mean(values: Sequence[float] | np.ndarray, name: str = "mean") -> Metric:
    """Plain mean of a value that is already per example (sentence scores, plugin values).

    Statistics (N, 2): [value, 1]; score: sum(value) / N.

    Args:
        values: (N,) finite per-example values.
        name: Name of the measured value, e.g. "rouge1"; paired tests require both sides to share it.

    Raises:
        ValueError: Empty, not 1-D, or non-finite values.
    """
    return Metric(name, _with_ones(_vector(values, "values")), _ratio)


def mean_of_present(values: Sequence[float | None], name: str = "mean") -> Metric:
    """Mean over the examples that have a value (a judge grades some answers, not all).

    Statistics (N, 2): [value, 1] where there is one, [0, 0] where not; score: sum(value) / count. A
    resample holding no graded example scores NaN.

    Args:
        values: (N,) per-example values or None; at least one finite value.
        name: Name of the measured value; paired tests require both sides to share it.

    Raises:
        ValueError: no value at all, or a non-finite one.
    """
    present = [v for v in values if v is not None]
    if not present:
        raise ValueError(f"{name}: no example has a value")
    _vector(present, "values")  # finite numbers
    rows = np.array([[v, 1.0] if v is not None else [0.0, 0.0] for v in values], dtype=np.float64)
    return Metric(name, rows, _ratio)


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------------------------


def _check_bootstrap_args(resamples: int, confidence: float) -> None:
    """Raise ValueError naming the argument unless resamples >= 1 and 0 < confidence < 1."""
    if resamples < 1:
        raise ValueError(f"resamples is {resamples}: the bootstrap needs at least 1 resample (1000 is usual)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}: give a level strictly between 0 and 1, e.g. 0.95")


def resample_indices(n: int, resamples: int, seed: int | None) -> np.ndarray:
    """The (resamples, n) int64 indices of a bootstrap: each row draws n examples with replacement.

    Drawn exactly as sacrebleu draws them (`sacrebleu/significance.py`):
    `np.random.default_rng(seed).choice(n, size=(resamples, n), replace=True)`, so `seed=SACREBLEU_SEED`
    reproduces sacrebleu's resamples. Memory: resamples * n * 8 bytes (80 MB for 1,000 x 10,000).

    Args:
        n: Number of examples N (>= 1).
        resamples: R (>= 1).
        seed: Seed of numpy's default generator (PCG64); None draws fresh entropy from the OS.
    """
    return np.random.default_rng(seed).choice(n, size=(resamples, n), replace=True)


def _resampled_sums(stats: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Column sums of each resample: (N, k) stats and (R, N) indices -> (R, k).

    Row r is sum_i stats[indices[r, i]] = counts[r] @ stats, where counts[r, j] is how often example j was drawn.
    The count matrix is built one block of resamples at a time to bound memory.
    """
    resamples, n = indices.shape
    sums = np.empty((resamples, stats.shape[1]), dtype=np.float64)
    block = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, resamples, block):
        rows = indices[start : start + block]  # (b, N)
        flat = (rows + n * np.arange(rows.shape[0])[:, None]).ravel()  # row-major position in the (b, N) counts
        counts = np.bincount(flat, minlength=rows.size).reshape(rows.shape).astype(np.float64)  # (b, N)
        sums[start : start + block] = counts @ stats
    return sums


def _resampled_scores(metric: Metric, indices: np.ndarray) -> np.ndarray:
    """(R,) corpus values of `metric` on each resample given by (R, N) indices."""
    return np.asarray(metric.score(_resampled_sums(metric.stats, indices)), dtype=np.float64)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile bootstrap interval: the (1 - c)/2 and (1 + c)/2 quantiles of `values`.

    Quantiles interpolate linearly between order statistics (numpy's default, Hyndman & Fan type 7). Efron &
    Tibshirani (1993), "An Introduction to the Bootstrap", ch. 13.
    """
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_interval(
    metric: Metric,
    resamples: int = 1000,
    seed: int | None = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Percentile bootstrap confidence interval of one metric on one run.

    Draws R resamples of the N examples with replacement (`resample_indices`), scores each, and takes the
    (1 - confidence)/2 and (1 + confidence)/2 quantiles of the R values (Efron & Tibshirani, 1993, ch. 13).

    Args:
        metric: The metric with its per-example statistics.
        resamples: R, the number of bootstrap resamples.
        seed: Seed of the resampling generator (see `resample_indices`); the same seed gives the same interval.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        {"value": full-sample value, "low": lower bound, "high": upper bound, "resamples": R}; in the metric's
        units (e.g. BLEU points 0-100, accuracy 0-1).

    Raises:
        ValueError: resamples < 1 or confidence outside (0, 1).
    """
    _check_bootstrap_args(resamples, confidence)
    scores = _resampled_scores(metric, resample_indices(metric.n, resamples, seed))
    low, high = _percentile_interval(scores, confidence)
    return {"value": metric.value(), "low": low, "high": high, "resamples": resamples}


def _check_paired(candidate: Metric, baseline: Metric) -> None:
    """Raise ValueError unless both metrics measure the same thing on the same N examples."""
    if candidate.name != baseline.name:
        raise ValueError(
            f"paired_bootstrap compares one metric on two systems, got candidate {candidate.name!r} and "
            f"baseline {baseline.name!r}; build both with the same function"
        )
    if candidate.n != baseline.n:
        raise ValueError(
            f"paired_bootstrap needs the same examples for both systems, got {candidate.n} candidate and "
            f"{baseline.n} baseline examples; score both systems on the same test set, in the same order"
        )
    if candidate.stats.shape != baseline.stats.shape:
        raise ValueError(
            f"candidate and baseline {candidate.name!r} statistics differ in shape ({candidate.stats.shape} vs "
            f"{baseline.stats.shape}); for macro_f1, pass the same num_classes to both"
        )


def sacrebleu_p_value(resampled_differences: np.ndarray, observed_difference: float) -> float:
    """p-value of sacrebleu's paired bootstrap test (`sacrebleu/significance.py`, `_paired_bs_test`).

    The null hypothesis is that the two systems are equal (the same underlying process). With d_r the resampled
    differences (candidate - baseline) and d the full-sample difference:

        s_r = |d_r| - mean_r |d_r|              (absolute differences, shifted to mean 0 under the null)
        p   = (#{r : s_r > |d|} + 1) / (R + 1)

    the shift-to-the-null bootstrap of Riezler & Maxwell (2005), as in Moses'
    `bootstrap-hypothesis-difference-significance.pl`, with the +1 of Davison & Hinkley so that p >= 1/(R + 1).
    The comparison is strict, as in sacrebleu: two identical systems (every d_r = d = 0) get p = 1/(R + 1), not 1,
    so check the difference before reading p when it is exactly 0.

    Args:
        resampled_differences: (R,) d_r, in the metric's units.
        observed_difference: d on the full sample (its sign is ignored).

    Returns:
        p in [1/(R + 1), 1].
    """
    magnitudes = np.abs(resampled_differences)
    shifted = magnitudes - magnitudes.mean()
    exceed = int(np.sum(shifted > abs(observed_difference)))
    return (exceed + 1) / (len(resampled_differences) + 1)


def paired_bootstrap(
    candidate: Metric,
    baseline: Metric,
    resamples: int = 1000,
    seed: int | None = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap comparison of two systems scored on the same examples (Koehn, 2004).

    Both systems are scored on the same R resamples of the N example indices (`resample_indices`), so the
    per-example pairing is kept. The interval is the percentile interval of the R resampled differences
    (candidate - baseline); the p-value is sacrebleu's, defined in `sacrebleu_p_value`.

    With `seed=SACREBLEU_SEED` and BLEU or chrF metrics this reproduces `sacrebleu REF -i BASELINE CANDIDATE
    --paired-bs --paired-bs-n R`: the same indices and the same p-value. (sacrebleu sums the statistics in
    float32, this code in float64, so resampled scores agree to ~1e-5 points; the p-value, a count of resamples
    past a threshold, is identical unless a resample falls within that distance of the threshold.)

    Args:
        candidate: The system under test.
        baseline: The system it is compared to; same metric name and the same N examples in the same order.
        resamples: R, the number of bootstrap resamples (sacrebleu's default is 1000).
        seed: Seed of the resampling generator; `SACREBLEU_SEED` (12345) for sacrebleu's resamples.
        confidence: Coverage of the interval of the difference, in (0, 1).

    Returns:
        {"candidate": full-sample candidate value, "baseline": full-sample baseline value,
        "difference": candidate - baseline on the full sample, "low"/"high": interval of the difference,
        "p_value": two-sided p-value of "the systems are equal", "resamples": R}; values in the metric's units.

    Raises:
        ValueError: The metrics differ in name or number of examples, resamples < 1, or confidence outside (0, 1).
    """
    _check_paired(candidate, baseline)
    _check_bootstrap_args(resamples, confidence)
    indices = resample_indices(candidate.n, resamples, seed)
    differences = _resampled_scores(candidate, indices) - _resampled_scores(baseline, indices)  # (R,)
    candidate_value, baseline_value = candidate.value(), baseline.value()
    low, high = _percentile_interval(differences, confidence)
    return {
        "candidate": candidate_value,
        "baseline": baseline_value,
        "difference": candidate_value - baseline_value,
        "low": low,
        "high": high,
        "p_value": sacrebleu_p_value(differences, candidate_value - baseline_value),
        "resamples": resamples,
    }


# ---------------------------------------------------------------------------------------------------------------
# Across runs: seeds, groups of runs, families of tests
# ---------------------------------------------------------------------------------------------------------------


def seed_summary(values: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Mean of runs that differ only in seed, with a Student t confidence interval.

    low/high = mean -/+ t_{(1 + confidence)/2, n - 1} * std / sqrt(n), std with ddof=1 (the sample standard
    deviation); the usual interval for a mean with unknown variance, assuming roughly normal run-to-run noise.

    Args:
        values: One final value per run (n >= 1), in the metric's units.
        confidence: Coverage of the interval, in (0, 1).

    Returns:
        {"n", "mean", "std", "low", "high"}. With n = 1 there is no spread to estimate: std, low and high are NaN.

    Raises:
        ValueError: No values, non-finite values, or confidence outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence is {confidence}: give a level strictly between 0 and 1, e.g. 0.95")
    array = _vector(values, "values")
    n = array.size
    center = float(array.mean())
    if n == 1:
        return {"n": 1, "mean": center, "std": math.nan, "low": math.nan, "high": math.nan}
    std = float(array.std(ddof=1))
    half_width = float(scipy.stats.t.ppf((1 + confidence) / 2, df=n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": center, "std": std, "low": center - half_width, "high": center + half_width}


def welch_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Welch's unequal-variance t-test of mean(a) = mean(b), e.g. two configurations over several seeds each.

    t = (mean_a - mean_b) / sqrt(v_a/n_a + v_b/n_b) with sample variances v (ddof=1); degrees of freedom by
    Welch–Satterthwaite: df = (v_a/n_a + v_b/n_b)^2 / ((v_a/n_a)^2/(n_a - 1) + (v_b/n_b)^2/(n_b - 1)) (Welch,
    1947; Satterthwaite, 1946). Computed by `scipy.stats.ttest_ind(a, b, equal_var=False)`.

    Args:
        a: Values of the first group (>= 2).
        b: Values of the second group (>= 2).

    Returns:
        {"difference": mean(a) - mean(b), "t", "df", "p_value": two-sided}. If both groups have zero variance,
        t, df and p_value are NaN (scipy's result).

    Raises:
        ValueError: A group with fewer than 2 values, or non-finite values.
    """
    first, second = _vector(a, "a"), _vector(b, "b")
    for name, group in (("a", first), ("b", second)):
        if group.size < 2:
            raise ValueError(f"{name} has {group.size} value(s): Welch's test needs at least 2 per group")
    result = scipy.stats.ttest_ind(first, second, equal_var=False)
    return {
        "difference": float(first.mean() - second.mean()),
        "t": float(result.statistic),
        "df": float(result.df),
        "p_value": float(result.pvalue),
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order (Holm, 1979).

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted values are
    p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)): the step-down multiplier, made monotone by the running
    maximum and capped at 1. Rejecting where p~ <= alpha controls the family-wise error rate at alpha.

    Args:
        p_values: The m raw p-values, each in [0, 1]; an empty sequence gives [].

    Returns:
        m adjusted p-values, each >= its raw value, in the order given.

    Raises:
        ValueError: A p-value outside [0, 1] or NaN.
    """
    raw = np.asarray(p_values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~((raw >= 0) & (raw <= 1)))
    if bad.size:
        raise ValueError(f"p_values[{bad[0]}] is {raw[bad[0]]}: p-values lie in [0, 1]")
    m = raw.size
    order = np.argsort(raw, kind="stable")
    stepped = (m - np.arange(m)) * raw[order]  # (m - j + 1) p_(j) for j = 1..m
    adjusted = np.minimum(1.0, np.maximum.accumulate(stepped))
    result = np.empty(m, dtype=np.float64)
    result[order] = adjusted
    return result.tolist()
