"""The ``distml`` command line: thin Typer functions that build validated settings, call one
library function, and print a short summary (or ``--json``).

Exit codes: 0 success; 1 unexpected failure (a crashed rank, a bug); 2 a problem the user
can fix (settings, data, checkpoint, device); 3 training diverged (non-finite loss).
Heavy modules (torch) are imported inside the commands so ``distml --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from distml import __version__
from distml.config import (
    BenchSettings,
    CompareBackendsSettings,
    CompareSettings,
    EvalSettings,
    LrFindSettings,
    PruneSettings,
    SelectSettings,
    SiSettings,
    StudySettings,
    SweepSettings,
    TrainConfig,
    resolve_settings,
    validate_settings,
)
from distml.errors import DistmlError
from distml.flags import OptionTable, PanelCommand, flag_names, setting_options

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)

app = typer.Typer(
    name="distml",
    help="Train CIFAR-10 classifiers on one or many GPUs; study and compress them with the "
    "Separation Index.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,  # click's plain help: wraps on words at any width
)

# each command's settings flags: help panel -> flag -> dotted key of its settings model
# (distml/flags.py turns every row into an option described by the settings field)
TRAIN_OPTIONS: OptionTable = {
    "Model": {
        "--model": "model.arch",
        "--width": "model.width",
        "--depth": "model.depth",
        "--norm": "model.norm",
        "--pool": "model.pool",
        "--activation": "model.activation",
        "--dropout": "model.dropout",
        "--init": "model.init",
        "--freeze-features": "model.freeze_features",
    },
    "Data": {
        "--dataset": "data.dataset",
        "--data-dir": "data.data_dir",
        "--val-fraction": "data.val_fraction",
        "--augment": "data.augment",
    },
    "Training": {
        "--epochs": "train.epochs",
        "--batch-size": "train.batch_size",
        "--accum-steps": "train.accum_steps",
        "--label-smoothing": "train.label_smoothing",
        "--early-stop": "train.early_stop",
        "--precision": "train.precision",
        "--device": "train.device",
        "--seed": "train.seed",
        "--deterministic": "train.deterministic",
    },
    "Optimisation": {
        "--optimizer": "optim.optimizer",
        "--lr": "optim.lr",
        "--momentum": "optim.momentum",
        "--weight-decay": "optim.weight_decay",
        "--scheduler": "optim.scheduler",
        "--step-size": "optim.step_size",
        "--gamma": "optim.gamma",
    },
    "Distributed": {
        "--mode": "dist.mode",
        "--nproc": "dist.nproc",
        "--backend": "dist.backend",
        "--sync-bn": "dist.sync_bn",
        "--max-restarts": "dist.max_restarts",
        "--nnodes": "dist.nnodes",
        "--node-rank": "dist.node_rank",
        "--rdzv-endpoint": "dist.rdzv_endpoint",
    },
    "Output": {
        "--out": "output.dir",
        "--name": "output.name",
        "--save": "output.save",
        "--overwrite": "output.overwrite",
    },
}
TRAIN_FLAG_NAMES = flag_names(TRAIN_OPTIONS)
CHECKPOINT_DATA = {
    "--dataset": "dataset",
    "--data-dir": "data_dir",
    "--device": "device",
    "--batch-size": "batch_size",
}
OUT_OPTIONS = {"--out": "out", "--overwrite": "overwrite"}
EVAL_OPTIONS: OptionTable = {"Options": {**CHECKPOINT_DATA, "--split": "split", **OUT_OPTIONS}}
SI_PANEL, HEAD_PANEL = "Separation Index", "New classifier head"
SI_OPTIONS: OptionTable = {
    "Options": {**CHECKPOINT_DATA, **OUT_OPTIONS},
    SI_PANEL: {"--fraction": "fraction", "--splits": "splits"},
}
HEAD_OPTIONS = {
    "--head-epochs": "head.epochs",
    "--lr": "head.lr",
    "--head-batch-size": "head.batch_size",
    "--scheduler": "head.scheduler",
    "--mode": "head.mode",
}
PRUNE_OPTIONS: OptionTable = {
    "Options": {**CHECKPOINT_DATA, **OUT_OPTIONS, "--save": "save"},
    SI_PANEL: {"--criterion": "criterion", "--tolerance": "tolerance", "--fraction": "fraction"},
    HEAD_PANEL: HEAD_OPTIONS,
}
SELECT_OPTIONS: OptionTable = {
    "Options": PRUNE_OPTIONS["Options"],
    SI_PANEL: {"--layer": "layer", **PRUNE_OPTIONS[SI_PANEL], "--max-features": "max_features"},
    HEAD_PANEL: HEAD_OPTIONS,
}
STUDY_OPTIONS: OptionTable = {
    "Options": {"--out": "out"},
    "Step-1 training": {
        "--epochs": "training.train.epochs",
        "--dataset": "training.data.dataset",
        "--data-dir": "training.data.data_dir",
        "--device": "training.train.device",
        "--mode": "training.dist.mode",
    },
    HEAD_PANEL: {"--head-epochs": "head.epochs", "--lr": "head.lr"},
    SI_PANEL: {
        "--fraction": "fraction",
        "--criterion": "criterion",
        "--layer-tolerance": "layer_tolerance",
        "--feature-tolerance": "feature_tolerance",
        "--layer": "layer",
        "--max-features": "max_features",
    },
}


def fail(message: str, code: int = 2, label: str = "error") -> None:
    """Print a one-paragraph error to stderr and exit with ``code`` (no traceback)."""
    typer.echo(f"distml: {label}: {message}", err=True)
    raise typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn DistmlError into a message and its exit code; an operating-system error on a
    file (the disk filled up, a folder became read-only during the run) into one too; Ctrl-C
    into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DistmlError as exc:
            fail(str(exc), exc.exit_code, exc.label)
        except OSError as exc:
            if exc.filename is None:  # not about a file the user can act on: a real failure
                raise
            fail(
                f"cannot use {exc.filename}: {exc.strerror or exc}. Check that the path exists "
                "and is writable (permissions, free space, a read-only file system), then run "
                "the command again."
            )
        except KeyboardInterrupt:
            typer.echo("distml: interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def emit(result: dict[str, Any], as_json: bool, human: Callable[[dict[str, Any]], str]) -> None:
    """The result on stdout: human lines, or one JSON object on the last line."""
    if as_json:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    else:
        typer.echo(human(result))


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"distml {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=version_callback,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """distml: distributed CIFAR-10 training and Separation-Index compression."""


# ----------------------------------------------------------------------------- train

Opt = typer.Option
JsonOpt = Annotated[
    bool,
    Opt(
        "--json",
        help="Print the result as one JSON object (last line of stdout).",
        rich_help_panel="Output",
    ),
]
QuietOpt = Annotated[
    bool, Opt("--quiet", "-q", help="No progress output.", rich_help_panel="Output")
]
SetOpt = Annotated[
    list[str] | None,
    Opt(
        "--set",
        metavar="KEY=VALUE",
        help="dotted.key=value, reaches any setting; repeatable; wins over flags.",
    ),
]
CheckpointArg = Annotated[
    Path, typer.Argument(metavar="CHECKPOINT", help="A distml .safetensors checkpoint.")
]


@app.command(cls=PanelCommand)
@user_errors
@setting_options(TrainConfig, TRAIN_OPTIONS)
def train(
    config: Annotated[
        Path | None,
        Opt(metavar="PATH", help="Settings file (TOML, YAML or JSON); flags override it."),
    ] = None,
    set_: SetOpt = None,
    amp: Annotated[
        bool,
        Opt(
            "--amp",
            help="Shorthand for --precision 16-mixed (fp16 + GradScaler).",
            rich_help_panel="Training",
        ),
    ] = False,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    resume: Annotated[
        Path | None,
        Opt(
            metavar="RUN_DIR",
            help="Continue a stopped run from its saved state, with the settings in its "
            "config.json (no other settings flags).",
            rich_help_panel="Output",
        ),
    ] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Train a classifier (single device, DataParallel or DDP).

    Writes config.json, metrics.csv, curves.png, summary.json and best/last checkpoints into
    the run directory (artifacts/runs/NAME). Settings: defaults < --config < flags < --set."""
    if resume is not None:
        given = [TRAIN_FLAG_NAMES[key] for key in flags]
        given += ["--config"] * bool(config) + ["--set"] * bool(set_) + ["--amp"] * amp
        if given:
            fail(
                "--resume continues a run with the settings in its config.json; drop "
                f"{', '.join(given)} (or start a new run without --resume)."
            )
        from distml.launch import resume_training

        emit(resume_training(resume, show_progress=not quiet), json_, train_report)
        return
    if amp:
        precision = flags.get("train.precision", "16-mixed")
        if precision != "16-mixed":
            fail(f"--amp means --precision 16-mixed, but --precision {precision} was given too.")
        flags["train.precision"] = "16-mixed"
    settings = resolve_settings(TrainConfig, config, flags, set_, TRAIN_FLAG_NAMES)

    from distml.launch import start_training

    summary = start_training(settings, show_progress=not quiet)
    if summary:  # empty on the nodes of a multi-node job that do not hold rank 0
        emit(summary, json_, train_report)


