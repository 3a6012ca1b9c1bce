"""Pushing an exported model directory to the Hugging Face Hub (`lmforge push RUN --to hf://org/name`).

Everything goes through huggingface_hub's `HfApi`: the repository is created if it is missing, a
branch named in `hf://org/name@branch` is created from main if it is missing, and the directory is
uploaded as one commit (or a pull request). The token is the one huggingface_hub finds itself
(HF_TOKEN, else the login stored by `hf auth login`); no config value or command-line option holds
one. Whatever the Hub answers is said in one line with every credential redacted.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import HFValidationError, validate_repo_id

from lmforge.atomic import OWNED_MARKER
from lmforge.errors import UserError
from lmforge.secrets import redact_text

try:  # the HTTP client huggingface_hub uses: httpx2 from 2.x on, httpx before
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    from httpx import TransportError

HF_SCHEME = "hf://"
NOTHING_CHANGED = "nothing changed: "
"""How `push_to_hub`'s answer starts when the repository already held these exact files."""
LOGIN_FIX = "set HF_TOKEN to a token with write access (https://huggingface.co/settings/tokens) or run `hf auth login`"


def parse_hf_url(url: str) -> tuple[str, str | None]:
    """The repository id and revision of `hf://org/name[@revision]`.

    Returns:
        ("org/name", revision), revision None when the address names none (the main branch).

    Raises:
        UserError: not an hf:// address, no "org/name" in it, an invalid name, or an empty revision.
    """
    form = "write hf://org/name, or hf://org/name@branch to push to a branch"
    if not url.startswith(HF_SCHEME):
        raise UserError(f"{url!r}: not a Hugging Face Hub address; {form}")
    repo_id, at, revision = url[len(HF_SCHEME) :].partition("@")
    if at and not revision.strip():
        raise UserError(f"{url!r}: nothing after '@'; name a branch (hf://org/name@dev) or leave out the '@'")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UserError(f"{url!r}: the repository must be namespace/name (your user or organisation, a name); {form}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{url!r}: {repo_id!r} is no valid repository name ({exc}); {form}") from None
    return repo_id, revision or None


def hub_token() -> str:
    """The Hugging Face token huggingface_hub finds itself: HF_TOKEN, else the login stored by
    `hf auth login` (never a config value or option).

    Raises:
        UserError: there is none, with how to set one.
    """
    token = get_token()
    if not token:
        raise UserError(f"no Hugging Face token found; {LOGIN_FIX}")
    return token


def push_to_hub(
    export_dir: Path,
    repo: str,
    revision: str | None,
    private: bool,
    create_pr: bool,
    commit_message: str,
    token: str | None = None,
) -> str:
    """Upload an exported model directory (`export.export_run`'s `out`, README.md model card
    included) to the model repository `repo` on the Hugging Face Hub, as one commit.

    Every file of `export_dir` is uploaded (added, or replaced when it differs) except lmforge's
    own record of what it wrote there (`.lmforge-files.json`); files already in the repository
    that the export lacks are kept. An upload that changes nothing makes no commit.

    Args:
        export_dir: the exported directory.
        repo: the repository id, "namespace/name" (`parse_hf_url` of the user's hf:// address).
        revision: the branch to commit to; created from main when it does not exist yet; None
            (or "main") for main; "refs/pr/N" commits to an open pull request.
        private: create a missing repository as private. An existing public repository is
            refused rather than pushed to, since it would not become private.
        create_pr: open a pull request against main with the commit instead of committing to
            main (a pull request cannot target another branch here: `revision` must be None).
        commit_message: the commit's (and the pull request's) title; name the run in it.
        token: a token the caller already holds; None (always, from the CLI) takes `hub_token()`'s:
            HF_TOKEN, else the login `hf auth login` stored.

    Returns:
        The URL of the new commit, or of the pull request with `create_pr`; when the repository
        already held exactly these files, no commit is made and the answer is NOTHING_CHANGED
        followed by the URL of the commit that holds them.

    Raises:
        UserError: no token, an empty commit message, `create_pr` with a branch, a missing
            export directory, a private push to a public repository, or any refusal or failure
            of the Hub (bad token, no write access, unreachable, invalid model card metadata),
            said in one line without the token.
    """
    where = f"{HF_SCHEME}{repo}" + (f"@{revision}" if revision else "")
    revision = None if revision in (None, "main") else revision
    _check_push(Path(export_dir), where, revision, create_pr, commit_message)
    if token is None:
        try:
            token = hub_token()
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
    api = HfApi(token=token, library_name="lmforge")
    try:
        _prepare_repo(api, repo, revision, private, where)
        before = _head(api, repo, revision)
        info = api.upload_folder(
            repo_id=repo,
            folder_path=Path(export_dir),
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            ignore_patterns=[OWNED_MARKER],
        )
    except (HfHubHTTPError, TransportError, OfflineModeIsEnabled) as exc:
        raise hub_error(exc, where) from None
    except ValueError as exc:  # the Hub's verdict on the card's metadata, checked before any upload
        if "Invalid metadata in README.md" not in str(exc):
            raise
        raise UserError(redact_text(f"{where}: the Hub refuses the model card: {_one_line(str(exc))}")) from None
    if info.oid == before and not info.pr_url:
        return f"{NOTHING_CHANGED}{info.commit_url}"
    return info.pr_url or info.commit_url


