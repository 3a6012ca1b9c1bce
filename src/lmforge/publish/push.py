"""`lmforge push RUN --to URL ...` and `lmforge pull URL --out DIR`.

    hf://org/name[@revision]     the Hugging Face Hub (publish.hub)
    s3://bucket/prefix           S3 or an S3-compatible server (publish.storage)
    file:///path, /path          a directory (a mounted drive)
    mlflow://Name[@alias]        the MLflow model registry (a pyfunc model version, with an alias)

A push exports the run exactly as `lmforge export` does (the adapter, or merged with
--merge-lora; with the model card) into a temporary directory, then sends it to every
destination. Every URL is checked before minutes of exporting. Credentials come from the
environment only: HF_TOKEN, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE),
MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.atomic import OWNED_MARKER, check_target, owned_dir
from lmforge.errors import UserError
from lmforge.publish.storage import (
    MANIFEST,
    PUSHING,
    LocalStore,
    Store,
    check_writable,
    download_dir,
    join,
    manifest_of,
    open_store,
    read_manifest,
    upload_dir,
)

_MLFLOW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Destination:
    """A parsed --to URL. kind: hf, store (s3 or a directory) or mlflow."""

    kind: str
    url: str
    name: str = ""
    """hf: the repo id; mlflow: the registered model's name."""
    tag: str | None = None
    """hf: the revision (branch); mlflow: the alias."""


def parse_destination(url: str) -> Destination:
    """The destination a --to URL names.

    Raises:
        UserError: a URL of no known scheme, or malformed for its scheme (with the right form).
    """
    if url.startswith("hf://"):
        from lmforge.publish.hub import parse_hf_url

        repo, revision = parse_hf_url(url)
        return Destination("hf", url, repo, revision)
    if not url.strip():
        raise UserError(
            "--to '': an empty destination; write hf://org/name, s3://bucket/prefix, mlflow://Name or a path"
        )
    if url.startswith("mlflow://"):
        name, at, alias = url[len("mlflow://") :].partition("@")
        if not _MLFLOW_NAME.match(name or ""):
            raise UserError(f"--to {url}: write mlflow://Name or mlflow://Name@alias (a registered model's name)")
        reserved = alias.lower() == "latest" or re.fullmatch(r"v\d+", alias.lower())
        if at and (not _ALIAS.match(alias) or reserved or len(alias) > 255):
            raise UserError(
                f"--to {url}: {alias!r} cannot be an MLflow alias (up to 255 letters, digits, _ and -, not 'latest' "
                "or v<N>); or leave out the '@'"
            )
        return Destination("mlflow", url, name, alias or None)
    if url.startswith("s3://"):
        if not url[len("s3://") :].split("/")[0]:
            raise UserError(f"--to {url}: no bucket; write s3://bucket/prefix")
        return Destination("store", url)
    if "://" in url and not url.startswith("file://"):
        raise UserError(
            f"--to {url}: push to hf://org/name[@revision], s3://bucket/prefix, mlflow://Name[@alias] or a directory"
        )
    return Destination("store", url)


