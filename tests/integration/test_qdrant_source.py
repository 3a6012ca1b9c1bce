"""A Qdrant collection as training data, in a real local store (qdrant-client's local mode): a few
hundred points read in scroll pages, payload fields mapped with data.columns, a fingerprint that
follows the points' ids and payloads, and one clear error for a missing collection, an unreachable
server or a malformed URL."""

import io
import json
import subprocess

import pytest
import yaml
from qdrant_client import QdrantClient, models
from rich.console import Console

from conftest import free_port, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import load_config
from lmforge.data import qdrant
from lmforge.data.prepare import prepare_data
from lmforge.errors import ConfigError, DataError
from lmforge.run import run_train

WORDS = "light darkness waters earth heaven herb seed fruit tree beast fowl fish day night".split()  # noqa: SIM905
POINTS = 300


def pairs(n: int) -> list[dict]:
    return [
        {"question": f"{WORDS[i % 14]} and {WORDS[(i * 5) % 14]}?", "answer": f"{WORDS[(i * 3) % 14]} {i}"}
        for i in range(n)
    ]


def make_store(directory, payloads: list[dict], collection: str = "pairs") -> str:
    """A local store with one point per payload (ids 1..n, random 4-d vectors), closed again."""
    client = QdrantClient(path=str(directory))
    client.create_collection(collection, vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    client.upsert(
        collection,
        points=[models.PointStruct(id=i + 1, vector=[1.0, i % 7, 0.5, 1.0], payload=p) for i, p in enumerate(payloads)],
    )
    client.close()
    return str(directory)


def config_for(tmp_path, cache_dir, url: str, *overrides: str):
    raw = tiny_config_dict(tmp_path / "unused.txt", cache_dir, tmp_path / "runs")
    raw["data"].update(
        {"train": url, "format": "prompt-completion", "columns": {"prompt": "question", "completion": "answer"}}
    )
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, overrides, env={}, check_files=True), path


def test_a_collection_trains_read_in_pages_and_its_fingerprint_follows_the_points(tmp_path, cache_dir, monkeypatch):
    store = make_store(tmp_path / "store", pairs(POINTS))
    url = f"qdrant://pairs?path={store}&page_size=64"
    config, _ = config_for(tmp_path, cache_dir, url)

    pages = []
    scroll = QdrantClient.scroll

    def counted(self, *args, **kwargs):  # the real scroll, its page sizes recorded
        page, offset = scroll(self, *args, **kwargs)
        pages.append((kwargs["limit"], len(page)))
        return page, offset

    monkeypatch.setattr(QdrantClient, "scroll", counted)
    data = prepare_data(config, log=lambda _: None)
    assert pages and all(limit == 64 and size <= 64 for limit, size in pages)
    assert sum(size for _, size in pages) % POINTS == 0  # whole passes over the collection, in pages

    report = data.report["splits"]
    assert sum(report[s]["records"] for s in ("train", "validation", "test")) == POINTS
    assert all(not report[s]["dropped"] for s in report)
    first = next(qdrant.records(qdrant.parse(url, "data.train")))
    assert first == ({**pairs(1)[0], "id": 1}, "qdrant://pairs point 1")

    # unchanged: from the cache; one payload changed: prepared again
    again = prepare_data(config, log=lambda _: None)
    assert again.cache_hit
    client = QdrantClient(path=store)
    client.set_payload("pairs", payload={"answer": "changed"}, points=[7])
    client.close()
    assert not prepare_data(config, log=lambda _: None).cache_hit

    outcome = run_train(config, Console(file=io.StringIO()))
    assert outcome.eval["validation"]["loss"] > 0
    records = [json.loads(line) for line in (outcome.run_dir / "predictions.jsonl").read_text().splitlines()]
    assert records and all(r["where"].startswith("qdrant://pairs point ") for r in records)


def test_a_missing_collection_an_unreachable_server_and_bad_urls_are_one_clear_error(tmp_path, cache_dir):
    store = make_store(tmp_path / "store", pairs(5), collection="other")
    config, path = config_for(tmp_path, cache_dir, f"qdrant://pairs?path={store}")
    with pytest.raises(DataError, match=r"no collection 'pairs' at .*\(its collections: other\)"):
        prepare_data(config, log=lambda _: None)

    port = free_port()  # nothing listens there
    config, path = config_for(tmp_path, cache_dir, f"qdrant://pairs?url=http://127.0.0.1:{port}&timeout=2")
    with pytest.raises(DataError, match=f"cannot reach the Qdrant server at http://127.0.0.1:{port}"):
        prepare_data(config, log=lambda _: None)
    done = subprocess.run(
        lmforge_command("train", str(path)), capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("cannot reach the Qdrant server") == 1, done.stderr

    for bad, message in [
        ("qdrant://?path=/tmp", "names no collection"),
        (f"qdrant://pairs?path={store}&url=http://localhost:6333", "exactly one of url="),
        ("qdrant://pairs", "exactly one of url="),
        (f"qdrant://pairs?path={tmp_path / 'nowhere'}", "no local Qdrant store"),
        (f"qdrant://pairs?path={store}&page_size=0", "page_size must be a whole number"),
        (f"qdrant://pairs?path={store}&limit=5", "unknown parameter"),
        ("qdrant://pairs?url=localhost:6333", "must be an http"),
    ]:
        with pytest.raises(ConfigError, match=message):
            config_for(tmp_path, cache_dir, bad)


def test_an_invalid_point_is_named_even_while_the_collection_is_being_read(tmp_path, cache_dir):
    """The advice on an invalid record reads records again while the first scan is open: the local
    store (locked per client) is shared, and the error names the point, not a lock."""
    payloads = pairs(POINTS)
    payloads[6] = {"question": "where is the answer?"}  # point 7: no answer
    store = make_store(tmp_path / "store", payloads)
    config, path = config_for(tmp_path, cache_dir, f"qdrant://pairs?path={store}&page_size=50")
    with pytest.raises(DataError, match=r"qdrant://pairs point 7: .*answer") as info:
        prepare_data(config, log=lambda _: None)
    assert "already accessed" not in str(info.value)
    dropped = prepare_data(load_config(path, ["data.on_invalid=drop"], env={}), log=lambda _: None)
    assert sum(dropped.report["splits"][s]["records"] for s in ("train", "validation", "test")) == POINTS
    assert sum(sum(dropped.report["splits"][s]["dropped"].values()) for s in dropped.report["splits"]) == 1
