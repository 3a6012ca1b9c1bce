"""When lmforge train re-executes itself with tcmalloc preloaded or glibc's tunables set, and when it
leaves the process alone. The re-execution itself runs in tests/integration/test_cli_train.py (the
real CLI)."""

from __future__ import annotations

import os

from lmforge import malloc
from lmforge.config import load_config

LIB = "libtcmalloc_minimal.so.4"


def found() -> str:
    return LIB


def never() -> str:
    raise AssertionError("the library was looked up although nothing would preload it")


def test_preloads_tcmalloc_once_where_nothing_else_is_chosen():
    env = malloc.preload_plan({"PATH": "/bin"}, "linux", found)
    quiet = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}  # no stderr line per allocation over 1 GB
    assert env == {"PATH": "/bin", "LD_PRELOAD": LIB, "_LMFORGE_MALLOC_PRELOADED": "1", **quiet}
    mine = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1024"}
    assert malloc.preload_plan(mine, "linux", found)["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "1024"
    assert malloc.preload_plan(env, "linux", never) is None  # the re-executed process goes on
    assert malloc.without_preload(env) == {"PATH": "/bin", **quiet}  # a child of it chooses afresh


def test_without_tcmalloc_glibc_keeps_freed_memory():
    env = malloc.preload_plan({"PATH": "/bin"}, "linux", lambda: None, lambda: "glibc")
    keep = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": keep, "_LMFORGE_MALLOC_PRELOADED": "1"}
    assert malloc.preload_plan(env, "linux", never) is None  # the re-executed process goes on
    assert malloc.without_preload(env) == {"PATH": "/bin"}  # a child of it chooses afresh
    mine = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert malloc.preload_plan(mine, "linux", lambda: None, lambda: "glibc") is None  # the user chose
    assert malloc.without_preload(mine) == mine
    assert malloc.preload_plan({}, "linux", lambda: None, lambda: "") is None  # musl: no glibc tunables


def test_leaves_the_process_alone_otherwise():
    assert malloc.preload_plan({}, "darwin", never) is None
    assert malloc.preload_plan({"LD_PRELOAD": "libjemalloc.so.2"}, "linux", never) is None  # the user chose
    assert malloc.preload_plan({"LMFORGE_MALLOC": "system"}, "linux", never) is None
    assert malloc.preload_plan({"LMFORGE_MALLOC": " System "}, "linux", never) is None
    assert malloc.preload_plan({"_LMFORGE_MALLOC_PRELOADED": "1"}, "linux", never) is None  # loader ignored it


def test_the_opt_out_is_not_a_config_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: llama-tiny}\ntokenizer: {train: true}\ndata: {train: t.txt, format: text}\n")
    loaded = load_config(config, env={"LMFORGE_MALLOC": "system", "LMFORGE_TRAIN__LR": "0.01"})
    assert loaded.train.lr == 0.01  # other LMFORGE_ variables still are


def test_names_the_allocator_in_use():
    kept = os.environ.get("GLIBC_TUNABLES") == malloc.GLIBC_KEEP
    expected = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else malloc.KEPT if kept else "glibc malloc"
    assert malloc.active() == expected
    tip = malloc.advice({})
    if expected == "tcmalloc":
        assert tip is None
    else:
        assert "tcmalloc" in tip and ("LD_PRELOAD=" in tip if malloc.find_tcmalloc() else "apt install" in tip)
    assert malloc.advice({"LMFORGE_MALLOC": "system"}) is None
