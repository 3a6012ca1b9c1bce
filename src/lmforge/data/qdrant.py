"""A Qdrant collection as a data source: `qdrant://COLLECTION?url=http://host:6333` (a server) or
`qdrant://COLLECTION?path=DIR` (a local store, qdrant-client's local mode).

Each point is a record whose fields are its payload (plus `id`, the point's id, unless the payload
has one), read with qdrant-client's scroll API one page at a time, in the collection's id order:
the collection is never held in memory. The cache fingerprint is a hash of every point's id and
payload, so a changed, added or removed point prepares the data again, and an unchanged
collection is read from the cache. A server's API key comes from the QDRANT_API_KEY environment
variable, never from the URL.

Query parameters: url or path (exactly one), page_size (points per scroll request, default 256),
timeout (seconds per request, default 30).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lmforge.errors import DataError

PREFIX = "qdrant://"
PAGE_SIZE = 256
KEY_VARIABLE = "QDRANT_API_KEY"


@dataclass(frozen=True)
class QdrantSource:
    """A parsed qdrant:// URL; str() gives it back as written."""

    url: str
    collection: str
    server: str | None
    """http(s)://host:port of a Qdrant server, or None for a local store."""
    path: str | None
    """The local store's directory, or None for a server."""
    page_size: int = PAGE_SIZE
    timeout: int = 30

    def __str__(self) -> str:
        return self.url


def is_qdrant(spec: object) -> bool:
    return isinstance(spec, QdrantSource) or (isinstance(spec, str) and spec.startswith(PREFIX))


def parse(url: str, field: str) -> QdrantSource:
    """The source of a qdrant:// URL.

    Raises:
        DataError: no collection, not exactly one of url= and path=, an unknown parameter or a
            page_size/timeout that is not a positive number; a path= that is no directory.
    """
    parts = urlsplit(url)
    collection = parts.netloc + parts.path.rstrip("/")
    query = parse_qs(parts.query, keep_blank_values=True)
    usage = "write qdrant://COLLECTION?url=http://host:6333 or qdrant://COLLECTION?path=DIR"
    if not collection or "/" in collection:
        raise DataError(f"{field}: {url!r} names no collection (or more than one part); {usage}")
    unknown = sorted(set(query) - {"url", "path", "page_size", "timeout"})
    if unknown:
        raise DataError(
            f"{field}: {url!r}: unknown parameter(s) {', '.join(unknown)}; known: url, path, page_size, timeout"
        )
    repeated = [name for name, values in query.items() if len(values) > 1]
    if repeated:
        raise DataError(f"{field}: {url!r}: {', '.join(repeated)} given twice")
    server, path = query.get("url", [None])[0], query.get("path", [None])[0]
    if (server is None) == (path is None) or not (server or path):
        raise DataError(f"{field}: {url!r} needs exactly one of url= (a server) and path= (a local store); {usage}")
    if server is not None and urlsplit(server).scheme not in ("http", "https"):
        raise DataError(f"{field}: {url!r}: url= must be an http(s) URL, e.g. url=http://localhost:6333")
    numbers = {}
    for name, default in (("page_size", PAGE_SIZE), ("timeout", 30)):
        text = query.get(name, [str(default)])[0]
        if not text.isdigit() or int(text) < 1:
            raise DataError(f"{field}: {url!r}: {name} must be a whole number above 0, got {text!r}")
        numbers[name] = int(text)
    if path is not None:
        local = Path(path).expanduser()
        if not local.is_dir():
            raise DataError(f"{field}: {url!r}: no local Qdrant store at {local.resolve()} (path= is its directory)")
        path = str(local.resolve())
    return QdrantSource(url, collection, server, path, **numbers)


_local_clients: dict[str, list] = {}
"""Open local-store clients by directory, each with the number of readers using it: qdrant-client's
local mode locks its directory, so a second reader in this process (a record read again while a
scan is under way, as the invalid-record advice does) shares the first one's client."""
_local_lock = threading.Lock()


@contextmanager
def _opened(source: QdrantSource):
    """A client of the source's server or local store, closed after its last user."""
    from qdrant_client import QdrantClient

    if source.server:
        client = QdrantClient(
            url=source.server,
            api_key=os.environ.get(KEY_VARIABLE),
            timeout=source.timeout,
            check_compatibility=False,  # (a warning when it fails; the errors below say more)
        )
        try:
            yield client
        finally:
            client.close()
        return
    with _local_lock:
        if source.path not in _local_clients:
            _local_clients[source.path] = [QdrantClient(path=source.path), 0]
        entry = _local_clients[source.path]
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _local_lock:
            entry[1] -= 1
            if entry[1] == 0:
                del _local_clients[source.path]
                entry[0].close()


@contextmanager
def _client(source: QdrantSource):
    """An open client whose collection exists, closed after (a local store is locked while a
    client holds it).

    Raises:
        DataError: the server cannot be reached, the store cannot be opened, or the collection
            is not there (the message lists the ones that are).
    """
    where = source.server or source.path
    try:
        opened = _opened(source)
        client = opened.__enter__()
    except Exception as exc:  # noqa: BLE001 - a lock held by another process, a damaged store
        raise DataError(f"{source}: cannot open the Qdrant store at {where} ({_reason(exc)})") from None
    try:
        try:
            names = sorted(c.name for c in client.get_collections().collections)
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, TLS, 401: said in one line
            key = f"; a server that needs a key takes it from {KEY_VARIABLE}" if source.server else ""
            raise DataError(f"{source}: cannot reach the Qdrant server at {where} ({_reason(exc)}){key}") from None
        if source.collection not in names:
            known = ", ".join(names) if names else "none"
            raise DataError(f"{source}: no collection {source.collection!r} at {where} (its collections: {known})")
        yield client
    finally:
        opened.__exit__(None, None, None)


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _points(source: QdrantSource) -> Iterator:
    """Every point of the collection with its payload (no vectors), one scroll page at a time."""
    with _client(source) as client:
        offset = None
        while True:
            try:
                page, offset = client.scroll(
                    source.collection,
                    limit=source.page_size,
                    offset=offset,
                    with_payload=True,
                    with_vectors=False,
                    timeout=source.timeout if source.server else None,
                )
            except Exception as exc:  # noqa: BLE001 - the server went away mid-read
                raise DataError(f"{source}: reading the collection failed ({_reason(exc)})") from None
            yield from page
            if offset is None:
                return


def records(source: QdrantSource) -> Iterator[tuple[dict, str]]:
    """(fields, where) of each point: its payload, with `id` set to the point's id unless the
    payload has an id of its own; where is "qdrant://COLLECTION point ID"."""
    for point in _points(source):
        fields = dict(point.payload or {})
        fields.setdefault("id", point.id)
        yield fields, f"{PREFIX}{source.collection} point {point.id}"


def digest(source: QdrantSource) -> str:
    """sha256 over every point's id and payload (JSON, keys sorted), in scroll order."""
    hashed = hashlib.sha256(source.collection.encode())
    for point in _points(source):
        payload = json.dumps(point.payload or {}, sort_keys=True, ensure_ascii=False, default=str)
        hashed.update(f"{point.id}\t{payload}\n".encode())
    return hashed.hexdigest()
