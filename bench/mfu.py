"""Model FLOPs utilisation (MFU) of lmforge's training loop: a ~120M Llama pretraining on full
blocks of 2048 tokens, the figure the issue's GPU goal is stated in (>= 40% in bf16).

    python bench/mfu.py            # llama-120m (vocab 32000, tied), sequence 2048, bf16
    python bench/mfu.py --smoke    # tiny model, sequence 64, a few steps: keeps the script alive
    python bench/mfu.py --set train.loss_chunk_size=512 model.attention=sdpa   # any config override

The run is lmforge's own `train()` on the KJV text of bench/workloads.py, packed into full blocks,
so data loading, the optimizer, clipping and logging are all inside the timed steps. Throughput is
taken between the first log point after the warm-up steps and the last one (tokens from the loop's
own `train/tokens_seen`), so compilation and allocator warm-up are left out.

Model FLOPs per token follow the PaLM paper (appendix B), as nanoGPT and most MFU figures do:
6 N + 12 L T d, with N the weights of every linear layer (the LM head included, the input embedding
not: it is a lookup), L layers, T the sequence length, d the attention width. Attention is counted
in full although a causal kernel skips half of it, and activation recomputation is not counted.

Like `lmforge train`, the script re-executes itself with tcmalloc preloaded where it is installed
(lmforge/malloc.py; LMFORGE_MALLOC=system keeps glibc's malloc): the first line names the allocator.

Two utilisations are printed: against the device's datasheet dense peak for the precision (known
GPUs only, or --peak-tflops), and against the peak of a large matmul measured here in the same
dtype, which is what the device actually delivers (also the only reference on a CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lmforge import malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_peers import Points  # noqa: E402
from workloads import make_workspace  # noqa: E402

FULL = {"preset": "llama-120m", "vocab_size": 32_000, "seq": 2048, "batch": 8, "steps": 30, "warmup": 10}
SMOKE = {"preset": "llama-tiny", "vocab_size": 512, "seq": 64, "batch": 2, "steps": 4, "warmup": 2}

DATASHEET_TFLOPS = {  # dense bf16/fp16 tensor-core peaks, without sparsity
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.4,  # SXM (HBM3)
    "H200": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
}
"""By a substring of torch.cuda.get_device_name(); the first match wins, so the more specific
names come first."""


def datasheet_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in DATASHEET_TFLOPS.items() if key in name), None)


def measured_peak(device: torch.device, dtype: torch.dtype, repeats: int = 10, smoke: bool = False) -> float:
    """TFLOP/s of an n x n x n matmul in `dtype`, the best of `repeats` after warm-up. --smoke
    times one 256 x 256 x 256 matmul: a CPU without native bf16 (oneDNN's slow reference path)
    takes seconds for each 2048-sized one."""
    n = 256 if smoke else 8192 if device.type == "cuda" else 2048
    repeats, warmup = (1, 1) if smoke else (repeats, 3)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + warmup):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def flops_per_token(model: nn.Module, seq: int) -> tuple[int, float]:
    """(N, model FLOPs per trained token) by the PaLM formula, 6 N + 12 L T d."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    config = model.config
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    return linear, 6 * linear + 12 * config.num_hidden_layers * seq * width


def run(root: Path, s: dict, precision: str, compile_model: bool, smoke: bool, overrides: list[str]) -> dict:
    import yaml
    from rich.console import Console

    from lmforge.config import load_config
    from lmforge.data.prepare import prepare_data
    from lmforge.engine.loop import train
    from lmforge.engine.losses import describe_loss, resolve_loss_chunk_size
    from lmforge.models.build import build_model
    from lmforge.tracking.base import Trackers

    ws = make_workspace(root, preset=s["preset"], vocab_size=s["vocab_size"], smoke=smoke)
    settings = root / "mfu.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "seed": 0,
                "output_dir": str(root / "runs"),
                "model": {"name_or_path": str(ws.base)},
                "data": {
                    "train": str(ws.text_train),
                    "validation": str(ws.text_validation),
                    "format": "text",
                    "max_length": s["seq"],
                    "cache_dir": str(root / "cache"),
                },
                "train": {
                    "max_steps": s["steps"],
                    "micro_batch_size": s["batch"],
                    "lr": 3e-4,
                    "warmup_steps": 2,
                    "precision": precision,
                    "compile": compile_model,
                    "log_every": s["warmup"],
                },
                "eval": {"max_batches": 1},
                "tracking": {"backends": ["none"]},
            }
        )
    )
    config = load_config(settings, overrides, env={})  # validated, as `lmforge train` would
    prepared = prepare_data(config, log=lambda _: None)
    model = build_model(config, prepared.tokenizer)
    params, per_token = flops_per_token(model, s["seq"])
    record = Points()
    result = train(model, prepared, config, Trackers(record, [], None, print), console=Console(quiet=True))
    chunk = resolve_loss_chunk_size(config.train.loss_chunk_size, result.model, "causal-lm", config.train.compile)
    logged = [(stamp, m["train/tokens_seen"]) for _, stamp, m in record.points if "train/tokens_seen" in m]
    (t0, n0), (t1, n1) = logged[0], logged[-1]
    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "params": params,
        "loss": describe_loss(chunk, result.model, "causal-lm"),
        "flops_per_token": per_token,
        "tokens_per_s": (n1 - n0) / (t1 - t0),
        "datasheet_tflops": datasheet_peak(device, precision),
        "measured_tflops": measured_peak(device, dtype, smoke=smoke),
    }


