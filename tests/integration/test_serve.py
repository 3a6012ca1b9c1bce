"""`lmforge serve` through the official OpenAI client against the real server (uvicorn on a
loopback port): answers as `lmforge generate` gives them, streams that add up to the same text,
eight clients at once, OpenAI-shaped 4xx errors, the API key, cancellation when a client leaves,
classifiers and seq2seq models, and no secret in any response or log line."""

import io
import json
import logging
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from rich.console import Console

from conftest import (
    ROOT,
    chapters,
    free_port,
    lmforge_command,
    save_tiny_bert,
    serving,
    subprocess_env,
    tiny_config_dict,
)
from lmforge.config import GenerateConfig, load_config
from lmforge.data.tokenize import ids_with_eos
from lmforge.eval.generation import model_inputs, predict_labels, respond
from lmforge.models.tokenizer import train_bpe_tokenizer
from lmforge.run import run_train
from lmforge.serve.app import create_app
from lmforge.serve.model import ServedModel

pytestmark = pytest.mark.slow
CHATS = ROOT / "examples" / "data" / "arithmetic_chat.jsonl"
KEY = "test-key-0123456789"
WORDS = "light darkness waters earth heaven herb seed fruit tree beast fowl fish day night".split()  # noqa: SIM905


def train(tmp, raw: dict):
    path = tmp / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    data = tmp / "chats.jsonl"
    data.write_text("".join(CHATS.read_text().splitlines(keepends=True)[:200]))
    raw = tiny_config_dict(data, tmp / "cache", tmp / "runs")
    raw["name"] = "chat"
    raw["data"].update({"format": "chat", "chat_template": "chatml", "max_length": 160})
    raw["train"].update({"max_steps": 6})
    return train(tmp, raw)


@pytest.fixture(scope="module")
def chat_server(chat_run):
    """The chat run served under its link's name, with an API key."""
    served = ServedModel.load(chat_run.parent / "chat-latest")
    with serving(create_app(served, api_key=KEY)) as url:
        yield served, url


