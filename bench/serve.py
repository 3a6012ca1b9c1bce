"""Throughput and latency of `lmforge serve` for 1, 4 and 8 concurrent clients.

    python bench/serve.py              # 48 requests per level, 32 new tokens each, medians of 3
    python bench/serve.py --smoke      # 1 and 2 clients, 4 requests of 4 tokens, once (tested)

The served model is a tiny Llama (llama-tiny's sizes: 2 layers, width 64; random weights) with a
512-token BPE tokenizer trained on the shipped KJV text, saved as a model directory, started with
the real command (`python -m lmforge serve DIR`) in its own process on a loopback port. Each
client is a thread with the official `openai` client sending greedy completions of KJV verses
one after another (16 verses in turn, each sent once before the levels); a level ends when its
requests are answered. Each level runs `--repeats` times in alternating order (a single pass
measured whichever level came first several times slower; bench/RESULTS.md). Printed per level,
medians: requests per second, the median and 95th-percentile latency of a request, and the new
tokens per second.

The server generates one answer at a time (no batching), so more clients queue: requests per
second stay about level while latency grows with the queue. What the figures show is the server's
overhead and fairness, not the model's speed.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT / "data" / "kjv-pentateuch.txt"


def make_model(directory: Path) -> Path:
    """The tiny model directory: random weights (seeded), a tokenizer trained on the KJV text."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(KJV.read_text(encoding="utf-8").split("\n\n")[:60], vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int) -> subprocess.Popen:
    """`lmforge serve` in its own process; returns once /health answers."""
    import httpx

    command = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port), "--model-name", "tiny"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"lmforge serve exited: {server.stderr.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("lmforge serve did not start within 120 s")


def run_level(url: str, clients: int, requests: int, tokens: int, prompts: list[str]) -> dict:
    """`requests` greedy completions sent by `clients` threads at once: req/s, latencies, tok/s."""
    import openai

    api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    latencies: list[float] = []
    written = [0]
    next_request = iter(range(requests))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                number = next(next_request, None)
            if number is None:
                return
            started = time.perf_counter()
            answer = api.completions.create(
                model="tiny", prompt=prompts[number % len(prompts)], max_tokens=tokens, temperature=0
            )
            with lock:
                latencies.append(time.perf_counter() - started)
                written[0] += answer.usage.completion_tokens

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return {
        "clients": clients,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50": statistics.median(latencies) * 1000,
        "p95": p95 * 1000,
        "tok_s": written[0] / wall,
    }


def measure(levels: list[int], repeats: int, requests: int, tokens: int, prompts: list[str]) -> list[dict]:
    """Each level `repeats` times against one server, the levels' order reversed on every other
    repeat (so that none always runs first); per level, the median of each figure."""
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-serve-") as workspace:
        model_dir = make_model(Path(workspace) / "tiny")
        port = free_port()
        server = start_server(model_dir, port)
        try:
            url = f"http://127.0.0.1:{port}"
            run_level(url, 1, len(prompts), tokens, prompts)  # warm-up: each prompt once, not reported
            runs: dict[int, list[dict]] = {n: [] for n in levels}
            for repeat in range(repeats):
                for n in levels if repeat % 2 == 0 else levels[::-1]:
                    runs[n].append(run_level(url, n, requests, tokens, prompts))
        finally:
            server.terminate()
            server.wait(timeout=60)
    figures = ("rps", "p50", "p95", "tok_s")
    return [
        {"clients": n, "requests": requests, **{k: statistics.median(r[k] for r in runs[n]) for k in figures}}
        for n in levels
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 and 2 clients, 4 requests of 4 tokens, once")
    parser.add_argument("--clients", type=int, nargs="+", default=None, help="Levels (default 1 4 8).")
    parser.add_argument("--requests", type=int, default=None, help="Requests per level (default 48).")
    parser.add_argument("--tokens", type=int, default=None, help="New tokens per request (default 32).")
    parser.add_argument("--repeats", type=int, default=None, help="Runs of each level; medians (default 3).")
    args = parser.parse_args()
    levels = args.clients or ([1, 2] if args.smoke else [1, 4, 8])
    requests = args.requests or (4 if args.smoke else 48)
    tokens = args.tokens or (4 if args.smoke else 32)
    repeats = args.repeats or (1 if args.smoke else 3)
    verses = [line.strip() for line in KJV.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 40]
    results = measure(levels, repeats, requests, tokens, verses[: 4 if args.smoke else 16])
    print(f"{'clients':>7} {'requests':>8} {'req/s':>7} {'p50_ms':>8} {'p95_ms':>8} {'tok/s':>7}")
    for r in results:
        figures = f"{r['rps']:>7.2f} {r['p50']:>8.0f} {r['p95']:>8.0f} {r['tok_s']:>7.1f}"
        print(f"{r['clients']:>7} {r['requests']:>8} {figures}")
    first, last = results[0], results[-1]
    print(
        f"summary (cpu, {os.cpu_count()} cores, medians of {repeats}, {tokens} new tokens a request, {requests} "
        f"requests a level): {last['clients']} clients {last['rps'] / first['rps']:.2f}x the req/s of "
        f"{first['clients']}, p95 latency {last['p95'] / first['p95']:.1f}x"
    )


if __name__ == "__main__":
    main()
