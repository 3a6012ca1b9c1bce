import pytest
import sacrebleu

from lmforge.eval.metrics import generation_summary, is_repetitive, sentence_scores


def summary(predictions, references):
    rows = [
        {"prediction": p, "reference": r, "scores": sentence_scores(p, r), "empty": not p.strip(), "truncated": False}
        | {"repetitive": is_repetitive(p)}
        for p, r in zip(predictions, references, strict=True)
    ]
    return generation_summary(rows)


def test_generation_metrics_on_known_fixtures():
    predictions = ["the cat sat on the mat", "a quick brown fox"]
    references = ["the cat sat on the mat", "the quick brown fox jumps"]
    m = summary(predictions, references)
    assert m["exact_match"] == 0.5
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    # ROUGE-1 by hand: the first pair is identical (F1 1); the second shares quick, brown, fox:
    # precision 3/4, recall 3/5, F1 2/3
    assert m["rouge1"] == pytest.approx((1 + 2 / 3) / 2)
    # ROUGE-2: identical pair 1; "quick brown", "brown fox" shared of 3 and 4 bigrams: F1 2*(2/3*2/4)/(2/3+2/4)
    assert m["rouge2"] == pytest.approx((1 + 2 * (2 / 3 * 2 / 4) / (2 / 3 + 2 / 4)) / 2)
    assert m["examples"] == 2 and m["empty"] == 0 and m["repetitive"] == 0


def test_sentence_scores_of_one_pair():
    scores = sentence_scores("a quick brown fox", "the quick brown fox jumps")
    assert scores["bleu"] == pytest.approx(
        sacrebleu.sentence_bleu("a quick brown fox", ["the quick brown fox jumps"]).score
    )
    assert scores["rouge1"] == pytest.approx(2 / 3) and scores["exact_match"] == 0.0


def test_exact_match_ignores_whitespace_only():
    assert summary(["  m o s e s \n"], ["m o s e s"])["exact_match"] == 1.0
    assert summary(["Moses"], ["moses"])["exact_match"] == 0.0
    same = "in the beginning god created the heaven"
    assert summary([same], [same])["bleu"] == pytest.approx(100.0)


def test_repetitive_answers():
    assert is_repetitive("and the lord and the lord and the lord and the lord")
    assert not is_repetitive("a b r a h a m")  # letters repeat; no 3-word phrase loops
    assert not is_repetitive("in the beginning god created the heaven and the earth")
    assert summary(["", "x"], ["a", "x"])["empty"] == 1


def test_character_loops_are_repetitive():
    assert is_repetitive("................")
    assert is_repetitive("ab" * 12)
    assert not is_repetitive("1000000")  # seven zeros: a number, not a loop
