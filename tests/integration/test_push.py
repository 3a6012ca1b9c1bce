"""`lmforge push` to S3 (a real moto server on loopback) and the MLflow registry, `lmforge pull`, and
`model.name_or_path: s3://...`."""

import io
import os
import re
import subprocess
import time

import boto3
import pytest
from rich.console import Console

from conftest import S3_KEYS, lmforge_command, subprocess_env
from lmforge.errors import UserError
from lmforge.export.export import export_run
from lmforge.publish.push import pull, push_run
from lmforge.publish.storage import MANIFEST, open_store, s3_etag, upload_dir
from lmforge.run import run_train

pytestmark = pytest.mark.slow
QUIET = Console(file=io.StringIO())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache_dir):
    """A finished tiny run (shared by the module's tests: it is only read)."""
    from conftest import chapters, tiny_config_dict
    from lmforge.config import Config

    tmp = tmp_path_factory.mktemp("push")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(40)) + "\n")
    config = Config.model_validate(tiny_config_dict(corpus, cache_dir, tmp / "runs"))
    return run_train(config, QUIET).run_dir


def files_of(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_push_to_s3_then_pull_gives_the_export_byte_for_byte_and_a_repush_sends_nothing(run_dir, s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/models/tiny"
    (line,) = push_run(run_dir, [url], log=lambda _: None)
    assert "files sent, 0 already there" in line

    exported = export_run(run_dir, tmp_path / "export")
    out, copied = pull(url, tmp_path / "pulled", log=lambda _: None)
    pulled, expected = files_of(out), files_of(exported)
    expected.pop(".lmforge-files.json"), pulled.pop(".lmforge-files.json")
    assert pulled == expected and copied == len(expected)  # the model's files, not the manifest

    assert not [k for k in keys_of(s3_bucket) if k.endswith(".lmforge-pushing")]  # the marker goes when done
    (again,) = push_run(run_dir, [url], log=lambda _: None)
    assert again.startswith(f"{url}: 0 files sent, {len(expected)} already there unchanged"), again
    assert pull(url, tmp_path / "pulled", log=lambda _: None)[1] == 0  # pulling again copies nothing

    # a push cut short: the manifest and one file never arrived; running it again sends just those
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="models/tiny/.lmforge-pushing", Body=b"{}")  # as a push leaves it
    client.delete_objects(
        Bucket=s3_bucket,
        Delete={"Objects": [{"Key": f"models/tiny/{MANIFEST}"}, {"Key": "models/tiny/model.safetensors"}]},
    )
    with pytest.raises(UserError, match="cut short; run it again"):
        pull(url, tmp_path / "half", log=lambda _: None)
    (resumed,) = push_run(run_dir, [url], log=lambda _: None)
    assert resumed.startswith(f"{url}: 1 files sent, {len(expected) - 1} already there unchanged"), resumed


def test_multipart_upload_is_verified_against_the_parts_md5(s3_bucket, tmp_path):
    from lmforge.config import StorageConfig

    big = tmp_path / "big"
    big.mkdir()
    (big / "weights.bin").write_bytes(os.urandom(11 << 20))  # 3 parts of 5 MiB, 5 MiB, 1 MiB
    store = open_store(f"s3://{s3_bucket}/big", storage=StorageConfig(multipart_threshold_mb=5, multipart_chunk_mb=5))
    assert upload_dir(big, store) == (1, 0)
    etag = boto3.client("s3").head_object(Bucket=s3_bucket, Key="big/weights.bin")["ETag"].strip('"')
    assert etag.endswith("-3") and etag == s3_etag(big / "weights.bin", 5 << 20, 5 << 20)
    out, _ = pull(f"s3://{s3_bucket}/big", tmp_path / "back", log=lambda _: None)
    assert (out / "weights.bin").read_bytes() == (big / "weights.bin").read_bytes()


def test_pull_of_a_prefix_lmforge_did_not_push_checks_sizes(s3_bucket, tmp_path):
    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="other/config.json", Body=b"{}")
    client.put_object(Bucket=s3_bucket, Key="other/sub/x.txt", Body=b"hello")
    messages = []
    out, copied = pull(f"s3://{s3_bucket}/other", tmp_path / "o", log=messages.append)
    assert copied == 2 and (out / "sub" / "x.txt").read_bytes() == b"hello"
    assert any("checked by size only" in m for m in messages)
    with pytest.raises(UserError, match="nothing is there"):
        pull(f"s3://{s3_bucket}/nothing-here", tmp_path / "n", log=lambda _: None)


