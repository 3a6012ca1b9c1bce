"""Benchmarks under bench/ run in their --smoke mode, so they never rot. Their figures are read
by people (bench/RESULTS.md), never asserted here: timings and memory are not test material."""

import subprocess
import sys

from conftest import ROOT, subprocess_env


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
