import json

import numpy as np
import pytest
import torch

from lmforge.data.loader import IGNORE_INDEX, StepPlan, collate, epoch_order, padding_fraction, row_order
from lmforge.data.packing import best_fit_decreasing, position_ids
from lmforge.data.prepare import hash_split, prepare_data
from lmforge.data.sources import read_records, resolve_paths
from lmforge.errors import DataError


def test_paragraph_documents_with_start_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first para\nline two\n\n\nsecond para\n  \nthird\n")
    records = list(read_records(path, "paragraph"))
    assert [r.fields["text"] for r in records] == ["first para\nline two", "second para", "third"]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:5", f"{path}:7"]


def test_line_and_file_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a\n\nb\nc\n")
    assert [r.fields["text"] for r in read_records(path, "line")] == ["a", "b", "c"]
    assert [r.fields["text"] for r in read_records(path, "file")] == ["a\n\nb\nc"]


def test_every_source_type_reads_the_same_records(tmp_path):
    import pandas as pd
    from datasets import Dataset

    rows = [{"q": "one?", "a": "1"}, {"q": "two?", "a": "2"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ["d.jsonl", "d.json", "d.csv", "d.parquet", "saved"]:
        (path,) = resolve_paths(str(tmp_path / name), "data.train")
        assert [r.fields for r in read_records(path)] == rows, name
    assert [r.where for r in read_records(tmp_path / "d.csv")] == [f"{tmp_path / 'd.csv'}:2", f"{tmp_path / 'd.csv'}:3"]


def test_malformed_lines_become_problem_records(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n{"text": \n[1, 2]\n')
    records = list(read_records(path))
    assert [r.reason for r in records] == ["", "malformed_json", "not_an_object"]
    assert records[1].where == f"{path}:2"


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
    splits = [hash_split({"text": t}, 0.05, 0.1) for t in texts]
    assert splits == [hash_split({"text": t}, 0.05, 0.1) for t in reversed(texts)][::-1]  # order-independent
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    assert abs(counts["test"] / 4000 - 0.05) < 0.015
    assert abs(counts["validation"] / 4000 - 0.10) < 0.02


def test_best_fit_decreasing():
    lengths = [5, 3, 8, 2, 6, 4, 1]
    bins = best_fit_decreasing(lengths, capacity=10)
    assert sorted(i for b in bins for i in b) == list(range(7))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 29 tokens need at least 3 rows of 10
    assert bins == best_fit_decreasing(lengths, capacity=10)  # deterministic
    with pytest.raises(ValueError):
        best_fit_decreasing([11], capacity=10)


def test_collate_positions_restart_per_example_and_padding_is_ignored():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "lengths": [2, 3]},
        {"input_ids": [4, 3], "labels": [-100, 3], "lengths": [2]},
    ]
    batch = collate(rows, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert int(batch["num_tokens"]) == 7
    assert position_ids([2, 3]) == [0, 1, 0, 1, 2]
    # what the host knows, so that no GPU is asked: the examples' lengths in flat order (the padding
    # of a row is one), and the flat positions with a next token to predict
    assert batch["segments"].tolist() == [2, 3, 2, 3]
    assert batch["target_index"].tolist() == [0, 2, 3, 5]


def test_collated_segments_are_what_the_position_ids_show():
    """`segments` stands in for reading the position ids back (attention.segment_lengths)."""
    from lmforge.models.attention import segment_lengths

    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = []
        for _ in range(int(rng.integers(1, 5))):
            lengths = [int(n) for n in rng.integers(1, 9, size=int(rng.integers(1, 4)))]
            ids = [int(t) for t in rng.integers(2, 50, size=sum(lengths))]
            rows.append({"input_ids": ids, "labels": ids, "lengths": lengths})
        batch = collate(rows, pad_id=1)
        assert batch["segments"].tolist() == segment_lengths(batch["position_ids"])
        assert (
            batch["target_index"].tolist()
            == (batch["labels"][:, 1:] != IGNORE_INDEX)
            .nonzero()
            .matmul(torch.tensor([batch["labels"].shape[1], 1]))
            .tolist()
        )


def test_epoch_order_depends_only_on_seed_and_epoch():
    a = epoch_order(100, seed=3, epoch=2)
    assert np.array_equal(a, epoch_order(100, seed=3, epoch=2))
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, epoch_order(100, seed=3, epoch=1))
    assert not np.array_equal(a, epoch_order(100, seed=4, epoch=2))


def test_row_orders_and_length_grouping_cut_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=400).tolist()
    assert row_order(lengths, 1, 0, "as_is").tolist() == list(range(400))
    ascending = row_order(lengths, 1, 0, "length_ascending")
    assert [lengths[i] for i in ascending] == sorted(lengths)
    grouped = row_order(lengths, 1, 0, "shuffle", group_by=64, batch=8)
    assert sorted(grouped.tolist()) == list(range(400))
    assert np.array_equal(grouped, row_order(lengths, 1, 0, "shuffle", group_by=64, batch=8))
    plain = row_order(lengths, 1, 0, "shuffle")
    assert padding_fraction(lengths, grouped, 8) < padding_fraction(lengths, plain, 8) / 3


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
    # a different row length re-packs (same tokenizer); different text re-trains the tokenizer
    messages.clear()
    config.data.max_length = 48
    assert not prepare_data(config, log=messages.append).cache_hit
    assert messages == ["tokenizing and packing the data"]
    with open(config.data.train, "a") as f:
        f.write("\n\nAnd a new chapter.\n")
    messages.clear()
    assert not prepare_data(config, log=messages.append).cache_hit
    assert any("training a byte-level BPE tokenizer" in m for m in messages)


def test_text_splits_and_report_are_consistent(tiny_config):
    data = prepare_data(tiny_config(), log=lambda _: None)
    report = data.report["splits"]
    for name, split in data.splits.items():
        assert sum(split["num_tokens"]) == report[name]["tokens"]
        assert len(split) == report[name]["rows"]
        assert all(sum(n) == len(ids) <= 32 for n, ids in zip(split["lengths"], split["input_ids"], strict=True))
    assert sum(s["records"] for s in report.values()) == 40  # every chapter of the corpus, once
    assert report["train"]["split_into_pieces"] > 0 and report["train"]["dropped"] == {}
    json.dumps(data.report)


def test_explicit_validation_file_is_used(tiny_config, tmp_path):
    val = tmp_path / "val.txt"
    val.write_text("A short validation document.\n")
    data = prepare_data(tiny_config(f"data.validation={val}", "data.test_fraction=0"), log=lambda _: None)
    assert data.report["splits"]["validation"]["records"] == 1
    assert "test" not in data.splits
    assert data.report["splits"]["train"]["records"] == 40


def test_grouped_micro_batches_are_shuffled_not_swept_long_to_short():
    lengths = list(range(1, 257))
    order = row_order(lengths, 5, 0, "shuffle", group_by=256, batch=8)
    batch_max = [max(lengths[i] for i in order[k : k + 8]) for k in range(0, 256, 8)]
    assert batch_max != sorted(batch_max, reverse=True) and batch_max != sorted(batch_max)
    spans = [
        max(lengths[i] for i in order[k : k + 8]) - min(lengths[i] for i in order[k : k + 8]) for k in range(0, 256, 8)
    ]
    assert max(spans) == 7  # each micro-batch holds 8 neighbouring lengths


def test_hub_dataset_source(tiny_config, monkeypatch, tmp_path):
    """The Hugging Face Hub cannot be reached here: `datasets.load_dataset` is replaced (the only
    mock in this suite, at that external boundary) by a local Dataset; everything after it is real."""
    import datasets

    rows = [{"text": f"Chapter {i}. " + " ".join(["and the children of Israel"] * 5)} for i in range(60)]
    local = datasets.Dataset.from_list(rows)
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    config = tiny_config("data.train=hub:someone/chapters:train", f"data.cache_dir={tmp_path / 'c'}")
    data = prepare_data(config, log=lambda _: None)
    assert ("someone/chapters", "train") in calls
    assert sum(s["records"] for s in data.report["splits"].values()) == 60


def test_unreachable_hub_dataset_is_a_clear_error(tiny_config, monkeypatch, tmp_path):
    import datasets

    def offline(name, split):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)  # the Hub boundary, as above
    with pytest.raises(DataError, match=r"hub:a/b:train: cannot load it from the Hugging Face Hub \(no network\)"):
        prepare_data(tiny_config("data.train=hub:a/b", f"data.cache_dir={tmp_path / 'c'}"), log=lambda _: None)