def train_report(s: dict[str, Any]) -> str:
    best = s["best_val_accuracy"]
    lines = [
        f"run           {s['run_dir']}",
        f"model         {s['architecture']} ({s['parameters']:,} parameters)",
        f"hardware      {s['mode']} x{s['world_size']} on {s['device_name']}, precision "
        f"{s['precision']}",
        f"test accuracy {100 * s['test_accuracy']:.2f}% (loss {s['test_loss']:.4f}, best epoch "
        f"{s['best_epoch']}" + (f", val {100 * best:.2f}%)" if best is not None else ")"),
        f"train acc.    {100 * s['train_accuracy']:.2f}% (best model, unaugmented)",
        f"time          {s['train_seconds']:.1f}s training, {s['total_seconds']:.1f}s total, "
        f"{s['images_per_second']:,.0f} img/s, peak memory {s['peak_memory_mb']:,.0f} MiB",
        f"verdict       {s['overfitting']['verdict']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- eval


@app.command("eval", cls=PanelCommand)
@user_errors
@setting_options(EvalSettings, EVAL_OPTIONS)
def eval_command(
    checkpoint: CheckpointArg,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Accuracy, loss, per-class accuracy and a confusion matrix of a checkpoint."""
    from distml.evaluate import evaluate_checkpoint

    settings = resolve_settings(
        EvalSettings, flags=flags | {"checkpoint": checkpoint}, flag_names=flag_names(EVAL_OPTIONS)
    )
    emit(evaluate_checkpoint(settings, show_progress=not quiet), json_, eval_report)


def eval_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['split']} accuracy {100 * r['accuracy']:.2f}% ({r['correct']}/{r['count']}), "
        f"loss {r['loss']:.4f} on {r['dataset']}",
        "per class: "
        + ", ".join(f"{c} {100 * a:.1f}%" for c, a in r["per_class_accuracy"].items()),
        f"confusion matrix: {r['confusion_png']}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- SI study
# distml si / prune / select-features / study: validated settings -> one library call
# (distml/taps.py, distml/compress.py, distml/study.py) -> emit.


def checkpoint_settings(
    model: type[M], table: OptionTable, checkpoint: Path, flags: dict[str, Any]
) -> M:
    """Validated settings of a command that reads a checkpoint."""
    return resolve_settings(
        model, flags=flags | {"checkpoint": checkpoint}, flag_names=flag_names(table)
    )


@app.command("si", cls=PanelCommand)
@user_errors
@setting_options(SiSettings, SI_OPTIONS)
def si_command(
    checkpoint: CheckpointArg,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Separation Index and Center SI of every feature layer, train and test.

    Measured on class-balanced subsets of each split; writes si.json and si.png (default
    folder: CHECKPOINT-si beside the checkpoint)."""
    from distml.taps import measure_layers

    settings = checkpoint_settings(SiSettings, SI_OPTIONS, checkpoint, flags)
    emit(measure_layers(settings, show_progress=not quiet), json_, si_report)


def si_report(r: dict[str, Any]) -> str:
    splits = r["splits"]
    head = f"{'layer':<14}{'shape':>12}" + "".join(f"{'SI ' + s:>12}" for s in splits)
    head += "".join(f"{'CSI ' + s:>12}" for s in splits)
    lines = [
        f"{r['checkpoint']} on {r['dataset']}: "
        + ", ".join(f"{n} {s} samples" for s, n in r["samples"].items()),
        head,
    ]
    for row in r["layers"]:
        shape = f"{row['channels']}x{row['size']}x{row['size']}"
        cells = [row["si"][s] for s in splits] + [row["center_si"][s] for s in splits]
        lines.append(f"{row['name']:<14}{shape:>12}" + "".join(f"{v:>12.4f}" for v in cells))
    lines.append(f"si.json: {r['json']}\nplot:    {r['plot']}")
    return "\n".join(lines)


@app.command("prune", cls=PanelCommand)
@user_errors
@setting_options(PruneSettings, PRUNE_OPTIONS)
def prune_command(
    checkpoint: CheckpointArg,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Cut the tail layers that do not raise the Separation Index; rebuild the classifier.

    The layer curve is measured on the training subset; layers after the shortest prefix
    within --tolerance of the best are cut. Writes pruned.safetensors and prune.json."""
    from distml.compress import prune_checkpoint

    settings = checkpoint_settings(PruneSettings, PRUNE_OPTIONS, checkpoint, flags)
    emit(prune_checkpoint(settings, show_progress=not quiet), json_, prune_report)


def compression_lines(r: dict[str, Any]) -> list[str]:
    before, after = r["parameters"]["before"], r["parameters"]["after"]
    lines = [
        f"parameters    {before['total']:,} -> {after['total']:,} "
        f"({100 * r['parameters']['removed_fraction']:.1f}% removed; features "
        f"{before['features']:,} -> {after['features']:,}, head {before['head']:,} -> "
        f"{after['head']:,})",
    ]
    acc = r["test_accuracy"]
    if acc["after"] is not None:
        lines.append(
            f"test accuracy {100 * acc['before']:.2f}% -> {100 * acc['after']:.2f}% "
            f"(new head trained, epochs: {r['head_training']['epochs']}, "
            f"{r['head_training']['run_dir']})"
        )
    elif r["head_rebuilt"]:
        lines.append(
            "test accuracy not measured: the rebuilt head is untrained (use --head-epochs N, "
            "or distml train --init CHECKPOINT --freeze-features)"
        )
    lines.append(f"checkpoint    {r['checkpoint']}")
    if r["head_training"] is not None:
        lines.append(f"with new head {r['head_training']['checkpoint']}")
    if r["saved"]:
        lines.append(f"saved         {r['saved']}")
    return lines


def prune_report(r: dict[str, Any]) -> str:
    label = "SI" if r["criterion"] == "si" else "Center SI"
    lines = [f"{label} per layer ({r['samples']} training samples):"]
    for i, (name, value) in enumerate(zip(r["layers"], r["curve"], strict=True), start=1):
        mark = "  <- last kept layer" if i == r["kept_layers"] else ""
        lines.append(f"  {name:<14}{value:.4f}{mark}")
    lines.append(
        f"kept {r['kept_layers']} of {len(r['layers'])} layers (tolerance {r['tolerance']:g}); "
        f"removed: {', '.join(r['removed_layers']) or 'nothing'}"
    )
    return "\n".join(lines + compression_lines(r) + [f"plot          {r['plot']}"])


@app.command("select-features", cls=PanelCommand)
@user_errors
@setting_options(SelectSettings, SELECT_OPTIONS)
def select_features_command(
    checkpoint: CheckpointArg,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Select a layer's channels by the Separation Index; remove the others.

    Greedy forward selection on the training subset; the unselected channels are removed from
    the weights and the classifier is rebuilt. Writes selected.safetensors, selection.json and
    selection.png."""
    from distml.compress import select_checkpoint_features

    settings = checkpoint_settings(SelectSettings, SELECT_OPTIONS, checkpoint, flags)
    emit(select_checkpoint_features(settings, show_progress=not quiet), json_, select_report)


def select_report(r: dict[str, Any]) -> str:
    sel = r["selection"]
    label = "SI" if r["criterion"] == "si" else "Center SI"
    lines = [
        f"greedy selection in {r['layer']} ({r['samples']} training samples): {label} "
        f"{sel['curve'][0]:.4f} with 1 channel, best {sel['best']:.4f} with "
        f"{sel['curve'].index(sel['best']) + 1}",
        f"kept {r['channels_after']} of {r['channels_before']} channels of {r['sliced_conv']} "
        f"({label} {sel['curve'][sel['kept'] - 1]:.4f}, tolerance {r['tolerance']:g})"
        + (f"; input channels of {r['next_conv']} sliced to match" if r["next_conv"] else ""),
    ]
    return "\n".join(lines + compression_lines(r) + [f"plot          {r['plot']}"])


TRAINING = "training."  # the prefix of a command's nested training settings


def training_settings(
    config: Path | None, flags: dict[str, Any], set_: list[str] | None, table: OptionTable
) -> tuple[TrainConfig, dict[str, Any]]:
    """A command's nested training settings, resolved as ``distml train`` resolves them
    (its --config file < its ``training.*`` flags < --set), and the command's other flags."""
    training_flags = {
        key.removeprefix(TRAINING): value
        for key, value in flags.items()
        if key.startswith(TRAINING)
    }
    own = {key: value for key, value in flags.items() if not key.startswith(TRAINING)}
    names = {key.removeprefix(TRAINING): flag for key, flag in flag_names(table).items()}
    return resolve_settings(TrainConfig, config, training_flags, set_, names), own


@app.command("study", cls=PanelCommand)
@user_errors
@setting_options(StudySettings, STUDY_OPTIONS, from_config=TRAINING)
def study_command(
    config: Annotated[
        Path, Opt(metavar="PATH", help="Training settings of step 1 (e.g. configs/vgg16.toml).")
    ],
    set_: Annotated[
        list[str] | None,
        Opt(
            "--set",
            metavar="KEY=VALUE",
            help="dotted.key=value for the step-1 training settings; repeatable.",
        ),
    ] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """The VGG16 Separation-Index study (Part B) in one command, with one report.

    Train (1), new head on frozen features (2), SI per layer, prune, select features, new
    heads (3), SI per layer of every model (4); writes report.md, report.json and every plot
    into --out."""
    from distml.study import run_study

    training, own = training_settings(config, flags, set_, STUDY_OPTIONS)
    # the study's own head defaults (30 epochs) under the head flags: a partly given section
    # would otherwise start from HeadSettings' defaults
    head = StudySettings.model_fields["head"].get_default(call_default_factory=True)
    values = {"head": head.model_dump(), "training": training, "head.mode": training.dist.mode}
    values |= own
    settings = resolve_settings(StudySettings, flags=values, flag_names=flag_names(STUDY_OPTIONS))
    emit(run_study(settings, show_progress=not quiet), json_, study_report)


def study_report(r: dict[str, Any]) -> str:
    lines = [f"{'model':<28}{'parameters':>14}{'test accuracy':>15}"]
    for row in r["models"]:
        acc = "-" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%"
        lines.append(f"{row['name']:<28}{row['parameters']:>14,}{acc:>15}")
    lines.append(f"report: {r['report_md']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- compare-backends

COMPARE_BACKENDS_OPTIONS: OptionTable = {
    "Collectives": {
        "--backends": "backends",
        "--nproc": "nproc",
        "--ops": "ops",
        "--sizes": "sizes",
        "--iters": "iters",
        "--warmup": "warmup",
        "--dtype": "dtype",
    },
    "Training comparison": {"--train-epochs": "train_epochs"},
    "Options": {"--device": "device", **OUT_OPTIONS},
}


@app.command("compare-backends", cls=PanelCommand)
@user_errors
@setting_options(CompareBackendsSettings, COMPARE_BACKENDS_OPTIONS)
def compare_backends_command(
    config: Annotated[
        Path | None,
        Opt(
            metavar="PATH",
            help="Training settings of --train-epochs (as for train --config).",
            rich_help_panel="Training comparison",
        ),
    ] = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Collective bandwidth and latency of NCCL and Gloo per op and message size.

    Measured as nccl-tests does (algbw, busbw, a value check of every result). Writes
    backends.json, backends.csv, bandwidth.png and latency.png (and training.png with
    --train-epochs) into --out; a backend that cannot run here is a skipped row."""
    from distml.comm import backends_table, compare_backends
    from distml.launch import start_training

    training = resolve_settings(TrainConfig, config, {}, set_, TRAIN_FLAG_NAMES)
    values = {**flags, "training": training}
    settings = validate_settings(
        CompareBackendsSettings, values, flag_names(COMPARE_BACKENDS_OPTIONS)
    )
    result = compare_backends(
        settings,
        show_progress=not quiet,
        run_training=lambda run: start_training(run, show_progress=not quiet),
    )
    if result is not None:  # None on the other ranks of an outer torchrun
        emit(result, json_, backends_table)


# ----------------------------------------------------------------------------- compare


COMPARE_OPTIONS: OptionTable = {
    "Options": {"--out": "out", "--allow-unfinished": "allow_unfinished"},
}


@app.command("compare", cls=PanelCommand)
@user_errors
@setting_options(CompareSettings, COMPARE_OPTIONS)
def compare_command(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(metavar="RUN_DIR", help="Run folders written by distml train."),
    ],
    json_: JsonOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Compare training runs side by side: table, seed groups, plots, interpretation.

    Writes report.md, compare.csv, compare.json, curves.png and time_memory.png into --out;
    runs that differ only in the seed are averaged (mean and standard deviation)."""
    from distml.compare import compare_runs

    values = {**flags, "runs": run_dirs}
    settings = validate_settings(CompareSettings, values, flag_names(COMPARE_OPTIONS))
    emit(compare_runs(settings), json_, compare_report)


def compare_report(r: dict[str, Any]) -> str:
    from distml.compare import side_by_side, text_table

    lines = [text_table(side_by_side(r)), ""]
    lines += [f"- {sentence}" for sentence in r["interpretation"]]
    lines.append(f"\nreport: {r['files']['report.md']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sweep

SWEEP_OPTIONS: OptionTable = {"Options": {"--out": "out", "--dry-run": "dry_run"}}


@app.command("sweep", cls=PanelCommand)
@user_errors
@setting_options(SweepSettings, SWEEP_OPTIONS)
def sweep_command(
    plan: Annotated[
        Path, typer.Argument(metavar="PLAN", help="A plan file (TOML), e.g. plans/modes.toml.")
    ],
    set_: SetOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Run a plan of training runs (variants x grid x seeds) and compare them.

    Every run is a normal run folder in --out; re-running the same command skips finished
    runs and resumes interrupted ones; the sweep ends with report.md (distml compare).
    --set applies to every run, after the plan (--set train.epochs=1 shrinks a whole plan)."""
    from distml.sweep import run_sweep

    values = {**flags, "plan": plan, "assignments": set_ or []}
    settings = validate_settings(SweepSettings, values, flag_names(SWEEP_OPTIONS))
    emit(run_sweep(settings, show_progress=not quiet), json_, sweep_report)


def sweep_report(r: dict[str, Any]) -> str:
    if r.get("dry_run"):
        lines = [f"{len(r['runs'])} runs planned in {r['out']} (nothing trained):"]
        for run in r["runs"]:
            what = ", ".join(f"{k}={v}" for k, v in run["overrides"].items()) or "the plan as is"
            skip = f"  [skipped: {run['skip_reason']}]" if run["skip_reason"] else ""
            lines.append(f"  {run['name']:<28} {what}{skip}")
        return "\n".join(lines)
    lines = [f"sweep {r['plan']} in {r['out']}:"]
    for outcome in r["outcomes"]:
        note = f"  ({outcome['message']})" if outcome["message"] else ""
        lines.append(f"  {outcome['name']:<28} {outcome['status']}{note}")
    if "compare" in r:
        lines += ["", compare_report(r["compare"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- lr-find

# the train flags that shape the test (not --lr: the test varies it; one process, so no
# distributed flags; the output is the test's own)
LR_FIND_OPTIONS: OptionTable = {
    panel: {flag: TRAINING + key for flag, key in flags.items() if flag != "--lr"}
    for panel, flags in TRAIN_OPTIONS.items()
    if panel not in ("Distributed", "Output")
}
LR_FIND_OPTIONS["Range test"] = {
    "--start-lr": "start_lr",
    "--end-lr": "end_lr",
    "--steps": "steps",
    "--beta": "beta",
    "--stop-factor": "stop_factor",
    "--skip-start": "skip_start",
    **OUT_OPTIONS,
}


@app.command("lr-find", cls=PanelCommand)
@user_errors
@setting_options(LrFindSettings, LR_FIND_OPTIONS)
def lr_find_command(
    config: Annotated[
        Path | None,
        Opt(metavar="PATH", help="Training settings file (as for train --config)."),
    ] = None,
    set_: SetOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Learning-rate range test: the lr to pass to distml train --lr.

    The lr grows exponentially from --start-lr to --end-lr over --steps steps of a fresh
    model; the smoothed loss is plotted against it and the steepest descent is suggested.
    Writes lr_find.json and lr_find.png; no weights are written anywhere."""
    from distml.lrfind import find_lr

    training, own = training_settings(config, flags, set_, LR_FIND_OPTIONS)
    values = {**own, "training": training}
    settings = validate_settings(LrFindSettings, values, flag_names(LR_FIND_OPTIONS))
    emit(find_lr(settings, show_progress=not quiet), json_, lr_find_report)


def lr_find_report(r: dict[str, Any]) -> str:
    steps = f"{r['steps_run']} of {r['steps_planned']} steps"
    stopped = " (stopped early: the loss diverged)" if r["stopped_early"] else ""
    if r["suggested_lr"] is None:
        verdict = "no suggestion: the smoothed loss never fell; widen --start-lr/--end-lr"
    else:
        verdict = f"suggested --lr {r['suggested_lr']:.3g} (steepest descent of the loss)"
    return f"{steps}{stopped}\n{verdict}\nplot: {r['plot']}\njson: {r['json']}"


def main() -> None:
    app()


# ----------------------------------------------------------------------------- bench


BENCH_OPTIONS: OptionTable = {
    "Model": {"--model": "model", "--width": "width", "--depth": "depth"},
    "Timing": {
        "--batch-size": "batch_size",
        "--steps": "steps",
        "--warmup": "warmup",
        "--device": "device",
        "--precision": "precisions",
        "--pipelines": "pipelines",
        "--compile": "compile",
        "--workers": "workers",
        "--seed": "seed",
    },
    "Data": {"--dataset": "dataset", "--data-dir": "data_dir", "--images": "images"},
    "Output": OUT_OPTIONS,
}


@app.command("bench", cls=PanelCommand)
@user_errors
@setting_options(BenchSettings, BENCH_OPTIONS)
def bench_command(
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Training images/s of distml's path, setting by setting, against the classic pipeline.

    Classic: a DataLoader of PIL images with torchvision transforms, fp32, NCHW. Writes
    bench.json, bench.csv and bench.png into --out."""
    from distml.bench import run_bench

    settings = validate_settings(BenchSettings, flags, flag_names(BENCH_OPTIONS))
    emit(run_bench(settings, show_progress=not quiet), json_, bench_report)


def bench_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['model']}, batch {r['settings']['batch_size']}, {r['device']}, torch {r['torch']}; "
        f"{r['flops_per_image'] / 1e9:.3f} GFLOP per training image; {r['mfu_note']}",
        "",
        r["table"],
        "",
        f"bench.json: {r['json']}\nbench.csv:  {r['csv']}\nplot:       {r['plot']}",
    ]
    return "\n".join(lines)
