"""train.mirror: checkpoints copied to S3 (a real moto server on loopback) survive the machine;
`--resume auto` on a machine with no runs/ continues bit-exactly from the mirror."""

import json
import shutil
import signal
import subprocess
import time

import boto3
import pytest
import yaml
from safetensors.torch import load_file

from conftest import ROOT, S3_KEYS, lmforge_command, subprocess_env, tiny_config_dict

pytestmark = pytest.mark.slow
STEPS = 80


def write_config(tmp, name, **extra):
    corpus = tmp / "corpus.txt"
    if not corpus.exists():
        corpus.write_text((ROOT / "data" / "kjv-pentateuch.txt").read_text()[:150_000])
    cfg = tiny_config_dict(corpus, tmp / "cache", tmp / "runs")
    cfg["name"] = name
    cfg["model"].update({"hidden_size": 128, "intermediate_size": 512, "num_layers": 2})
    cfg["train"].update(
        {"max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 4, "lr": 2e-3, "warmup_steps": 3}
        | {"eval_every": 10, "save_every": 5, "keep_last": 2, "log_every": 1}
    )
    cfg["eval"].update({"at_start": True})
    cfg.update(extra)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config, *args, cwd=None):
    proc = subprocess.run(
        lmforge_command("train", str(config), *args),
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=600,
        cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def keys(bucket, prefix=""):
    client = boto3.client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def final_weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


def test_sigkill_then_resume_from_the_mirror_on_a_fresh_machine_is_bit_exact(tmp_path, s3_bucket):
    reference = tmp_path / "reference"
    reference.mkdir()
    train(write_config(reference, "run"))
    (ref_dir,) = (reference / "runs").glob("run-2*")

    machine = tmp_path / "machine"
    machine.mkdir()
    config = write_config(machine, "run")
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["mirror"] = f"s3://{s3_bucket}/mirror"
    config.write_text(yaml.safe_dump(cfg))

    log = (machine / "first.log").open("w")
    proc = subprocess.Popen(
        lmforge_command("train", str(config)), stdout=log, stderr=subprocess.STDOUT, env=subprocess_env()
    )
    deadline = time.monotonic() + 300
    while not [k for k in keys(s3_bucket, "mirror/") if k.endswith("/manifest.json")]:  # a checkpoint is mirrored
        assert proc.poll() is None, (machine / "first.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # steps are slower than a checkpoint's upload: this is mid-run
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    mirrored = keys(s3_bucket, "mirror/")
    (run_name,) = {k.split("/")[1] for k in mirrored}
    assert f"mirror/{run_name}/metrics.jsonl" in mirrored and f"mirror/{run_name}/config.yaml" in mirrored
    assert not any("/final/" in k for k in mirrored)

    shutil.rmtree(machine / "runs")  # the machine and its disk are gone (the data cache too)
    shutil.rmtree(machine / "cache")
    out = train(config, "--resume", "auto").stdout
    assert "warning" not in (machine / "first.log").read_text()  # every upload went through
    assert "downloading checkpoint step-0000" in out and "resuming from" in out, out
    (run_dir,) = (machine / "runs").glob("run-2*")
    assert run_dir.name == run_name  # the same run continues, under its own name

    ours, theirs = final_weights(run_dir), final_weights(ref_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert (ours[key] == theirs[key]).all(), key  # bit for bit
    train_losses = lambda d: [  # noqa: E731
        (p["step"], p["train/loss"])
        for p in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in p
    ]
    assert train_losses(run_dir) == train_losses(ref_dir)  # every step once, the same floats

    # at the end the mirror holds the whole run: final/ with its manifest, the kept checkpoints only
    mirrored = keys(s3_bucket, f"mirror/{run_name}/")
    assert f"mirror/{run_name}/final/lmforge_manifest.json" in mirrored
    assert f"mirror/{run_name}/eval.json" in mirrored and f"mirror/{run_name}/predictions.jsonl" in mirrored
    remote_checkpoints = {k.split("/")[3] for k in mirrored if "/checkpoints/" in k}
    assert remote_checkpoints == {p.name for p in (run_dir / "checkpoints").iterdir()}
    body = boto3.client("s3").get_object(Bucket=s3_bucket, Key=f"mirror/{run_name}/final/model.safetensors")["Body"]
    assert body.read() == (run_dir / "final" / "model.safetensors").read_bytes()
    secret = S3_KEYS["AWS_SECRET_ACCESS_KEY"].encode()  # in the environment of both runs; in no file or line
    for key in mirrored:
        assert secret not in boto3.client("s3").get_object(Bucket=s3_bucket, Key=key)["Body"].read(), key
    assert secret.decode() not in out + (machine / "first.log").read_text()


def test_an_unreachable_mirror_is_said_before_training(tmp_path, s3_bucket):
    config = write_config(tmp_path, "run")
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["mirror"] = "s3://no-such-bucket-here/x"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        lmforge_command("train", str(config)), capture_output=True, text=True, env=subprocess_env(), timeout=300
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "train.mirror: s3://no-such-bucket-here/x" in proc.stderr + proc.stdout
    assert "the bucket does not exist" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").glob("run-2*"))  # nothing trained, no run directory


def test_a_directory_mirror_holds_the_whole_run_and_sync_restores_what_it_lost(tiny_config, tmp_path):
    """A mounted drive (Colab's Google Drive) as the mirror: a plain directory."""
    import io

    from rich.console import Console

    from lmforge.run import run_train
    from lmforge.tracking.sync import sync_run

    mirror = tmp_path / "drive" / "lmforge"
    config = tiny_config(f"train.mirror={mirror}", "train.save_every=2", "train.keep_last=1")
    run_dir = run_train(config, Console(file=io.StringIO())).run_dir
    copy = mirror / run_dir.name
    local = {p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    remote = {p.relative_to(copy) for p in copy.rglob("*") if p.is_file()}
    assert remote - local == {p.relative_to(copy) for p in copy.rglob("lmforge_manifest.json")}
    assert local <= remote  # everything, checkpoints pruned to keep_last there too
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-000004"]
    for path in local:
        assert (copy / path).read_bytes() == (run_dir / path).read_bytes(), path

    (copy / "final" / "model.safetensors").unlink()
    messages = []
    sync_run(run_dir, [], log=messages.append)
    assert (copy / "final" / "model.safetensors").read_bytes() == (run_dir / "final" / "model.safetensors").read_bytes()
    assert any("holds the run directory" in m for m in messages)
