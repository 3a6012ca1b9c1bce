"""lmforge.results.stats: metrics as additive statistics, bootstrap, sacrebleu's paired test, seeds, Welch, Holm."""

import inspect
import json
import math
import os
import random
import re
import string
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import scipy.stats
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.significance import PairedTest

from lmforge.results import stats

RESAMPLES = 1000


def _reference_sentences(count: int = 150) -> list[str]:
    """Real English: sentences of the docstrings of a few standard-library modules, in a fixed order."""
    sentences = []
    for module in (textwrap, json, string, os.path, inspect):
        for _, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None)
            if not (callable(obj) and doc and getattr(obj, "__module__", "") == module.__name__):
                continue
            for sentence in doc.replace("\n", " ").split(". "):
                words = sentence.split()
                if 6 <= len(words) <= 40:
                    sentences.append(" ".join(words))
    assert len(sentences) >= count
    return sentences[:count]


def _garble(sentences: list[str], drop: float, seed: int) -> list[str]:
    """A system output: each word dropped with probability `drop`, neighbours swapped with probability drop/2."""
    rng = random.Random(seed)
    outputs = []
    for sentence in sentences:
        words = [w for w in sentence.split() if rng.random() > drop]
        for i in range(len(words) - 1):
            if rng.random() < drop / 2:
                words[i], words[i + 1] = words[i + 1], words[i]
        outputs.append(" ".join(words))
    return outputs


@pytest.fixture(scope="module")
def systems() -> tuple[list[str], list[str], list[str]]:
    """(references, baseline, candidate); the candidate is garbled less: +0.8 BLEU (p 0.27), +1.4 chrF (p 0.12)."""
    references = _reference_sentences()
    return references, _garble(references, drop=0.2, seed=0), _garble(references, drop=0.18, seed=1)


def _sacrebleu_cli_paired_bs(tmp_path: Path, references: list[str], baseline: list[str], candidate: list[str]) -> str:
    """Stdout of `sacrebleu REF -i BASELINE CANDIDATE --paired-bs` with BLEU and chrF, 6 decimals, plain text."""
    for name, lines in (("ref", references), ("base", baseline), ("cand", candidate)):
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # No SACREBLEU_* overrides from the environment: default seed 12345, the format asked for here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SACREBLEU")}
    command = [sys.executable, "-m", "sacrebleu", "ref.txt", "-i", "base.txt", "cand.txt"]
    command += ["--paired-bs", "--paired-bs-n", str(RESAMPLES), "-m", "bleu", "chrf", "-f", "text", "-w", "6", "-nc"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=120)
    return done.stdout


def _parse_cli(stdout: str) -> dict[str, dict[str, str]]:
    """{"bleu"|"chrf": {"baseline": score, "candidate": score, "p_value": p}} as the printed strings.

    The table prints each system's row as `score (mean ± ci)` per metric column, and the candidate's p-value on
    the next line as `(p = 0.2717)`.
    """
    baseline_row = re.search(r"Baseline: base\.txt(.*)$", stdout, re.MULTILINE).group(1)
    candidate_row = re.search(r"cand\.txt(.*)$", stdout, re.MULTILINE).group(1)
    baseline_scores = re.findall(r"([\d.]+) \(", baseline_row)
    candidate_scores = re.findall(r"([\d.]+) \(", candidate_row)
    p_values = re.findall(r"\(p = ([\d.]+)\)", stdout)
    assert len(baseline_scores) == len(candidate_scores) == len(p_values) == 2, stdout
    return {
        metric: {"baseline": baseline_scores[i], "candidate": candidate_scores[i], "p_value": p_values[i]}
        for i, metric in enumerate(("bleu", "chrf"))
    }


