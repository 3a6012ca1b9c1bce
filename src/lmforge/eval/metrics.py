"""Metrics of generated text against references: exact match, BLEU (sacrebleu), ROUGE (rouge-score)."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Whitespace-collapsed, stripped: what exact match compares."""
    return " ".join(text.split())


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu's default 13a tokenisation), mean ROUGE-1/2/L F1 (stemmed), exact match."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not predictions:
        return {}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    n = len(predictions)
    return {
        "exact_match": sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True)) / n,
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "rouge1": sum(s["rouge1"].fmeasure for s in rouge) / n,
        "rouge2": sum(s["rouge2"].fmeasure for s in rouge) / n,
        "rougeL": sum(s["rougeL"].fmeasure for s in rouge) / n,
        "examples": n,
    }
