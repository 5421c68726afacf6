"""``distml sweep PLAN``: the Part A experiments as plans of runs, ending in one comparison.

A plan is a TOML file (validated like the settings; unknown keys are errors)::

    base = "configs/resnet9.toml"        # optional settings file, as for --config
    seeds = [0, 1]                       # optional; every run repeated per seed
    [set]                                # dotted overrides for every run
    "train.epochs" = 10
    [grid]                               # every combination of these
    "train.batch_size" = [16, 32, 64, 128]
    [[variants]]                         # and/or named variants
    name = "bf16"
    set = { "train.precision" = "bf16-mixed" }
    seeds = [0]                          # optional, replaces the plan's seeds

Runs = variants (or one unnamed) x grid x seeds, each a normal run folder ``OUT/<name>``.
Settings of one run, lowest first: defaults < base < [set] < the variant's set < its grid
values < its seed < ``--set`` on the command line. Re-running the same command skips finished
runs and resumes interrupted ones; a failed run is recorded and the others go on; the sweep
ends with ``distml compare`` over its runs, into ``OUT/report.md``.
"""

from __future__ import annotations

import itertools
import json
import re
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from distml.config import (
    Section,
    SettingsError,
    SweepSettings,
    TrainConfig,
    format_validation_error,
    known_keys,
    parse_assignment,
    read_config_file,
    set_dotted,
    suggest_key,
    validate_settings,
)
from distml.errors import DistmlError, Interrupted

PLAN_FILE = "sweep.json"  # the sweep's own record in OUT: plan, runs, status of each
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")

# short names of common grid keys, for readable run folder names (bs-16, opt-adamw)
SHORT_KEYS = {
    "train.batch_size": "bs",
    "train.accum_steps": "accum",
    "train.precision": "prec",
    "train.epochs": "ep",
    "optim.optimizer": "opt",
    "optim.lr": "lr",
    "optim.step_size": "step",
    "optim.weight_decay": "wd",
    "model.norm": "norm",
    "model.pool": "pool",
    "model.activation": "act",
    "model.dropout": "drop",
    "dist.mode": "mode",
    "dist.backend": "backend",
    "dist.nproc": "np",
}


