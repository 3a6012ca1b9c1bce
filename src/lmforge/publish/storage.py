"""Remote storage for directories of files: S3 (and S3-compatible servers) or a local directory.

A directory is copied to `s3://bucket/prefix/` (or `/mounted/drive/prefix/`) file by file, each
verified after it lands, with a manifest written last:

    prefix/lmforge_manifest.json   {"format": 1, "files": {"model.safetensors": {"size", "sha256"}, ...}}

The manifest vouches for the files, as a checkpoint's manifest.json does locally. A copy that is
cut short leaves no manifest (or the previous one), so a reader never takes a half-copied
directory; running the copy again sends only the files whose remote copy differs (S3 objects
carry their SHA-256 in their metadata).

S3 notes:
- boto3 >= 1.36 sends a CRC checksum with every upload by default, which several S3-compatible
  servers (older MinIO, Ceph, some clouds) reject; lmforge sends checksums only where S3 requires
  them (`request_checksum_calculation="when_required"`) and verifies content itself: after each
  upload, the object's size, its ETag against the file's MD5 (single part) or the MD5 of its parts'
  MD5s (multipart), and the SHA-256 it carries. A server whose ETags are no MD5 (SSE-KMS
  encryption) is checked by size and SHA-256 metadata only. Downloads are checked against the
  manifest's SHA-256.
- Large files go in parts (`storage.multipart_threshold_mb`, `storage.multipart_chunk_mb`), in
  parallel, each part retried alone (boto3's transfer manager).
- The endpoint: `storage.endpoint_url`, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (read by
  boto3 itself), else AWS. Credentials come from the environment or the AWS config files only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmforge.atomic import current_umask
from lmforge.errors import UserError
from lmforge.secrets import redact_text

MANIFEST = "lmforge_manifest.json"
PUSHING = ".lmforge-pushing"
"""Beside the files of a push under way (upload_dir's claim): the place is lmforge's."""
FORMAT = 1
MIB = 1 << 20


@dataclass(frozen=True)
class Remote:
    """A remote file: its size in bytes, the SHA-256 it is known to have (None: unknown) and its
    S3 ETag (None elsewhere)."""

    size: int
    sha256: str | None
    etag: str | None = None


class Store(Protocol):
    """Files under one root, named by relative keys with "/" separators."""

    url: str

    def head(self, key: str) -> Remote | None:
        """The file at `key`, or None if there is none."""

    def put(self, local: Path, key: str, sha256: str) -> None:
        """Copy `local` to `key` and verify it landed whole.

        Raises:
            StorageError: the copy failed or does not match the file.
        """

    def get(self, key: str, local: Path) -> None:
        """Copy `key` to the file `local`."""

    def holds(self, local: Path, key: str, remote: Remote) -> bool:
        """Whether the file at `key` (described by `remote`, whose size and SHA-256 already match)
        has the content of `local`, as far as the store can tell without downloading it."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, sorted."""

    def children(self, prefix: str = "") -> list[str]:
        """The names one level below `prefix` ("a/" -> ["b", "c"] for a/b/x, a/c), sorted."""

    def delete(self, keys: list[str]) -> None:
        """Remove the files at `keys` (missing ones are no error)."""


class StorageError(UserError):
    """Remote storage refused, failed or returned something else than was sent."""


# --------------------------------------------------------------------------- opening


def open_store(url: str, endpoint_url: str | None = None, region: str | None = None, storage=None) -> Store:
    """The store for `url`: s3://bucket/prefix, file:///path or a local path.

    Args:
        endpoint_url, region: for s3:// (override `storage`'s).
        storage: a `config.StorageConfig` (endpoint, region, multipart sizes), or None for defaults.

    Raises:
        UserError: a URL of another scheme, or s3:// without a bucket.
    """
    if not url.strip():
        raise UserError("an empty storage URL; write s3://bucket/prefix or a directory")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/(?!/)", url):
        scheme = url.split(":")[0]
        raise UserError(f"{url}: one slash after '{scheme}:'; write {scheme}://{url.split(':/', 1)[1]}")
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise UserError(f"{url}: no bucket; write s3://bucket/prefix")
        settings = {
            "endpoint_url": endpoint_url or (storage.endpoint_url if storage else None),
            "region": region or (storage.region if storage else None),
            "threshold": (storage.multipart_threshold_mb if storage else 64) * MIB,
            "chunk": (storage.multipart_chunk_mb if storage else 64) * MIB,
        }
        return S3Store(bucket, prefix.strip("/"), **settings)
    if "://" in url and not url.startswith("file://"):
        raise UserError(f"{url}: storage URLs are s3://bucket/prefix, file:///path or a local path")
    return LocalStore(Path(url.removeprefix("file://")).expanduser())


def join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


# --------------------------------------------------------------------------- S3


class S3Store:
    """`s3://bucket/prefix` through boto3 (see the module docstring for checksums and parts)."""

    def __init__(
        self, bucket: str, prefix: str, endpoint_url: str | None, region: str | None, threshold: int, chunk: int
    ):
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config as BotoConfig

        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        self.threshold, self.chunk = threshold, chunk
        config = BotoConfig(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=20,
            read_timeout=120,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        if endpoint_url is not None and not re.match(r"^https?://[^/\s]+", endpoint_url):
            raise UserError(
                f"storage.endpoint_url / --endpoint-url {endpoint_url!r}: not a URL; write http(s)://host[:port]"
            )
        try:
            session = boto3.session.Session()
            self.client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        except ValueError as exc:  # an invalid AWS_ENDPOINT_URL(_S3) or region from the environment
            raise UserError(
                f"{self.url}: boto3 refuses the S3 settings ({exc}); check AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 "
                "(http(s)://host[:port]) and AWS_REGION"
            ) from None
        self.transfer = TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunk, max_concurrency=4)

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def head(self, key: str) -> Remote | None:
        with s3_errors(self.url, key):
            try:
                answer = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except Exception as exc:  # noqa: BLE001 - a 404 is an answer; anything else is raised below
                if _status(exc) == 404:
                    return None
                raise
        meta = answer.get("Metadata", {})
        return Remote(answer["ContentLength"], meta.get("sha256"), answer.get("ETag", "").strip('"') or None)

    def holds(self, local: Path, key: str, remote: Remote) -> bool:
        """An ETag that is an MD5 must be the file's: the SHA-256 metadata may belong to content
        that was since overwritten (by another tool) with a file of the same size."""
        return not (remote.etag and is_md5_etag(remote.etag)) or remote.etag == s3_etag(
            local, self.threshold, self.chunk
        )

    def put(self, local: Path, key: str, sha256: str) -> None:
        size = local.stat().st_size
        with s3_errors(self.url, key):
            self.client.upload_file(
                str(local),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": {"sha256": sha256}},
                Config=self.transfer,
            )
            answer = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        etag = answer.get("ETag", "").strip('"')
        problems = []
        if answer["ContentLength"] != size:
            problems.append(f"{answer['ContentLength']} bytes arrived of {size}")
        if answer.get("Metadata", {}).get("sha256") != sha256:
            problems.append("its SHA-256 metadata is not the file's")
        if is_md5_etag(etag) and etag != s3_etag(local, self.threshold, self.chunk):
            problems.append(f"its ETag {etag} is not the file's MD5 (the content changed on the way)")
        if problems:
            raise StorageError(f"{self.url}/{key}: the upload does not match {local}: {'; '.join(problems)}")

    def get(self, key: str, local: Path) -> None:
        with s3_errors(self.url, key):
            self.client.download_file(self.bucket, self._key(key), str(local), Config=self.transfer)

    def list(self, prefix: str = "") -> list[str]:
        root = join(self.prefix, prefix)
        start = f"{root}/" if root else ""
        keys = []
        with s3_errors(self.url, prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=start):
                keys += [item["Key"][len(join(self.prefix)) :].lstrip("/") for item in page.get("Contents", [])]
        return sorted(keys)

    def children(self, prefix: str = "") -> list[str]:
        root = join(self.prefix, prefix)
        start = f"{root}/" if root else ""
        names = set()
        with s3_errors(self.url, prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=start, Delimiter="/"
            )
            for page in pages:
                names |= {p["Prefix"][len(start) :].strip("/") for p in page.get("CommonPrefixes", [])}
                names |= {item["Key"][len(start) :] for item in page.get("Contents", [])}
        return sorted(names)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # S3's limit per request
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            with s3_errors(self.url, keys[start]):
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None) or {}
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return 404 if code in ("404", "NoSuchKey", "NotFound") else status


