import json

import numpy as np
import pytest

from lmforge.data.loader import IGNORE_INDEX, StepPlan, collate, epoch_order
from lmforge.data.packing import pack_documents
from lmforge.data.prepare import _hash_split, prepare_data
from lmforge.data.sources import read_documents, resolve_paths
from lmforge.errors import DataError


def test_paragraph_documents_with_start_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n\nsecond para\n  \nthird\n")
    docs = list(read_documents(path, "text", "paragraph"))
    assert [d.text for d in docs] == ["first para\nline two", "second para", "third"]
    assert [d.where for d in docs] == [f"{path}:1", f"{path}:5", f"{path}:7"]


def test_line_and_file_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a\n\nb\nc\n")
    assert [d.text for d in read_documents(path, "text", "line")] == ["a", "b", "c"]
    assert [d.text for d in read_documents(path, "text", "file")] == ["a\n\nb\nc"]


def test_jsonl_documents_skip_empty_text(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "x"}\n{"body": "  "}\n\n{"body": "y"}\n')
    docs = list(read_documents(path, "body", "paragraph"))
    assert [(d.text, d.where) for d in docs] == [("x", f"{path}:1"), ("y", f"{path}:4")]


def test_jsonl_wrong_type_names_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: field 'text' must be a string, got int"):
        list(read_documents(path, "text", "paragraph"))


def test_resolve_paths_glob_dir_and_list(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ["d/b.txt", "d/a.jsonl", "d/sub/c.txt", "d/ignored.md"]:
        (tmp_path / name).write_text("x")
    assert [p.name for p in resolve_paths(str(tmp_path / "d"), "data.train")] == ["a.jsonl", "b.txt", "c.txt"]
    assert [p.name for p in resolve_paths(str(tmp_path / "d" / "**" / "*.txt"), "data.train")] == ["b.txt", "c.txt"]
    both = resolve_paths([str(tmp_path / "d" / "b.txt"), str(tmp_path / "d" / "*.txt")], "data.train")
    assert [p.name for p in both] == ["b.txt"]  # de-duplicated
    with pytest.raises(DataError, match="unsupported file type '.md'"):
        resolve_paths(str(tmp_path / "d" / "ignored.md"), "data.train")


def test_hash_split_is_stable_and_proportional():
    texts = [f"document number {i}" for i in range(4000)]
    splits = [_hash_split(t, 0.05, 0.1) for t in texts]
    assert splits == [_hash_split(t, 0.05, 0.1) for t in reversed(texts)][::-1]  # order-independent
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    assert abs(counts["test"] / 4000 - 0.05) < 0.015
    assert abs(counts["validation"] / 4000 - 0.10) < 0.02


def test_pack_documents_keeps_every_token():
    blocks, dropped = pack_documents([[1, 2, 3], [4, 5], [6, 7, 8, 9]], eos_id=0, block_size=4)
    assert [b.tolist() for b in blocks] == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert dropped == 0
    blocks, dropped = pack_documents([[1, 2, 3]], eos_id=0, block_size=3)  # tail [0] predicts nothing
    assert [b.tolist() for b in blocks] == [[1, 2, 3]] and dropped == 1


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    assert np.array_equal(a, epoch_order(100, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=2))


def test_step_plan_covers_each_row_once_per_epoch():
    plan = StepPlan(num_rows=23, micro_batch_size=4, grad_accum=2)
    order = epoch_order(23, 0, 0)
    assert plan.steps_per_epoch == 3  # 6 micro-batches (the last of 3 rows), 2 per step
    rows = [r for s in range(plan.steps_per_epoch) for mb in plan.step_rows(order, s) for r in mb.tolist()]
    assert rows == order.tolist()


def test_step_plan_shards_across_processes():
    plan = StepPlan(num_rows=40, micro_batch_size=2, grad_accum=2, world=2)
    order = np.arange(40)
    rank0 = [r for s in range(plan.steps_per_epoch) for mb in plan.step_rows(order, s, 0) for r in mb]
    rank1 = [r for s in range(plan.steps_per_epoch) for mb in plan.step_rows(order, s, 1) for r in mb]
    assert sorted(rank0 + rank1) == list(range(40)) and not set(rank0) & set(rank1)


def test_collate_pads_and_masks():
    batch = collate([[5, 6, 7], [8]], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_cache_reused_and_invalidated(tiny_config, tmp_path):
    config = tiny_config(f"data.cache_dir={tmp_path / 'own-cache'}")
    messages = []
    first = prepare_data(config, log=messages.append)
    assert not first.cache_hit and any("tokenizing" in m for m in messages)
    assert any("training a byte-level BPE tokenizer" in m for m in messages)
    messages.clear()
    second = prepare_data(config, log=messages.append)
    assert second.cache_hit and messages == []  # neither tokenizer training nor tokenization again
    assert second.splits["train"]["input_ids"] == first.splits["train"]["input_ids"]
    # a different block length re-packs (same tokenizer); different text re-trains the tokenizer
    messages.clear()
    config.data.max_length = 48
    assert not prepare_data(config, log=messages.append).cache_hit
    assert messages == ["tokenizing and packing the corpus"]
    with open(config.data.train, "a") as f:
        f.write("\n\nAnd a new chapter.\n")
    messages.clear()
    assert not prepare_data(config, log=messages.append).cache_hit
    assert any("training a byte-level BPE tokenizer" in m for m in messages)


def test_splits_and_report_are_consistent(tiny_config):
    data = prepare_data(tiny_config(), log=lambda _: None)
    report = data.report["splits"]
    for name, split in data.splits.items():
        tokens = sum(len(r) for r in split["input_ids"])
        assert tokens == report[name]["tokens"] - report[name]["tokens_dropped"]
        assert len(split) == report[name]["blocks"]
    assert sum(s["documents"] for s in report.values()) == 40  # every chapter of the corpus, once
    json.dumps(data.report)


def test_explicit_validation_file_is_used(tiny_config, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("A short validation document.\n")
    data = prepare_data(tiny_config(f"data.validation={val}", "data.test_fraction=0"), log=lambda _: None)
    assert data.report["splits"]["validation"]["documents"] == 1
    assert "test" not in data.splits
    assert data.report["splits"]["train"]["documents"] == 40