def test_paired_bootstrap_reproduces_sacrebleu_cli(tmp_path, systems):
    """BLEU and chrF paired bootstrap against `sacrebleu --paired-bs` (1000 resamples, its default seed).

    Tolerance: none beyond what the CLI prints. Scores are printed with 6 decimals (`-w 6`) and ours are the same
    float64 computation as sacrebleu's corpus score, so the formatted strings must be equal. The p-value is
    (c + 1) / 1001 for an integer count c; consecutive values are 1/1001 > 1e-4 apart, so the 4 printed decimals
    determine c, and equal strings mean the same count, i.e. the same p-value exactly. That holds because
    `seed=SACREBLEU_SEED` draws the very indices sacrebleu draws; the only numerical difference (sacrebleu sums
    statistics in float32, we in float64, ~1e-5 points) is checked below to be far from flipping any count.
    """
    references, baseline, candidate = systems
    printed = _parse_cli(_sacrebleu_cli_paired_bs(tmp_path, references, baseline, candidate))
    for name, build in (("bleu", stats.bleu), ("chrf", stats.chrf)):
        ours = stats.paired_bootstrap(
            build(candidate, references), build(baseline, references), resamples=RESAMPLES, seed=stats.SACREBLEU_SEED
        )
        assert f"{ours['baseline']:.6f}" == printed[name]["baseline"]
        assert f"{ours['candidate']:.6f}" == printed[name]["candidate"]
        assert f"{ours['p_value']:.4f}" == printed[name]["p_value"]
    # Pin the data so that the comparison is not vacuous: a real gap, p neither tiny nor large.
    assert printed["bleu"]["p_value"] == "0.2717"
    assert printed["chrf"]["p_value"] == "0.1239"


def test_paired_bootstrap_matches_sacrebleu_api_exactly(systems):
    """The same comparison through sacrebleu's Python API, which keeps full precision: the p-values are equal
    floats, and no resampled statistic lies within 1e-4 of sacrebleu's threshold (float32 noise is ~1e-5), so the
    equality does not rest on luck."""
    references, baseline, candidate = systems
    _, scores = PairedTest(
        [("baseline", baseline), ("candidate", candidate)],
        {"BLEU": BLEU()},
        [references],
        test_type="bs",
        n_samples=RESAMPLES,
    )()
    theirs = scores["BLEU"][1]
    ours_candidate, ours_baseline = stats.bleu(candidate, references), stats.bleu(baseline, references)
    ours = stats.paired_bootstrap(ours_candidate, ours_baseline, resamples=RESAMPLES, seed=stats.SACREBLEU_SEED)
    assert ours["candidate"] == theirs.score
    assert ours["p_value"] == theirs.p_value

    indices = stats.resample_indices(len(references), RESAMPLES, stats.SACREBLEU_SEED)
    candidate_sums = stats._resampled_sums(ours_candidate.stats, indices)  # (R, 10) summed BLEU statistics
    resampled_candidate = ours_candidate.score(candidate_sums)
    differences = resampled_candidate - ours_baseline.score(stats._resampled_sums(ours_baseline.stats, indices))
    shifted = np.abs(differences) - np.abs(differences).mean()
    assert np.min(np.abs(shifted - abs(ours["difference"]))) > 1e-4
    # sacrebleu's bootstrap mean of the candidate over the same resamples (float32 sums: 1e-5 tolerance).
    assert resampled_candidate.mean() == pytest.approx(theirs.mean, abs=1e-5)


def test_full_sample_bleu_and_chrf_equal_sacrebleu(systems):
    references, _, candidate = systems
    assert stats.bleu(candidate, references).value() == sacrebleu.corpus_bleu(candidate, [references]).score
    assert stats.chrf(candidate, references).value() == sacrebleu.corpus_chrf(candidate, [references]).score
    # Statistics are per sentence: scoring one row alone is that sentence's corpus BLEU of one sentence.
    one = stats.bleu(candidate[:1], references[:1])
    assert one.value() == sacrebleu.corpus_bleu(candidate[:1], [references[:1]]).score


def _loop_paired_bootstrap(candidate: np.ndarray, baseline: np.ndarray, resamples: int, seed: int) -> dict:
    """An independent, plain paired bootstrap of accuracy: explicit indices, one resample at a time."""
    rng = np.random.default_rng(seed)
    indices = rng.choice(len(candidate), size=(resamples, len(candidate)), replace=True)
    differences = []
    for row in indices:
        differences.append(sum(candidate[i] for i in row) / len(row) - sum(baseline[i] for i in row) / len(row))
    differences = np.array(differences)
    observed = candidate.mean() - baseline.mean()
    magnitudes = np.abs(differences)
    exceed = sum(1 for m in magnitudes if m - magnitudes.mean() > abs(observed))
    low, high = np.quantile(differences, [0.025, 0.975])
    return {"difference": observed, "low": low, "high": high, "p_value": (exceed + 1) / (resamples + 1)}


