"""The MLflow pyfunc model answers as `lmforge generate` does: prompts through the run's
data.template by default, as given with params={"raw": True}."""

import io
import json
import random
import subprocess

import pytest
import yaml
from rich.console import Console

from conftest import lmforge_command, subprocess_env, tiny_config_dict
from lmforge.config import load_config
from lmforge.run import run_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def speller(tmp_path_factory):
    """A tiny prompt-completion run that learned to spell words after "Spell {prompt}:\\n"."""
    tmp = tmp_path_factory.mktemp("speller")
    rng = random.Random(0)
    words = {"".join(rng.choices("abcdehijlmnorst", k=rng.randint(4, 7))) for _ in range(300)}
    rows = [{"prompt": w, "completion": " ".join(w)} for w in sorted(words)]
    (tmp / "spell.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = tiny_config_dict(tmp / "spell.jsonl", tmp / "cache", tmp / "runs")
    raw["name"] = "speller"
    raw["data"].update({"format": "prompt-completion", "template": "Spell {prompt}:\n"})
    raw["train"].update({"max_steps": 80, "lr": 3e-3, "micro_batch_size": 8})
    raw["eval"]["generate"].update({"temperature": 0.0, "max_new_tokens": 12})
    path = tmp / "speller.yaml"
    path.write_text(yaml.safe_dump(raw))
    return run_train(load_config(path, env={}), Console(file=io.StringIO())).run_dir


def generate(run_dir, prompts_file, *extra: str) -> str:
    """What `lmforge generate RUN --prompts-file FILE` answers the file's one prompt (greedy, 12 tokens)."""
    options = ["--temperature", "0", "--max-new-tokens", "12", *extra]
    command = lmforge_command("generate", str(run_dir), "--prompts-file", str(prompts_file), *options)
    proc = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    return json.loads(line)["generated"]


def test_pyfunc_predicts_what_lmforge_generate_answers(speller, tmp_path):
    import mlflow.pyfunc

    from lmforge.tracking.mlflow_model import save_pyfunc

    model = mlflow.pyfunc.load_model(str(save_pyfunc(speller, tmp_path / "pyfunc" / "model")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("abraham\n")

    (templated,) = model.predict(["abraham"])
    assert templated == generate(speller, prompts)  # "Spell abraham:\n", cut and ended as trained
    (raw,) = model.predict(["abraham"], params={"raw": True})
    assert raw == generate(speller, prompts, "--raw")  # "abraham" continued as given
    assert templated.strip() and templated != raw
    shorter = model.predict(["abraham"], params={"max_new_tokens": 2})[0]
    assert templated.startswith(shorter) and len(shorter) < len(templated)
    assert model.predict(["abraham", "moses"]) == [templated, model.predict(["moses"])[0]]
