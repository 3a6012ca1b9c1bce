"""LLM-judged quality of generated answers (`eval.judge`): an OpenAI-compatible endpoint grades each
greedy answer against its reference on each criterion from 1 (poor) to 5 (excellent).

The judge is asked for a JSON object ({"relevance": 4, ...}); a reply is read as one (inside a
code fence or prose too), else as "relevance: 4" lines. A reply that does not grade every criterion
within 1-5 is counted as unparsable, a request that fails (network, HTTP error, timeout) as failed;
neither stops the evaluation. Per-example grades become scores judge_<criterion>, their means the
generation metrics judge_<criterion>.

The API key comes from the environment variable eval.judge.api_key_env and goes nowhere but the
request's Authorization header: not into eval.json, predictions.jsonl or any message.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lmforge.config import JudgeConfig
from lmforge.secrets import REDACTED, redact_text

LOWEST, HIGHEST = 1, 5
INSTRUCTIONS = (
    "You grade answers to questions. Compare the answer with the reference answer and grade it on each "
    "criterion from 1 (poor) to 5 (excellent). Reply with a JSON object only, one integer per criterion."
)
TEXT_CHARS = 4000
"""Each of the question, the reference and the answer is sent up to this many characters."""


@dataclass
class JudgeResult:
    """What grading found: counts for eval.json, means for the generation metrics."""

    graded: int = 0
    unparsable: int = 0
    failed: int = 0
    model: str = ""
    means: dict[str, float] = field(default_factory=dict)
    """judge_<criterion> -> mean grade over the graded answers."""

    def counts(self) -> dict[str, Any]:
        """eval.json's judge entry: {graded, unparsable, failed, model}."""
        return {"graded": self.graded, "unparsable": self.unparsable, "failed": self.failed, "model": self.model}


def metric_name(criterion: str) -> str:
    """The metric (and per-example score) of a criterion: judge_ and its words joined by
    underscores ("Factual accuracy" -> judge_factual_accuracy)."""
    return "judge_" + _key(criterion)


def _key(name: str) -> str:
    return re.sub(r"\W+", "_", name.strip().lower()).strip("_")