def test_vectorised_paired_bootstrap_equals_a_plain_loop():
    rng = np.random.default_rng(7)
    candidate = (rng.random(80) < 0.7).astype(float)
    baseline = (rng.random(80) < 0.6).astype(float)
    expected = _loop_paired_bootstrap(candidate, baseline, resamples=500, seed=3)
    ours = stats.paired_bootstrap(stats.accuracy(candidate), stats.accuracy(baseline), resamples=500, seed=3)
    # Sums of 0/1 values are exact integers in both, so the numbers are identical, not merely close.
    assert ours["difference"] == expected["difference"]
    assert ours["low"] == expected["low"]
    assert ours["high"] == expected["high"]
    assert ours["p_value"] == expected["p_value"]
    assert 0 < ours["p_value"] < 1 and ours["low"] < ours["difference"] < ours["high"]


def test_bootstrap_of_degenerate_cases_by_hand():
    # Candidate right everywhere, baseline wrong everywhere: every resample differs by exactly 1, the shifted
    # statistics are all 0 and none exceeds |d| = 1, so p = (0 + 1) / (R + 1).
    result = stats.paired_bootstrap(stats.accuracy([True] * 5), stats.accuracy([False] * 5), resamples=99)
    assert (result["difference"], result["low"], result["high"]) == (1.0, 1.0, 1.0)
    assert result["p_value"] == 1 / 100
    # sacrebleu's strict '>' also gives identical systems p = 1/(R + 1) (documented in sacrebleu_p_value).
    same = stats.paired_bootstrap(stats.accuracy([1, 0, 1]), stats.accuracy([1, 0, 1]), resamples=99)
    assert (same["difference"], same["low"], same["high"], same["p_value"]) == (0.0, 0.0, 0.0, 1 / 100)
    # One example: every resample is that example.
    single = stats.bootstrap_interval(stats.mean([0.25]), resamples=10)
    assert single == {"value": 0.25, "low": 0.25, "high": 0.25, "resamples": 10}


def test_bootstrap_interval_of_two_examples_against_the_binomial():
    # Two examples, correct and wrong: a resample's accuracy is k/2 with k ~ Binomial(2, 1/2), i.e. 0, 0.5, 1
    # with probabilities 1/4, 1/2, 1/4. With 20,000 resamples the empirical frequencies are within 0.01 of that.
    metric = stats.accuracy([1, 0])
    indices = stats.resample_indices(2, 20_000, seed=0)
    values = metric.score(stats._resampled_sums(metric.stats, indices))
    frequencies = [np.mean(values == v) for v in (0.0, 0.5, 1.0)]
    assert frequencies == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    interval = stats.bootstrap_interval(metric, resamples=20_000, confidence=0.9)
    assert (interval["value"], interval["low"], interval["high"]) == (0.5, 0.0, 1.0)


def test_seed_summary_is_scipys_t_interval():
    values = [61.2, 59.8, 60.5, 62.1, 60.9]
    summary = stats.seed_summary(values, confidence=0.9)
    low, high = scipy.stats.t.interval(0.9, df=4, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert summary["n"] == 5
    assert summary["mean"] == pytest.approx(60.9)
    assert summary["std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["low"] == pytest.approx(low) and summary["high"] == pytest.approx(high)

    alone = stats.seed_summary([3.0])
    assert alone["n"] == 1 and alone["mean"] == 3.0
    assert math.isnan(alone["std"]) and math.isnan(alone["low"]) and math.isnan(alone["high"])


def test_welch_against_scipy_and_by_hand():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0]
    result = stats.welch_test(a, b)
    scipy_result = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert result["t"] == pytest.approx(scipy_result.statistic)
    assert result["p_value"] == pytest.approx(scipy_result.pvalue)
    # By hand: means 2.5 and 6; variances 5/3 and 10; v/n = 5/12 and 2.
    # t = -3.5 / sqrt(29/12); df = (29/12)^2 / ((5/12)^2 / 3 + 2^2 / 4) = (841/144) / (25/432 + 1) = 2523/457.
    assert result["difference"] == -3.5
    assert result["t"] == pytest.approx(-3.5 / math.sqrt(29 / 12))
    assert result["df"] == pytest.approx(2523 / 457)
    assert result["p_value"] == pytest.approx(2 * scipy.stats.t.sf(3.5 / math.sqrt(29 / 12), 2523 / 457))


def test_holm_by_hand():
    # Sorted: 0.005, 0.01, 0.03, 0.04 -> times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max: 0.02, 0.03,
    # 0.06, 0.06; back in input order (0.01, 0.04, 0.03, 0.005):
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Capped at 1: 2 * 0.6 = 1.2 -> 1, and the larger p inherits it.
    assert stats.holm([0.9, 0.6]) == [1.0, 1.0]
    assert stats.holm([0.2]) == [0.2]
    assert stats.holm([]) == []


def test_macro_f1_agrees_with_the_evaluators_confusion_matrix():
    from lmforge.eval.evaluate import macro_f1 as confusion_macro_f1

    rng = np.random.default_rng(0)
    num_classes = 6  # class 5 never occurs in labels or predictions: left out of the mean by both
    true_ids = rng.integers(0, 5, size=200)
    predicted_ids = np.where(rng.random(200) < 0.6, true_ids, rng.integers(0, 5, size=200))
    predicted_ids[:3] = 4  # make sure a class can be predicted more often than it occurs
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true_ids, predicted_ids, strict=True):
        confusion[t][p] += 1
    ours = stats.macro_f1(true_ids, predicted_ids, num_classes)
    assert ours.value() == pytest.approx(confusion_macro_f1(confusion), rel=1e-12)
    assert ours.stats.shape == (200, 3 * num_classes)
    # A tiny case by hand: true [0, 0, 1], predicted [0, 1, 1]: F1_0 = 2*1/(1+2) = 2/3, F1_1 = 2*1/(2+1) = 2/3.
    assert stats.macro_f1([0, 0, 1], [0, 1, 1], 3).value() == pytest.approx(2 / 3)


