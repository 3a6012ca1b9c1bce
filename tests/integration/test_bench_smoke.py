"""Benchmarks under bench/ run in their --smoke mode, so they never rot. Their figures are read
by people (bench/RESULTS.md), never asserted here: timings and memory are not test material."""

import subprocess
import sys

import pytest

from conftest import ROOT, cli_allocator, deepspeed_env, subprocess_env
from lmforge.engine.loop import cpu_has_native_bf16


def test_memory_benchmark_smoke():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory.py"), "--smoke"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split() == ["vocab", "seq", "batch", "plain", "MB", "chunked", "MB", "ratio"]
    vocab, seq, batch, plain, chunked, ratio = lines[1].split()
    assert (vocab, seq, batch) == ("2000", "64", "2") and float(plain) > 0 and float(chunked) > 0
    assert lines[-1].startswith("summary (cpu, medians of 1): chunked/plain step peak memory v2k/s64:")


def run_bench(script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        env=env or subprocess_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()


@pytest.mark.slow
def test_vs_peers_pretrain_and_time_to_loss_smoke(tmp_path):
    lines = run_bench(
        "vs_peers.py", "--workload", "pretrain", "--smoke", "--precision", "bf16", "--workspace", str(tmp_path),
        "--malloc", "system",
    )  # fmt: skip
    assert [line.split()[0] for line in lines[2:-1]] == ["lmforge", "trainer"]
    assert all(line.endswith("  glibc malloc") for line in lines[2:-1])  # the same allocator for both
    assert lines[-1].startswith("summary (cpu, medians of 1, malloc system): lmforge trained tok/s ")
    assert "x vs trainer" in lines[-1]

    # every tool as its users get it: lmforge's precision auto and allocator, Trainer's fp32 and glibc
    lines = run_bench("vs_peers.py", "--workload", "pretrain", "--smoke", "--defaults", "--workspace", str(tmp_path))
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert rows["lmforge"][7] == ("bf16" if cpu_has_native_bf16() else "fp32") and rows["trainer"][7] == "fp32"
    assert " ".join(rows["lmforge"][9:]) == cli_allocator() and " ".join(rows["trainer"][9:]) == "glibc malloc"
    assert lines[-1].startswith("summary (cpu, medians of 1, every tool on its defaults): lmforge trained tok/s ")

    lines = run_bench("vs_peers.py", "--workload", "time-to-loss", "--smoke", "--workspace", str(tmp_path))
    starts = {line.split()[0]: float(line.split()[1]) for line in lines[-3:-1]}
    # both tools measure the same untrained model on the same held-out tokens: one number
    assert starts["lmforge"] == pytest.approx(starts["trainer"], rel=1e-3)
    assert lines[-1].startswith("summary time-to-loss (medians of 1, target val loss")


def test_data_prep_smoke(tmp_path):
    lines = run_bench("data_prep.py", "--smoke", "--workspace", str(tmp_path))
    assert lines[0].split()[:3] == ["workload", "num_proc", "records"]
    rows = {line.split()[0]: line.split() for line in lines[1:3]}
    assert set(rows) == {"sft", "text"}
    for row in rows.values():
        assert int(row[2].replace(",", "")) > 0 and int(row[3].replace(",", "")) > 0
    assert lines[-2].startswith("summary (medians of 1, best num_proc): sft ")


def test_mfu_smoke(tmp_path):
    """The tiny Llama trains in lmforge's loop; its FLOPs are counted by the PaLM formula."""
    lines = run_bench("mfu.py", "--smoke", "--workspace", str(tmp_path), "--set", "train.loss_chunk_size=64")
    allocator = cli_allocator()  # preloaded as lmforge train does
    assert lines[0].startswith(f"mfu on cpu, bf16, {allocator}:") and lines[0].endswith(" train.loss_chunk_size=64")
    assert lines[1] == "loss: fused cross-entropy from hidden states, 64 targets per chunk, no full logits"
    params, mflops, tokens_per_s, tflops, peak, matmul = lines[3].split()
    # llama-tiny, vocab 512: 2 layers x (4 x 64^2 + 3 x 64 x 256) + the 512 x 64 head; the input
    # embedding is a lookup, not counted
    linear = 2 * (4 * 64**2 + 3 * 64 * 256) + 512 * 64
    assert int(params.replace(",", "")) == linear
    assert float(mflops) == pytest.approx((6 * linear + 12 * 2 * 64 * 64) / 1e6, abs=1e-3)  # 6N + 12 L T d
    assert float(tokens_per_s) > 0 and float(tflops) > 0 and peak == "-" and float(matmul) > 0
    assert lines[-1].startswith("summary (cpu, bf16, medians of 1): MFU -; ")
    assert "% of the " in lines[-1] and "measured matmul peak" in lines[-1]


@pytest.mark.slow
def test_vs_peers_sft_smoke(tmp_path):
    """Every tool trains the tiny workload; the table and the summary come out."""
    lines = run_bench("vs_peers.py", "--workload", "sft", "--smoke", "--workspace", str(tmp_path))
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(rows) == {"lmforge", "lmforge-unpacked", "trainer", "trainer-grouped", "trl-packed"}
    for tool, row in rows.items():
        tokens_per_s, tokens, val_loss = float(row[1]), float(row[5]), float(row[6])
        assert tokens_per_s > 0 and tokens > 0 and 0 < val_loss < 20, tool
        # --malloc as-shipped: lmforge preloads tcmalloc where installed, as `lmforge train` does
        shipped = cli_allocator() if tool.startswith("lmforge") else "glibc malloc"
        assert row[7] == "fp32" and int(row[8]) >= 1 and " ".join(row[9:]) == shipped, tool
    assert lines[-1].startswith("summary (cpu, medians of 1, malloc as-shipped): lmforge trained tok/s ")
    assert "x vs trl-packed" in lines[-1]


def test_long_examples_smoke():
    lines = run_bench("long_examples.py", "--smoke")
    assert lines[1].split() == ["attention", "seconds", "RSS", "1/3", "MB", "2/3", "MB", "end", "MB", "peak", "MB"]
    assert [line.split()[0] for line in lines[2:4]] == ["varlen", "sdpa"]
    assert all(float(mb) > 0 for line in lines[2:4] for mb in line.split()[2:])  # seconds print as 0.0 here
    assert lines[-1].startswith("summary (cpu, bf16, medians of 1): varlen ") and "x the speed of sdpa" in lines[-1]


@pytest.mark.slow
def test_sweep_overhead_smoke():
    lines = run_bench("sweep_overhead.py", "--smoke")
    assert lines[0].split() == ["repeat", "sweep_s", "plain_s", "trials", "ratio"]
    repeat, sweep_s, plain_s, trials, ratio = lines[1].split()
    assert trials == "2" and float(sweep_s) > 0 and float(plain_s) > 0
    assert float(ratio) == pytest.approx(float(sweep_s) / float(plain_s), rel=0.01)
    assert lines[-1].startswith("summary (cpu, medians of 1): sweep of 2 trials / 2 plain runs wall time ")


def test_report_size_smoke(tmp_path):
    lines = run_bench("report_size.py", "--smoke", "--workspace", str(tmp_path))
    assert lines[0].startswith("one run: ") and lines[1].startswith("sweep of 10 trials: ")
    assert (tmp_path / "sweep.html").stat().st_size > (tmp_path / "one.html").stat().st_size


def test_serve_smoke():
    """The real `lmforge serve` answers 1 and then 2 concurrent clients; the table and the summary come out."""
    lines = run_bench("serve.py", "--smoke")
    assert lines[0].split() == ["clients", "requests", "req/s", "p50_ms", "p95_ms", "tok/s"]
    rows = [line.split() for line in lines[1:3]]
    assert [(r[0], r[1]) for r in rows] == [("1", "4"), ("2", "4")]
    for row in rows:
        rps, p50, p95, tok_s = map(float, row[2:])
        assert rps > 0 and 0 < p50 <= p95 and 0 < tok_s <= 4 * rps + 0.1  # at most 4 new tokens a request (rounded)
    assert lines[-1].startswith("summary (cpu, ") and "medians of 1, " in lines[-1] and "2 clients " in lines[-1]
    assert "x the req/s of 1" in lines[-1]


def test_checkpoint_size_smoke():
    lines = [line for line in run_bench("checkpoint_size.py", "--smoke") if not line.startswith(("Writing", "Loading"))]
    assert lines[0].split()[:3] == ["base", "params", "trainable"]
    row = lines[1].split()
    full_mb, adapter_mb = float(row[5]), float(row[7])
    assert lines[1].startswith("spelling (quickstart model)") and 0 < adapter_mb < full_mb


@pytest.mark.slow
def test_scaleout_smoke():
    lines = run_bench("scaleout.py", "--smoke", "--jobs", "2 processes, FSDP", "2, ZeRO-3", env=deepspeed_env())
    assert lines[0].split()[:2] == ["job", "tokens/s"]
    rows = {line[:20].strip(): line[20:].split() for line in lines[1:4]}
    assert list(rows) == ["1 process", "2 processes, FSDP", "2, ZeRO-3"]
    assert rows["1 process"][1] == "1.00x"
    for name, figures in rows.items():  # tokens/s, ratio, peak RSS MB of each process ("/" between)
        peaks = [float(mb.replace(",", "")) for mb in figures[2:-1] if mb != "/"]
        assert float(figures[0].replace(",", "")) > 0 and len(peaks) == (1 if name == "1 process" else 2)
        assert all(mb > 50 for mb in peaks)
