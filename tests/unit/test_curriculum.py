"""data.curriculum: difficulty levels, packing within a level, the schedule of the curriculum phase,
its resume and process shares, and its config errors."""

import json
import math
from itertools import islice

import numpy as np
import pytest
import yaml

from conftest import chapters, tiny_config_dict
from lmforge.config import load_config
from lmforge.data.curriculum import CurriculumPhase, difficulty_levels
from lmforge.data.loader import StepPlan, step_data
from lmforge.data.packing import pack_within_levels
from lmforge.data.prepare import prepare_data
from lmforge.errors import ConfigError, RecordError

# --------------------------------------------------------------------------- levels and packing


def test_levels_are_equal_count_buckets_of_the_difficulty_rank():
    difficulty = np.array([5.0, 1.0, 3.0, 8.0, 2.0, 7.0, 4.0, 6.0])
    tie = np.arange(8, dtype=np.uint64)
    level, rank = difficulty_levels(difficulty, tie, 4)
    assert rank.tolist() == [4, 0, 2, 7, 1, 6, 3, 5]
    assert level.tolist() == [2, 0, 1, 3, 0, 3, 1, 2]  # two per level, easiest in level 0
    assert np.bincount(level).tolist() == [2, 2, 2, 2]


def test_ties_are_broken_by_the_hash_not_by_file_order():
    """Equal difficulties: the tie hash decides, so reordering the examples changes no example's level."""
    rng = np.random.default_rng(0)
    difficulty = np.repeat([1.0, 2.0], 6)  # 12 examples, two values: the level boundary falls inside them
    tie = rng.integers(0, 2**63, 12).astype(np.uint64)
    level, _ = difficulty_levels(difficulty, tie, 3)
    permutation = rng.permutation(12)
    moved, _ = difficulty_levels(difficulty[permutation], tie[permutation], 3)
    assert moved.tolist() == level[permutation].tolist()
    # within the first value, the 4 smallest ties are level 0, the other 2 level 1
    first = np.flatnonzero(difficulty == 1.0)
    assert sorted(level[first].tolist()) == [0, 0, 0, 0, 1, 1]
    assert level[first[np.argsort(tie[first])]].tolist() == [0, 0, 0, 0, 1, 1]


def test_examples_of_one_record_never_straddle_two_levels():
    # a record cut into 3 pieces (same difficulty and tie) sits on the boundary of the 2-level cut
    difficulty = np.array([1.0, 2.0, 3.0, 3.0, 3.0, 4.0])
    tie = np.array([9, 9, 5, 5, 5, 9], dtype=np.uint64)
    level, _ = difficulty_levels(difficulty, tie, 2)
    assert level.tolist() == [0, 0, 0, 0, 0, 1]


def test_packing_within_levels_never_mixes_levels():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 20, 200).tolist()
    levels = rng.integers(0, 4, 200).tolist()
    rank = rng.permutation(200).tolist()
    bins = pack_within_levels(lengths, levels, 32, rank)
    assert sorted(i for b in bins for i in b) == list(range(200))  # every example once
    assert all(sum(lengths[i] for i in b) <= 32 for b in bins)
    assert all(len({levels[i] for i in b}) == 1 for b in bins)
    row_levels = [levels[b[0]] for b in bins]
    assert row_levels == sorted(row_levels)  # level by level, easiest first
    for k in range(4):  # within a level, by the highest rank of a row's examples
        keys = [max(rank[i] for i in b) for b in bins if levels[b[0]] == k]
        assert keys == sorted(keys)


# --------------------------------------------------------------------------- the schedule


class _Config:
    """What CurriculumPhase.of reads of a config."""

    def __init__(self, seed=3, **curriculum):
        from lmforge.config import CurriculumConfig

        self.seed = seed
        self.data = type("Data", (), {"curriculum": CurriculumConfig(**curriculum)})()


LEVELS = np.repeat(np.arange(4), [10, 10, 10, 10])  # 40 rows stored easiest first


def test_linear_pool_is_the_easiest_ceil_c_n_rows_and_grows_to_all():
    phase = CurriculumPhase.of(_Config(start=0.2), LEVELS, total_steps=40)
    assert phase.end == 20  # default: half of the run
    sizes = []
    for t in range(20):
        pool = phase.pool(t)
        c = 0.2 + 0.8 * t / 20
        assert len(pool) == math.ceil(c * 40)
        assert pool.tolist() == list(range(len(pool)))  # the easiest rows, in rank order
        drawn = phase.draw(t, 8)
        assert set(drawn.tolist()) <= set(pool.tolist()) and len(set(drawn.tolist())) == 8  # no repeat in a step
        sizes.append(len(pool))
    assert sizes[0] == 8 and sizes == sorted(sizes) and sizes[-1] == 39
    assert not phase.in_phase(20)


