"""How many CPU threads a training process uses when the config leaves train.num_threads."""

from __future__ import annotations

import os

import torch

CORE_SHARE = "_LMFORGE_CORE_SHARE"
"""Set by `lmforge train --nproc` beside the OMP_NUM_THREADS it gives each process: "cores/processes"."""


def available_cores() -> int:
    """The physical cores this process may use: joblib's `cpu_count`, which reads the CPU affinity
    and the cgroup CPU quota (v1 and v2), where os.cpu_count() and PyTorch see the whole machine."""
    import joblib

    return joblib.cpu_count(only_physical_cores=True)


def default_threads() -> tuple[int, str]:
    """(threads, where the number comes from) for a process whose config leaves train.num_threads.

    OMP_NUM_THREADS when it is set (PyTorch reads it; torchrun sets 1 for each process it starts
    unless told otherwise). Else the physical cores this process may use, shared by the job's
    processes on this machine (LOCAL_WORLD_SIZE), as `available_cores` counts them. PyTorch's own
    default, one thread per core of the machine, ignores the affinity and the quota: a container
    limited to 2 of 64 cores, or a SLURM job's share of a node, would run 64 threads that wait on
    each other.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        if share := os.environ.get(CORE_SHARE):  # lmforge's launcher set it: say what it was
            cores, local = (int(part) for part in share.split("/"))
            return torch.get_num_threads(), f"the {cores} cores this process may use, shared by {local} processes"
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = available_cores()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    shared = f", shared by {local} processes" if local > 1 else ""
    return max(1, cores // local), f"the {cores} core{'s' * (cores != 1)} this process may use{shared}"
