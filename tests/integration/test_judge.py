"""eval.judge end to end: a training run and `lmforge eval` graded by a fake judge (a FastAPI app
that answers fixed grades, bad replies and errors by rule, so every count and mean is known), and
by `lmforge serve` itself (a tiny chat model: its replies are unparsable, counted, never fatal).
The judge's API key reaches the judge and nothing else."""

import asyncio
import io
import json
import random
import re
import subprocess

import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from rich.console import Console

from conftest import ROOT, chapters, free_port, lmforge_command, serving, subprocess_env, tiny_config_dict
from lmforge.config import JudgeConfig, load_config
from lmforge.eval.judge import judge_answers
from lmforge.run import run_train
from lmforge.serve.app import create_app
from lmforge.serve.model import ServedModel

pytestmark = pytest.mark.slow
KEY = "judge-key-9876543210"
KEY_ENV = "TEST_JUDGE_KEY"  # (not an LMFORGE_ name: those are config overrides)
CRITERIA = ["relevance", "clarity"]


def verdict(question: str) -> dict | str | int:
    """What the fake judge answers about a question: grades, a reply without grades, or an HTTP error."""
    n = sum(map(ord, question))
    if n % 5 == 0:
        return "I would rather not grade this."
    if n % 5 == 1:
        return 400
    return {"relevance": 1 + n % 5, "clarity": 1 + (n // 5) % 5}


def fake_judge() -> FastAPI:
    """Grades by `verdict`; refuses a request without the key; records the most requests in flight."""
    app = FastAPI()
    app.state.in_flight = app.state.most = app.state.requests = 0

    @app.post("/v1/chat/completions")
    async def grade(request: Request):
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "bad key", "type": "auth"}}, status_code=401)
        body = await request.json()
        app.state.requests += 1
        app.state.in_flight += 1
        app.state.most = max(app.state.most, app.state.in_flight)
        await asyncio.sleep(0.05)
        app.state.in_flight -= 1
        question = re.search(r"Question:\n(.*?)\n\nReference answer:", body["messages"][-1]["content"], re.DOTALL)
        answer = verdict(question.group(1))
        if isinstance(answer, int):
            return JSONResponse({"error": {"message": "cannot grade", "type": "invalid_request_error"}}, answer)
        content = json.dumps(answer) if isinstance(answer, dict) else answer
        message = {"role": "assistant", "content": content}
        return {
            "id": "judge-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    return app


def spelling_rows(n, seed):
    rng = random.Random(seed)
    words = sorted({w.strip(".,;:") for c in chapters(20) for w in c.lower().split() if w.isalpha()})
    return [{"word": w, "spelling": " ".join(w)} for w in rng.sample(words, n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected(rows: list[dict], max_examples: int) -> tuple[dict, dict]:
    """(counts, means) the fake judge's rule gives for the answered rows."""
    answered = [r for r in rows if "prediction" in r][:max_examples]
    verdicts = [verdict(r["input"]) for r in answered]
    grades = [v for v in verdicts if isinstance(v, dict)]
    counts = {
        "graded": len(grades),
        "unparsable": sum(isinstance(v, str) for v in verdicts),
        "failed": sum(isinstance(v, int) for v in verdicts),
    }
    means = {f"judge_{c}": sum(g[c] for g in grades) / len(grades) for c in CRITERIA}
    return counts, means


def files_text(directory) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in sorted(directory.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def judged_run(tmp_path_factory):
    """A prompt-completion run whose final evaluation the fake judge grades (10 of 12 answers, 2 at a time)."""
    tmp = tmp_path_factory.mktemp("judged")
    judge = fake_judge()
    with serving(judge) as url, pytest.MonkeyPatch.context() as env:
        env.setenv(KEY_ENV, KEY)
        raw = tiny_config_dict(tmp / "unused.txt", tmp / "cache", tmp / "runs")
        raw["data"] = {
            "train": write_jsonl(tmp / "train.jsonl", spelling_rows(300, 0)),
            "test": write_jsonl(tmp / "test.jsonl", spelling_rows(20, 1)),
            "validation_fraction": 0.05,
            "format": "prompt-completion",
            "columns": {"prompt": "word", "completion": "spelling"},
            "template": "Spell {prompt}:\n",
            "max_length": 48,
            "cache_dir": str(tmp / "cache"),
        }
        raw["train"].update(max_steps=8, micro_batch_size=8, lr=3e-3)
        raw["eval"]["generate"].update(max_examples=12, max_new_tokens=8)
        raw["eval"]["judge"] = {
            "base_url": f"{url}/v1",
            "model": "fake-judge",
            "api_key_env": KEY_ENV,
            "criteria": CRITERIA,
            "max_examples": 10,
            "concurrency": 2,
        }
        path = tmp / "judged.yaml"
        path.write_text(yaml.safe_dump(raw))
        out = io.StringIO()
        run_dir = run_train(load_config(path, env={}), Console(file=out, width=200)).run_dir
        yield tmp, run_dir, out.getvalue(), judge, url


def test_a_run_is_graded_by_the_judge_with_exact_counts_and_means(judged_run):
    _, run_dir, output, judge, _ = judged_run
    final = json.loads((run_dir / "eval.json").read_text())
    rows = read_jsonl(run_dir / "predictions.jsonl")
    counts, means = expected(rows, 10)
    assert final["judge"] == {**counts, "model": "fake-judge"}
    assert counts["graded"] >= 2 and counts["unparsable"] >= 1 and counts["failed"] >= 1, counts  # every case
    for name, mean in means.items():
        assert final["generation"][name] == pytest.approx(mean)
    for row in [r for r in rows if "prediction" in r][:10]:
        grades = verdict(row["input"])
        scored = {k: v for k, v in row["scores"].items() if k.startswith("judge_")}
        assert scored == ({f"judge_{c}": float(grades[c]) for c in CRITERIA} if isinstance(grades, dict) else {})
    assert not any(k.startswith("judge_") for r in rows[10:] for k in r.get("scores", {}))
    assert judge.state.requests == 10 and judge.state.most == 2  # eval.judge.concurrency at a time
    points = read_jsonl(run_dir / "metrics.jsonl")
    assert any(p.get("generation/judge_relevance") == pytest.approx(means["judge_relevance"]) for p in points)
    line = f"eval.judge: {counts['graded']} of 10 answers graded by fake-judge"
    assert line in output and "HTTP 400: cannot grade" in output and "Traceback" not in output
    assert KEY not in output and KEY not in files_text(run_dir)


def test_lmforge_eval_applies_the_runs_judge(judged_run):
    tmp, run_dir, _, judge, _ = judged_run
    out = tmp / "evaluation"
    proc = subprocess.run(
        lmforge_command("eval", str(run_dir), "--out", str(out)),
        capture_output=True,
        text=True,
        env=subprocess_env(**{KEY_ENV: KEY}),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "eval.json").read_text())["predictions"]
    counts, means = expected(read_jsonl(out / "predictions.jsonl"), 10)
    assert summary["judge"] == {**counts, "model": "fake-judge"}
    assert summary["generation"]["judge_clarity"] == pytest.approx(means["judge_clarity"])
    assert "eval.judge:" in proc.stderr and KEY not in proc.stdout + proc.stderr + files_text(out)

    # without the key in the environment: nothing graded, one clear line, the evaluation complete
    proc = subprocess.run(
        lmforge_command("eval", str(run_dir), "--out", str(tmp / "no-key")),
        capture_output=True,
        text=True,
        env={k: v for k, v in subprocess_env().items() if k != KEY_ENV},
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"eval.judge.api_key_env: {KEY_ENV} is not set" in proc.stderr
    judged = json.loads((tmp / "no-key" / "eval.json").read_text())["predictions"]["judge"]
    assert judged == {"graded": 0, "unparsable": 0, "failed": 10, "model": "fake-judge"}


def test_a_judge_that_cannot_be_reached_or_refuses_the_key_is_counted(judged_run, monkeypatch):
    _, run_dir, _, _, url = judged_run
    rows = [r for r in read_jsonl(run_dir / "predictions.jsonl") if "prediction" in r]
    lines = []
    nowhere = JudgeConfig(base_url=f"http://127.0.0.1:{free_port()}/v1", model="m", max_examples=3, timeout=5)
    result = judge_answers([dict(r) for r in rows], nowhere, lines.append)
    assert (result.graded, result.unparsable, result.failed, result.means) == (0, 0, 3, {})
    assert "3 requests failed (first: APIConnectionError" in lines[0]
    monkeypatch.setenv(KEY_ENV, "not-" + KEY)
    refused = JudgeConfig(base_url=f"{url}/v1", model="m", api_key_env=KEY_ENV, max_examples=2)
    result = judge_answers([dict(r) for r in rows], refused, lines.append)
    assert result.failed == 2 and "HTTP 401: bad key" in lines[1] and "not-" + KEY not in lines[1]


def test_lmforge_serve_as_the_judge(judged_run, tmp_path):
    """A tiny chat model served by lmforge grades a run's answers through `lmforge eval`: it cannot
    grade (its replies are unparsable), and that is counted, not fatal."""
    tmp, run_dir, _, _, _ = judged_run
    data = tmp_path / "chats.jsonl"
    data.write_text("".join((ROOT / "examples/data/arithmetic_chat.jsonl").read_text().splitlines(True)[:200]))
    raw = tiny_config_dict(data, tmp_path / "cache", tmp_path / "runs")
    raw["name"] = "chat"
    raw["data"].update({"format": "chat", "chat_template": "chatml", "max_length": 160})
    (tmp_path / "chat.yaml").write_text(yaml.safe_dump(raw))
    chat_run = run_train(load_config(tmp_path / "chat.yaml", env={}), Console(file=io.StringIO())).run_dir
    served = ServedModel.load(chat_run, name="tiny-judge")
    saved = (run_dir / "config.yaml").read_text()
    config = yaml.safe_load(saved)
    out = tmp_path / "evaluation"
    try:
        with serving(create_app(served, api_key=KEY)) as url:
            config["eval"]["judge"].update(base_url=f"{url}/v1", model="tiny-judge", max_tokens=24, max_examples=4)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
            proc = subprocess.run(
                lmforge_command("eval", str(run_dir), "--out", str(out)),
                capture_output=True,
                text=True,
                env=subprocess_env(**{KEY_ENV: KEY}),
                timeout=300,
            )
    finally:
        (run_dir / "config.yaml").write_text(saved)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    judged = json.loads((out / "eval.json").read_text())["predictions"]["judge"]
    assert judged["model"] == "tiny-judge" and judged["failed"] == 0
    assert judged["graded"] + judged["unparsable"] == 4 and judged["unparsable"] >= 3, judged
    assert len(served.log) == 4  # four requests, each answered
    assert KEY not in proc.stdout + proc.stderr + files_text(out)


def test_replies_of_any_shape_are_counted_never_fatal():
    """A judge whose 200 replies are not what the OpenAI API promises: a body that is no JSON, choices
    that are no list, content that is no text. Each is counted; none stops the evaluation."""
    from fastapi.responses import Response

    shapes = [
        Response("not json at all", media_type="application/json"),
        {"choices": "garbage"},
        {"choices": [{"message": "hi"}]},
        {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": 5}, "finish_reason": "stop"}]},
    ]  # fmt: skip
    app = FastAPI()
    app.state.calls = 0

    @app.post("/v1/chat/completions")
    async def grade(request: Request):
        app.state.calls += 1
        return shapes[(app.state.calls - 1) % len(shapes)]

    rows = [{"input": f"q{i}", "reference": "a", "prediction": "a"} for i in range(len(shapes))]
    with serving(app) as url:
        config = JudgeConfig(base_url=f"{url}/v1", model="m", criteria=CRITERIA, concurrency=1, timeout=5)
        lines = []
        result = judge_answers(rows, config, lines.append)
    assert result.graded == 0 and result.unparsable + result.failed == len(shapes), lines
    assert not any("scores" in r for r in rows)
