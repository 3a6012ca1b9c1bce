"""`lmforge report` opened in a real headless Chromium (Debian's chromium and chromedriver, through
selenium): for one run, a group of runs with a baseline, and a sweep; every section present, no
console error, no network request, a screenshot that is not blank, and the leaderboard sorts."""

import io
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import chapters, lmforge_command, save_tiny_bert, subprocess_env, tiny_config_dict
from lmforge.models.tokenizer import train_bpe_tokenizer

pytestmark = pytest.mark.slow

SECTIONS = ("leaderboard", "curves", "significance", "errors", "samples")


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        lmforge_command(*args), cwd=cwd, capture_output=True, text=True, env=subprocess_env(), timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def spelling_rows(n, seed):
    rng = random.Random(seed)
    words = sorted({w.strip(".,;:") for c in chapters(20) for w in c.lower().split() if w.isalpha()})
    return [{"word": w, "spelling": " ".join(w)} for w in rng.sample(words, n)]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four prompt-completion runs: two learning rates x two seeds (the baseline: lr 1e-3, seed 1),
    and a classifier."""
    tmp = tmp_path_factory.mktemp("report")
    cfg = {
        "name": "spell",
        "output_dir": str(tmp / "runs"),
        "model": {"preset": "llama-tiny"},
        "tokenizer": {"train": True, "vocab_size": 400},
        "data": {
            "train": write_jsonl(tmp / "train.jsonl", spelling_rows(300, 0)),
            "test": write_jsonl(tmp / "test.jsonl", spelling_rows(40, 1)),
            "format": "prompt-completion",
            "columns": {"prompt": "word", "completion": "spelling"},
            "template": "Spell {prompt}:\n",
            "max_length": 48,
            "validation_fraction": 0.1,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"micro_batch_size": 8, "max_steps": 12, "eval_every": 4, "log_every": 2},
        "eval": {"generate": {"num_examples": 2, "max_new_tokens": 8, "max_examples": 20}},
        "tracking": {"backends": ["none"]},
    }
    (tmp / "spell.yaml").write_text(yaml.safe_dump(cfg))
    made = {}
    for lr in ("1e-3", "3e-3"):
        for seed in ("1", "2"):
            out = tmp / "runs" / f"lr{lr}-seed{seed}"
            cli(tmp, "train", "spell.yaml", f"train.lr={lr}", f"seed={seed}", f"output_dir={out}")
            (made[(lr, seed)],) = out.glob("spell-2*")
    tokenizer = train_bpe_tokenizer(chapters(30), vocab_size=400)
    bert = save_tiny_bert(tmp / "bert", tokenizer, positions=64)
    genesis = [{"text": line, "label": "genesis"} for line in chapters(1)[0].split("\n")]
    exodus = [{"text": line, "label": "exodus"} for line in chapters(1, start=60)[0].split("\n")]
    classify = {
        "name": "classify",
        "output_dir": str(tmp / "classify"),
        "model": {"name_or_path": str(bert), "task": "classification"},
        "data": {
            "train": write_jsonl(tmp / "ctrain.jsonl", (genesis[5:] + exodus[5:]) * 3),
            "validation": write_jsonl(tmp / "cval.jsonl", genesis[:5] + exodus[:5]),
            "test": write_jsonl(tmp / "ctest.jsonl", genesis[:5] + exodus[:5]),
            "format": "classification",
            "max_length": 32,
            "cache_dir": str(tmp / "cache"),
        },
        "train": {"micro_batch_size": 8, "max_steps": 10, "lr": 5e-4, "eval_every": 5},
        "tracking": {"backends": ["none"]},
    }
    (tmp / "classify.yaml").write_text(yaml.safe_dump(classify))
    cli(tmp, "train", "classify.yaml")
    (made["classify"],) = (tmp / "classify").glob("classify-2*")
    return tmp, made


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Debian's chromedriver, logging console messages and network events."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, (
        "the report tests need Debian's chromium and chromium-driver (scripts/system-packages.sh)"
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


def open_report(browser, path: Path, screenshot: Path | None = None) -> dict:
    """Load the report; return its console messages, requested URLs and screenshot's pixel spread."""
    from PIL import Image, ImageStat

    browser.get_log("browser")
    browser.get_log("performance")  # (drain what an earlier page left)
    browser.get(path.resolve().as_uri())
    browser.execute_script("return document.readyState")
    messages = browser.get_log("browser")
    requests = []
    for entry in browser.get_log("performance"):
        event = json.loads(entry["message"])["message"]
        if event["method"] == "Network.requestWillBeSent":
            requests.append(event["params"]["request"]["url"])
    png = browser.get_screenshot_as_png()
    if screenshot is not None:
        screenshot.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("L")
    return {"console": messages, "requests": requests, "spread": ImageStat.Stat(image).stddev[0]}