class Variant(Section):
    name: str = Field(description="folder-name part of this variant's runs")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides")
    seeds: list[int] | None = Field(None, description="seeds of this variant (default: plan's)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        if not NAME_PATTERN.match(name):
            raise ValueError(
                f"variant name {name!r} must be a plain folder name (letters, digits, . _ + -)"
            )
        return name


class Plan(Section):
    description: str = Field("", description="what the plan studies (shown in the report)")
    base: Path | None = Field(None, description="settings file every run starts from")
    seeds: list[int] | None = Field(None, description="every run repeated per seed")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted overrides, every run")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="every combination")
    variants: list[Variant] = Field(default_factory=list, description="named variants")

    @model_validator(mode="after")
    def _well_formed(self) -> Plan:
        keys = known_keys(TrainConfig)
        for key, values in self.grid.items():
            if key not in keys:
                raise ValueError(f"grid over an unknown setting {key!r}{did_you_mean(key)}")
            if not values:
                raise ValueError(f"grid {key!r} is empty: give at least one value")
        for where, overrides in [("set", self.set)] + [(v.name, v.set) for v in self.variants]:
            for key in overrides:
                if key not in keys:
                    raise ValueError(f"{where}: unknown setting {key!r}{did_you_mean(key)}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError("variant names must be unique")
        for seeds in [self.seeds] + [v.seeds for v in self.variants]:
            if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
                raise ValueError("seeds must be a non-empty list of distinct integers")
        return self


def did_you_mean(key: str) -> str:
    close = suggest_key(key, known_keys(TrainConfig))
    return f"; did you mean {close!r}?" if close else ""


@dataclass
class PlannedRun:
    """One run of the plan: its folder name, the overrides that define it, its settings."""

    name: str
    overrides: dict[str, Any]  # variant + grid + seed (what tells it apart from the others)
    config: TrainConfig
    skip_reason: str | None = None


@dataclass
class RunOutcome:
    name: str
    run_dir: str
    status: str  # finished | already-finished | resumed | failed | skipped | not-run
    overrides: dict[str, Any]
    message: str = ""
    summary: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- planning


def read_plan(path: Path) -> Plan:
    """Read and validate a plan file (TOML)."""
    if not path.is_file():
        raise SettingsError(f"plan file {path} does not exist (or is not a file).")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"plan file {path} is not valid TOML: {exc}.") from None
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        text = format_validation_error(exc, Plan).replace("invalid settings", "invalid plan")
        raise SettingsError(f"{path}: {text}") from None


def base_file(plan: Plan, plan_path: Path) -> Path | None:
    """The plan's base settings file: as given (relative to the current folder), else next to
    the plan."""
    if plan.base is None:
        return None
    if plan.base.is_absolute() or plan.base.exists():
        return plan.base
    beside = plan_path.parent / plan.base
    return beside if beside.exists() else plan.base


def value_label(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "none"


def run_name(variant: str | None, grid_values: dict[str, Any], seed: int | None) -> str:
    parts = [variant] if variant else []
    for key, value in grid_values.items():
        parts.append(f"{SHORT_KEYS.get(key, key.rsplit('.', 1)[-1])}-{value_label(value)}")
    if seed is not None:
        parts.append(f"seed{seed}")
    return "-".join(parts) or "run"


def expand(plan: Plan) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """(name, variant name, overrides) of every run, in plan order."""
    variants = plan.variants or [Variant(name="unnamed")]
    keys = list(plan.grid)
    for variant in variants:
        seeds = variant.seeds if variant.seeds is not None else plan.seeds
        for combo in itertools.product(*(plan.grid[k] for k in keys)):
            grid_values = dict(zip(keys, combo, strict=True))
            for seed in seeds or [None]:
                overrides = {**variant.set, **grid_values}
                if seed is not None:
                    overrides["train.seed"] = seed
                label = variant.name if plan.variants else None
                yield run_name(label, grid_values, seed), label, overrides


def plan_runs(plan: Plan, plan_path: Path, out: Path, assignments: list[str]) -> list[PlannedRun]:
    """Resolve and validate every run's settings before anything trains: a bad value in the
    seventh run is an error before the first starts."""
    base = base_file(plan, plan_path)
    base_tree = read_config_file(base) if base else {}
    cli = [parse_assignment(text) for text in assignments]
    runs: list[PlannedRun] = []
    problems: list[str] = []
    for name, _, overrides in expand(plan):
        tree = json.loads(json.dumps(base_tree))  # a deep copy of plain data
        for key, value in [*plan.set.items(), *overrides.items(), *cli]:
            set_dotted(tree, key, value)
        # a sweep decides where its runs go; a base file's output paths would collide
        tree.setdefault("output", {})
        tree["output"].update({"dir": str(out / name), "name": None, "save": None})
        try:
            config = validate_settings(TrainConfig, tree)
        except SettingsError as exc:
            problems.append(f"run {name}: {exc}")
            continue
        runs.append(PlannedRun(name, overrides, config))
    if problems:
        raise SettingsError("the plan has runs with invalid settings:\n" + "\n".join(problems))
    names = [run.name for run in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SettingsError(
            f"the plan gives several runs the same folder name ({', '.join(duplicates)}): "
            "give the variants distinct names."
        )
    for run in runs:
        run.skip_reason = cannot_run_here(run.config)
    return runs


def cannot_run_here(config: TrainConfig) -> str | None:
    """Why this machine cannot run these settings (a skipped run, not a failure), or None."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_gpu = config.train.device == "cuda" or (config.train.device == "auto" and gpus > 0)
    if config.train.device == "cuda" and gpus == 0:
        return "needs a CUDA GPU; none is visible"
    if config.dist.backend == "nccl" and not on_gpu:
        return "the nccl backend needs CUDA GPUs; this run would be on the CPU"
    if config.dist.mode == "dp" and gpus < 2:
        return f"DataParallel needs at least 2 GPUs to split a batch; {gpus} visible"
    if config.dist.mode == "ddp" and on_gpu:
        ranks = config.dist.nproc or gpus
        backend = config.dist.backend or "nccl"
        if backend == "nccl" and ranks > gpus:
            return f"nccl runs one rank per GPU: {ranks} ranks asked for, {gpus} GPU(s) visible"
    return None


# ----------------------------------------------------------------------------- running


def check_out(out: Path, runs: list[PlannedRun]) -> None:
    """OUT is new, or a folder this same plan wrote before (then the sweep continues)."""
    if out.exists() and not out.is_dir():
        raise DistmlError(f"--out {out} is a file; give a folder for the sweep's runs.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    record = out / PLAN_FILE
    if not record.is_file():
        raise DistmlError(
            f"--out {out} already holds files that are not a sweep (no {PLAN_FILE}). Choose "
            "another --out, or delete that folder first."
        )
    for run in runs:
        saved = out / run.name / "config.json"
        if saved.is_file():
            previous = json.loads(saved.read_text())
            if previous != run.config.model_dump(mode="json"):
                raise DistmlError(
                    f"{out / run.name} holds a run with other settings than the plan now gives "
                    f"it (the plan or --set changed since). Use another --out, or delete "
                    f"{out / run.name} to run it again."
                )


def run_one(
    run: PlannedRun,
    start: Callable[[TrainConfig], dict[str, Any]],
    resume: Callable[[Path], dict[str, Any]],
) -> RunOutcome:
    """Train one planned run, or continue it: finished runs are kept, interrupted ones resume,
    the rest start (the launcher reuses a folder left by a start that failed before its first
    epoch, and refuses one that holds a run)."""
    from distml.checkpoint import STATE_FILE

    run_dir = run.config.output.dir
    assert run_dir is not None
    outcome = RunOutcome(run.name, str(run_dir), "finished", run.overrides)
    if run.skip_reason:
        outcome.status, outcome.message = "skipped", run.skip_reason
        return outcome
    summary_file = run_dir / "summary.json"
    if summary_file.is_file():
        outcome.status = "already-finished"
        outcome.summary = json.loads(summary_file.read_text())
        return outcome
    try:
        if (run_dir / STATE_FILE).is_file():
            outcome.status = "resumed"
            outcome.summary = resume(run_dir)
        else:
            outcome.summary = start(run.config)
    except Interrupted:  # stopped by a signal: the sweep stops too
        raise
    except DistmlError as exc:
        outcome.status, outcome.message = "failed", str(exc)
    return outcome


def run_table(runs: list[PlannedRun]) -> list[dict[str, Any]]:
    """The dry-run listing: every run's name, what defines it and its resolved settings."""
    return [
        {
            "name": run.name,
            "overrides": run.overrides,
            "skip_reason": run.skip_reason,
            "settings": run.config.model_dump(mode="json"),
        }
        for run in runs
    ]


def write_record(out: Path, plan: Plan, plan_path: Path, outcomes: list[RunOutcome]) -> None:
    from distml.files import atomic_write_json

    atomic_write_json(
        out / PLAN_FILE,
        {
            "plan_file": str(plan_path),
            "plan": plan.model_dump(mode="json"),
            "runs": [{k: v for k, v in vars(o).items() if k != "summary"} for o in outcomes],
        },
    )


def run_sweep(settings: SweepSettings, *, show_progress: bool = True) -> dict[str, Any]:
    """Plan, validate, then train every run in turn (or list them with ``dry_run``); end with
    a comparison of the finished runs in ``OUT/report.md``."""
    from distml.compare import compare_runs
    from distml.config import CompareSettings
    from distml.launch import resume_training, start_training
    from distml.progress import Reporter

    plan = read_plan(settings.plan)
    out = settings.out_dir()
    runs = plan_runs(plan, settings.plan, out, settings.assignments)
    result: dict[str, Any] = {"plan": str(settings.plan), "out": str(out), "runs": run_table(runs)}
    if settings.dry_run:
        result["dry_run"] = True
        return result
    check_out(out, runs)
    reporter = Reporter(show_progress)
    outcomes: list[RunOutcome] = []
    out.mkdir(parents=True, exist_ok=True)
    try:
        for number, run in enumerate(runs, 1):
            reporter.line(f"sweep {number}/{len(runs)}: {run.name}")
            outcome = run_one(
                run,
                lambda config: start_training(config, show_progress=show_progress),
                lambda run_dir: resume_training(run_dir, show_progress=show_progress),
            )
            if outcome.status in ("failed", "skipped"):
                reporter.line(f"  {outcome.status}: {outcome.message}")
            outcomes.append(outcome)
            write_record(out, plan, settings.plan, outcomes)
    except Interrupted as exc:
        write_record(out, plan, settings.plan, outcomes)
        exc.args = (
            f"{exc} The sweep stopped after {len(outcomes)} of {len(runs)} runs; continue it "
            f"with the same command: distml sweep {settings.plan} --out {out}",
        )
        raise
    result["outcomes"] = [{k: v for k, v in vars(o).items() if k != "summary"} for o in outcomes]
    finished = [Path(o.run_dir) for o in outcomes if o.summary]
    left_out = {o.name: f"{o.status}: {o.message}" for o in outcomes if not o.summary}
    if finished:
        comparison = CompareSettings(
            runs=finished,
            out=out,
            allow_unfinished=True,
            title=f"Sweep {settings.plan.stem}: {plan.description}".rstrip(": "),
            not_compared=left_out,
        )
        result["compare"] = compare_runs(comparison)
        result["report"] = str(out / "report.md")
    return result