def push_run(
    target: Path,
    urls: list[str],
    merge_lora: bool = False,
    private: bool = False,
    create_pr: bool = False,
    endpoint_url: str | None = None,
    log: Callable[[str], None] = print,
    license: str | None = None,
) -> list[str]:
    """Export `target` (a finished run, a paused run or a checkpoint) once and send it to every URL;
    return one line per destination saying where it went and what was sent (each also given to
    `log` as it is done). A destination that fails does not stop the others; the failures are
    raised together at the end.

    Raises:
        UserError: a bad URL, a target that cannot be exported, missing credentials, or a destination
            that refuses (named, without credentials; destinations before it keep what they got).
    """
    from lmforge.eval.target import resolve_target
    from lmforge.export.card import check_license, local_base_warning
    from lmforge.export.export import export_run

    if license is not None:
        check_license(license)
    destinations = [parse_destination(url) for url in urls]
    if not destinations:
        raise UserError("push: name at least one destination with --to")
    if (private or create_pr) and not any(d.kind == "hf" for d in destinations):
        raise UserError("--private and --create-pr are for hf:// destinations; none was given")
    kind, model_dir = resolve_target(Path(target))
    run_dir = model_dir.parent if kind == "run" else model_dir.parent.parent
    config = _run_config(model_dir if kind == "checkpoint" else run_dir)
    for destination in destinations:  # what can be checked is, before minutes of exporting
        _preflight(destination, endpoint_url, config, run_dir)
    step = json.loads((model_dir / "trainer_state.json").read_text())["step"] if kind == "checkpoint" else None
    what = f"{run_dir.name}" + (f" (checkpoint at step {step})" if step is not None else "")
    with tempfile.TemporaryDirectory(prefix="lmforge-push-") as tmp:
        export = export_run(Path(target), Path(tmp) / "model", merge_lora=merge_lora, license=license)
        (export / OWNED_MARKER).unlink(missing_ok=True)  # lmforge's local bookkeeping, not the model's
        warning = local_base_warning(export)
        if warning and any(d.kind != "mlflow" for d in destinations):  # the MLflow model is merged
            log(f"warning: {warning}")
        push = Push(Path(target), run_dir, config, export, what, merge_lora, private, create_pr, endpoint_url, log)
        lines, failed = [], []
        for destination in destinations:  # each on its own: one that fails does not undo the others
            try:
                lines.append(f"{destination.url}: {push.send(destination)}")
                log(lines[-1])
            except UserError as exc:
                failed.append(str(exc))
    if failed:
        done = f"; sent: {', '.join(line.split(': ')[0] for line in lines)}" if lines else ""
        raise UserError(f"push: {len(failed)} of {len(destinations)} destinations failed{done}\n" + "\n".join(failed))
    return lines


def _preflight(destination: Destination, endpoint_url: str | None, config, run_dir: Path) -> None:
    """Refuse now what would fail after the export: no Hub token, an unwritable or foreign store,
    an unreachable MLflow registry.

    Raises:
        UserError: with the fix.
    """
    if destination.kind == "hf":
        from lmforge.publish.hub import hub_token

        hub_token()
    elif destination.kind == "store":
        store = open_store(destination.url, endpoint_url, storage=config.storage if config else None)
        names = store.children()
        if names and MANIFEST not in names and PUSHING not in names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise UserError(
                f"--to {destination.url}: it holds files lmforge did not push ({shown}); name a new or empty "
                "place (a push replaces the files of its own earlier push only)"
            )
        check_writable(store)
    else:
        _mlflow_client(mlflow_uri(run_dir, config), destination.name)


@dataclass
class Push:
    """One export on its way to its destinations."""

    target: Path
    run_dir: Path
    config: object
    export: Path
    what: str
    merge_lora: bool
    private: bool
    create_pr: bool
    endpoint_url: str | None
    log: Callable[[str], None]

    def send(self, destination: Destination) -> str:
        """Send the export to `destination`; return where it went and what was sent."""
        if destination.kind == "hf":
            from lmforge.publish.hub import push_to_hub

            message = f"lmforge push {self.what}" + (" (merged LoRA)" if self.merge_lora else "")
            return push_to_hub(self.export, destination.name, destination.tag, self.private, self.create_pr, message)
        if destination.kind == "store":
            storage = self.config.storage if self.config is not None else None
            store = open_store(destination.url, endpoint_url=self.endpoint_url, storage=storage)
            sent, kept = upload_dir(self.export, store, log=self.log, claim=True)
            return f"{sent} files sent, {kept} already there unchanged"
        digest = hashlib.sha256(json.dumps(manifest_of(self.export), sort_keys=True).encode()).hexdigest()
        return register_in_mlflow(self.target, self.run_dir, destination.name, destination.tag, self.config, digest)


def _run_config(directory: Path):
    from lmforge.config import saved_config

    return saved_config(directory / "config.yaml") if (directory / "config.yaml").is_file() else None