def test_step_pool_adds_one_level_per_equal_interval_from_the_level_holding_start():
    phase = CurriculumPhase.of(_Config(start=0.3, schedule="step", steps=9), LEVELS, total_steps=100)
    # the easiest 30% (12 rows) reach into level 1: levels 0-1, then 0-2, then 0-3, three steps each
    tops = [int(LEVELS[phase.pool(t)].max()) for t in range(9)]
    assert tops == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [len(phase.pool(t)) for t in (0, 3, 6)] == [20, 30, 40]
    for t in range(9):
        assert LEVELS[phase.draw(t, 8)].max() <= tops[t]


def test_stage_pool_is_exactly_the_current_stage():
    stages = [{"data": "a", "until_step": 3}, {"data": "b", "until_step": 5}, {"data": "c"}]
    levels = np.repeat(np.arange(3), [7, 5, 9])
    phase = CurriculumPhase.of(_Config(stages=stages), levels, total_steps=100)
    assert [phase.stage(t) for t in range(8)] == [0, 0, 0, 1, 1, 2, 2, 2]  # step t + 1 <= until_step
    assert math.isinf(phase.end)  # the last stage trains to the end
    for t in range(30):
        assert set(levels[phase.draw(t, 4)].tolist()) == {phase.stage(t)}
    # a stage goes through its rows before repeating one: steps 5.. of stage 2 (9 rows, 4 a step)
    seen = np.concatenate([phase.draw(t, 4) for t in (5, 6)])
    assert len(set(seen.tolist())) == 8
    closed = [{"data": "a", "until_step": 3}, {"data": "b", "until_step": 5}]
    assert CurriculumPhase.of(_Config(stages=closed), levels[:12], total_steps=100).end == 5


def test_a_draw_is_a_function_of_seed_and_step_alone():
    one = CurriculumPhase.of(_Config(seed=3), LEVELS, total_steps=40)
    other = CurriculumPhase.of(_Config(seed=3), LEVELS.copy(), total_steps=40)
    assert all(np.array_equal(one.draw(t, 8), other.draw(t, 8)) for t in range(20))
    later = [other.draw(t, 8).tolist() for t in reversed(range(20))][::-1]  # any order of asking
    assert later == [one.draw(t, 8).tolist() for t in range(20)]
    reseeded = CurriculumPhase.of(_Config(seed=4), LEVELS, total_steps=40)
    assert any(not np.array_equal(one.draw(t, 8), reseeded.draw(t, 8)) for t in range(20))


def test_a_pool_smaller_than_a_step_is_gone_through_again():
    phase = CurriculumPhase.of(_Config(start=0.05), LEVELS, total_steps=40)
    drawn = phase.draw(0, 8)  # the pool is ceil(0.05 * 40) = 2 rows
    assert len(drawn) == 8 and set(drawn.tolist()) == {0, 1}


# --------------------------------------------------------------------------- with real prepared data


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _config(tmp_path, cache_dir, train, **data):
    cfg = tiny_config_dict(train, cache_dir, tmp_path / "runs")
    cfg["data"].update(data)
    cfg["tokenizer"]["vocab_size"] = 300
    cfg["train"]["max_steps"] = 40
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path, [], env={})


@pytest.fixture
def lines():
    return [line for chapter in chapters(12) for line in chapter.split("\n") if line.strip()]


def test_prepared_rows_never_mix_levels_and_steps_stay_in_their_pool(tmp_path, cache_dir, lines):
    """Length curriculum, packed: every example of a row lies within its level's length span, and the
    rows of each step of the phase are from its pool; the epochs that follow see every row."""
    records = [{"text": line} for line in lines[:300]]
    # max_length above every line's length: no record is cut into pieces, so an example's length is its difficulty
    config = _config(tmp_path, cache_dir, _jsonl(tmp_path / "t.jsonl", records), curriculum="length", max_length=320)
    data = prepare_data(config, log=lambda m: None)
    train = data.splits["train"]
    spans = {level["level"]: level["difficulty"] for level in data.report["curriculum"]["levels"]}
    assert len(spans) == 4 and all(level["rows"] for level in data.report["curriculum"]["levels"])
    row_levels = np.array(train["level"])
    assert row_levels.tolist() == sorted(row_levels.tolist())  # stored easiest first
    mixed = 0
    for level, lengths in zip(row_levels, train["lengths"], strict=True):
        low, high = spans[int(level)]
        assert all(low <= n <= high for n in lengths)
        mixed += len(lengths) > 1
    assert mixed > len(train) / 2  # the rows are packed

    total = 20
    plan = StepPlan(len(train), 4, 1)
    phase = CurriculumPhase.of(config, row_levels, total)
    steps = list(enumerate(islice(step_data(train, plan, config, 0, (0, 0), step=0, total_steps=total), total)))
    for t, data_of_step in steps[: int(phase.end)]:
        pool = set(phase.pool(t).tolist())
        assert data_of_step.step_in_epoch == -1
        assert all(set(r.tolist()) <= pool for r in data_of_step.rows)
        top = int(row_levels[phase.pool(t)].max())
        assert all(row_levels[r].max() <= top for r in data_of_step.rows)
    assert [(d.epoch, d.step_in_epoch) for _, d in steps[10:13]] == [(0, 0), (0, 1), (0, 2)]