def check_page(browser, report: Path) -> dict:
    seen = open_report(browser, report)
    assert [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")] == []
    assert seen["requests"] == [report.resolve().as_uri()], seen["requests"]  # the file itself, nothing else
    assert seen["spread"] > 20  # not a blank page: text and plots on white
    for section in SECTIONS:
        element = browser.find_element("id", section)
        assert element.is_displayed() and element.text.strip(), section
    return seen


def test_report_of_one_run(runs, browser, tmp_path):
    tmp, made = runs
    report = tmp_path / "one.html"
    cli(tmp, "report", str(made[("3e-3", "1")]), "--out", str(report))
    check_page(browser, report)
    text = browser.find_element("id", "errors").text
    assert "Worst examples by loss" in text and "Exact-match failures" in text and "By input length" in text
    assert len(browser.find_elements("css selector", "#curves svg")) >= 3  # loss, learning rate, throughput...
    assert "No baseline given" in browser.find_element("id", "significance").text
    assert "test/loss" in browser.find_element("id", "intervals-table").text
    assert report.stat().st_size < 1_000_000


def test_report_of_runs_against_a_baseline_and_the_leaderboard_sorts(runs, browser, tmp_path):
    tmp, made = runs
    baseline = made[("1e-3", "1")]
    report = tmp_path / "group.html"
    cli(tmp, "report", str(tmp / "runs"), "--baseline", str(baseline), "--out", str(report), "--resamples", "200")
    check_page(browser, report)
    significance = browser.find_element("id", "significance-table").text
    assert significance.count("test/loss") == 3  # each other run against the baseline, Holm over the three
    assert "p (Holm)" in significance
    seeds = browser.find_element("id", "significance").text
    assert "Seeds: test/loss" in seeds and "Welch p vs baseline" in seeds
    assert "fixed" in browser.find_element("id", "errors").text
    # the leaderboard is ranked by test loss; a click on the step column sorts by it, again reverses
    table = browser.find_element("id", "leaderboard-table")
    header = [th.text for th in table.find_elements("css selector", "thead th")]
    column = header.index("test/loss")
    values = [
        float(r.find_elements("css selector", "td")[column].text)
        for r in table.find_elements("css selector", "tbody tr")
    ]
    assert values == sorted(values) and len(values) == 4
    th = table.find_elements("css selector", "thead th")[column]
    th.click()
    th.click()
    values = [
        float(r.find_elements("css selector", "td")[column].text)
        for r in table.find_elements("css selector", "tbody tr")
    ]
    assert values == sorted(values, reverse=True)
    shutil.copy(report, tmp_path / "kept.html")


def test_report_of_a_classifier(runs, browser, tmp_path):
    tmp, made = runs
    report = tmp_path / "classify.html"
    cli(tmp, "report", str(made["classify"]), "--out", str(report))
    check_page(browser, report)
    text = browser.find_element("id", "errors").text
    for part in ("Confusion matrix", "Per class", "Most frequent confusions", "Most confident wrong answers"):
        assert part in text
    assert "expected calibration error" in text
    rows = [json.loads(line) for line in (made["classify"] / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 10


def test_report_of_a_sweep(runs, browser, tmp_path):
    tmp, _ = runs
    base = tiny_config_dict(tmp / "corpus.txt", tmp / "cache", tmp_path / "runs")
    (tmp / "corpus.txt").write_text("\n\n".join(chapters(40)) + "\n")
    base["train"].update({"max_steps": 8, "eval_every": 4, "log_every": 2})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "grid.yaml").write_text(
        "name: grid\nbase: base.yaml\nmethod: grid\nparameters:\n  train.lr: {values: [1.0e-3, 3.0e-3, 1.0e-2]}\n"
    )
    cli(tmp_path, "sweep", "grid.yaml")
    report = tmp_path / "sweep.html"
    cli(tmp_path, "report", str(tmp_path / "runs" / "sweeps" / "grid"), "--out", str(report))
    check_page(browser, report)
    sweep = browser.find_element("id", "sweep")
    assert "against each parameter" in sweep.text and "Parallel coordinates" in sweep.text
    assert "Parameter importances" in sweep.text
    assert len(sweep.find_elements("css selector", "svg")) >= 2
    rows = browser.find_elements("css selector", "#leaderboard-table tbody tr")
    assert len(rows) == 3
