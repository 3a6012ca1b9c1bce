"""The allocator of CPU training: `lmforge train` and `lmforge eval` preload tcmalloc when it is
installed, and otherwise tell glibc's malloc to keep freed memory (`GLIBC_KEEP`).

glibc's malloc serves every allocation above its mmap threshold (at most 32 MB) with fresh pages
from the kernel and returns them on free, so the large tensors PyTorch allocates at every step on
a CPU (activations, logits, gradients) pay their page faults again at every step. tcmalloc keeps
freed memory for reuse. Measured on a 2-core CPU (bench/RESULTS.md, session 8), tcmalloc against
glibc: the 120M Llama in bf16 +35% tokens/s and SFT of the 20M model in bf16 +5-24% (alternating
runs), `Trainer` pretraining the 20M model in fp32 about +7% (two runs half an hour apart), each
with a lower peak RSS; jemalloc, with its defaults, was 20% slower than glibc. Any PyTorch
program gains alike: `Trainer` too, when preloaded by hand.

Where no tcmalloc is installed (no Python package ships it), glibc's own tunables get part of the
way without installing anything: blocks up to 32 MB (its largest mmap threshold) come from its
heap and freed memory stays there for the next step (`GLIBC_KEEP`): +11% tokens/s for SFT of the
20M model in fp32 on a 2-core AVX2 CPU, the same peak RSS (bench/RESULTS.md, 2026-12-02).

An allocator, and glibc's tunables, must be in place before the process allocates anything, so
they cannot be switched on from Python: the command re-executes itself once (same process id,
arguments and environment) with LD_PRELOAD naming tcmalloc, or else with GLIBC_TUNABLES. Nothing
happens when LD_PRELOAD or GLIBC_TUNABLES is already set (the user chose), when
LMFORGE_MALLOC=system, or off Linux. tcmalloc: Debian and Ubuntu `apt install
libtcmalloc-minimal4`; Fedora `dnf install gperftools-libs`.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import platform as platforms
import sys
from collections.abc import Callable, Mapping

OPT_OUT = "LMFORGE_MALLOC"
"""LMFORGE_MALLOC=system keeps glibc's malloc. Not a config override (config.ENV_RESERVED)."""

_REEXECUTED = "_LMFORGE_MALLOC_PRELOADED"
"""Set in the re-executed process: it never re-executes again, whatever the loader did."""

GLIBC_KEEP = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
"""GLIBC_TUNABLES where tcmalloc is absent. By default glibc serves each block over its mmap
threshold (128 KB at start, raised as blocks are freed, up to 32 MB) with fresh pages from the
kernel and trims the top of its heap past 128 KB, so a step's large tensors pay their page faults
again. Fixed at 32 MB (the most glibc accepts on 64-bit) and a 4 GB trim threshold, they are
reused. Tensors over 32 MB are still mapped afresh: tcmalloc keeps those too."""

KEPT = "glibc malloc (freed memory kept)"
"""`active()` under GLIBC_KEEP: the plan line and the run's lmforge.malloc tag."""

LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
"""gperftools' allocator without and with its profilers; the minimal one is all that is needed."""


def find_tcmalloc() -> str | None:
    """The installed tcmalloc's file name as the dynamic loader finds it, or None."""
    for name in LIBRARIES:
        if found := ctypes.util.find_library(name):
            return found
    return None


def _opted_out(env: Mapping[str, str]) -> bool:
    return env.get(OPT_OUT, "").strip().lower() == "system"


def _libc() -> str:
    """The C library this Python runs on: "glibc", or "" where it cannot tell (musl)."""
    return platforms.libc_ver()[0]


def preload_plan(
    env: Mapping[str, str],
    platform: str,
    find: Callable[[], str | None] = find_tcmalloc,
    libc: Callable[[], str] = _libc,
) -> dict[str, str] | None:
    """The environment to re-execute with (tcmalloc preloaded; else glibc told `GLIBC_KEEP`), or
    None to go on as we are. The library is looked up (`find`, which asks ldconfig) only once
    everything else says yes: the re-executed process, and one with an LD_PRELOAD of its own, return
    at once. GLIBC_TUNABLES of the user's own are left alone."""
    if platform != "linux" or env.get(_REEXECUTED) or env.get("LD_PRELOAD") or _opted_out(env):
        return None
    if (library := find()) is not None:
        # gperftools builds that report allocations over 1 GB on stderr would do so at every step of a big model
        quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}
        return {**quiet, **env, "LD_PRELOAD": library, _REEXECUTED: "1"}
    if env.get("GLIBC_TUNABLES") or libc() != "glibc":
        return None
    return {**env, "GLIBC_TUNABLES": GLIBC_KEEP, _REEXECUTED: "1"}


def without_preload(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with no preloaded library, none of lmforge's glibc tunables and no mark of a
    re-execution: a child started with it makes its own choice (`preload_plan`)."""
    ours = {"LD_PRELOAD", _REEXECUTED} | ({"GLIBC_TUNABLES"} if env.get("GLIBC_TUNABLES") == GLIBC_KEEP else set())
    return {k: v for k, v in env.items() if k not in ours}


def preload_tcmalloc() -> None:
    """Re-execute this process with tcmalloc preloaded, or glibc's tunables set, where
    `preload_plan` says so; return otherwise. For the command-line entry point only: it replaces
    the running program."""
    env = preload_plan(os.environ, sys.platform)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


@functools.cache  # fixed for the life of the process
def active() -> str:
    """The allocator this process runs on: tcmalloc or jemalloc where one is loaded, else the C
    library's malloc (read from the process's own memory map on Linux); `KEPT` under GLIBC_KEEP."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            mapped = maps.read()
    except OSError:
        return "system malloc"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in mapped:
            return name
    if sys.platform != "linux":
        return "system malloc"
    return KEPT if os.environ.get("GLIBC_TUNABLES") == GLIBC_KEEP else "glibc malloc"


def advice(env: Mapping[str, str] | None = None) -> str | None:
    """What to do for a faster CPU run, when this process runs on glibc's malloc; None otherwise."""
    env = os.environ if env is None else env
    if active() not in ("glibc malloc", KEPT) or _opted_out(env):  # glibc: Linux only
        return None
    if library := find_tcmalloc():
        return f"this process runs on glibc's malloc: start it with LD_PRELOAD={library} for faster CPU training"
    return (
        "install tcmalloc (Debian/Ubuntu: apt install libtcmalloc-minimal4) and lmforge train preloads it: "
        "CPU training ran 5-35% faster with it than on glibc's malloc as it comes"
    )