def client(url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def test_answers_are_lmforge_generate_answers_and_streams_add_up_to_them(chat_server):
    served, url = chat_server
    api = client(url)
    assert served.name == "chat-latest" and [m.id for m in api.models.list()] == ["chat-latest"]
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = api.chat.completions.create(model="chat-latest", messages=question, temperature=0, max_tokens=12)
    # what `lmforge generate RUN --chat "What is 2 + 3?" --temperature 0` answers: the same text
    prompt = served.chat_prompt(question)
    cfg = GenerateConfig(max_new_tokens=12, temperature=0, top_k=None)
    assert chat.choices[0].message.content == respond(served.model, served.tokenizer, [prompt], cfg, 0, served.hints)[0]
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    ids, _ = model_inputs(served.model, served.tokenizer, prompt, served.hints["answer_starts"])
    assert chat.usage.prompt_tokens == len(ids) > 10
    assert chat.usage.completion_tokens == 12 and chat.usage.total_tokens == chat.usage.prompt_tokens + 12
    assert chat.choices[0].finish_reason == "length"

    chunks = list(
        api.chat.completions.create(
            model="chat-latest",
            messages=question,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    # sampled: the same seed gives the same text, streamed or not; another seed another text
    def sample(seed, **kw):
        return api.completions.create(
            model="chat-latest", prompt="What is 7 + 8?", temperature=1.0, top_p=0.9, seed=seed, max_tokens=24, **kw
        )

    first, again, other = sample(5).choices[0].text, sample(5).choices[0].text, sample(6).choices[0].text
    assert first == again != other
    assert "".join(c.choices[0].text for c in sample(5, stream=True)) == first


def test_stop_strings_end_the_answer(chat_server):
    served, url = chat_server
    api = client(url)
    prompt = "What is 12 + 30?"
    greedy = api.completions.create(model="chat-latest", prompt=prompt, temperature=0, max_tokens=16).choices[0]
    assert greedy.finish_reason == "length"
    cut = greedy.text[len(greedy.text) // 2 :][:2]
    assert cut.strip()
    for stop in (cut, [cut, "never written"]):
        stopped = api.completions.create(model="chat-latest", prompt=prompt, temperature=0, max_tokens=16, stop=stop)
        assert stopped.choices[0].text == greedy.text[: greedy.text.index(cut)]
        assert stopped.choices[0].finish_reason == "stop"
        streamed = api.completions.create(
            model="chat-latest", prompt=prompt, temperature=0, max_tokens=16, stop=stop, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_eight_concurrent_clients_are_all_answered_as_one_alone(chat_server):
    served, url = chat_server
    api = client(url)
    questions = [f"What is {a} + {a + 3}?" for a in range(8)]

    def ask(question):
        answer = api.completions.create(model="chat-latest", prompt=question, temperature=0, max_tokens=10)
        return answer.choices[0].text

    alone = [ask(q) for q in questions]
    logged = len(served.log)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone
    assert len(served.log) == logged + 8


def error_of(call):
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"], body
    return caught.value, body


def test_bad_requests_are_openai_errors_never_500(chat_server):
    _, url = chat_server
    api = client(url)

    def complete(**kw):
        return lambda: api.completions.create(**{"model": "chat-latest", "prompt": "hi", **kw})

    exc, body = error_of(complete(model="gpt-nothing"))
    assert isinstance(exc, openai.NotFoundError) and body["code"] == "model_not_found" and body["param"] == "model"
    assert "chat-latest" in body["message"]
    exc, body = error_of(complete(prompt="seed " * 3000))
    assert isinstance(exc, openai.BadRequestError) and body["code"] == "context_length_exceeded"
    assert "2048" in body["message"] and body["param"] == "prompt"
    exc, body = error_of(complete(max_tokens=2040, prompt="seed " * 20))
    assert isinstance(exc, openai.BadRequestError) and body["param"] == "max_tokens"
    for params, param in [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 2}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"logprobs": 3}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ]:
        exc, body = error_of(complete(**params))
        assert isinstance(exc, openai.BadRequestError) and body["param"] == param, (params, body)
        assert body["type"] == "invalid_request_error"
    exc, body = error_of(lambda: api.chat.completions.create(model="chat-latest", messages=[]))
    assert exc.status_code == 400 and body["param"] == "messages"

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for content, expected in [
        (b'{"model": "chat-latest", "prompt": ', "could not parse the JSON body"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "Missing request body"),
        (b'{"model": "chat-latest"}', "Missing required parameter: 'prompt'"),
        (b'{"prompt": "hi"}', "Missing required parameter: 'model'"),
        (b'{"model": "chat-latest", "prompt": 7}', "Invalid value for 'prompt'"),
    ]:
        response = httpx.post(f"{url}/v1/completions", content=content, headers=headers)
        assert response.status_code == 400, (content, response.text)
        assert expected in response.json()["error"]["message"], response.text
    response = httpx.get(f"{url}/v1/nothing", headers=headers)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert httpx.get(f"{url}/v1/completions", headers=headers).status_code == 405


def test_the_api_key_is_required_except_for_health(chat_server):
    _, url = chat_server
    for key in ("wrong-key", KEY[:-1], KEY + "x"):
        exc, body = error_of(lambda k=key: client(url, k).models.list())
        assert isinstance(exc, openai.AuthenticationError) and body["code"] == "invalid_api_key"
        assert key not in body["message"]
    for headers in ({}, {"Authorization": KEY}, {"Authorization": "Basic " + KEY + "x"}):
        response = httpx.post(f"{url}/v1/completions", content=b"{bad json", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert client(url).models.list().data[0].id == "chat-latest"


def wait_for(predicate, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_leaves_cancels_its_generation(chat_server):
    """A streamed answer of up to 1500 tokens, read for one chunk and dropped, stops at once; a
    plain request whose client times out stops too."""
    served, url = chat_server
    before = len(served.log)
    body = {"model": "chat-latest", "prompt": "What is 1 + 1?", "max_tokens": 1500, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response,
    ):
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: {")
    wait_for(lambda: len(served.log) > before)
    record = served.log[-1]
    assert record["finish_reason"] == "cancelled" and 0 < record["completion_tokens"] < 1500, record

    body.pop("stream")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=0.5)
    wait_for(lambda: len(served.log) > before + 1)
    record = served.log[-1]
    assert record["finish_reason"] == "cancelled" and 0 < record["completion_tokens"] < 1500, record
    # and the server goes on answering
    answer = client(url).completions.create(model="chat-latest", prompt="What is 1 + 1?", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe_tokenizer(chapters(30) + [" ".join(WORDS)] * 5, vocab_size=400)


def test_a_classifier_answers_classify_and_refuses_completions(tmp_path, tokenizer):
    model_dir = save_tiny_bert(tmp_path / "bert", tokenizer, positions=64)
    text = (chapters(1)[0], chapters(1, start=60)[0])
    rows = [{"text": line, "label": "genesis"} for line in text[0].split("\n")]
    rows += [{"text": line, "label": "exodus"} for line in text[1].split("\n")]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_config_dict(tmp_path / "train.jsonl", tmp_path / "cache", tmp_path / "runs")
    raw.pop("tokenizer")
    raw.update(name="cls", model={"name_or_path": str(model_dir), "task": "classification"})
    raw["data"].update({"format": "classification", "max_length": 48})
    run_dir = train(tmp_path, raw)
    served = ServedModel.load(run_dir, name="verses")
    with serving(create_app(served)) as url:
        texts = ["In the beginning God created the heaven and the earth.", "And Moses said unto the LORD"]
        response = httpx.post(f"{url}/v1/classify", json={"model": "verses", "input": texts})
        assert response.status_code == 200, response.text
        result = response.json()
        assert [r["label"] for r in result["data"]] == predict_labels(served.model, served.tokenizer, texts)
        for r in result["data"]:
            assert set(r["probabilities"]) == {"genesis", "exodus"}
            assert sum(r["probabilities"].values()) == pytest.approx(1.0)
            assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)
        tokens = sum(len(served.tokenizer(t)["input_ids"]) for t in texts)
        assert result["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        one = httpx.post(f"{url}/v1/classify", json={"model": "verses", "input": texts[0]}).json()
        assert one["data"] == result["data"][:1]
        too_long = httpx.post(f"{url}/v1/classify", json={"model": "verses", "input": "light " * 200})
        assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"

        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        exc, body = error_of(lambda: api.completions.create(model="verses", prompt="In the beginning"))
        assert exc.status_code == 400 and "/v1/classify" in body["message"]
        exc, body = error_of(
            lambda: api.chat.completions.create(model="verses", messages=[{"role": "user", "content": "x"}])
        )
        assert exc.status_code == 400 and "/v1/classify" in body["message"]


def test_a_seq2seq_model_answers_completions(tmp_path):
    rng = random.Random(0)
    rows = [
        {"source": " ".join(w), "target": " ".join(reversed(w))} for w in (rng.sample(WORDS, 3) for _ in range(200))
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_config_dict(tmp_path / "pairs.jsonl", tmp_path / "cache", tmp_path / "runs")
    raw.update(name="s2s", model={"preset": "t5-tiny", "task": "seq2seq"})
    raw["data"].update({"format": "seq2seq", "template": "reverse: {source}"})
    run_dir = train(tmp_path, raw)
    served = ServedModel.load(run_dir)
    assert served.task == "seq2seq" and served.name == run_dir.name
    with serving(create_app(served)) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = api.completions.create(model=run_dir.name, prompt="light day fish", temperature=0, max_tokens=8)
        prompt = served.completion_prompt("light day fish")
        assert prompt == "reverse: light day fish"  # the run's template, as `lmforge generate` sends it
        cfg = GenerateConfig(max_new_tokens=8, temperature=0)
        assert answer.choices[0].text == respond(served.model, served.tokenizer, [prompt], cfg, 0, served.hints)[0]
        assert answer.usage.prompt_tokens == len(ids_with_eos(prompt, served.tokenizer))
        streamed = api.completions.create(
            model=run_dir.name, prompt="light day fish", temperature=0, max_tokens=8, stream=True
        )
        assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
        exc, body = error_of(
            lambda: api.chat.completions.create(model=run_dir.name, messages=[{"role": "user", "content": "x"}])
        )
        assert exc.status_code == 400 and "seq2seq" in body["message"] and "/v1/completions" in body["message"]


def test_the_command_keeps_secrets_out_of_responses_and_logs_and_stops_on_ctrl_c(chat_run):
    """`lmforge serve` in its own process with the API key and an HF token in its environment:
    neither is in any response (headers too) or any line the server prints, whatever is asked."""
    hf_token = "hf_" + "Secret0123456789abcdefghij"
    port = free_port()
    env = subprocess_env(SERVE_API_KEY=KEY, HF_TOKEN=hf_token)
    command = lmforge_command(
        "serve", str(chat_run), "--port", str(port), "--api-key-env", "SERVE_API_KEY", "--max-request-mb", "0.5"
    )
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _health(url) or proc.poll() is not None, seconds=120)
        assert proc.poll() is None, proc.communicate()
        good = {"Authorization": f"Bearer {KEY}"}
        for method, path, headers, body in [
            ("GET", "/health", {}, None),
            ("GET", "/v1/models", good, None),
            ("GET", "/v1/models", {"Authorization": f"Bearer {KEY}-not"}, None),
            ("GET", "/v1/models", {"Authorization": f"Bearer {hf_token}"}, None),
            ("POST", "/v1/completions", {}, {"model": chat_run.name, "prompt": KEY}),
            ("POST", "/v1/completions", good, {"model": chat_run.name, "prompt": KEY, "max_tokens": 4}),
            ("POST", "/v1/completions", good, {"model": hf_token, "prompt": "x"}),
            ("POST", "/v1/completions", good, {"model": chat_run.name, "prompt": hf_token, "api_key": KEY}),
            ("POST", "/v1/completions", good, {"model": chat_run.name, "prompt": "x", "temperature": KEY}),
            ("POST", "/v1/completions", good, {"model": chat_run.name, "prompt": "x", "stream": True}),
            ("POST", "/v1/classify", good, {"model": chat_run.name, "input": hf_token}),
            ("POST", "/v1/completions", good, {"model": chat_run.name, "prompt": "x" * 2**19}),  # over 0.5 MiB
        ]:
            response = httpx.request(method, url + path, headers=headers, json=body, timeout=60)
            assert response.status_code < 500, response.text
            seen.append(response.text + json.dumps(dict(response.headers)))
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"serving {chat_run.name} (causal-lm) at http://127.0.0.1:{port}/v1" in out and "stopped" in out
    assert "Traceback" not in out + err and "POST /v1/completions" in out + err
    for text in [*seen, out, err]:
        assert KEY not in text and hf_token not in text
    # a message that repeats what the client sent has the key it sent blanked out
    assert sum("Invalid value for 'temperature'" in s and "***REDACTED***" in s for s in seen) == 1
    assert sum("larger than this server's limit of 0.5 MiB" in s for s in seen) == 1  # --max-request-mb


def _health(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_unset_api_key_variable_refuses_to_start(chat_run):
    env = {k: v for k, v in subprocess_env().items() if k != "SERVE_API_KEY_UNSET"}
    for extra in ({}, {"SERVE_API_KEY_UNSET": " "}):
        proc = subprocess.run(
            lmforge_command("serve", str(chat_run), "--api-key-env", "SERVE_API_KEY_UNSET"),
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        state = "empty" if extra else "not set"
        assert f"--api-key-env SERVE_API_KEY_UNSET: that environment variable is {state}" in proc.stderr
    assert os.environ.get("SERVE_API_KEY_UNSET") is None


def test_raw_completions_continue_the_text_as_given(chat_server):
    served, _ = chat_server
    raw = ServedModel(served.model, served.tokenizer, served.run_config, served.hints, "raw", raw=True)
    assert raw.completion_prompt("In the beginning") == "In the beginning"  # no chat template around it
    assert served.completion_prompt("In the beginning").startswith("<|im_start|>user\nIn the beginning")
    with serving(create_app(raw)) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = api.completions.create(model="raw", prompt="In the beginning", temperature=0, max_tokens=8)
    cfg = GenerateConfig(max_new_tokens=8, temperature=0)  # as `lmforge generate --raw`: no hints
    assert answer.choices[0].text == respond(served.model, served.tokenizer, ["In the beginning"], cfg, 0)[0]


def test_a_port_in_use_is_a_message(chat_run):
    import socket

    from lmforge.errors import UserError
    from lmforge.serve.app import serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"--host 127.0.0.1 --port {port}: cannot listen there .*another --port"):
            serve(chat_run, port=port)


def post(url: str, content: bytes, path: str = "/v1/completions", timeout: float = 60) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    return httpx.post(url + path, content=content, headers=headers, timeout=timeout)


def test_a_body_over_the_size_limit_is_413_unread(chat_server):
    served, url = chat_server
    nine_mib = b'{"model": "chat-latest", "prompt": "' + b"a" * (9 * 2**20) + b'"}'
    started = time.perf_counter()
    response = post(url, nine_mib)
    assert response.status_code == 413 and time.perf_counter() - started < 5
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
    assert "limit of 8 MiB" in error["message"] and "--max-request-mb" in error["message"]

    def chunks():  # no Content-Length: the body streamed in chunks, refused once past the limit
        yield nine_mib[:37]
        for start in range(37, len(nine_mib), 2**17):
            yield nine_mib[start : start + 2**17]

    assert post(url, chunks()).status_code == 413
    small = ServedModel(served.model, served.tokenizer, served.run_config, served.hints, "chat-latest")
    with serving(create_app(small, max_request_mb=0.01)) as small_url:  # 10 KiB
        body = {"model": "chat-latest", "prompt": "What is 1 + 1?", "max_tokens": 2}
        assert httpx.post(f"{small_url}/v1/completions", json=body).status_code == 200
        body["user"] = "x" * 10_500
        response = httpx.post(f"{small_url}/v1/completions", json=body)
        assert response.status_code == 413 and "limit of 0.01 MiB" in response.json()["error"]["message"]


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(chat_server, monkeypatch):
    """2048 tokens of context hold no more than 65536 characters (32 a token): a longer prompt is a
    400 at once, without tokenizing it (which would take memory and time in proportion)."""
    served, url = chat_server
    assert served.context == 2048 and served.max_chars == 65536
    tokenized = []

    def spy(model, tokenizer, prompt, starts):
        tokenized.append(prompt)
        return model_inputs(model, tokenizer, prompt, starts)

    monkeypatch.setattr("lmforge.serve.model.model_inputs", spy)
    api = client(url)
    started = time.perf_counter()
    exc, body = error_of(lambda: api.completions.create(model="chat-latest", prompt="seed " * 40_000))
    assert exc.status_code == 400 and body["code"] == "context_length_exceeded" and body["param"] == "prompt"
    assert "prompt is 200000 characters" in body["message"] and "65536 characters" in body["message"]
    assert "2048 tokens" in body["message"]
    halves = [{"role": "user", "content": "a" * 40_000}, {"role": "assistant", "content": "b" * 40_000}]
    exc, body = error_of(lambda: api.chat.completions.create(model="chat-latest", messages=halves))
    assert exc.status_code == 400 and body["param"] == "messages" and "80000 characters" in body["message"]
    assert time.perf_counter() - started < 5 and tokenized == []
    # at the bound the prompt is tokenized, and refused for its tokens
    exc, body = error_of(lambda: api.completions.create(model="chat-latest", prompt="seed " * 13_000))
    assert body["code"] == "context_length_exceeded" and "the prompt alone is" in body["message"]
    assert len(tokenized) == 1


def test_text_that_is_not_unicode_is_a_400_naming_the_field(chat_server):
    """JSON escapes can spell lone surrogates ("\\ud800"), which no tokenizer takes: a 400 naming
    the field, wherever a string goes; a surrogate pair (an emoji) is a character and answered."""
    _, url = chat_server
    chat = '{"model": "chat-latest", "messages": [{"role": "user", "content": CONTENT}]}'
    for path, body, param in [
        ("/v1/completions", '{"model": "chat-latest", "prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", '{"model": "chat-latest", "prompt": "a\\udfffb"}', "prompt"),
        ("/v1/completions", '{"model": "chat-latest", "prompt": ["a\\udfffb"]}', "prompt"),
        ("/v1/completions", '{"model": "chat-latest", "prompt": "a", "stop": ["x", "\\ud800"]}', "stop"),
        ("/v1/completions", '{"model": "chat-\\ud800", "prompt": "a"}', "model"),
        ("/v1/chat/completions", chat.replace("CONTENT", '"\\udc00"'), "messages"),
        ("/v1/chat/completions", chat.replace("CONTENT", '[{"type": "text", "text": "\\ud800"}]'), "messages"),
        ("/v1/classify", '{"model": "chat-latest", "input": ["fine", "\\ud800"]}', "input"),
        ("/v1/completions", '{"model": "chat-latest", "prompt": "a", "\\ud800": 1}', None),
    ]:
        response = post(url, body.encode(), path)
        assert response.status_code == 400, (body, response.text)
        error = response.json()["error"]
        assert error["param"] == param and "\\ud" in error["message"] and "not" in error["message"], (body, error)
    emoji = post(url, b'{"model": "chat-latest", "prompt": "\\ud83d\\ude00", "max_tokens": 2}')
    assert emoji.status_code == 200 and emoji.json()["usage"]["completion_tokens"] == 2


def test_seeds_outside_torchs_range_are_a_400_and_inside_it_answered(chat_server):
    _, url = chat_server
    for seed in ("99999999999999999999999", str(2**63), str(-(2**63) - 1), "1e30"):
        response = post(url, b'{"model": "chat-latest", "prompt": "hi", "seed": %s}' % seed.encode())
        assert response.status_code == 400 and response.json()["error"]["param"] == "seed", (seed, response.text)
    for seed in (-1, 2**63 - 1, -(2**63)):
        body = {"model": "chat-latest", "prompt": "What is 7 + 8?", "seed": seed, "max_tokens": 12}
        texts = [post(url, json.dumps(body).encode()).json()["choices"][0]["text"] for _ in range(2)]
        assert texts[0] == texts[1], seed  # the same seed, the same text


def test_an_unexpected_failure_is_a_500_with_one_log_line_and_no_secret(chat_server, caplog):
    served, _ = chat_server
    broken = ServedModel(served.model, served.tokenizer, served.run_config, served.hints, "broken")

    def fail(job, on_text=None):
        raise RuntimeError(f"boom with {KEY}\nand a second line")

    broken.run = fail
    with caplog.at_level(logging.ERROR, logger="lmforge.serve"), serving(create_app(broken, api_key=KEY)) as url:
        response = post(url, b'{"model": "broken", "prompt": "hi", "max_tokens": 2}')
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "internal error; the server's log has the details",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    (record,) = [r for r in caplog.records if r.name == "lmforge.serve"]
    line = record.getMessage()
    assert line.startswith("POST /v1/completions failed: RuntimeError: boom with ***REDACTED*** and a second line (")
    assert "\n" not in line and KEY not in line and record.exc_info is None
