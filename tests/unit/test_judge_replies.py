"""Reading a judge's reply: JSON in its usual wrappings, "criterion: grade" lines, and the replies
that must count as unparsable."""

import json

import pytest

from lmforge.eval.judge import judge_messages, metric_name, parse_grades

CRITERIA = ["relevance", "completeness", "clarity"]
ALL_FOUR = {"judge_relevance": 4.0, "judge_completeness": 3.0, "judge_clarity": 5.0}


@pytest.mark.parametrize(
    "reply",
    [
        '{"relevance": 4, "completeness": 3, "clarity": 5}',
        "Relevance (1-5): 4\nCompleteness (1-5): 3\nClarity (1-5): 5",
        "**Relevance** (out of 5): 4\n**Completeness** (out of 5): 3\n**Clarity** (out of 5): 5",
        '  {"Relevance": 4, "COMPLETENESS": 3, "clarity": 5}\n',
        '```json\n{"relevance": 4, "completeness": 3, "clarity": 5}\n```',
        'Here are my grades:\n{"relevance": 4, "completeness": 3, "clarity": 5}\nThe answer is fine.',
        '{"relevance": "4", "completeness": "3/5", "clarity": 5.0}',
        '{"relevance": {"score": 4, "why": "on topic"}, "completeness": {"score": 3}, "clarity": {"grade": 5}}',
        '{"grades": "below", "x": 1} then {"relevance": 4, "completeness": 3, "clarity": 5}',
        "relevance: 4\ncompleteness: 3\nclarity: 5",
        "**Relevance**: 4/5\n**Completeness** - 3\n- Clarity = 5 (very clear)",
        "Relevance score: 4. Completeness score: 3. Clarity score: 5.",
        '{"relevance": 4, "completeness": 3}\nclarity: 5',
    ],
)
def test_replies_that_grade_every_criterion(reply):
    assert parse_grades(reply, CRITERIA) == ALL_FOUR


@pytest.mark.parametrize(
    "reply",
    [
        None,
        "",
        "The answer is good.",
        '{"relevance": 4, "completeness": 3}',  # a criterion missing
        '{"relevance": 4, "completeness": 3, "clarity": 9}',  # out of 1-5
        '{"relevance": 0, "completeness": 3, "clarity": 5}',
        '{"relevance": true, "completeness": 3, "clarity": 5}',
        '{"relevance": "good", "completeness": 3, "clarity": 5}',
        "relevance: high\ncompleteness: 3\nclarity: 5",
        " + + + + + 1 carried 8 + ",  # what a tiny model says
        "[4, 3, 5]",
        "relevance: -3\ncompleteness: 3\nclarity: 5",  # signed
        "Relevance: 4/10\ncompleteness: 3\nclarity: 5",  # another scale
        '{"relevance": "5/10", "completeness": 3, "clarity": 5}',
    ],
)
def test_replies_that_are_unparsable(reply):
    assert parse_grades(reply, CRITERIA) is None


def test_criteria_of_several_words_and_their_metric_names():
    criteria = ["Factual accuracy", "tone"]
    assert [metric_name(c) for c in criteria] == ["judge_factual_accuracy", "judge_tone"]
    assert parse_grades('{"factual_accuracy": 2, "Tone": 1}', criteria) == {
        "judge_factual_accuracy": 2.0,
        "judge_tone": 1.0,
    }
    assert parse_grades("Factual accuracy: 2\nTone: 1", criteria) == {"judge_factual_accuracy": 2.0, "judge_tone": 1.0}


def test_the_request_holds_the_question_the_reference_and_the_answer():
    row = {"input": "Spell cat:\n", "reference": "c a t", "prediction": "c a"}
    system, user = judge_messages(row, CRITERIA)
    assert system["role"] == "system" and "1 (poor) to 5 (excellent)" in system["content"]
    assert user["role"] == "user"
    for part in ("Question:\nSpell cat:\n", "Reference answer:\nc a t", "Answer to grade:\nc a"):
        assert part in user["content"]
    example = user["content"].rsplit("such as ", 1)[1].rstrip(".")
    assert json.loads(example) == {"relevance": 3, "completeness": 3, "clarity": 3}