def judge_messages(row: dict[str, Any], criteria: list[str]) -> list[dict[str, str]]:
    """The chat messages that ask the judge to grade one predictions row (input, reference,
    prediction) on `criteria`."""
    example = json.dumps({_key(c): 3 for c in criteria})
    grading = (
        f"Question:\n{row.get('input', '')[:TEXT_CHARS]}\n\n"
        f"Reference answer:\n{(row.get('reference') or '')[:TEXT_CHARS]}\n\n"
        f"Answer to grade:\n{row.get('prediction', '')[:TEXT_CHARS]}\n\n"
        f"Criteria: {', '.join(_key(c) for c in criteria)}.\n"
        f"Reply with a JSON object such as {example}."
    )
    return [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": grading}]


def parse_grades(reply: str | None, criteria: list[str]) -> dict[str, float] | None:
    """The grade of every criterion in a judge's reply, keyed by `metric_name`; None when some
    criterion has none, or one outside 1-5.

    Read as a JSON object first (the whole reply, a fenced block, or the first {...} in it; a
    grade may be a number, a numeric string such as "4" or "4/5", or an object with a score),
    then as lines such as "Relevance: 4" or "**Clarity** - 5/5".
    """
    if not reply:
        return None
    wanted = {_key(c): metric_name(c) for c in criteria}
    found = _from_json(reply, wanted) or {}
    for key, name in wanted.items():
        if name not in found and (grade := _from_lines(reply, key)) is not None:
            found[name] = grade
    if set(found) != set(wanted.values()) or any(not LOWEST <= g <= HIGHEST for g in found.values()):
        return None
    return found


def _from_json(reply: str, wanted: dict[str, str]) -> dict[str, float] | None:
    for candidate in _json_candidates(reply):
        try:
            data = json.loads(candidate)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and (found := _wanted_grades(data, wanted)):
            return found
    return None


def _wanted_grades(data: dict, wanted: dict[str, str]) -> dict[str, float]:
    grades = {_key(str(k)): _grade(v) for k, v in data.items()}
    return {name: grades[key] for key, name in wanted.items() if grades.get(key) is not None}


def _json_candidates(reply: str) -> list[str]:
    fenced = re.findall(r"```(?:json)?\s*(.*?)```", reply, flags=re.DOTALL)
    outer = reply[reply.find("{") : reply.rfind("}") + 1] if "{" in reply else ""
    return [reply.strip(), *fenced, outer, *re.findall(r"\{[^{}]*\}", reply)]


def _grade(value: Any) -> float | None:
    """A grade from a JSON value: 4, 4.5, "4", "4/5", {"score": 4}; None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*", value)
        return float(match.group(1)) if match else None
    if isinstance(value, dict):
        for key in ("score", "grade", "rating", "value"):
            if key in value:
                return _grade(value[key])
    return None


def _from_lines(reply: str, key: str) -> float | None:
    """The number after the criterion's name on its line ("relevance: 4", "Relevance - 4/5")."""
    words = r"[\s_-]+".join(re.escape(word) for word in key.split("_"))
    # "Relevance: 4", "**Relevance** (1-5): 4", "Relevance (out of 5) - 4/5": the grade follows the
    # line's colon or dash after the name; a scale in brackets before it is skipped. A grade out of
    # anything but 5, or a signed one, is no grade.
    name = rf"(?im)\b{words}\b(?:\s+(?:score|grade|rating))?[*_\s]*(?:\([^)\n]*\))?[*_\s]*"
    line = re.search(name + r"[:=-]\s*(-?\d+(?:\.\d+)?)(\s*/\s*\d+)?", reply)
    if line is None or line.group(1).startswith("-"):
        return None
    scale = line.group(2)
    if scale and scale.replace("/", "").strip() != str(HIGHEST):
        return None
    return float(line.group(1))


def judge_answers(rows: list[dict], judge: JudgeConfig, warn: Callable[[str], None] = print) -> JudgeResult:
    """Grade the first `judge.max_examples` answered rows, `judge.concurrency` requests at a time.

    Each graded row gets scores judge_<criterion> (in place); the result holds the counts and the
    means. Failures are counted and reported through `warn` (credentials blanked out), never raised.

    Args:
        rows: predictions rows with input, reference and prediction.
    """
    result = JudgeResult(model=judge.model)
    todo = rows[: judge.max_examples]
    key = os.environ.get(judge.api_key_env, "").strip() if judge.api_key_env else None
    if judge.api_key_env and not key:
        result.failed = len(todo)
        warn(f"eval.judge.api_key_env: {judge.api_key_env} is not set; no answer was graded (export it and rerun)")
        return result
    try:
        client = _client(judge, key)
    except Exception as exc:  # noqa: BLE001 - a base_url or key the client refuses: counted, never fatal
        result.failed = len(todo)
        warn(_summary_line(result, len(todo), [f"{type(exc).__name__}: {exc}"], key))
        return result
    with ThreadPoolExecutor(max_workers=judge.concurrency) as pool:
        outcomes = list(pool.map(lambda row: _grade_one(client, judge, row), todo))
    graded = [grades for grades, _ in outcomes if grades is not None]
    errors = [error for _, error in outcomes if error is not None]
    for row, (grades, _) in zip(todo, outcomes, strict=True):
        if grades is not None:
            row.setdefault("scores", {}).update(grades)
    result.graded, result.failed = len(graded), len(errors)
    result.unparsable = len(todo) - len(graded) - len(errors)
    if graded:
        result.means = {m: sum(g[m] for g in graded) / len(graded) for m in map(metric_name, judge.criteria)}
    warn(_summary_line(result, len(todo), errors, key))
    return result


def _client(judge: JudgeConfig, key: str | None):
    import openai

    # (no key: a placeholder, so the client does not fall back on OPENAI_API_KEY)
    return openai.OpenAI(base_url=judge.base_url, api_key=key or "no-key", timeout=judge.timeout, max_retries=2)


def _grade_one(client, judge: JudgeConfig, row: dict) -> tuple[dict[str, float] | None, str | None]:
    """(grades, None), (None, None) for an unparsable reply, or (None, what failed)."""
    import openai

    try:
        response = client.chat.completions.create(
            model=judge.model,
            messages=judge_messages(row, judge.criteria),
            max_tokens=judge.max_tokens,
            temperature=0,
        )
    except openai.APIStatusError as exc:
        detail = exc.body.get("message") if isinstance(exc.body, dict) else None  # (the error object's)
        return None, f"HTTP {exc.status_code}: {detail or exc.message}"
    except Exception as exc:  # noqa: BLE001 - refused, timed out, a body that is no JSON: counted, never fatal
        return None, f"{type(exc).__name__}: {exc}"
    try:
        reply = response.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):  # a reply of another shape: unparsable
        return None, None
    return parse_grades(reply if isinstance(reply, str) else None, judge.criteria), None


def _summary_line(result: JudgeResult, asked: int, errors: list[str], key: str | None) -> str:
    line = (
        f"eval.judge: {result.graded} of {asked} answers graded by {result.model}; "
        f"{result.unparsable} replies unparsable, {result.failed} requests failed"
    )
    if errors:
        first = redact_text(errors[0])
        line += f" (first: {first.replace(key, REDACTED) if key else first})"
    return line.replace("[", "(").replace("]", ")")  # (printed through rich consoles: no markup)
