import pytest
import sacrebleu

from lmforge.eval.metrics import generation_metrics


def test_generation_metrics_on_known_fixtures():
    predictions = ["the cat sat on the mat", "a quick brown fox"]
    references = ["the cat sat on the mat", "the quick brown fox jumps"]
    m = generation_metrics(predictions, references)
    assert m["exact_match"] == 0.5
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    # ROUGE-1 by hand: the first pair is identical (F1 1); the second shares quick, brown, fox:
    # precision 3/4, recall 3/5, F1 2/3
    assert m["rouge1"] == pytest.approx((1 + 2 / 3) / 2)
    # ROUGE-2: identical pair 1; "quick brown", "brown fox" shared of 3 and 4 bigrams: F1 2*(2/3*2/4)/(2/3+2/4)
    assert m["rouge2"] == pytest.approx((1 + 2 * (2 / 3 * 2 / 4) / (2 / 3 + 2 / 4)) / 2)
    assert m["examples"] == 2


def test_exact_match_ignores_whitespace_only():
    assert generation_metrics(["  m o s e s \n"], ["m o s e s"])["exact_match"] == 1.0
    assert generation_metrics(["Moses"], ["moses"])["exact_match"] == 0.0
    same = "in the beginning god created the heaven"
    assert generation_metrics([same], [same])["bleu"] == pytest.approx(100.0)
