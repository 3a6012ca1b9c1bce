"""The `lmforge` command. Thin: parse arguments, load the config, call one function."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import typer
from rich.console import Console

from lmforge.errors import ConfigError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train and fine-tune language models from one YAML file.",
)
config_app = typer.Typer(no_args_is_help=True, help="Show or check a config.")
app.add_typer(config_app, name="config")
data_app = typer.Typer(no_args_is_help=True, help="Look at the data a config prepares.")
app.add_typer(data_app, name="data")

console = Console(stderr=False, highlight=False, soft_wrap=True, emoji=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

SIGNAL_EXITS = {"SIGINT": 130, "SIGUSR1": 138, "SIGTERM": 143}
"""Exit codes of a run paused by a signal: 128 + the signal's number, as a shell reports it."""
OVERRIDES = typer.Argument(None, help="Dotted overrides, e.g. train.lr=3e-4 data.max_length=256.")
TARGET_HELP = "A run directory (finished or paused), a checkpoint (runs/NAME/checkpoints/step-N) or a model directory."


def _print_version(value: bool) -> None:
    if value:
        from lmforge import __version__

        console.print(f"lmforge {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(
        False, "--version", help="Print lmforge's version and exit.", is_eager=True, callback=_print_version, metavar=""
    ),
) -> None:
    """Train and fine-tune language models from one YAML file."""


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # peft calls a transformers property deprecated in v5; nothing for a user to act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@app.command("train")
def train_command(
    config: Path = typer.Argument(..., help="YAML or JSON config file."),
    overrides: list[str] = OVERRIDES,
    quick_test: bool = typer.Option(
        False, "--quick-test", help="A few steps and a tiny eval, to check a config.", metavar=""
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate config and data, report sizes, train nothing.", metavar=""
    ),
    resume: str = typer.Option(
        None, "--resume", help="auto (newest valid checkpoint of this run name) or a checkpoint/run directory."
    ),
    multirun: bool = typer.Option(
        False,
        "-m",
        "--multirun",
        help="A grid sweep over every override with several values: train.lr=1e-4,3e-4 lora.r=8,16.",
        metavar="",
    ),
    nproc: int = typer.Option(
        None, "--nproc", min=1, help="Start a job of this many processes on this machine (lmforge runs torchrun)."
    ),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Machines in the job (each runs this command)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's number in the job, 0 to nnodes-1."),
    master_addr: str = typer.Option(None, "--master-addr", help="Where every machine reaches machine 0."),
    master_port: int = typer.Option(None, "--master-port", min=1, max=65535, help="Machine 0's port (29500)."),
) -> None:
    """Train a model as the config says."""
    from lmforge.config import load_config
    from lmforge.engine.lr_find import RangeTestInterrupted
    from lmforge.launch import Launch, check_launch, leave_job, start_job
    from lmforge.run import check_resume_ahead, quick_test_config, resume_command, run_train

    job = None
    if nproc is not None or nnodes > 1 or node_rank or master_addr or master_port:
        job = Launch(nproc or 1, nnodes, node_rank, master_addr, master_port)
        check_launch(job)
    if multirun:
        if quick_test or dry_run or resume or job:
            raise UserError("-m (multirun) runs a sweep: --quick-test, --dry-run, --resume and --nproc do not apply")
        from lmforge.sweep.runner import run_sweep
        from lmforge.sweep.spec import multirun_spec

        loaded = multirun_spec(config, overrides or [])
        raise typer.Exit(run_sweep(loaded, console))
    cfg = load_config(config, overrides or [], check_files=True)
    if quick_test:
        cfg = quick_test_config(cfg)
    _quiet_libraries()
    if job is not None:
        from lmforge.data.prepare import prepare_data
        from lmforge.engine.sharding import check_deepspeed_batch, check_strategy, resolve_strategy

        check_strategy(resolve_strategy(cfg, job.nproc * job.nnodes))  # said once, here, not by every process
        check_deepspeed_batch(cfg, job.nproc * job.nnodes)
        if resume and nnodes == 1:  # (machines of a multi-machine job may hold no copy until the job runs)
            check_resume_ahead(cfg, resume, job.nproc)
        prepare_data(cfg, log=lambda m: err_console.print(m, style="dim"))  # this machine's cache, before the job
        flags = [*(["--quick-test"] if quick_test else []), *(["--dry-run"] if dry_run else [])]
        start_job(job, ["train", str(config), *(overrides or []), *flags, *(["--resume", resume] if resume else [])])
    try:
        outcome = run_train(
            cfg, console, dry_run=dry_run, resume=resume, config_path=str(config), overrides=overrides or []
        )
    except RangeTestInterrupted as exc:
        err_console.print(f"{exc}: stopped during the learning-rate range test (train.lr=find); nothing was trained")
        raise typer.Exit(SIGNAL_EXITS.get(str(exc), 130)) from None
    except KeyboardInterrupt:
        command = resume_command(str(config), overrides or [], "auto")
        err_console.print(f"interrupted at once; the newest complete checkpoint is kept: {command}", markup=False)
        raise typer.Exit(130) from None
    leave_job()
    if outcome.paused in SIGNAL_EXITS:
        raise typer.Exit(SIGNAL_EXITS[outcome.paused])