def test_stage_levels_flow_from_the_files_and_resume_is_exact(tmp_path, cache_dir, lines):
    """Each stage's rows come from its file alone (disjoint alphabets show it), and step_data started
    at any step yields what the run from step 0 did there, inside and after the phase."""
    easy = _jsonl(tmp_path / "easy.jsonl", [{"text": line.lower()} for line in lines[:120]])
    hard = _jsonl(tmp_path / "hard.jsonl", [{"text": line.upper()} for line in lines[120:240]])
    stages = [{"data": str(easy), "until_step": 4}, {"data": str(hard), "until_step": 7}]
    config = _config(tmp_path, cache_dir, easy, curriculum={"stages": stages}, max_length=48)
    data = prepare_data(config, log=lambda m: None)
    train, tok = data.splits["train"], data.tokenizer
    row_levels = np.array(train["level"])
    for level, ids in zip(row_levels, train["input_ids"], strict=True):
        text = tok.decode(ids, skip_special_tokens=True)
        assert (text == text.lower()) if level == 0 else (text == text.upper()), text
    report = data.report["curriculum"]
    assert report["by"] == "stages" and [s["rows"] for s in report["levels"]] == np.bincount(row_levels).tolist()

    plan = StepPlan(len(train), 2, 2)
    full = list(islice(step_data(train, plan, config, 0, (0, 0), step=0, total_steps=14), 14))
    assert [set(row_levels[np.concatenate(d.rows)].tolist()) for d in full[:7]] == [{0}] * 4 + [{1}] * 3
    for k in (2, 4, 5, 7, 9):  # a checkpoint's state: its step, and epoch position (0, 0) until the epochs
        state = (full[k - 1].epoch, full[k - 1].step_in_epoch + 1)
        resumed = step_data(train, plan, config, 0, state, step=k, total_steps=14)
        for expected, got in zip(full[k:], resumed, strict=False):
            assert (got.epoch, got.step_in_epoch) == (expected.epoch, expected.step_in_epoch)
            assert all(np.array_equal(a, b) for a, b in zip(got.rows, expected.rows, strict=True))


def test_every_process_takes_its_share_of_one_global_draw(tmp_path, cache_dir, lines):
    config = _config(
        tmp_path, cache_dir, _jsonl(tmp_path / "t.jsonl", [{"text": s} for s in lines[:200]]), curriculum="length"
    )
    train = prepare_data(config, log=lambda m: None).splits["train"]
    single = StepPlan(len(train), 8, 1)
    ranks = [StepPlan(len(train), 4, 1, world=2), StepPlan(len(train), 4, 1, world=2)]
    one = [d.rows for d in islice(step_data(train, single, config, 0, (0, 0), total_steps=12), 6)]
    per_rank = [
        [d.rows for d in islice(step_data(train, plan, config, 0, (0, 0), rank, total_steps=12), 6)]
        for rank, plan in enumerate(ranks)
    ]
    for t in range(6):
        (whole,) = one[t]
        (first,), (second,) = per_rank[0][t], per_rank[1][t]
        assert np.array_equal(np.concatenate([first, second]), whole)  # micro-batch 0 to rank 0, 1 to rank 1


# --------------------------------------------------------------------------- invalid difficulties


def _all_training(tmp_path, lines):
    """data settings that put every record of data.train in training: a validation file, no test."""
    return {"validation": str(_jsonl(tmp_path / "v.jsonl", [{"text": s} for s in lines[-20:]])), "test_fraction": 0.0}


def test_missing_or_non_numeric_difficulty_is_an_invalid_record(tmp_path, cache_dir, lines):
    records = [{"text": s, "level": i % 5} for i, s in enumerate(lines[:80])]
    records[10]["level"] = "hard"
    del records[20]["level"]
    path = _jsonl(tmp_path / "t.jsonl", records)
    held = _all_training(tmp_path, lines)
    config = _config(tmp_path, cache_dir, path, curriculum={"column": "level"}, **held)
    with pytest.raises(RecordError, match=rf"{path}:11: field 'level' \(data.curriculum.column\) must hold a finite"):
        prepare_data(config, log=lambda m: None)
    config = _config(tmp_path, cache_dir, path, curriculum={"column": "level"}, on_invalid="drop", **held)
    report = prepare_data(config, log=lambda m: None).report
    assert report["splits"]["train"]["dropped"] == {"bad_difficulty": 1, "missing_difficulty": 1}
    assert report["splits"]["train"]["records"] == 80
    assert [level["difficulty"] for level in report["curriculum"]["levels"]][::3] == [[0, 1], [3, 4]]
    # the validation file has no difficulty: only training records are scored


