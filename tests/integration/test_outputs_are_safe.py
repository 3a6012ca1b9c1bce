"""What lmforge writes never costs the user a file, and anyone the umask allows can read it."""

import io
import os
import stat
import subprocess

import pytest
import yaml
from rich.console import Console

from conftest import chapters, lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import load_config
from lmforge.errors import UserError
from lmforge.export.export import export_run
from lmforge.run import run_train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n\n".join(chapters(20)) + "\n")
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(corpus, tmp / "cache", tmp / "runs")))
    old = os.umask(0o022)
    try:
        return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir
    finally:
        os.umask(old)


def modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_a_run_and_its_model_follow_the_umask(run_dir):
    """Temporary directories are 0700 and some writers make files 0600; nothing of that remains."""
    for path, mode in modes(run_dir).items():
        expected = 0o755 if (run_dir / path).is_dir() else 0o644
        assert mode == expected, (path, oct(mode))


def test_export_follows_a_stricter_umask_too(run_dir, tmp_path):
    old = os.umask(0o077)
    try:
        export_run(run_dir, tmp_path / "private")
    finally:
        os.umask(old)
    assert set(modes(tmp_path / "private").values()) == {0o700, 0o600}


def test_export_never_deletes_what_lmforge_did_not_write(run_dir, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds files lmforge did not write \(notes.txt\).*--force"):
        export_run(run_dir, out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    proc = subprocess.run(
        lmforge_command("export", str(run_dir), "--out", str(out)), capture_output=True, text=True, env=subprocess_env()
    )
    assert proc.returncode == 2 and "notes.txt" in proc.stderr and "Traceback" not in proc.stderr

    export_run(run_dir, out, force=True)  # written into it; notes.txt stays
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_force_never_writes_over_a_file_of_the_users(run_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.md").write_text("MY OWN NOTES")
    with pytest.raises(UserError, match=r"holds files of the names lmforge writes .*\(README.md\)"):
        export_run(run_dir, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md"] and (out / "README.md").read_text() == "MY OWN NOTES"
    assert not list(tmp_path.glob(".staged-*"))  # nothing left behind


def test_an_earlier_export_is_replaced_and_files_added_to_it_are_kept(run_dir, tmp_path):
    out = tmp_path / "export"
    export_run(run_dir, out)
    (out / "my-eval.md").write_text("mine")
    (out / "stale.bin").write_text("x")
    export_run(run_dir, out)  # no --force needed: lmforge wrote this directory
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md", "my-eval.md", "stale.bin"} <= names
    assert (out / "my-eval.md").read_text() == "mine"


def test_export_into_a_file_is_a_clear_error(run_dir, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="a file, not a directory"):
        export_run(run_dir, tmp_path / "f")