@app.command("init")
def init_command(
    template: str = typer.Option(
        "sft", "--template", "-t", help="pretrain, sft, lora, chat, seq2seq or classify.", show_default=True
    ),
    out: Path = typer.Option(None, "--out", "-o", help="The config file to write. Default: <template>.yaml."),
    model: str = typer.Option(
        None,
        "--model",
        help="The pretrained model to start from (a Hub id or a local directory), not the template's.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace the config file if it exists.", metavar=""),
) -> None:
    """Write a commented config for a common job, and sample data where the data it names is
    missing: `lmforge train FILE --quick-test` runs straight after."""
    from lmforge.starter import write_starter

    out = out or Path(f"{template}.yaml")
    for line in write_starter(template, out, model, force):
        console.print(line, markup=False)
    console.print(f"next: lmforge train {out} --quick-test", markup=False)


@app.command("lr-find")
def lr_find_command(
    config: Path = typer.Argument(..., help="YAML or JSON config file."),
    overrides: list[str] = OVERRIDES,
    out: Path = typer.Option(
        None, "--out", help="Where lr_find.json and lr_find.png go. Default: <output_dir>/<name>-lr-find-<time>/."
    ),
) -> None:
    """The learning-rate range test: a few real training steps at exponentially growing learning
    rates (train.lr_find), the loss curve, and three suggestions. Nothing is trained for keeps."""
    from lmforge.config import load_config
    from lmforge.run import run_lr_find

    cfg = load_config(config, overrides or [], check_files=True)
    _quiet_libraries()
    try:
        run_lr_find(cfg, console, out)
    except KeyboardInterrupt:
        err_console.print("interrupted: the range test stopped; nothing was saved", markup=False)
        raise typer.Exit(130) from None  # (a SIGTERM too: the command leaves nothing to resume)


