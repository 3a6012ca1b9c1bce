"""`publish.hub.push_to_hub` uploads an export exactly, names the run, sends the token only as
authorization and never says it.

The Hugging Face Hub cannot be reached from the test machines, so these tests replace it at the
HTTP boundary only: huggingface_hub's own client factory (`set_client_factory`) gets an
`httpx2.MockTransport` that implements just enough of the Hub's HTTP API (repo create, repo and
revision info, branch create, README metadata validation, preupload, the LFS batch API and the
upload it points to, the NDJSON commit, pull requests) to keep the repository's files per branch
and record every request. Everything above that boundary is the real code: lmforge's export of a
tiny trained run, HfApi's upload logic (which files are LFS, skipping unchanged files), lmforge's
error handling. Xet is switched off (`constants.HF_HUB_DISABLE_XET`): with hf_xet installed, LFS
files would go through hf_xet's own HTTP client, which no httpx transport sees. One test keeps it
on with a Hub that stores every file in git, so that huggingface_hub's Xet pipeline (the path a
user with hf_xet takes) is checked too, short of hf_xet's own transfers.
"""

import base64
import hashlib
import io
import itertools
import json
import math
import re
from pathlib import Path
from urllib.parse import unquote

import httpx2
import pytest
import yaml
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory  # to put the real client back
from rich.console import Console

from conftest import chapters, tiny_config_dict
from lmforge.atomic import OWNED_MARKER
from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.export.export import export_run
from lmforge.publish.hub import NOTHING_CHANGED, parse_hf_url, push_to_hub
from lmforge.run import run_train

