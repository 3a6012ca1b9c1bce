"""System metrics logged with each train log line: process memory, and CUDA memory when present."""

from __future__ import annotations

import psutil
import torch

MB = 1024 * 1024


def system_metrics(device: torch.device) -> dict[str, float]:
    """system/rss_mb (this process's resident memory) and, on CUDA, allocated/peak/reserved MB."""
    metrics = {"system/rss_mb": psutil.Process().memory_info().rss / MB}
    if device.type == "cuda":
        metrics["system/cuda_allocated_mb"] = torch.cuda.memory_allocated(device) / MB
        metrics["system/cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / MB
        metrics["system/cuda_reserved_mb"] = torch.cuda.memory_reserved(device) / MB
    return metrics