def _check_push(export_dir: Path, where: str, revision: str | None, create_pr: bool, message: str) -> None:
    """What can be refused before the Hub is asked anything."""
    if not export_dir.is_dir() or not any(export_dir.iterdir()):
        raise UserError(f"{where}: {export_dir} is no exported model directory; make one with `lmforge export`")
    if not message.strip():
        raise UserError(f"{where}: the commit message is empty; give one that names the run")
    if create_pr and revision is not None:
        raise UserError(
            f"{where}: a pull request is opened against main; leave out @{revision}, or push to the branch "
            "without a pull request"
        )


def _prepare_repo(api: HfApi, repo: str, revision: str | None, private: bool, where: str) -> None:
    """The repository, created when missing (private if asked), and the branch `revision`, created
    from main when missing (a pull request's refs/pr/N must exist already).

    Raises:
        UserError: `private` asked of an existing public repository.
    """
    try:
        existing = api.repo_info(repo)
    except RepositoryNotFoundError:
        existing = None
    if existing is None:
        api.create_repo(repo, private=private, exist_ok=True)
    elif private and not existing.private:
        raise UserError(
            f"{where}: the repository exists and is public, so a private push would publish the model; make it "
            "private on the Hub first (its Settings), or push without private"
        )
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo, branch=revision, exist_ok=True)


def _head(api: HfApi, repo: str, revision: str | None) -> str | None:
    """The commit `revision` (main when None) points at now."""
    return api.repo_info(repo, revision=revision).sha


def hub_error(exc: Exception, where: str) -> UserError:
    """One line that says what the Hub (or the way to it) answered, and what to do, without
    any credential."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) if isinstance(exc, HfHubHTTPError) else None
    said = getattr(exc, "server_message", None) or str(exc)
    if isinstance(exc, OfflineModeIsEnabled):
        detail = "HF_HUB_OFFLINE is set; unset it to push"
    elif isinstance(exc, TransportError):
        detail = (
            f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(exc).__name__}: {exc}); check the "
            "network (or HF_ENDPOINT) and push again"
        )
    elif status == 401:
        detail = f"the Hub does not accept the token (401: {said}); {LOGIN_FIX}"
    elif status == 403:
        detail = f"the token may not write there (403: {said}); use a token with write access to its namespace"
    elif status == 404 or isinstance(exc, RepositoryNotFoundError):
        detail = f"no such repository or branch, or the token cannot see it (404: {said})"
    else:
        detail = f"the Hub answered {status or type(exc).__name__}: {said}"
    return UserError(redact_text(f"{where}: {_one_line(detail)}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())