TOKEN = "hf_" + "Zq7" * 12
ENDPOINT = "https://huggingface.co"
REPO = "lmforge-test/tiny"
LFS_HOST = "lfs.mock"
LFS_SUFFIXES = (".safetensors", ".bin")  # the Hub's default .gitattributes stores these in LFS
TELEMETRY = "/api/agent-harnesses"  # huggingface_hub's own best-effort look-up, no part of a push


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """The Hub's HTTP API as far as `push_to_hub` uses it: repositories with their branches and
    files, LFS objects, and every request recorded (method, host, path, query, authorization, body)."""

    def __init__(self, token: str = TOKEN, writable: bool = True, lfs_suffixes: tuple[str, ...] = LFS_SUFFIXES):
        self.token, self.writable, self.lfs_suffixes = token, writable, lfs_suffixes
        self.repos: dict[str, dict] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.pull_requests: list[str] = []  # their titles; number n is refs/pr/n
        self.shas = (hashlib.sha1(str(n).encode()).hexdigest() for n in itertools.count())
        self.routes = [
            ("POST", r"/api/repos/create", self.create_repo),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self.repo_info),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)", self.create_branch),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/discussions", self.open_pull_request),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/discussions/(?P<num>\d+)", self.pull_request),
        ]

    # -- transport -----------------------------------------------------------------------------

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        path = request.url.raw_path.decode().split("?")[0]
        self.requests.append(
            {
                "method": request.method,
                "host": request.url.host,
                "path": path,
                "params": dict(request.url.params),
                "authorization": request.headers.get("authorization"),
                "json": json.loads(body) if request.headers.get("content-type") == "application/json" else None,
            }
        )
        if request.url.host == LFS_HOST:  # the storage an LFS upload URL points at: no Hub token there
            oid = path.rsplit("/", 1)[1]
            assert hashlib.sha256(body).hexdigest() == oid
            self.lfs[oid] = body
            return httpx2.Response(200)
        if path == TELEMETRY:
            return httpx2.Response(200, json={"standardEnvVars": [], "harnesses": {}})
        if request.headers.get("authorization") != f"Bearer {self.token}":  # a verbose server echoes it
            message = f"Invalid credentials in Authorization header {request.headers.get('authorization')}"
            return httpx2.Response(401, json={"error": message})
        for method, pattern, route in self.routes:
            match = re.fullmatch(pattern, path)
            if match and method == request.method:
                return route(request, body, **{k: unquote(v) for k, v in match.groupdict().items() if v})
        raise AssertionError(f"the fake Hub has no route for {request.method} {path}")

    def install(self, monkeypatch, xet: bool = False) -> None:
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", ENDPOINT)
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(self.handle)))

    # -- routes --------------------------------------------------------------------------------

    def create_repo(self, request, body):
        payload = json.loads(body)
        repo = f"{payload['organization']}/{payload['name']}"
        if not self.writable:
            return httpx2.Response(
                403, json={"error": "You don't have the rights to create a model under this namespace"}
            )
        if repo in self.repos:
            return httpx2.Response(409, json={"error": "You already created this model repo"})
        initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self.repos[repo] = {"private": payload.get("visibility") == "private", "refs": {"main": self.snapshot(initial)}}
        return httpx2.Response(200, json={"url": f"{ENDPOINT}/{repo}", "name": repo})

    def snapshot(self, files: dict[str, bytes]) -> dict:
        return {"sha": next(self.shas), "files": dict(files)}

    def ref(self, repo: str, rev: str | None) -> dict | httpx2.Response:
        if repo not in self.repos:
            return httpx2.Response(
                404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "Repository not found"}
            )
        refs = self.repos[repo]["refs"]
        if (rev or "main") not in refs:
            return httpx2.Response(404, headers={"X-Error-Code": "RevisionNotFound"}, json={"error": "Invalid rev id"})
        return refs[rev or "main"]

    def repo_info(self, request, body, repo, rev=None):
        ref = self.ref(repo, rev)
        if isinstance(ref, httpx2.Response):
            return ref
        siblings = [{"rfilename": name} for name in ref["files"]]
        return httpx2.Response(
            200, json={"id": repo, "sha": ref["sha"], "private": self.repos[repo]["private"], "siblings": siblings}
        )

    def create_branch(self, request, body, repo, rev):
        refs = self.repos[repo]["refs"]
        if rev in refs:
            return httpx2.Response(409, json={"error": "Reference already exists"})
        refs[rev] = dict(refs["main"])
        return httpx2.Response(200, json={})

    def validate_yaml(self, request, body):
        """The Hub's check of a card's metadata, as far as lmforge could get it wrong: base_model."""
        base = (ModelCard(json.loads(body)["content"]).data.base_model or "").strip()
        if base.startswith(("/", ".")):
            message = f'"base_model" with value "{base}" is not valid. Use a model id from https://hf.co/models.'
            return httpx2.Response(400, json={"errors": [{"message": message}]})
        return httpx2.Response(200, json={})

    def preupload(self, request, body, repo, rev):
        ref = self.ref(repo, rev)
        if isinstance(ref, httpx2.Response):
            return ref
        files = []
        for entry in json.loads(body)["files"]:
            lfs = entry["path"].endswith(self.lfs_suffixes)
            remote = ref["files"].get(entry["path"])
            oid = None if remote is None else hashlib.sha256(remote).hexdigest() if lfs else git_oid(remote)
            mode = "lfs" if lfs else "regular"
            files.append({"path": entry["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return httpx2.Response(200, json={"files": files, "commitOid": ref["sha"]})

    def lfs_batch(self, request, body, repo):
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:  # already stored: nothing to upload
                entry["actions"] = {"upload": {"href": f"https://{LFS_HOST}/upload/{obj['oid']}"}}
            objects.append(entry)
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

    def commit(self, request, body, repo, rev):
        ref = self.ref(repo, rev)
        if isinstance(ref, httpx2.Response):
            return ref
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        added = {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                added[value["path"]] = self.lfs[value["oid"]]  # uploaded before the commit, or it fails
        refs = self.repos[repo]["refs"]
        new = self.snapshot({**ref["files"], **added})
        pr_url = None
        if request.url.params.get("create_pr") == "1":
            number = sum(name.startswith("refs/pr/") for name in refs) + 1
            rev, pr_url = f"refs/pr/{number}", f"{ENDPOINT}/{repo}/discussions/{number}"
            self.pull_requests.append(header["summary"])
        refs[rev] = new
        self.commits.append({"repo": repo, "revision": rev, "header": header, "files": added, "lines": lines})
        url = f"{ENDPOINT}/{repo}/commit/{new['sha']}"
        return httpx2.Response(200, json={"commitUrl": url, "commitOid": new["sha"], "pullRequestUrl": pr_url})

    def open_pull_request(self, request, body, repo):
        """A pull request opened before its commits (huggingface_hub's Xet pipeline does this)."""
        refs = self.repos[repo]["refs"]
        self.pull_requests.append(json.loads(body)["title"])
        refs[f"refs/pr/{len(self.pull_requests)}"] = dict(refs["main"])
        return httpx2.Response(200, json={"num": len(self.pull_requests)})

    def pull_request(self, request, body, repo, num):
        return httpx2.Response(
            200,
            json={
                "title": self.pull_requests[int(num) - 1],
                "num": int(num),
                "author": {"name": "lmforge-test"},
                "createdAt": "2026-01-01T00:00:00.000Z",
                "status": "draft",
                "repo": {"name": repo, "type": "model"},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
            },
        )


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, its export) of a tiny model trained from scratch."""
    tmp = tmp_path_factory.mktemp("push")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(40)) + "\n", encoding="utf-8")
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, tmp / "cache", tmp / "runs")))
    run_dir = run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir
    return run_dir, export_run(run_dir, tmp / "export")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-login"))
    fake = FakeHub()
    fake.install(monkeypatch)
    yield fake
    set_client_factory(default_client_factory)


def exported_files(export: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in export.iterdir() if p.name != OWNED_MARKER}


def with_a_new_card(export: Path, tmp_path: Path) -> Path:
    """A copy of the export whose README.md alone differs."""
    changed = tmp_path / "changed"
    changed.mkdir()
    for name, data in exported_files(export).items():
        (changed / name).write_bytes(data)
    (changed / "README.md").write_text((export / "README.md").read_text() + "\nA note.\n")
    return changed


@pytest.mark.slow
def test_a_push_commits_exactly_the_export_with_its_card_under_the_token(export, hub):
    run_dir, out = export
    url = push_to_hub(out, REPO, None, private=True, create_pr=False, commit_message=f"lmforge: {run_dir.name}")

    [commit] = hub.commits
    main = hub.repos[REPO]["refs"]["main"]
    assert url == f"{ENDPOINT}/{REPO}/commit/{main['sha']}"
    assert commit["files"] == exported_files(out)  # every file, byte for byte, and nothing else
    assert {name for name, data in main["files"].items()} == {".gitattributes", *exported_files(out)}
    assert commit["header"]["summary"] == f"lmforge: {run_dir.name}"
    lfs = [line["value"]["path"] for line in commit["lines"] if line["key"] == "lfsFile"]
    assert lfs == ["model.safetensors"] and hub.lfs  # the weights went through the LFS upload
    [create] = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert create["json"]["visibility"] == "private" and hub.repos[REPO]["private"]

    card = ModelCard(commit["files"]["README.md"].decode())
    final = json.loads((run_dir / "eval.json").read_text())
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert card.data.tags == ["lmforge", "causal-lm"] and card.data.datasets is None  # corpus.txt is no Hub id
    assert "base_model" not in card.data.to_dict()  # trained from scratch
    published = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert published == {
        (final[section].get("split", section), name): value
        for section in ("validation", "test", "generation")
        for name, value in final.get(section, {}).items()
        if isinstance(value, float) and math.isfinite(value)
    }
    assert ("test", "loss") in published
    hub_requests = [r for r in hub.requests if r["host"] != LFS_HOST and r["path"] != TELEMETRY]
    assert hub_requests and all(r["authorization"] == f"Bearer {TOKEN}" for r in hub_requests)
    assert all(r["authorization"] is None for r in hub.requests if r["host"] == LFS_HOST)


@pytest.mark.slow
def test_an_unchanged_push_makes_no_commit_and_a_changed_file_is_the_only_one_sent(export, hub, tmp_path):
    run_dir, out = export
    first = push_to_hub(out, REPO, None, False, False, f"lmforge: {run_dir.name}")
    again = push_to_hub(out, REPO, None, False, False, f"lmforge: {run_dir.name} again")
    assert again == f"{NOTHING_CHANGED}{first}" and len(hub.commits) == 1

    url = push_to_hub(with_a_new_card(out, tmp_path), REPO, None, False, False, "lmforge: a new card")
    assert url == f"{ENDPOINT}/{REPO}/commit/{hub.repos[REPO]['refs']['main']['sha']}" and url != first
    assert list(hub.commits[-1]["files"]) == ["README.md"]


@pytest.mark.slow
def test_a_branch_is_created_once_and_a_pull_request_targets_main(export, hub):
    run_dir, out = export
    push_to_hub(out, REPO, "dev", False, False, f"lmforge: {run_dir.name}")
    refs = hub.repos[REPO]["refs"]
    assert hub.commits[-1]["revision"] == "dev" and set(refs["dev"]["files"]) > set(refs["main"]["files"])
    assert [r["path"] for r in hub.requests if "/branch/" in r["path"]] == [f"/api/models/{REPO}/branch/dev"]
    assert push_to_hub(out, REPO, "dev", False, False, "again").startswith(NOTHING_CHANGED)  # exists: 409 taken

    pr = push_to_hub(out, REPO, None, False, True, f"lmforge: {run_dir.name}")
    assert pr == f"{ENDPOINT}/{REPO}/discussions/1"
    assert hub.commits[-1]["revision"] == "refs/pr/1" and refs["main"]["files"].keys() == {".gitattributes"}
    commit_request = [r for r in hub.requests if "/commit/" in r["path"]][-1]
    assert commit_request["params"] == {"create_pr": "1"} and commit_request["path"].endswith("/commit/main")
    with pytest.raises(UserError, match="pull request is opened against main; leave out @dev"):
        push_to_hub(out, REPO, "dev", False, True, "x")


@pytest.mark.slow
def test_refusals_say_the_fix_in_one_line_and_never_the_token(export, hub, monkeypatch, tmp_path):
    _, out = export
    failures = {}

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with pytest.raises(UserError) as failures["no token"]:
        push_to_hub(out, REPO, None, False, False, "x")
    assert "set HF_TOKEN" in str(failures["no token"].value) and "hf auth login" in str(failures["no token"].value)
    assert not [r for r in hub.requests if r["path"] != TELEMETRY]

    monkeypatch.setenv("HF_TOKEN", "hf_" + "W" * 34)  # not the token the Hub knows; it echoes it back
    with pytest.raises(UserError, match="does not accept the token \\(401") as failures["bad token"]:
        push_to_hub(out, REPO, None, False, False, "x")
    assert "hf_WWWW" not in str(failures["bad token"].value)

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.writable = False
    with pytest.raises(UserError, match="may not write there \\(403") as failures["read-only"]:
        push_to_hub(out, REPO, None, False, False, "x")

    hub.writable = True
    push_to_hub(out, REPO, None, False, False, "public")
    with pytest.raises(UserError, match="exists and is public") as failures["private"]:
        push_to_hub(out, REPO, None, True, False, "x")

    bad_card = with_a_new_card(out, tmp_path)
    (bad_card / "README.md").write_text("---\nbase_model: /home/me/base\n---\n# a card\n")
    with pytest.raises(UserError, match="the Hub refuses the model card: .*base_model.* is not valid") as failures[
        "card"
    ]:
        push_to_hub(bad_card, REPO, None, False, False, "x")

    def unreachable(request):
        raise httpx2.ConnectError(f"connection refused while sending {request.headers.get('authorization')}")

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(unreachable)))
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub at https://huggingface.co") as failures[
        "net"
    ]:
        push_to_hub(out, REPO, None, False, False, "x")

    for failure in failures.values():
        message = str(failure.value)
        assert TOKEN not in message and "\n" not in message and message.startswith(f"hf://{REPO}: ")


@pytest.mark.slow
def test_through_the_xet_pipeline_commits_skips_and_pull_requests_go_the_same_way(export, hub, monkeypatch, tmp_path):
    """With hf_xet installed (the default), upload_folder takes its Xet pipeline. LFS files would
    travel through hf_xet's own client, so this Hub keeps every file in git; the commits, the
    unchanged-file skip and the pull request are the pipeline's own."""
    run_dir, out = export
    hub.lfs_suffixes = ()
    hub.install(monkeypatch, xet=True)
    first = push_to_hub(out, REPO, None, False, False, f"lmforge: {run_dir.name}")
    assert hub.commits[-1]["files"] == exported_files(out) and first.endswith(hub.repos[REPO]["refs"]["main"]["sha"])
    assert push_to_hub(out, REPO, None, False, False, "again") == f"{NOTHING_CHANGED}{first}"
    assert push_to_hub(out, REPO, None, False, True, "a pull request") == f"{NOTHING_CHANGED}{first}"
    assert hub.pull_requests == [] and len(hub.commits) == 1  # no empty pull request either

    pr = push_to_hub(with_a_new_card(out, tmp_path), REPO, None, False, True, f"lmforge: {run_dir.name} card")
    assert pr == f"{ENDPOINT}/{REPO}/discussions/1" and hub.pull_requests == [f"lmforge: {run_dir.name} card"]
    assert hub.commits[-1]["revision"] == "refs/pr/1" and list(hub.commits[-1]["files"]) == ["README.md"]


def test_hf_addresses_give_the_repository_and_revision_or_say_the_form():
    assert parse_hf_url("hf://org/name") == ("org/name", None)
    assert parse_hf_url("hf://org/name@dev") == ("org/name", "dev")
    assert parse_hf_url("hf://org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    bad = {
        "org/name": "not a Hugging Face Hub address",
        "s3://bucket/x": "not a Hugging Face Hub address",
        "hf://name": "must be namespace/name",
        "hf://org/name/extra": "must be namespace/name",
        "hf:///name": "must be namespace/name",
        "hf://org/name@": "nothing after '@'",
        "hf://org/na me": "is no valid repository name",
        "hf://org/name--x..y": "is no valid repository name",
    }
    for url, says in bad.items():
        with pytest.raises(UserError, match=re.escape(says)):
            parse_hf_url(url)


@pytest.mark.slow
def test_lmforge_push_sends_one_export_to_the_hub_and_s3_at_once(export, hub, s3_bucket, tmp_path):
    """`lmforge push RUN --to hf://... --to s3://...` (push_run, the command's function): the same
    export reaches both; the Hub commit names the run; a second push changes nothing anywhere."""
    from lmforge.publish.push import pull, push_run

    run_dir, out = export
    lines = push_run(run_dir, [f"hf://{REPO}@dev", f"s3://{s3_bucket}/m"], log=lambda _: None)
    assert lines[0].startswith(f"hf://{REPO}@dev: {ENDPOINT}/{REPO}/commit/") and "0 already there" in lines[1]
    [commit] = hub.commits
    assert commit["header"]["summary"] == f"lmforge push {run_dir.name}"
    assert commit["files"] == exported_files(out)
    pulled, _ = pull(f"s3://{s3_bucket}/m", tmp_path / "pulled", log=lambda _: None)
    assert exported_files(pulled) == commit["files"]  # the same bytes in both places

    again = push_run(run_dir, [f"hf://{REPO}@dev", f"s3://{s3_bucket}/m"], log=lambda _: None)
    assert again[0].startswith(f"hf://{REPO}@dev: {NOTHING_CHANGED}") and again[1].split(": ")[1].startswith("0 files")
    assert len(hub.commits) == 1