@app.command("eval")
def eval_command(
    target: Path = typer.Argument(..., help=TARGET_HELP),
    overrides: list[str] = typer.Argument(
        None, help="Dotted data settings over the run's, e.g. data.text_field=body data.format=prompt-completion."
    ),
    data: list[str] = typer.Option(None, "--data", help="Evaluate on these files instead of a split."),
    split: str = typer.Option("test", "--split", help="test, validation or train: the run's own split."),
    baseline: str = typer.Option(
        None,
        "--baseline",
        help="Compare with this run, checkpoint or model on the same examples (paired bootstrap, fixed and broken "
        "examples); 'base': the run's base model, before fine-tuning.",
    ),
    out: Path = typer.Option(
        None, "--out", help="Where predictions.jsonl (and comparison.json) go. Default: runs/evaluations/NAME-TIME/."
    ),
    max_length: int = typer.Option(None, "--max-length", min=8, help="Tokens per row (default: the run's)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    resamples: int = typer.Option(1000, "--resamples", min=0, help="Bootstrap resamples of the comparison."),
) -> None:
    """Evaluate a trained model: loss, perplexity and token accuracy (or accuracy and macro-F1) on
    stdout as JSON; every example's prediction and scores in predictions.jsonl; with --baseline,
    the comparison in comparison.json."""
    from lmforge.eval.target import COMPARISON, evaluate_target

    _quiet_libraries()
    if out is None:
        name = target.resolve().name + (f"-vs-{Path(baseline).resolve().name}" if baseline else "")
        out = Path("runs") / "evaluations" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = evaluate_target(
        target,
        data or None,
        split,
        max_length,
        batch_size,
        log=err_console.print,
        overrides=overrides or [],
        out_dir=out,
        baseline=baseline,
        resamples=resamples,
    )
    console.print(json.dumps(metrics, indent=2))
    err_console.print(f"predictions: {out / 'predictions.jsonl'}", highlight=False, markup=False)
    if baseline:
        comparison = json.loads((out / COMPARISON).read_text())
        _print_comparison(comparison)
        err_console.print(f"comparison:  {out / COMPARISON}", highlight=False, markup=False)


def _print_comparison(comparison: dict) -> None:
    """The paired tests, one line a metric (the difference, its 95% interval, the p-value, and the
    verdict at p < 0.05), and the fixed and broken counts, on stderr."""
    err_console.print(f"candidate {comparison['candidate']} against baseline {comparison['baseline']}:", markup=False)
    for name, test in comparison["metrics"].items():
        line = (
            f"  {name:<24} {test['candidate']:10.4f} vs {test['baseline']:10.4f}  difference {test['difference']:+.4f}"
        )
        if "p_value" in test:
            line += f" [{test['low']:+.4f}, {test['high']:+.4f}]  p={test['p_value']:.4f}"
        err_console.print(f"{line}  {test['verdict']}", markup=False, highlight=False)
    err_console.print(f"  fixed {comparison['fixed']} examples, broke {comparison['broken']}", markup=False)


@app.command("report")
def report_command(
    paths: list[Path] = typer.Argument(..., help="Runs, run directories or sweep directories (runs/sweeps/NAME)."),
    baseline: Path = typer.Option(
        None, "--baseline", help="A run every other run is tested against on the same examples (paired bootstrap)."
    ),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    resamples: int = typer.Option(1000, "--resamples", min=1, help="Bootstrap resamples of the comparisons."),
) -> None:
    """One self-contained HTML file about a run, several runs or a sweep: leaderboard, curves,
    sweep plots, significance against a baseline, error analysis, samples. Opens offline."""
    from lmforge.results.report import build_report

    written = build_report(list(paths), out, baseline=baseline, resamples=resamples)
    size = written.stat().st_size
    err_console.print(f"report: {written} ({size / 1024:.0f} KB)", markup=False, highlight=False)


@app.command("generate")
def generate_command(
    target: Path = typer.Argument(..., help=TARGET_HELP),
    prompt: str = typer.Argument(None, help="The prompt (or use --prompts-file)."),
    chat: bool = typer.Option(
        False, "--chat", help="Send the prompt as a user message through the chat template.", metavar=""
    ),
    raw: bool = typer.Option(
        False, "--raw", help="Continue the text as given, without the run's template.", metavar=""
    ),
    system: str = typer.Option(None, "--system", help="A system message before the prompt (with chat)."),
    prompts_file: Path = typer.Option(
        None, "--prompts-file", help=".txt (a prompt a line) or .jsonl ({prompt}); prints JSONL."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="0 for greedy decoding."),
    top_k: int = typer.Option(50, "--top-k", min=1),
    top_p: float = typer.Option(None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling, e.g. 0.9."),
    stop: list[str] = typer.Option(None, "--stop", help="A string that ends the answer (repeatable)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Answer a prompt with a trained model, prompted as it was trained.

    The prompt goes through the run's chat or prompt template (--raw continues the text as given);
    a classifier answers with a class name.
    """
    from lmforge.config import GenerateConfig
    from lmforge.data.formats import turn_end
    from lmforge.eval.generation import as_trained, read_hints, respond
    from lmforge.eval.target import load_target, model_dir_of

    if (prompt is None) == (prompts_file is None):
        raise UserError("give a prompt or --prompts-file FILE (one of them)")
    if chat and raw:
        raise UserError("--chat and --raw exclude each other")
    cfg = _options(
        GenerateConfig,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop=stop or [],
    )
    prompts = [prompt] if prompt is not None else _read_prompts(prompts_file)
    _quiet_libraries()
    model, tokenizer, run_config = load_target(target)
    shown = [p if raw else as_trained(p, run_config, tokenizer, chat, system) for p in prompts]
    hints = read_hints(model_dir_of(target))
    if chat and not hints["stop"] and (end := turn_end(tokenizer)):  # a chat model lmforge did not train
        hints["stop"] = [end]
    answers = respond(model, tokenizer, shown, cfg, seed=seed, hints=None if raw else hints)
    if prompts_file is not None:
        for p, answer in zip(prompts, answers, strict=True):
            console.print(json.dumps({"prompt": p, "generated": answer}, ensure_ascii=False), markup=False)
    elif shown[0] == prompts[0] and not _is_classifier(model):
        console.print(prompts[0] + answers[0], markup=False)  # a continuation of the text
    else:
        console.print(answers[0], markup=False)  # an answer, or a class name


def _options(schema, **values):
    """`schema` built from command-line options; a value it refuses is a message naming the option.

    Raises:
        UserError: naming each refused option, its value and the rule.
    """
    from pydantic import ValidationError

    try:
        return schema(**values)
    except ValidationError as exc:
        problems = [
            f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
        ]
        raise UserError("; ".join(problems)) from None


def _is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")  # a PeftModel's name says it too


def _read_prompts(path: Path) -> list[str]:
    """Prompts from a .txt file (a non-empty line each) or a .jsonl file ({"prompt": ...} a line)."""
    from lmforge.data.sources import read_text

    if not path.is_file():
        raise UserError(f"--prompts-file {path}: no such file (looked for {path.resolve()})")
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: malformed JSON: {exc.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{path}:{number}: expected {{"prompt": "..."}}')
        prompts.append(record["prompt"])
    return prompts


@app.command("export")
def export_command(
    run: Path = typer.Argument(..., help="A run (finished or paused) or a checkpoint directory."),
    out: Path = typer.Option(..., "--out", help="Directory to write."),
    merge_lora: bool = typer.Option(
        False, "--merge-lora", help="Fold a LoRA adapter into the base weights.", metavar=""
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Write into a non-empty directory that is not an export, beside its files (never over them).",
        metavar="",
    ),
    license: str = typer.Option(
        None,
        "--license",
        help="The model card's licence, a Hub licence id (lowercase: mit, apache-2.0, other); default: the base's.",
    ),
) -> None:
    """Write a self-contained Hugging Face directory with a model card."""
    from lmforge.export.export import export_run

    _quiet_libraries()
    path = export_run(run, out, merge_lora=merge_lora, force=force, license=license)
    console.print(f"exported {run} to {path}")


@app.command("sync")
def sync_command(
    run: Path = typer.Argument(..., help="A run directory."),
    overrides: list[str] = typer.Argument(
        None, help="Settings over the run's saved config, e.g. tracking.mlflow.tracking_uri=http://host:5000."
    ),
) -> None:
    """Send a tracking backend the points it missed (server down during the run), from metrics.jsonl."""
    from lmforge.tracking.sync import sync_run

    sync_run(run, overrides or [], log=console.print)


@app.command("push")
def push_command(
    run: Path = typer.Argument(..., help="A run (finished or paused) or a checkpoint directory."),
    to: list[str] = typer.Option(
        ...,
        "--to",
        help="hf://org/name\\[@revision], s3://bucket/prefix, mlflow://Name\\[@alias] or a directory; repeatable.",
        metavar="URL",
    ),
    merge_lora: bool = typer.Option(
        False, "--merge-lora", help="Fold a LoRA adapter into the base weights.", metavar=""
    ),
    private: bool = typer.Option(False, "--private", help="hf: create the repository private.", metavar=""),
    create_pr: bool = typer.Option(
        False, "--create-pr", help="hf: open a pull request instead of committing.", metavar=""
    ),
    endpoint_url: str = typer.Option(
        None, "--endpoint-url", help="s3: an S3-compatible server (default: storage.endpoint_url, AWS_ENDPOINT_URL)."
    ),
    license: str = typer.Option(
        None,
        "--license",
        help="The model card's licence, a Hub licence id (lowercase: mit, apache-2.0, other); default: the base's.",
    ),
) -> None:
    """Publish a run: export it (as `lmforge export`) and send it to the Hub, S3 or the MLflow registry.
    Credentials come from the environment only (HF_TOKEN, AWS_*, MLFLOW_TRACKING_*)."""
    from lmforge.publish.push import push_run

    _quiet_libraries()
    push_run(
        run,
        to,
        merge_lora,
        private,
        create_pr,
        endpoint_url,
        log=lambda m: console.print(m, highlight=False),
        license=license,
    )


@app.command("pull")
def pull_command(
    url: str = typer.Argument(..., help="s3://bucket/prefix (or a directory) that `lmforge push` wrote."),
    out: Path = typer.Option(..., "--out", help="Directory to write (new, empty, or an earlier pull)."),
    endpoint_url: str = typer.Option(
        None, "--endpoint-url", help="An S3-compatible server (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Write into a non-empty directory, beside its files (never over them).", metavar=""
    ),
) -> None:
    """Download a pushed model, every file checked against its SHA-256."""
    from lmforge.publish.push import pull

    path, copied = pull(url, out, endpoint_url=endpoint_url, force=force, log=console.print)
    console.print(f"pulled {url} to {path} ({copied} files copied)", highlight=False)


@app.command("serve")
def serve_command(
    target: Path = typer.Argument(..., help=TARGET_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="The address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    api_key_env: str = typer.Option(
        None,
        "--api-key-env",
        help="An environment variable holding the API key clients must send (Authorization: Bearer KEY); "
        "default: LMFORGE_API_KEY if it is set, else no key.",
    ),
    model_name: str = typer.Option(None, "--model-name", help="What clients call the model (default: TARGET's name)."),
    raw: bool = typer.Option(
        False, "--raw", help="Completions continue the prompt as given, without the run's template.", metavar=""
    ),
    max_request_mb: float = typer.Option(
        8.0, "--max-request-mb", min=0.001, help="The largest request body read, in MiB (larger ones get 413)."
    ),
) -> None:
    """Serve a trained model over an OpenAI-compatible HTTP API until Ctrl-C.

    /v1/completions and /v1/chat/completions (streaming too) for language models, /v1/classify for
    classifiers, /v1/models, /health. Prompts go through the template the model was trained with.
    """
    from lmforge.serve.app import serve

    _quiet_libraries()
    serve(target, host, port, api_key_env, model_name, raw, lambda m: console.print(m, markup=False), max_request_mb)


@app.command("sweep")
def sweep_command(
    words: list[str] = typer.Argument(
        ...,
        help="A sweep spec (or a sweep's directory) and key=value overrides: run or continue the sweep. Or status "
        "and the same: where it stands.",
        metavar="SPEC K=V... | status SPEC K=V...",
    ),
    workers: int = typer.Option(1, "--workers", min=1, help="Trial processes at once on this machine."),
    worker: bool = typer.Option(
        False, "--worker", help="Join a sweep started elsewhere (shared storage); never creates it.", metavar=""
    ),
) -> None:
    """Search hyperparameters with Optuna; each trial is an ordinary run in its own process.

    Spec keys set the spec (max_trials=60, pruner.type=median); other keys set training (train.eval_every=50).

    Ctrl-C pauses the trials at a step boundary; the same command continues from their checkpoints.
    """
    from lmforge.sweep.runner import run_sweep, spec_path, sweep_status
    from lmforge.sweep.spec import enter_working_dir, load_spec

    if words[0] == "status":
        if len(words) < 2:
            raise UserError("usage: lmforge sweep status SWEEP.yaml|SWEEP_DIR [k=v ...]")
        path = enter_working_dir(spec_path(Path(words[1])))
        sweep_status(load_spec(path, words[2:], check_files=False), console)
        return
    path = enter_working_dir(spec_path(Path(words[0])))
    loaded = load_spec(path, words[1:])  # trials quiet the libraries they import; this process has none
    try:
        code = run_sweep(loaded, console, workers=workers, join=worker)
    except KeyboardInterrupt:  # before the sweep took over Ctrl-C, or a second one while it ended
        err_console.print("interrupted; the same command continues the sweep", markup=False)
        raise typer.Exit(130) from None
    raise typer.Exit(code)


@app.command("runs")
def runs_command(
    directory: Path = typer.Argument(Path("runs"), help="A runs directory, a sweep directory or one run."),
    filters: list[str] = typer.Option(
        None, "--filter", help="KEY OP VALUE, OP one of >= <= != == = > < ~ (regex), e.g. 'lora.r>=8' (repeatable)."
    ),
    sort: list[str] = typer.Option(None, "--sort", help="A column, -column for descending (repeatable)."),
    fmt: str = typer.Option(None, "--format", help="table (default), csv, json or parquet (needs --out)."),
    out: Path = typer.Option(None, "--out", help="Write csv, json or parquet here (format from the suffix)."),
    columns: str = typer.Option(None, "--columns", help="These columns, comma-separated, e.g. run,state,lora.r."),
) -> None:
    """List runs with their state, settings and final metrics: a table, or csv/json/parquet.

    The table shows each run's state and step, the settings that differ between the runs, and their final metrics.
    """
    from lmforge.results.runs import list_runs

    list_runs(directory, filters or [], sort or [], fmt, out, columns, console, err_console)


@data_app.command("prepare")
def data_prepare(
    config: Path = typer.Argument(..., help="YAML or JSON config file."),
    overrides: list[str] = OVERRIDES,
) -> None:
    """Tokenize the data into the cache ahead of a job (on each machine, when they share no
    data.cache_dir), so that no process of the job waits on it; prints the data report."""
    from lmforge.config import load_config
    from lmforge.data.prepare import cache_root, prepare_data
    from lmforge.data.report import data_report_lines, data_warnings

    cfg = load_config(config, overrides or [], check_files=True)
    _quiet_libraries()
    data = prepare_data(cfg, log=lambda m: err_console.print(m, style="dim"))
    for line in data_report_lines(data.report):
        console.print(line, highlight=False)
    for message in data_warnings(data.report, cfg.data):
        err_console.print(f"warning: {message}", style="yellow")
    done = "was in the cache" if data.cache_hit else "is cached now"
    console.print(f"the data {done} ({cache_root(cfg)}): a job with this config reads it from there", highlight=False)


@data_app.command("inspect")
def data_inspect(
    config: Path = typer.Argument(..., help="YAML or JSON config file."),
    overrides: list[str] = OVERRIDES,
    example: int = typer.Option(0, "--example", min=0, help="Which training row to show (0 is the first)."),
) -> None:
    """Counts, drops, truncation, tokens, length histogram, and one example with its loss mask."""
    from lmforge.config import load_config
    from lmforge.data.prepare import prepare_data
    from lmforge.data.report import boundary_line, data_report_lines, data_warnings, histogram_lines, render_masked

    cfg = load_config(config, overrides or [], check_files=True)
    _quiet_libraries()
    data = prepare_data(cfg, log=lambda m: err_console.print(m, style="dim"))
    for line in data_report_lines(data.report):
        console.print(line)
    for message in data_warnings(data.report, cfg.data):
        err_console.print(f"warning: {message}", style="yellow")
    console.print("\nexample lengths (train, tokens):")
    for line in histogram_lines(data.report):
        console.print(line)
    rows = len(data.splits["train"])
    if example >= rows:
        raise UserError(f"--example {example}: the training split has {rows:,} rows (0 to {rows - 1:,})")
    row = data.splits["train"][example]
    n = row["lengths"][0]
    console.print(f"\ntraining row {example}, first of its {len(row['lengths'])} packed example(s), {n} tokens")
    console.print("trained tokens in green, masked tokens dim inside « »:\n")
    console.print(render_masked(row["input_ids"][:n], row["labels"][:n], data.tokenizer))
    if cfg.data.format not in ("text", "classification", "seq2seq"):
        console.print("\n" + boundary_line(row["input_ids"][:n], row["labels"][:n], data.tokenizer), markup=False)


@config_app.command("show")
def config_show(config: Path = typer.Argument(...), overrides: list[str] = OVERRIDES) -> None:
    """Print the resolved config, every default filled in; a setting lmforge derives when unset (null)
    has what it comes to as a comment."""
    from lmforge.config import derived_defaults, dump_yaml, load_config, with_derived_comments

    resolved = load_config(config, overrides or [])
    console.print(with_derived_comments(dump_yaml(resolved), derived_defaults(resolved)), markup=False, end="")


@config_app.command("validate")
def config_validate(config: Path = typer.Argument(...), overrides: list[str] = OVERRIDES) -> None:
    """Check a config; print every problem at once and exit 1 if there is any."""
    from lmforge.config import load_config
    from lmforge.results.plugins import plugins_for

    try:
        plugins_for(load_config(config, overrides or [], check_files=True))  # (imported as training would)
    except (ConfigError, UserError) as exc:
        err_console.print(f"error: {exc}", markup=False)
        raise typer.Exit(1) from None
    console.print(f"{config}: valid")


HEAVY_COMMANDS = ("train", "eval", "lr-find")
"""Commands that preload tcmalloc where it is installed (lmforge.malloc): minutes of tensor work."""


def main() -> None:
    """Entry point: user errors are one clear message and exit code 2, never a traceback."""
    if sys.argv[1:2] and sys.argv[1] in HEAVY_COMMANDS:
        from lmforge.malloc import preload_tcmalloc

        preload_tcmalloc()  # re-executes this command with tcmalloc where it is installed
    try:
        app()
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False)
        sys.exit(2)
    except OSError as exc:  # a path the user named that cannot be read or written
        where = f": {exc.filename}" if exc.filename else ""
        err_console.print(f"error: {exc.strerror or exc}{where}", markup=False)
        sys.exit(2)
