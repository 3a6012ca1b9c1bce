"""Shared fixtures: a real text corpus (KJV chapters shipped in data/) and tiny-model configs."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import yaml

from lmforge import malloc
from lmforge.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "kjv-pentateuch.txt"


def chapters(n: int, start: int = 0) -> list[str]:
    """The first n chapters (paragraphs) of the shipped corpus."""
    return CORPUS.read_text(encoding="utf-8").split("\n\n")[start : start + n]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One data/tokenizer cache for the session: identical inputs are prepared once."""
    return tmp_path_factory.mktemp("lmforge-cache")


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    return path


def tiny_config_dict(corpus: Path, cache_dir: Path, out: Path) -> dict:
    """A tiny pretraining config in fp32 on every machine: the tests compare runs with fp32
    references at tight tolerances, and `precision: auto` would pick bf16 on a CPU that computes it
    natively (that choice is tested in test_precision_default.py)."""
    return {
        "name": "tiny",
        "seed": 7,
        "output_dir": str(out),
        "model": {"preset": "llama-tiny"},
        "tokenizer": {"train": True, "vocab_size": 512},
        "data": {
            "train": str(corpus),
            "max_length": 32,
            "cache_dir": str(cache_dir),
            "validation_fraction": 0.1,
            "test_fraction": 0.1,
        },
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "log_every": 1,
            "eval_every": None,
            "precision": "fp32",
        },
        "eval": {"max_batches": 2, "at_start": False, "generate": {"num_examples": 1, "max_new_tokens": 4}},
        "tracking": {"backends": ["none"]},
    }


@pytest.fixture
def tiny_config(corpus, cache_dir, tmp_path):
    """Build a validated tiny config; keyword arguments are dotted overrides."""

    def make(*overrides: str) -> Config:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tiny_config_dict(corpus, cache_dir, tmp_path / "runs")))
        return load_config(path, overrides, env={})

    return make


def rows_dataset(token_lists):
    """Training rows of one example each, as prepare_data writes them: every token but the first
    a target."""
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"input_ids": list(t), "labels": [-100, *t[1:]], "lengths": [len(t)], "num_tokens": len(t)}
            for t in token_lists
        ]
    )


def save_tiny_llama(directory: Path, tokenizer, seed: int = 0) -> Path:
    """A 2-layer Llama (width 32) with random weights and `tokenizer`, saved as a "pretrained" directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def save_tiny_t5(directory: Path, tokenizer, width: int = 64) -> Path:
    """A 2+2-layer T5 with random weights and `tokenizer`, saved as a "pretrained" directory."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_ff=2 * width,
        d_kv=width // 4,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def save_tiny_bert(directory: Path, tokenizer, width: int = 64, positions: int = 128) -> Path:
    """A 2-layer BERT encoder (no head) with random weights and `tokenizer`, saved as "pretrained"."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * width,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def lmforge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge", *args]


def cli_allocator() -> str:
    """The allocator `lmforge train` runs on here: it preloads tcmalloc where that is installed,
    else tells glibc's malloc to keep freed memory (lmforge.malloc)."""
    return "tcmalloc" if malloc.find_tcmalloc() else malloc.KEPT


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment without lmforge's variables or a preloaded allocator: the CLI decides."""
    env = {k: v for k, v in malloc.without_preload(os.environ).items() if not k.startswith("LMFORGE_")}
    env.update(extra)
    return env


def deepspeed_env(**extra: str) -> dict[str, str]:
    """`subprocess_env` with DeepSpeed importable. `make setup` installs it beside the venv
    (.venv/deepspeed), out of every other process's way (pyproject.toml says why). Missing, the
    test fails: it does not skip."""
    where = Path(sys.executable).parent.parent / "deepspeed"
    assert (where / "deepspeed").is_dir(), f"DeepSpeed is not installed in {where}: run make setup"
    env = subprocess_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(where), *filter(None, [env.get("PYTHONPATH")])])
    env["PATH"] = f"{where / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # ninja, for DeepSpeed's CPU op
    return env


class RecordingTracker:
    """Stands where metrics.jsonl does (written synchronously) and keeps the points in memory, to
    read logged values back in tests: `Trackers(RecordingTracker(), [], None, print)`."""

    name = "recording"

    def __init__(self) -> None:
        self.points: list[tuple[int, dict]] = []
        self.status: str | None = None

    @property
    def lines(self) -> int:
        return len(self.points)

    def log_metrics(self, metrics, step, timestamp) -> None:
        self.points.append((step, dict(metrics)))

    def finish(self, status) -> None:
        self.status = status

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, m[key]) for step, m in self.points if key in m]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """An ASGI app (`lmforge serve`'s, or a fake endpoint) in uvicorn on a free loopback port, in a
    background thread: yields its base URL, stops it after."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on a loopback port, started for the session from the Debian
    package's binaries (`make test` installs it); trust authentication, so the URL holds no password.
    Missing PostgreSQL fails the test: the shared-storage tests must not pass by skipping."""
    import shutil
    import subprocess
    import tempfile

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    bindir = found[-1].parent if found else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)
    if bindir is None:
        pytest.fail("PostgreSQL is not installed (Debian: apt install postgresql; `make test` installs it)")
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))  # under /tmp: the server's user must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the package's user
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def run(*args) -> None:
        subprocess.run([*as_user, *map(str, args)], check=True, capture_output=True, timeout=120)

    run(bindir / "initdb", "-D", data, "-U", "lmforge", "--auth=trust", "-E", "UTF8", "--no-sync")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o", options, "start")
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "lmforge", "sweeps")
        yield f"postgresql://lmforge@127.0.0.1:{port}/sweeps"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


S3_KEYS = {"AWS_ACCESS_KEY_ID": "AKIAMOTOTESTING00000", "AWS_SECRET_ACCESS_KEY": "moto-secret-key-for-tests-only"}
"""Credentials the moto server accepts (it checks none); a real client signs requests with them."""


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server on a loopback port: moto in server mode, in its own process
    (`python -m moto.server`, from the dev extra). Missing moto fails the test, never skips it."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("the moto S3 server did not start (pip install 'moto[server]'; the dev extra has it)")
            time.sleep(0.2)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request):
    """A new bucket on the moto server, with AWS_ENDPOINT_URL and test credentials in the
    environment (subprocesses inherit them); returns its name."""
    import re

    import boto3

    for key, value in {**S3_KEYS, "AWS_ENDPOINT_URL": s3_endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + f"-{free_port()}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