def test_mean_loss_is_token_weighted():
    metric = stats.mean_loss([2.0, 30.0], [1, 10])
    assert metric.value() == pytest.approx(32 / 11)  # not the mean of per-example means (2 + 3) / 2 = 2.5
    assert metric.higher_is_better is False
    assert stats.exact_match([True, False, True, True]).value() == 0.75
    assert stats.accuracy(np.array([1, 0, 0, 0])).value() == 0.25
    assert stats.mean([1.0, 2.0, 6.0], name="rouge1").value() == 3.0


def test_paired_bootstrap_rejects_different_examples():
    with pytest.raises(ValueError, match="same examples for both systems, got 3 candidate and 2 baseline"):
        stats.paired_bootstrap(stats.accuracy([1, 0, 1]), stats.accuracy([1, 0]))
    with pytest.raises(ValueError, match="got candidate 'accuracy' and baseline 'mean_loss'"):
        stats.paired_bootstrap(stats.accuracy([1, 0]), stats.mean_loss([1.0, 2.0], [1, 1]))
    with pytest.raises(ValueError, match="same num_classes"):
        stats.paired_bootstrap(stats.macro_f1([0, 1], [0, 1], 2), stats.macro_f1([0, 1], [0, 1], 3))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: stats.accuracy([]), "correct is empty"),
        (lambda: stats.mean([]), "values is empty"),
        (lambda: stats.mean_loss([], []), "loss_sums is empty"),
        (lambda: stats.macro_f1([], [], 3), "true_ids is empty"),
        (lambda: stats.bleu([], []), "predictions and references are empty"),
        (lambda: stats.chrf([], []), "predictions and references are empty"),
        (lambda: stats.seed_summary([]), "values is empty"),
        (lambda: stats.welch_test([1.0], [1.0, 2.0]), "a has 1 value"),
        (lambda: stats.bleu(["a b"], ["a b", "c d"]), "got 1 and 2"),
        (lambda: stats.accuracy([1, 2]), r"correct\[1\] is 2.0"),
        (lambda: stats.mean_loss([1.0], [0]), "at least one target token"),
        (lambda: stats.macro_f1([0, 3], [0, 1], 3), r"true_ids\[1\] is 3.0: class ids must be integers in \[0, 3\)"),
        (lambda: stats.holm([0.5, 1.5]), r"p_values\[1\] is 1.5"),
        (lambda: stats.bootstrap_interval(stats.accuracy([1]), resamples=0), "resamples is 0"),
        (lambda: stats.bootstrap_interval(stats.accuracy([1]), confidence=95), "confidence is 95"),
        (lambda: stats.Metric("x", np.zeros((0, 2)), lambda s: s[..., 0]), "N >= 1 examples"),
    ],
)
def test_bad_inputs_raise_clear_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()