def main() -> None:
    malloc.preload_tcmalloc()  # as lmforge train does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model and sequence, a few steps")
    parser.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs of the whole training call")
    parser.add_argument("--batch", type=int, default=None, help="micro-batch size (default 8; 2 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps, warm-up included")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing, and the log interval")
    parser.add_argument("--compile", action="store_true", help="train.compile: true")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, as on lmforge train's command line"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, if not known here")
    parser.add_argument("--workspace", type=Path, default=None, help="default: a directory under /tmp, reused")
    args = parser.parse_args()
    s = dict(SMOKE if args.smoke else FULL)
    s.update(
        {k: v for k, v in (("batch", args.batch), ("steps", args.steps), ("warmup", args.warmup)) if v is not None}
    )
    if s["steps"] < 2 * s["warmup"] or s["steps"] % s["warmup"]:
        raise SystemExit(
            f"--steps must be a multiple of {s['warmup']} (the warm-up and log interval), at least twice it"
        )
    name = "lmforge-bench-mfu-smoke" if args.smoke else "lmforge-bench-mfu"
    root = args.workspace or Path(tempfile.gettempdir()) / name
    runs = [run(root, s, args.precision, args.compile, args.smoke, args.set) for _ in range(args.repeats)]
    report(runs, s, args.precision, args.peak_tflops, args.set)


def report(runs: list[dict], s: dict, precision: str, peak_override: float | None, overrides: list[str]) -> None:
    first = runs[0]
    speed = statistics.median(r["tokens_per_s"] for r in runs)
    achieved = speed * first["flops_per_token"] / 1e12
    datasheet = peak_override or first["datasheet_tflops"]
    measured = statistics.median(r["measured_tflops"] for r in runs)
    settings = {k: s[k] for k in ("preset", "vocab_size", "seq", "batch", "steps", "warmup")}
    head = f"mfu on {first['device']}, {precision}, {malloc.active()}: {json.dumps(settings)} {' '.join(overrides)}"
    print(head.rstrip())
    print(f"loss: {first['loss']}")
    print(f"{'params (linear)':>16} {'MFLOP/token':>12} {'tok/s':>10} {'TFLOP/s':>9} {'peak':>8} {'matmul':>8}")
    peak = f"{datasheet:.1f}" if datasheet else "-"
    print(
        f"{first['params']:>16,} {first['flops_per_token'] / 1e6:>12.3f} {speed:>10.0f} {achieved:>9.3f} "
        f"{peak:>8} {measured:>8.3f}"
    )
    of_peak = f"MFU {100 * achieved / datasheet:.1f}% of {datasheet:.0f} TFLOP/s datasheet" if datasheet else "MFU -"
    print(
        f"summary ({first['device']}, {precision}, medians of {len(runs)}): {of_peak}; "
        f"{100 * achieved / measured:.1f}% of the {measured:.1f} TFLOP/s measured matmul peak (goal on GPU: >= 40%)"
    )


if __name__ == "__main__":
    main()
