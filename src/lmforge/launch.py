"""`lmforge train --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P]`: lmforge
starts the job itself with PyTorch's launcher (torch.distributed.run, which `torchrun` is), after
checking the config and preparing the data on this machine, so that no process of the job waits on
tokenization past the collective timeout. Plain `torchrun` and `accelerate launch` work as before."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from lmforge.errors import UserError

DEFAULT_PORT = 29500
"""torchrun's default rendezvous port on the main machine of a job of several machines."""


@dataclass(frozen=True)
class Launch:
    """Where this machine's processes sit in the job."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None


def check_launch(launch: Launch) -> None:
    """The launch options against each other and against a job already running.

    Raises:
        UserError: naming the option and the fix.
    """
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        raise UserError(
            "--nproc/--nnodes start a job, and this process is already one of a job (torchrun or accelerate "
            "launch started it): drop --nproc/--nnodes, or run lmforge train --nproc N without the launcher"
        )
    if launch.node_rank >= launch.nnodes:
        raise UserError(
            f"--node-rank {launch.node_rank}: the machines of a job of --nnodes {launch.nnodes} are numbered 0 to "
            f"{launch.nnodes - 1}"
        )
    if launch.nnodes > 1 and not launch.master_addr:
        raise UserError(
            f"--nnodes {launch.nnodes}: give --master-addr, the address every machine reaches the one with "
            "--node-rank 0 at (and the same --master-port on each, default 29500)"
        )


def torchrun_command(launch: Launch, lmforge_args: list[str]) -> list[str]:
    """The command that starts this machine's processes of the job, each running `lmforge
    lmforge_args`: one machine alone rendezvouses on a free local port (--standalone) unless a port
    is given; several machines meet at --master-addr:--master-port, static ranks by --node-rank."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.nnodes == 1 and launch.master_port is None:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            f"--master-addr={launch.master_addr or '127.0.0.1'}",
            f"--master-port={launch.master_port or DEFAULT_PORT}",
        ]
    return [*command, "-m", "lmforge", *lmforge_args]


def start_job(launch: Launch, lmforge_args: list[str]) -> None:
    """Replace this process with the launcher (signals then reach it, and it passes them on to the
    job's processes); does not return. Each process gets an equal share of the cores this one may use
    as its CPU threads (OMP_NUM_THREADS, unless set: torchrun would give each one thread)."""
    from lmforge.engine.threads import CORE_SHARE, available_cores

    if "OMP_NUM_THREADS" not in os.environ:
        cores = available_cores()
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // launch.nproc))
        os.environ[CORE_SHARE] = f"{cores}/{launch.nproc}"
    command = torchrun_command(launch, lmforge_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def leave_job() -> None:
    """Destroy torch.distributed's default process group, where this process is in one: once a
    job's process has finished its run normally, before the interpreter exits.

    torch asks every trainer process to do so near the end of its main (the "Shutdown" section of
    its distributed docs): a gloo group left to the interpreter's exit may still hold work whose
    tensors then need the GIL and abort the finished process (SIGABRT, "terminate called without
    an active exception", pytorch/pytorch#190489), failing a job whose run was complete. Not called
    after an error: a process still in a collective with the others would hang (torchtitan#1342).
    """
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
