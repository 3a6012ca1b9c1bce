"""A sweep spec: which training config, which settings to search, how, and how to judge a trial.

The spec is its own YAML file. Its `parameters` are keyed by the dotted paths of the training
config (`lora.r`, `train.lr`) and every value is checked against the schema, with the base
config, before any trial starts: one error lists every problem, with its file line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from lmforge.config import EVAL_METRICS, Config, _read_file, load_config
from lmforge.errors import ConfigError

METHODS = ("grid", "random", "tpe", "bayes", "cmaes")
"""Samplers: Optuna's GridSampler, RandomSampler, TPESampler (bayes is its alias), CmaEsSampler."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Parameter(Strict):
    """One axis of the search: a list of values, or a distribution between min and max."""

    values: list[Any] | None = None
    """The choices (a grid needs these). Any YAML value the setting takes, lists included."""
    distribution: Literal["uniform", "log_uniform", "int_uniform", "log_int_uniform"] | None = None
    """Sample a number between min and max; log_*: uniformly in log space (learning rates)."""
    min: float | None = None
    max: float | None = None
    step: float | None = Field(default=None, gt=0)
    """Only multiples of this above min (not with a log distribution)."""

    @field_validator("values")
    @classmethod
    def _numbers(cls, values: list[Any] | None) -> list[Any] | None:
        return None if values is None else [_number(v) for v in values]

    @model_validator(mode="after")
    def _one_kind(self) -> Parameter:
        problems = []
        if (self.values is None) == (self.distribution is None):
            problems.append("give either values: [...] or distribution: with min and max")
        if self.values is not None and not self.values:
            problems.append("values is empty: list at least one")
        if self.distribution is not None:
            if self.min is None or self.max is None:
                problems.append(f"distribution {self.distribution} needs min and max")
            elif self.min > self.max:
                problems.append(f"min ({self.min:g}) is above max ({self.max:g})")
            elif self.distribution.startswith("log") and self.min <= 0:
                problems.append(f"a log distribution needs min > 0 (got {self.min:g}); use uniform, or a positive min")
            if self.distribution.startswith("int") or self.distribution.startswith("log_int"):
                bad = [f"{name} {v:g}" for name, v in (("min", self.min), ("max", self.max)) if v is not None and v % 1]
                if bad:
                    problems.append(f"{self.distribution} takes whole numbers ({', '.join(bad)})")
            if self.step is not None and self.distribution.startswith("log"):
                problems.append("step does not apply to a log distribution")
        elif self.min is not None or self.max is not None or self.step is not None:
            problems.append("min, max and step go with distribution:, not with values:")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def choices(self) -> list[Any]:
        """The grid's points on this axis (values only)."""
        return list(self.values or [])


class Metric(Strict):
    name: str = "eval/loss"
    """A validation metric the runs log: eval/<name> (eval/loss, eval/accuracy, ...)."""
    goal: Literal["minimize", "maximize"] = "minimize"


class Pruner(Strict):
    type: Literal["none", "median", "hyperband", "asha"] = "none"
    """Stop unpromising trials early: Optuna's MedianPruner, HyperbandPruner or
    SuccessiveHalvingPruner (ASHA). Each validation evaluation is reported at its training step."""
    warmup_evals: int = Field(default=0, ge=0)
    """Evaluations of a trial (after step 0) before it may be pruned."""
    startup_trials: int = Field(default=5, ge=0)
    """median: trials that finish before any is pruned (Optuna's n_startup_trials)."""
    min_resource: int | None = Field(default=None, ge=1)
    """hyperband/asha: training steps every trial gets (default: train.eval_every of the base)."""
    reduction_factor: int = Field(default=3, ge=2)
    """hyperband/asha: the fraction 1/reduction_factor of trials promoted at each rung."""


class SweepSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The sweep's name: its directory is <output_dir>/sweeps/<name>/, its Optuna study this name."""
    base: str
    """The training config, relative to this spec file."""
    overrides: list[str] = []
    """Dotted settings fixed for every trial (train.eval_every=50)."""
    metric: Metric = Metric()
    """The validation metric a trial is judged by: its best value over the trial's evaluations."""
    method: Literal["grid", "random", "tpe", "bayes", "cmaes"] = "tpe"
    seed: int = Field(default=0, ge=0)
    """Seeds the sampler: the same spec samples the same parameters."""
    max_trials: int | None = Field(default=None, ge=1)
    """Trials in the whole sweep, across resumes and workers (pruned and failed ones count).
    Default: the grid's size for grid, else 20."""
    parameters: dict[str, Parameter]
    """The search space, keyed by dotted training-config paths."""
    pruner: Pruner = Pruner()
    storage: str | None = None
    """Where the study lives: null, a journal file in the sweep directory (one machine, any number
    of workers); or postgresql://user@host:port/db for workers on several machines (the password
    comes from PGPASSWORD or ~/.pgpass, never from this file)."""

    @field_validator("storage")
    @classmethod
    def _storage_url(cls, url: str | None) -> str | None:
        problem = storage_problem(url)
        if problem:
            raise ValueError(problem)
        return url

    working_dir: str | None = None
    """The directory the base config's relative paths (data, output_dir, a model directory) are
    read from, relative to this file; default: the one lmforge runs in. The copy of the spec a sweep
    keeps (runs/sweeps/<name>/sweep.yaml) sets it, so `lmforge sweep runs/sweeps/<name>` works from
    anywhere."""
    lease_timeout: float = Field(default=120.0, gt=0)
    """Seconds without a heartbeat after which another worker takes over a RUNNING trial (its
    machine died); on the same machine a dead process is noticed at once."""
    retry_oom: bool = True
    """Run a trial that ran out of memory once more with micro_batch_size halved and grad_accum
    doubled (the same effective batch)."""
    max_same_failures: int = Field(default=3, ge=1)
    """Stop the sweep when this many trials in a row fail with the same error."""

    @field_validator("parameters")
    @classmethod
    def _grid_has_values(cls, parameters: dict[str, Parameter], info: ValidationInfo) -> dict[str, Parameter]:
        if not parameters:
            raise ValueError("name at least one setting to search")
        if info.data.get("method") == "grid":
            continuous = [k for k, p in parameters.items() if p.values is None]
            if continuous:
                raise ValueError(
                    f"method grid needs values: [...] for every parameter; {', '.join(continuous)} "
                    "has a distribution (list values, or use random/tpe)"
                )
        return parameters

    def grid_size(self) -> int:
        return math.prod(len(p.choices()) for p in self.parameters.values())

    def trial_budget(self) -> int:
        """max_trials, or its default; a grid never runs more trials than it has points."""
        if self.method == "grid":
            return min(self.max_trials or self.grid_size(), self.grid_size())
        return self.max_trials or 20


def storage_problem(url: str | None) -> str | None:
    """What is wrong with a spec's storage URL (None: nothing): it must be PostgreSQL, and hold no
    password (that comes from PGPASSWORD or ~/.pgpass)."""
    if url is None:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        return "not a database URL; use postgresql://user@host:port/db (or leave storage unset)"
    if parsed.password is not None or "password" in parsed.query:
        return (
            "the URL holds a password; remove it and set PGPASSWORD (or ~/.pgpass) instead, so that it never "
            "reaches the spec, logs or the study"
        )
    if parsed.drivername.split("+")[0] != "postgresql":
        if parsed.drivername.startswith("postgres"):
            return f"{parsed.drivername}:// is not a URL SQLAlchemy takes: write postgresql://"
        return (
            f"{parsed.drivername}:// is not supported: postgresql://... for workers on several machines, or leave "
            "storage unset for the journal file on one machine (SQLite locks up under concurrent workers)"
        )
    return None