# --------------------------------------------------------------------------- MLflow registry


def mlflow_uri(run_dir: Path, config) -> str:
    """Where the registry is: MLFLOW_TRACKING_URI, else the run's tracking.mlflow.tracking_uri, else
    the embedded store the run used (<output_dir>/mlflow.db, the directory holding the run)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if config is not None and config.tracking.mlflow.tracking_uri:
        return config.tracking.mlflow.tracking_uri
    return f"sqlite:///{run_dir.resolve().parent / 'mlflow.db'}"


def register_in_mlflow(target: Path, run_dir: Path, name: str, alias: str | None, config, digest: str) -> str:
    """Log `target` as an MLflow pyfunc model (a LoRA adapter merged, so it stands alone), register it
    as a new version of `name`, point `alias` at that version, and return the URI that loads it
    (`models:/Name@alias`, else `models:/Name/<version>`). The model goes into the run's own MLflow
    run when the registry's store has it (tracking.json), else into a new run "push of <run>", under
    its own artifact path, so that no earlier version's model changes. `digest` identifies the
    content (the export's manifest): pushing the same model again reuses its version (and moves the
    alias). Aliases replace stages, which MLflow deprecated.

    Raises:
        UserError: the registry cannot be reached or refuses (credentials never appear).
    """
    from mlflow.exceptions import MlflowException

    from lmforge.secrets import redact_text
    from lmforge.tracking.base import saved_ids
    from lmforge.tracking.mlflow_model import save_pyfunc

    uri = mlflow_uri(run_dir, config)
    client = _mlflow_client(uri, name)
    content = f"{digest}{'+merged' if config is not None and config.lora else ''}"
    try:
        version = _version_with(client, name, content)
        if version is None:  # new content: logged under its own path, so no version's model changes
            run_id = _mlflow_run(client, saved_ids(run_dir).get("mlflow"), run_dir)
            path = f"lmforge-push/{content[:16]}"
            with tempfile.TemporaryDirectory(prefix="lmforge-mlflow-") as tmp:
                save_pyfunc(Path(target), Path(tmp) / "model")
                client.log_artifacts(run_id, str(Path(tmp) / "model"), path)
            version = client.create_model_version(
                name, source=f"runs:/{run_id}/{path}", run_id=run_id, tags={CONTENT_TAG: content}
            )
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as exc:
        raise UserError(redact_text(f"mlflow://{name} at {uri}: {exc.message}")) from None
    return f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"


CONTENT_TAG = "lmforge.content_sha256"
"""A registered version's tag: the SHA-256 of the export it was made from (a push of the same
model again reuses that version instead of making another)."""


def _mlflow_client(uri: str, name: str):
    """A client of the registry at `uri`, with the registered model `name` created if missing; a
    dead server is said in seconds (MLflow's own retries would take minutes).

    Raises:
        UserError: the registry cannot be reached or refuses.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from lmforge.secrets import redact_text
    from lmforge.tracking.mlflow import HTTP_DEFAULTS

    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    client = MlflowClient(tracking_uri=uri)
    try:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, bad URI: one line each
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise UserError(redact_text(f"mlflow://{name}: the registry at {uri} failed: {message}")) from None
    return client


def _version_with(client, name: str, content: str):
    """The version of `name` registered from this content, if any."""
    versions = client.search_model_versions(f"name='{name}'")
    return next((v for v in versions if v.tags.get(CONTENT_TAG) == content), None)


def _mlflow_run(client, run_id: str | None, run_dir: Path) -> str:
    """The run's MLflow run id if this store has it, else a new finished run named for the push."""
    from mlflow.exceptions import MlflowException

    if run_id is not None:
        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:
            pass
    experiment = client.get_experiment_by_name("lmforge-push")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment("lmforge-push")
    run = client.create_run(experiment_id, run_name=f"push of {run_dir.name}", tags={"lmforge.run_dir": str(run_dir)})
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


# --------------------------------------------------------------------------- pull


def pull(
    url: str, out: Path, endpoint_url: str | None = None, force: bool = False, log: Callable[[str], None] = print
) -> tuple[Path, int]:
    """Copy what `lmforge push` (or a train.mirror) put at `url` into the directory `out`, each file
    checked against the manifest's SHA-256; return (out, files copied). Pulling into an earlier
    pull copies only what changed. A prefix without lmforge's manifest (copied there by other
    tools) is taken whole, each file checked by its size only.

    Raises:
        UserError: nothing at `url`, a file that arrives different, or an `out` holding other files.
    """
    store = open_store(url, endpoint_url=endpoint_url)
    manifest = remote_manifest(store, log)
    present, owned = check_target(Path(out), force)
    tops = {key.split("/")[0] for key in manifest["files"]}
    clashes = sorted(tops & set(present) - (owned or set()))
    if clashes:  # said before the download, not after
        raise UserError(
            f"--out {Path(out).resolve()}: it holds files of the names the pull writes that lmforge did not write "
            f"({', '.join(clashes[:5])}); move them, or name another directory"
        )
    if owned is not None:  # an earlier pull: replace what changed, in place, file by file
        copied = download_dir(store, "", Path(out), manifest, log)
        for name in owned - set(manifest["files"]) - {OWNED_MARKER}:
            (Path(out) / name).unlink(missing_ok=True)
        (Path(out) / OWNED_MARKER).write_text(json.dumps(sorted(manifest["files"])))
        return Path(out), copied
    with owned_dir(Path(out), force=force) as tmp:
        copied = download_dir(store, "", tmp, manifest, log)
    return Path(out), copied


def remote_manifest(store: Store, log: Callable[[str], None] = print) -> dict:
    """The manifest at the store's root, or one made from its listing (sizes only) if it has none.

    Raises:
        UserError: nothing is there.
    """
    manifest = read_manifest(store)
    if manifest is not None:
        return manifest
    if store.head(PUSHING) is not None:
        raise UserError(f"{store.url}: a push there is under way or was cut short; run it again, then pull")
    keys = store.list()
    if not keys:
        where = "no such directory, or it is empty" if isinstance(store, LocalStore) else "nothing is there"
        raise UserError(
            f"{store.url}: {where} (check the {'path' if isinstance(store, LocalStore) else 'bucket and prefix'})"
        )
    log(f"{store.url}: no {MANIFEST} (not pushed by lmforge): taking its {len(keys)} files, checked by size only")
    files = {}
    for key in keys:
        remote = store.head(key)
        files[key] = {"size": remote.size, "sha256": remote.sha256}
    return {"format": 1, "files": files}


def local_model(name_or_path: str, storage=None, log: Callable[[str], None] = print) -> str:
    """`name_or_path` itself, or for s3:// a local copy of it, pulled into the lmforge cache
    ($LMFORGE_CACHE or ~/.cache/lmforge/models/): one copy per content of the remote model, so an
    adapter trained on one version keeps its base when the remote model is pushed again.

    Raises:
        UserError: the remote model cannot be read.
    """
    if not str(name_or_path).startswith("s3://"):
        return name_or_path
    root = Path(os.environ.get("LMFORGE_CACHE", "~/.cache/lmforge")).expanduser() / "models"
    url = str(name_or_path).rstrip("/")
    store = open_store(url, storage=storage)
    manifest = remote_manifest(store, log)
    content = json.dumps(manifest["files"], sort_keys=True)  # each version of the remote model its own copy:
    local = root / hashlib.sha256(f"{url}\n{content}".encode()).hexdigest()[:16]  # an adapter keeps its base
    local.mkdir(parents=True, exist_ok=True)
    copied = download_dir(store, "", local, manifest, log)
    if copied:
        log(f"model.name_or_path {url}: {copied} files copied to {local}")
    return str(local)


__all__ = ["Destination", "join", "local_model", "parse_destination", "pull", "push_run", "register_in_mlflow"]