_DENIED = ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class s3_errors:  # noqa: N801 - used as a `with` statement
    """Turns botocore's errors into one StorageError line naming the URL and what to check;
    credentials never appear (lmforge.secrets)."""

    def __init__(self, url: str, key: str) -> None:
        self.where = f"{url}/{key}".rstrip("/")

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, StorageError) or not _is_boto_error(exc):
            return False
        status, code = _status(exc), (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
        if not code:  # the transfer manager wraps the server's answer in its message
            code = next((c for c in ("NoSuchBucket", *_DENIED) if f"({c})" in str(exc)), "")
        if code in ("NoSuchBucket",):
            hint = "the bucket does not exist: create it, or fix the URL"
        elif status in (401, 403) or "Credentials" in type(exc).__name__ or code in _DENIED:
            hint = "access denied: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this bucket"
        elif "Endpoint" in type(exc).__name__ or "Connect" in type(exc).__name__:
            hint = "cannot reach the server: check storage.endpoint_url / AWS_ENDPOINT_URL and the network"
        else:
            hint = "the server refused or failed"
        raise StorageError(redact_text(f"{self.where}: {hint} ({type(exc).__name__}: {exc})")) from None


def _is_boto_error(exc: BaseException) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError | Boto3Error)


def is_md5_etag(etag: str) -> bool:
    """Whether an ETag is an MD5 (plain, or multipart "md5-N"), which S3 gives without SSE-KMS."""
    digest, _, parts = etag.partition("-")
    return len(digest) == 32 and all(c in "0123456789abcdef" for c in digest) and (not parts or parts.isdigit())