def test_csv_difficulties_are_numbers_in_text(tmp_path, cache_dir, lines):
    plain = [s for s in lines if '"' not in s][:60]
    rows = ["text,score"] + [f'"{s}",{i % 3}.5' for i, s in enumerate(plain)]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(rows) + "\n")
    config = _config(
        tmp_path,
        cache_dir,
        path,
        curriculum={"column": "score", "levels": 3},
        max_length=320,
        **_all_training(tmp_path, lines),
    )
    report = prepare_data(config, log=lambda m: None).report
    assert [level["difficulty"] for level in report["curriculum"]["levels"]] == [[0.5, 0.5], [1.5, 1.5], [2.5, 2.5]]
    assert [level["examples"] for level in report["curriculum"]["levels"]] == [20, 20, 20]


def test_the_cache_holds_levels_and_packing_not_the_schedule(tmp_path, cache_dir, lines):
    path = _jsonl(tmp_path / "t.jsonl", [{"text": s} for s in lines[:100]])
    messages = []
    assert not prepare_data(_config(tmp_path, cache_dir, path, curriculum="length"), messages.append).cache_hit
    again = _config(tmp_path, cache_dir, path, curriculum={"start": 0.5, "schedule": "step", "steps": 3})
    assert prepare_data(again, messages.append).cache_hit
    relevelled = _config(tmp_path, cache_dir, path, curriculum={"levels": 3})
    data = prepare_data(relevelled, messages.append)
    assert not data.cache_hit and sorted(set(data.splits["train"]["level"])) == [0, 1, 2]


# --------------------------------------------------------------------------- config errors


def _problems(tmp_path, curriculum, **data):
    cfg = tiny_config_dict(tmp_path / "easy.jsonl", tmp_path / "cache", tmp_path / "runs")
    cfg["data"]["curriculum"] = curriculum
    cfg["data"].update(data)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as caught:
        load_config(path, [], env={})
    return str(caught.value)


def test_invalid_combinations_are_config_errors_that_name_the_fix(tmp_path):
    easy = str(tmp_path / "easy.jsonl")
    both = _problems(tmp_path, {"stages": [{"data": easy}], "column": "score", "levels": 3, "start": 0.5})
    assert "data.curriculum.stages and data.curriculum.column are exclusive" in both
    assert "data.curriculum.levels / start do not apply to stages" in both and "remove them" in both

    order = [{"data": easy, "until_step": 5}, {"data": "b.jsonl", "until_step": 5}, {"data": "c.jsonl"}]
    unordered = _problems(tmp_path, {"stages": order})
    assert "data.curriculum.stages.1.until_step=5 must be above the previous stage's (5)" in unordered

    open_middle = _problems(tmp_path, {"stages": [{"data": easy}, {"data": "b.jsonl", "until_step": 3}]})
    assert "data.curriculum.stages.0.until_step: required (only the last stage may leave it out" in open_middle

    other_train = _problems(tmp_path, {"stages": [{"data": "a.jsonl", "until_step": 2}, {"data": "b.jsonl"}]})
    assert f"data.train ({easy}) must name the first stage's data (a.jsonl)" in other_train

    ordered = _problems(tmp_path, "length", order="length_ascending")
    assert "data.order=length_ascending conflicts with data.curriculum" in ordered and "remove data.order" in ordered

    txt = _problems(tmp_path, {"column": "score"}, train=str(tmp_path / "corpus.txt"))
    assert "data.curriculum.column=score: the documents of a .txt file have no fields" in txt
    assert "data.curriculum=length" in txt


def test_valid_curricula_load(tmp_path):
    cfg = tiny_config_dict(tmp_path / "easy.jsonl", tmp_path / "cache", tmp_path / "runs")
    for curriculum in (
        "length",
        {"column": "score", "schedule": "step", "levels": 3, "start": 0.5, "steps": 2},
        {"stages": [{"data": str(tmp_path / "easy.jsonl"), "until_step": 2}, {"data": "hard.jsonl"}]},
    ):
        cfg["data"]["curriculum"] = curriculum
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        assert load_config(tmp_path / "c.yaml", [], env={}).data.curriculum is not None
    cfg["data"]["curriculum"] = "length"
    cfg["model"] = {"name_or_path": str(tmp_path), "task": "classification"}  # no packing: fine
    cfg["data"]["format"] = "classification"
    cfg["tokenizer"] = {}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert load_config(tmp_path / "c.yaml", [], env={}).data.curriculum.levels == 4