def test_cli_push_and_pull_keep_credentials_out_of_everything(run_dir, s3_bucket, tmp_path):
    env = subprocess_env(HF_TOKEN="hf_" + "Q" * 34)
    url = f"s3://{s3_bucket}/cli"
    pushed = subprocess.run(
        lmforge_command("push", str(run_dir), "--to", url), capture_output=True, text=True, env=env, timeout=300
    )
    assert pushed.returncode == 0, pushed.stderr
    pulled = subprocess.run(
        lmforge_command("pull", url, "--out", str(tmp_path / "p")), capture_output=True, text=True, env=env, timeout=300
    )
    assert pulled.returncode == 0, pulled.stderr
    assert "files copied" in pulled.stdout
    secrets = [S3_KEYS["AWS_SECRET_ACCESS_KEY"], S3_KEYS["AWS_ACCESS_KEY_ID"], env["HF_TOKEN"]]
    texts = [pushed.stdout, pushed.stderr, pulled.stdout, pulled.stderr]
    texts += [data.decode("utf-8", "replace") for data in files_of(tmp_path / "p").values()]
    assert not [s for s in secrets for t in texts if s in t]

    bad = subprocess.run(
        lmforge_command("push", str(run_dir), "--to", "s3://no-such-bucket-anywhere/x"),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert bad.returncode == 2 and "the bucket does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_push_to_mlflow_with_an_alias_loads_and_predicts_and_versions_keep_their_models(run_dir, monkeypatch, tmp_path):
    import mlflow.pyfunc
    from mlflow.tracking import MlflowClient

    from lmforge.engine.checkpoint import list_checkpoints

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (line,) = push_run(run_dir, ["mlflow://tiny-kjv@champion"], log=lambda _: None)
    assert line == "mlflow://tiny-kjv@champion: models:/tiny-kjv@champion"
    champion = mlflow.pyfunc.load_model("models:/tiny-kjv@champion")
    (answer,) = champion.predict(["In the beginning"])
    assert isinstance(answer, str)

    checkpoint = list_checkpoints(run_dir / "checkpoints")[0].path
    push_run(checkpoint, ["mlflow://tiny-kjv@old"], log=lambda _: None)  # other weights: a new version
    client = MlflowClient(tracking_uri=uri)
    first, second = (client.get_model_version_by_alias("tiny-kjv", a) for a in ("champion", "old"))
    assert str(first.version) == "1" and str(second.version) == "2" and first.source != second.source
    again = mlflow.pyfunc.load_model("models:/tiny-kjv@champion")  # version 1 still holds the final model
    assert again.predict(["In the beginning"]) == [answer]

    push_run(run_dir, ["mlflow://tiny-kjv@prod"], log=lambda _: None)  # the same model: its version again
    assert str(client.get_model_version_by_alias("tiny-kjv", "prod").version) == "1"
    assert len(client.search_model_versions("name='tiny-kjv'")) == 2

    for bad in ("mlflow://tiny-kjv@V3", "mlflow://tiny-kjv@", "mlflow://tiny-kjv@" + "a" * 300, "mlflow://x y@ok!"):
        with pytest.raises(UserError, match="--to"):
            push_run(run_dir, [bad], log=lambda _: None)
    assert len(client.search_model_versions("name='tiny-kjv'")) == 2  # a refused alias registers nothing

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UserError, match="the registry at http://127.0.0.1:9 failed"):
        push_run(run_dir, ["mlflow://tiny-kjv"], log=lambda _: None)
    assert time.monotonic() - started < 120  # said in seconds, before the export


def test_a_run_resumed_where_its_mlflow_run_is_unknown_gets_a_new_one(tmp_path, tiny_config):
    from lmforge.tracking.base import RunInfo
    from lmforge.tracking.mlflow import MlflowTracker

    config = tiny_config("tracking.backends=[mlflow]")
    tracker = MlflowTracker(RunInfo(config, tmp_path / "run-x", {}))
    new = tracker.start("0123456789abcdef0123456789abcdef")  # recorded on a machine that is gone
    assert new != "0123456789abcdef0123456789abcdef"
    assert tracker.client.get_run(new).data.tags["lmforge.continues_run"] == "0123456789abcdef0123456789abcdef"


def test_bad_destinations_are_refused_before_the_export(run_dir, s3_bucket, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my precious readme")
    cases = {
        str(mine): "it holds files lmforge did not push (README.md)",
        str(run_dir): "it holds files lmforge did not push",
        "": "an empty destination",
        f"s3:/{s3_bucket}/x": f"one slash after 's3:'; write s3://{s3_bucket}/x",
        str(tmp_path / "afile" / "sub"): "cannot",
    }
    (tmp_path / "afile").write_text("a file")
    for url, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            push_run(run_dir, [url], log=lambda _: None)
    assert (mine / "README.md").read_text() == "my precious readme"
    with pytest.raises(UserError, match="not a URL"):
        push_run(run_dir, [f"s3://{s3_bucket}/x"], endpoint_url="notaurl", log=lambda _: None)
    with pytest.raises(UserError, match="for hf:// destinations"):
        push_run(run_dir, [f"s3://{s3_bucket}/x"], private=True, log=lambda _: None)
    assert not keys_of(s3_bucket)  # nothing was sent anywhere


def keys_of(bucket):
    return [item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_same_size_object_overwritten_by_another_tool_is_sent_again(run_dir, s3_bucket):
    url = f"s3://{s3_bucket}/m"
    push_run(run_dir, [url], log=lambda _: None)
    client = boto3.client("s3")
    original = client.get_object(Bucket=s3_bucket, Key="m/config.json")["Body"].read()
    client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"x" * len(original))  # no lmforge metadata
    (line,) = push_run(run_dir, [url], log=lambda _: None)
    assert ": 1 files sent" in line
    assert client.get_object(Bucket=s3_bucket, Key="m/config.json")["Body"].read() == original


def test_model_name_or_path_s3_trains_from_the_pulled_copy(s3_bucket, tmp_path, monkeypatch, tiny_config):
    from conftest import chapters, save_tiny_llama
    from lmforge.models.tokenizer import train_bpe_tokenizer

    base = save_tiny_llama(tmp_path / "base", train_bpe_tokenizer(chapters(20), vocab_size=300))
    store = open_store(f"s3://{s3_bucket}/bases/tiny")
    upload_dir(base, store)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "lmforge-cache"))

    url = f"s3://{s3_bucket}/bases/tiny"
    cfg = tiny_config(
        "model.preset=null", f"model.name_or_path={url}", "tokenizer.train=false", "lora.r=4", "train.max_steps=2"
    )
    outcome = run_train(cfg, QUIET)
    record = (outcome.run_dir / "lmforge_base.json").read_text()
    assert url in record  # the adapter records where its base came from, and the local copy it loads
    copies = list((tmp_path / "lmforge-cache" / "models").iterdir())
    assert (
        len(copies) == 1 and (copies[0] / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    )