def shown_url(url: str) -> str:
    """A storage URL as it may be printed: no password, no query."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(password=None, query={}).render_as_string(hide_password=False)


def encode_choice(value: Any) -> Any:
    """A value as an Optuna categorical choice (None, bool, int, float or str): lists and mappings
    become their JSON text."""
    return value if value is None or isinstance(value, bool | int | float | str) else json.dumps(value)


def decode_choice(parameter: Parameter, value: Any) -> Any:
    if parameter.values is not None and isinstance(value, str) and value not in parameter.values:
        return json.loads(value)
    return value


def as_override(key: str, value: Any) -> str:
    """`key=value` as the config loader parses it (JSON is YAML)."""
    return f"{key}={json.dumps(value)}"


class LoadedSpec:
    """A validated spec, where it came from, and the base training config it sweeps."""

    def __init__(self, spec: SweepSpec, path: Path | None, base_path: Path, base: Config) -> None:
        self.spec = spec
        self.path = path
        self.base_path = base_path
        self.base = base
        """The base config with the spec's fixed overrides."""

    @property
    def sweep_dir(self) -> Path:
        return Path(self.base.output_dir) / "sweeps" / self.spec.name


def load_spec(path: Path, overrides: list[str] | None = None, check_files: bool = True) -> LoadedSpec:
    """Read and check a sweep spec: its own fields, the base config with the fixed overrides, every
    parameter's key and values against the training schema, and the metric against the task.

    Args:
        overrides: `key=value` from the command line. Keys of the spec (max_trials=60,
            pruner.type=median, storage=...) set the spec; any other key is a training setting
            added to the spec's overrides.
        check_files: check that the base config's data files and model directories exist.

    Raises:
        ConfigError: every problem at once, each with its file line, in file order.
    """
    if path.is_dir():
        raise ConfigError([f"{path}: a directory; give a sweep spec (a sweep's directory holds its own: sweep.yaml)"])
    raw, lines = _read_file(path)
    problems: list[str] = []
    given: dict[str, str] = {}  # spec keys set on the command line, and by which override
    seen: dict[str, str] = {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if key in seen:
            problems.append(f"override {item!r}: {key} is given twice on the command line ({seen[key]!r}); keep one")
            continue
        seen[key] = item if key != "storage" else "storage=(a URL)"
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. max_trials=40")
        elif key.split(".")[0] in SweepSpec.model_fields:
            _put(raw, key, _yaml_value(value))
            given[key] = item if key != "storage" else "storage=(a URL)"  # it may hold a password: never echoed
        elif key.split(".")[0] in Config.model_fields:
            raw["overrides"] = [*(raw.get("overrides") or []), item]
        else:
            known = [*SweepSpec.model_fields, *Config.model_fields]
            match = difflib.get_close_matches(key.split(".")[0], known, n=1, cutoff=0.5)
            hint = f"; did you mean {match[0]}?" if match else f"; sweep keys: {', '.join(SweepSpec.model_fields)}"
            problems.append(f"override {item!r}: {key}: neither a sweep key nor a training setting{hint}")
    where = _locator(path, lines, given)
    spec, found = _validated(raw, where)
    problems += found
    base = None
    if isinstance(raw.get("base"), str):  # what the base says, even when the spec has problems of its own
        fixed = [o for o in raw.get("overrides") or [] if isinstance(o, str)]
        parameters = {}
        for key, value in (raw.get("parameters") or {}).items():
            try:
                parameters[str(key)] = Parameter.model_validate(value)
            except ValidationError:
                continue  # reported by _validated
        metric = (raw.get("metric") or {}).get("name", Metric().name) if isinstance(raw.get("metric"), dict) else None
        base, more = _base_problems(where, path.parent / raw["base"], fixed, parameters, metric, check_files)
        problems += more
    if problems or spec is None or base is None:
        line = re.compile(re.escape(str(path)) + r":(\d+): ")
        ordered = sorted(problems, key=lambda p: int(m.group(1)) if (m := line.match(p)) else 1 << 30)
        raise ConfigError(ordered, str(path))
    return LoadedSpec(spec, path, path.parent / spec.base, base)


def enter_working_dir(path: Path) -> Path:
    """Change to the spec's working_dir, if it names one; return the spec's path, absolute.

    Raises:
        ConfigError: working_dir is not a directory.
    """
    path = path.resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError:
        return path  # load_spec reports it, with its line
    where = raw.get("working_dir") if isinstance(raw, dict) else None
    if isinstance(where, str):
        directory = path.parent / where
        if not directory.is_dir():
            raise ConfigError([f"{path}: working_dir: no directory {directory}"], str(path))
        os.chdir(directory)
    return path


def check_spec(spec: SweepSpec, base_path: Path, check_files: bool = True) -> LoadedSpec:
    """A spec built in code (multirun) checked against its base, as load_spec checks a file.

    Raises:
        ConfigError: every problem at once.
    """
    where = _locator(None, {}, {})
    base, problems = _base_problems(where, base_path, spec.overrides, spec.parameters, spec.metric.name, check_files)
    if problems or base is None:
        raise ConfigError(problems)
    return LoadedSpec(spec, None, base_path, base)


def _base_problems(
    where,
    base_path: Path,
    overrides: list[str],
    parameters: dict[str, Parameter],
    metric: str | None,
    check_files: bool,
) -> tuple[Config | None, list[str]]:
    """(the base config or None, problems): the base with the fixed overrides, the metric against
    its task, and each parameter's key and values against the schema (against the base alone
    when the fixed overrides are wrong, so that their problems hide none of the others)."""
    problems = []
    fixed = {o.partition("=")[0].strip(): o for o in overrides}
    try:
        base = load_config(base_path, overrides, check_files=check_files)
    except ConfigError as exc:
        problems = [
            f"{where('overrides')}overrides: {p}" if p.startswith("override '") else f"{where('base')}base: {p}"
            for p in exc.problems
        ]
        if not overrides or not all(p.startswith("override '") for p in exc.problems):
            return None, problems
        try:
            base, overrides = load_config(base_path, check_files=check_files), []
        except ConfigError:
            return None, problems
    produced = [f"eval/{m}" for m in EVAL_METRICS[base.model.task]]
    if metric is not None and metric not in produced:
        problems.append(
            f"{where('metric.name')}metric.name: a {base.model.task} run logs no {metric}; use one of "
            f"{', '.join(produced)}"
        )
    for key, parameter in parameters.items():
        if key in fixed:
            problems.append(
                f"{where('parameters.' + key)}parameters.{key}: also fixed by the override {fixed[key]!r}, which each "
                "trial's value would replace: remove one of them (to cut the search, narrow the searched values)"
            )
        found = _value_problems(base_path, overrides, key, parameter)
        problems += [f"{where('parameters.' + key)}parameters.{key}: {p}" for p in found]
    return base, problems


def _value_problems(base_path: Path, overrides: list[str], key: str, parameter: Parameter) -> list[str]:
    """What the schema says about each of the axis's values (or its min and max) in the base config."""
    if key in ("name", "output_dir"):
        return ["the sweep sets each trial's name and directory itself; it cannot be searched"]
    samples = parameter.choices() if parameter.values is not None else [parameter.min, parameter.max]
    if parameter.distribution and parameter.distribution.endswith("int_uniform"):
        samples = [int(v) for v in samples]
    problems: list[str] = []
    for value in samples:
        try:
            load_config(base_path, [*overrides, as_override(key, value)])
        except ConfigError as exc:
            mine = [p.split(": ", 1)[1] for p in exc.problems if p.startswith(f"override '{key}=")]
            text = "; ".join(mine or exc.problems)
            if "unknown key" in text or " is a value, not a section" in text:
                return [text.removeprefix(f"{key}: ")]  # the key itself is wrong: once is enough
            problems.append(f"value {value!r}: {text.removeprefix(f'{key}: ')}")
    if parameter.values is not None and len({json.dumps(v, sort_keys=True) for v in parameter.values}) < len(
        parameter.values
    ):
        problems.append("values repeat: list each once")
    return problems


def _validated(raw: dict[str, Any], where) -> tuple[SweepSpec | None, list[str]]:
    """(the spec or None, its problems with their lines)."""
    try:
        return SweepSpec.model_validate(raw), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(part) for part in error["loc"]]
            dotted = ".".join(loc)
            if loc and loc[0] == "parameters" and len(loc) > 1:
                dotted = f"parameters.{loc[1]}" + "".join(f".{p}" for p in loc[2:])
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key" + _nearest(loc)
            elif error["type"] == "missing":
                message = "required"
            elif "input" in error and not isinstance(error["input"], dict) and loc[:1] != ["storage"]:
                message += f" (got {error['input']!r})"
            problems.append(f"{where(dotted)}{dotted}: {message}" if dotted else f"{where('')}{message}")
        return None, problems


