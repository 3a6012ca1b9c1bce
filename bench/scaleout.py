"""One process against two (DDP, FSDP, DeepSpeed ZeRO-2 and ZeRO-3) on this machine's CPU: trained
tokens per second of the job and peak RSS of each training process, in one run, the same global
batch for all.

    python bench/scaleout.py                       # llama-20m on the quickstart text, 30 steps
    python bench/scaleout.py --preset llama-120m   # where sharding shows in memory, 10 steps
    python bench/scaleout.py --smoke               # llama-tiny, 6 steps (tested)

Each job is `lmforge train examples/quickstart.yaml` (its own tokenizer, the text in data/) with
micro-batch 8 x grad_accum 2 in one process, and micro-batch 8 in each of two (`--nproc 2`,
distributed.strategy ddp, fsdp or deepspeed), fp32, no evaluation, no checkpoint until the end. Tokens per
second is the job's, from metrics.jsonl, over the steps after the first log point (start-up and
first-step allocation excluded). Peak RSS is sampled every 0.1 s from every training process
(psutil), the torchrun launcher excluded: each process's, largest first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
JOBS = {  # name: (processes, overrides)
    "1 process": (1, ["train.grad_accum=2"]),
    "2 processes, DDP": (2, ["distributed.strategy=ddp"]),
    # FSDP and DeepSpeed train on the plain loss (full-vocabulary logits): DDP on it too, to tell
    # what sharding saves from what the chunked loss saves
    "2, DDP, plain loss": (2, ["distributed.strategy=ddp", "train.loss_chunk_size=null"]),
    "2 processes, FSDP": (2, ["distributed.strategy=fsdp"]),
    "2, ZeRO-2": (2, ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=2"]),
    "2, ZeRO-3": (2, ["distributed.strategy=deepspeed", "distributed.deepspeed.zero_stage=3"]),
    # glibc's mmap threshold held at its initial 128 KiB (setting it stops it rising as large blocks
    # are freed): every tensor over it is returned to the kernel on free, none kept in the heap
    "2, DDP, fixed mmap": (2, ["distributed.strategy=ddp"]),
    "2, FSDP, fixed mmap": (2, ["distributed.strategy=fsdp"]),
}
ENVIRONMENTS = {name: {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"} for name in JOBS if "fixed mmap" in name}


def run(name: str, processes: int, overrides: list[str], settings: list[str], out: Path) -> dict:
    command = [sys.executable, "-m", "lmforge", "train", str(ROOT / "examples" / "quickstart.yaml")]
    command += [*settings, *overrides, f"output_dir={out}", f"name=job{processes}"]
    if processes > 1:
        command += ["--nproc", str(processes)]
    env = {**os.environ, **ENVIRONMENTS.get(name, {})}
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peaks: dict[int, int] = {}
    while job.poll() is None:
        for child in psutil.Process(job.pid).children(recursive=True) + [psutil.Process(job.pid)]:
            try:
                if "torch.distributed.run" in " ".join(child.cmdline()):
                    continue  # the launcher trains nothing
                peaks[child.pid] = max(peaks.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.1)
    output = job.stdout.read()
    if job.returncode != 0:
        raise SystemExit(f"{name} failed:\n{output}")
    (run_dir,) = [p for p in out.glob(f"job{processes}-2*") if p.is_dir()]
    points = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [p for p in points if "train/step_time" in p]  # the job's tokens, every process's
    first, later = logged[0], logged[1:]
    seconds = sum(p["train/step_time"] * (p["step"] - q["step"]) for q, p in zip(logged[:-1], later, strict=True))
    trained = later[-1]["train/tokens_seen"] - first["train/tokens_seen"]
    top = sorted(peaks.values(), reverse=True)[:processes]
    return {"tokens_per_sec": trained / seconds, "peak_rss_mb": [rss / 2**20 for rss in top]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps")
    parser.add_argument("--preset", default="llama-20m", help="model.preset (default llama-20m)")
    parser.add_argument("--steps", type=int, help="training steps (default 30 for llama-20m, else 10)")
    parser.add_argument("--jobs", nargs="+", choices=list(JOBS), default=list(JOBS), help="the jobs to run")
    args = parser.parse_args()
    steps, log_every = (6, 2) if args.smoke else (30, 5) if args.preset == "llama-20m" else (10, 2)
    steps = args.steps or steps
    settings = [
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        "train.micro_batch_size=8",
        "train.eval_every=null",
        "train.precision=fp32",
        "eval.generate.num_examples=0",
        "eval.predictions=false",
        "tracking.backends=[none]",
    ]
    if not args.smoke:
        settings += [f"model.preset={args.preset}", "model.hidden_size=null", "model.intermediate_size=null"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["1 process", *(job for job in args.jobs if job != "1 process")]:  # the yardstick first
            processes, overrides = JOBS[name]
            results[name] = run(name, processes, overrides, settings, Path(tmp) / name.replace(" ", "_"))
    alone = results["1 process"]["tokens_per_sec"]
    print(f"{'job':<20} {'tokens/s':>10} {'vs 1 process':>13} {'peak RSS per process':>22}")
    for name, figures in results.items():
        ratio = figures["tokens_per_sec"] / alone
        rss = " / ".join(f"{mb:,.0f}" for mb in figures["peak_rss_mb"])
        print(f"{name:<20} {figures['tokens_per_sec']:>10,.0f} {ratio:>12.2f}x {rss:>19} MB")
    if any(name in ENVIRONMENTS for name in results):
        print("fixed mmap: GLIBC_TUNABLES=glibc.malloc.mmap_threshold=131072")


if __name__ == "__main__":
    main()
