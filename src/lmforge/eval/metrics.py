"""Metrics of generated text against references: exact match, BLEU and chrF (sacrebleu), ROUGE
(rouge-score), and the signs of a degenerate answer."""

from __future__ import annotations

import re
from collections import Counter


def normalize(text: str) -> str:
    """Whitespace-collapsed, stripped: what exact match compares."""
    return " ".join(text.split())


def sentence_scores(prediction: str, reference: str) -> dict[str, float]:
    """Per-example generation scores: exact match (whitespace-collapsed), sentence BLEU and chrF
    (sacrebleu, 0-100; BLEU with sacrebleu's sentence smoothing), ROUGE-1/2/L F1 (rouge-score,
    stemmed, 0-1)."""
    import sacrebleu

    rouge = _rouge().score(reference, prediction)
    return {
        "exact_match": float(normalize(prediction) == normalize(reference)),
        "bleu": sacrebleu.sentence_bleu(prediction, [reference]).score,
        "chrf": sacrebleu.sentence_chrf(prediction, [reference]).score,
        "rouge1": rouge["rouge1"].fmeasure,
        "rouge2": rouge["rouge2"].fmeasure,
        "rougeL": rouge["rougeL"].fmeasure,
    }


_scorer = None


def _rouge():
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return _scorer


def generation_summary(rows: list[dict]) -> dict[str, float]:
    """Corpus metrics of greedy answers: BLEU and chrF over the corpus (sacrebleu's sums of
    n-gram statistics, not the mean of sentence scores), exact match and ROUGE as means of the
    per-example scores, and the counts of empty, truncated and repetitive answers."""
    import sacrebleu

    predictions, references = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    n = len(rows)
    return {
        "exact_match": sum(r["scores"]["exact_match"] for r in rows) / n,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        **{k: sum(r["scores"][k] for r in rows) / n for k in ("rouge1", "rouge2", "rougeL")},
        "empty": sum(r["empty"] for r in rows),
        "truncated": sum(r["truncated"] for r in rows),
        "repetitive": sum(r["repetitive"] for r in rows),
        "examples": n,
    }


def is_repetitive(text: str, n: int = 3, times: int = 3) -> bool:
    """Whether an answer loops: some word n-gram (3 words) occurs `times` (3) times or more and
    fewer than half of its n-grams are distinct (a loose version of the repetition rate of Welleck
    et al. (2019), "Neural text degeneration with unlikelihood training"), or, without words to
    count, a unit of 1-8 characters repeats 10 times running ("................", "abababab...")."""
    if _LOOP.search("".join(text.split())):
        return True
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return False
    most = Counter(grams).most_common(1)[0][1]
    return most >= times and len(set(grams)) < len(grams) / 2


_LOOP = re.compile(r"(.{1,8}?)\1{9,}", re.DOTALL)