def _nearest(loc: list[str]) -> str:
    known = {(): SweepSpec, ("metric",): Metric, ("pruner",): Pruner}
    parent = tuple(loc[:-1])
    model = Parameter if len(loc) == 3 and loc[0] == "parameters" else known.get(parent)
    if model is None:
        return ""
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else f"; known keys here: {', '.join(model.model_fields)}"


def _locator(path: Path | None, lines: dict[str, int], given: dict[str, str]):
    """where(dotted key) -> the prefix naming where it was set: the command-line override that set
    it, else "FILE:LINE: " of its nearest key in the file."""

    def where(dotted: str) -> str:
        for key, item in given.items():
            if dotted and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + ".")):
                return f"override {item!r}: "
        parts = dotted.split(".") if dotted else []
        if parts[:1] == ["parameters"] and len(parts) > 2:  # parameter keys hold dots themselves
            for n in range(len(parts), 1, -1):
                if ".".join(parts[:n]) in lines:
                    return f"{path}:{lines['.'.join(parts[:n])]}: "
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in lines:
                return f"{path}:{lines['.'.join(parts[:n])]}: "
        return f"{path}: " if path else ""

    return where


def _put(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a spec key from the command line; `parameters.<dotted training key>.<field>` keeps the
    training key whole."""
    parts = dotted.split(".")
    if parts[0] == "parameters" and len(parts) > 2:
        parts = ["parameters", ".".join(parts[1:-1]), parts[-1]]
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _yaml_value(text: str) -> Any:
    try:
        return _number(yaml.safe_load(text)) if text.strip() else text
    except yaml.YAMLError:
        return text


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value: Any) -> Any:
    """1e-4 as the number it means: YAML 1.1 (PyYAML) reads a float without a dot as text."""
    return float(value) if isinstance(value, str) and _EXPONENT.fullmatch(value) else value


# ----------------------------------------------------------------------------- multirun


def split_values(text: str) -> list[str]:
    """A multirun value split at its commas, except inside quotes and brackets:
    `1e-4,3e-4` -> two; `"a, b",c` -> two; `[q,v],[k]` -> two."""
    parts, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    return [*parts, "".join(current)]


def multirun_spec(config_path: Path, overrides: list[str]) -> LoadedSpec:
    """`lmforge train CONFIG -m train.lr=1e-4,3e-4 lora.r=8,16` as a grid sweep (Hydra's multirun):
    every override with commas (outside quotes and brackets) is an axis, the others are fixed. The
    sweep's name is the config's with a hash of the command, so the same command continues it.

    Raises:
        ConfigError: no override has commas, or a problem with the values, named by the option.
    """
    axes: dict[str, Parameter] = {}
    fixed: list[str] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = split_values(value) if sep else []
        if len(parts) > 1:
            axes[key.strip()] = Parameter(values=[_yaml_value(p) for p in parts])
        else:
            fixed.append(item)
    if not axes:
        raise ConfigError(["-m (multirun) needs an override with several values, e.g. train.lr=1e-4,3e-4"])
    name = load_config(config_path, fixed).name
    digest = hashlib.sha256(json.dumps([str(config_path.resolve()), overrides]).encode()).hexdigest()[:8]
    spec = SweepSpec(
        name=f"{name}-multirun-{digest}",
        base=str(config_path.resolve()),
        overrides=fixed,
        method="grid",
        parameters=axes,
    )
    try:
        return check_spec(spec, config_path)
    except ConfigError as exc:
        hint = " (-m splits values at commas; quote a value that holds one: 'key=\"a, b\"')"
        problems = [
            f"-m {p.removeprefix('parameters.')}{hint}" if p.startswith("parameters.") else p for p in exc.problems
        ]
        raise ConfigError(problems, str(config_path)) from None