def s3_etag(path: Path, threshold: int, chunk: int) -> str:
    """The ETag S3 gives `path` uploaded by boto3 with these settings: the MD5 of the content below
    `threshold` bytes, else the MD5 of the parts' MD5s followed by -<parts> (chunk as boto3 adjusts
    it: at most 10,000 parts, each at least 5 MiB)."""
    from s3transfer.utils import ChunksizeAdjuster

    size = path.stat().st_size
    if size < threshold:
        return _digest(path, hashlib.md5).hexdigest()
    chunk = ChunksizeAdjuster().adjust_chunksize(chunk, size)
    parts = []
    with path.open("rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            parts.append(hashlib.md5(block).digest())
    return f"{hashlib.md5(b''.join(parts)).hexdigest()}-{len(parts)}"


# --------------------------------------------------------------------------- a local directory


class LocalStore:
    """A directory (a mounted network drive: Google Drive on Colab, an NFS share). Each file is
    written under a temporary name and renamed, so a reader never sees half a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = str(root)

    def head(self, key: str) -> Remote | None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root}: a file, not a directory; name a directory")
        path = self.root / key
        return Remote(path.stat().st_size, None) if path.is_file() else None

    def holds(self, local: Path, key: str, remote: Remote) -> bool:
        return file_sha256(self.root / key) == file_sha256(local)

    def put(self, local: Path, key: str, sha256: str) -> None:
        target = self.root / key
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"{target.parent}: cannot make the directory ({exc.strerror})") from None
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{target.name}-", dir=target.parent)
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a copy is an ordinary file
            if file_sha256(Path(tmp)) != sha256:
                raise StorageError(f"{target}: the copy of {local} does not match it (the disk or the file changed)")
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def get(self, key: str, local: Path) -> None:
        shutil.copyfile(self.root / key, local)

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(
            p.relative_to(self.root).as_posix()
            for p in base.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")
        )

    def children(self, prefix: str = "") -> list[str]:
        base = self.root / prefix
        return sorted(p.name for p in base.iterdir() if not p.name.startswith(".tmp-")) if base.is_dir() else []

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            path = self.root / key
            path.unlink(missing_ok=True)
            for parent in path.parents:  # directories left empty go too, as S3 has no empty "directories"
                if parent == self.root or not parent.is_relative_to(self.root) or any(parent.iterdir()):
                    break
                parent.rmdir()


# --------------------------------------------------------------------------- directories


def _digest(path: Path, kind: Callable[[], Any]) -> Any:
    digest = kind()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            digest.update(block)
    return digest


def file_sha256(path: Path) -> str:
    return _digest(path, hashlib.sha256).hexdigest()


def local_files(directory: Path, skip: Callable[[str], bool] = lambda _: False) -> Iterator[tuple[str, Path]]:
    """(key, path) of every file under `directory`, sorted, without those `skip(key)` names."""
    for path in sorted(directory.rglob("*")):
        key = path.relative_to(directory).as_posix()
        if path.is_file() and not skip(key):
            yield key, path


def manifest_of(directory: Path, skip: Callable[[str], bool] = lambda _: False) -> dict[str, Any]:
    """{"format", "files": {key: {"size", "sha256"}}} of the files under `directory`."""
    files = {key: {"size": p.stat().st_size, "sha256": file_sha256(p)} for key, p in local_files(directory, skip)}
    return {"format": FORMAT, "files": files}


def upload_dir(
    directory: Path,
    store: Store,
    prefix: str = "",
    skip: Callable[[str], bool] = lambda _: False,
    last: tuple[str, ...] = (),
    log: Callable[[str], None] = lambda _: None,
    claim: bool = False,
) -> tuple[int, int]:
    """Copy the files under `directory` to `prefix/` in `store`, those named in `last` after all
    others, then write the manifest; return (files sent, files already there unchanged).

    A file whose remote copy has the same size and SHA-256 is not sent again, so running this
    again after an interruption sends only what is missing or changed. Remote files under
    `prefix/` that the directory no longer has are left alone until the manifest, which lists
    exactly the directory's files, no longer names them (they are then removed). With `claim`, a
    marker (PUSHING) is written first and removed after the manifest, so that a copy cut short is
    still known as lmforge's when it is run again.

    Raises:
        StorageError: a file could not be copied or verified.
    """
    manifest = manifest_of(directory, skip)
    old = read_manifest(store, prefix)
    if claim:
        _write_json(store, join(prefix, PUSHING), {"format": FORMAT})
    sent = kept = 0
    keys = sorted(manifest["files"], key=lambda k: (k in last, last.index(k) if k in last else 0, k))
    for key in keys:
        entry = manifest["files"][key]
        there = store.head(join(prefix, key))
        if there is not None and there.size == entry["size"]:
            known = there.sha256 or (old or {}).get("files", {}).get(key, {}).get("sha256")
            if (known is None or known == entry["sha256"]) and store.holds(directory / key, join(prefix, key), there):
                kept += 1
                continue
        log(f"uploading {key} ({entry['size'] / MIB:.1f} MiB)")
        store.put(directory / key, join(prefix, key), entry["sha256"])
        sent += 1
    write_manifest(store, prefix, manifest)
    stale = sorted(set((old or {}).get("files", {})) - set(manifest["files"]))
    store.delete([join(prefix, k) for k in stale] + ([join(prefix, PUSHING)] if claim else []))
    return sent, kept


def check_writable(store: Store) -> None:
    """Write and remove a small file at the store's root: a wrong bucket, missing credentials, a
    read-only or mistyped directory are said now, not after an hour of training.

    Raises:
        StorageError: the store cannot be written.
    """
    with tempfile.TemporaryDirectory(prefix="lmforge-probe-") as tmp:
        probe = Path(tmp) / "probe"
        probe.write_text("lmforge checks it can write here; this file is removed at once\n")
        key = f".lmforge-probe-{os.getpid()}"
        try:
            store.put(probe, key, file_sha256(probe))
        except OSError as exc:
            raise StorageError(f"{store.url}: cannot write there ({exc.strerror or exc})") from None
        store.delete([key])


def write_manifest(store: Store, prefix: str, manifest: dict[str, Any]) -> None:
    _write_json(store, join(prefix, MANIFEST), manifest)


def _write_json(store: Store, key: str, data: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="lmforge-manifest-") as tmp:
        path = Path(tmp) / Path(key).name
        path.write_text(json.dumps(data, indent=2, sort_keys=True))
        store.put(path, key, file_sha256(path))


def read_manifest(store: Store, prefix: str = "", name: str = MANIFEST) -> dict[str, Any] | None:
    """The manifest at `prefix/name`, or None if there is none.

    Raises:
        StorageError: it exists but is no manifest.
    """
    if store.head(join(prefix, name)) is None:
        return None
    with tempfile.TemporaryDirectory(prefix="lmforge-manifest-") as tmp:
        path = Path(tmp) / name
        store.get(join(prefix, name), path)
        try:
            manifest = json.loads(path.read_text())
            manifest["files"].items()
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            raise StorageError(f"{store.url}/{join(prefix, name)}: not a manifest lmforge can read") from None
    return manifest


def download_dir(
    store: Store, prefix: str, out: Path, manifest: dict[str, Any], log: Callable[[str], None] = lambda _: None
) -> int:
    """Copy the files the manifest lists from `prefix/` into the directory `out` (which exists),
    each checked against its size and SHA-256 (its size only where the manifest has no SHA-256); a
    file `out` already has unchanged is not copied again. Return the number copied.

    Raises:
        StorageError: a file is missing remotely or arrives different from the manifest.
    """
    copied = 0
    for key, entry in sorted(manifest["files"].items()):
        target = out / key
        checked = entry["sha256"] is not None  # None: a listing without lmforge's manifest, sizes only
        if (
            target.is_file()
            and target.stat().st_size == entry["size"]
            and (not checked or file_sha256(target) == entry["sha256"])
        ):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading {key} ({entry['size'] / MIB:.1f} MiB)")
        partial = target.with_name(f".tmp-{target.name}")
        if store.head(join(prefix, key)) is None:
            raise StorageError(f"{store.url}/{join(prefix, key)}: listed in the manifest but missing")
        store.get(join(prefix, key), partial)
        if partial.stat().st_size != entry["size"] or (checked and file_sha256(partial) != entry["sha256"]):
            partial.unlink(missing_ok=True)
            raise StorageError(f"{store.url}/{join(prefix, key)}: arrived different from its manifest entry (SHA-256)")
        os.replace(partial, target)
        copied += 1
    return copied
