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
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import typer

from distml import __version__
from distml.errors import DistmlError

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound="BaseModel")

if TYPE_CHECKING:
    from pydantic import BaseModel

app = typer.Typer(
    name="distml",
    help="Train CIFAR-10 classifiers on one or many GPUs; study and compress them with the "
    "Separation Index.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)

# flag name (as Typer passes it) -> dotted settings key, for `distml train`
TRAIN_FLAGS = {
    "model": "model.arch",
    "width": "model.width",
    "depth": "model.depth",
    "norm": "model.norm",
    "dropout": "model.dropout",
    "init": "model.init",
    "freeze_features": "model.freeze_features",
    "dataset": "data.dataset",
    "data_dir": "data.data_dir",
    "val_fraction": "data.val_fraction",
    "augment": "data.augment",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "accum_steps": "train.accum_steps",
    "label_smoothing": "train.label_smoothing",
    "early_stop": "train.early_stop",
    "precision": "train.precision",
    "device": "train.device",
    "seed": "train.seed",
    "deterministic": "train.deterministic",
    "optimizer": "optim.optimizer",
    "lr": "optim.lr",
    "momentum": "optim.momentum",
    "weight_decay": "optim.weight_decay",
    "scheduler": "optim.scheduler",
    "step_size": "optim.step_size",
    "gamma": "optim.gamma",
    "mode": "dist.mode",
    "nproc": "dist.nproc",
    "backend": "dist.backend",
    "sync_bn": "dist.sync_bn",
    "max_restarts": "dist.max_restarts",
    "nnodes": "dist.nnodes",
    "node_rank": "dist.node_rank",
    "rdzv_endpoint": "dist.rdzv_endpoint",
    "out": "output.dir",
    "name": "output.name",
    "save": "output.save",
}
FLAG_NAMES = {key: "--" + flag.replace("_", "-") for flag, key in TRAIN_FLAGS.items()}
FLAG_NAMES["model.arch"] = "--model"


def fail(message: str, code: int = 2, label: str = "error") -> None:
    """Print a one-paragraph error to stderr and exit with ``code`` (no traceback)."""
    typer.echo(f"distml: {label}: {message}", err=True)
    raise typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn DistmlError into a message and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DistmlError as exc:
            fail(str(exc), exc.exit_code, exc.label)
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
MODEL, DATA, OPTIM, TRAIN, DIST, OUT = (
    "Model",
    "Data",
    "Optimisation",
    "Training",
    "Distributed",
    "Output",
)


@app.command()
@user_errors
def train(
    config: Annotated[
        Path | None, Opt(help="Settings file (TOML, YAML or JSON); flags override it.")
    ] = None,
    set_: Annotated[
        list[str] | None,
        Opt("--set", help="dotted.key=value, reaches any setting; repeatable; wins over flags."),
    ] = None,
    model: Annotated[
        Literal["cnn", "vgg16"] | None, Opt(help="Architecture.", rich_help_panel=MODEL)
    ] = None,
    width: Annotated[
        float | None, Opt(help="Channel multiplier (1.0 = standard widths).", rich_help_panel=MODEL)
    ] = None,
    depth: Annotated[
        int | None, Opt(help="cnn: conv blocks (8 = ResNet-9).", rich_help_panel=MODEL)
    ] = None,
    norm: Annotated[
        Literal["batch", "group", "layer", "instance", "none"] | None, Opt(rich_help_panel=MODEL)
    ] = None,
    dropout: Annotated[
        float | None, Opt(help="Dropout before the classifier layers.", rich_help_panel=MODEL)
    ] = None,
    init: Annotated[
        Path | None,
        Opt(
            help="Start from this checkpoint's weights (architecture from it).",
            rich_help_panel=MODEL,
        ),
    ] = None,
    freeze_features: Annotated[
        bool | None,
        Opt(
            "--freeze-features/--no-freeze-features",
            help="With --init: freeze the features, train a new classifier head.",
            rich_help_panel=MODEL,
        ),
    ] = None,
    dataset: Annotated[
        str | None,
        Opt(
            help="cifar10, synthetic, or a distml .safetensors dataset file.", rich_help_panel=DATA
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        Opt(help="Dataset download/cache folder (default: data).", rich_help_panel=DATA),
    ] = None,
    val_fraction: Annotated[
        float | None,
        Opt(help="Class-balanced validation fraction (default 0.1).", rich_help_panel=DATA),
    ] = None,
    augment: Annotated[
        bool | None, Opt("--augment/--no-augment", help="Random crop + flip.", rich_help_panel=DATA)
    ] = None,
    epochs: Annotated[int | None, Opt(rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[
        int | None,
        Opt(
            help="Effective batch per optimizer step (all ranks, all micro-steps).",
            rich_help_panel=TRAIN,
        ),
    ] = None,
    accum_steps: Annotated[
        int | None, Opt(help="Micro-batches accumulated per step.", rich_help_panel=TRAIN)
    ] = None,
    label_smoothing: Annotated[float | None, Opt(rich_help_panel=TRAIN)] = None,
    early_stop: Annotated[
        int | None,
        Opt(
            metavar="PATIENCE",
            help="Stop after PATIENCE epochs without a better val accuracy.",
            rich_help_panel=TRAIN,
        ),
    ] = None,
    precision: Annotated[
        Literal["32", "16-mixed", "bf16-mixed"] | None, Opt(rich_help_panel=TRAIN)
    ] = None,
    amp: Annotated[
        bool,
        Opt(
            "--amp",
            help="Shorthand for --precision 16-mixed (fp16 + GradScaler).",
            rich_help_panel=TRAIN,
        ),
    ] = False,
    device: Annotated[Literal["auto", "cuda", "cpu"] | None, Opt(rich_help_panel=TRAIN)] = None,
    seed: Annotated[int | None, Opt(rich_help_panel=TRAIN)] = None,
    deterministic: Annotated[
        bool | None,
        Opt(
            "--deterministic/--no-deterministic",
            help="Reproducible kernels (slower).",
            rich_help_panel=TRAIN,
        ),
    ] = None,
    optimizer: Annotated[
        Literal["sgd", "adam", "adamw", "rmsprop"] | None, Opt(rich_help_panel=OPTIM)
    ] = None,
    lr: Annotated[float | None, Opt(help="Peak learning rate.", rich_help_panel=OPTIM)] = None,
    momentum: Annotated[
        float | None, Opt(help="SGD/RMSprop momentum; Adam beta1.", rich_help_panel=OPTIM)
    ] = None,
    weight_decay: Annotated[float | None, Opt(rich_help_panel=OPTIM)] = None,
    scheduler: Annotated[
        Literal["step", "cosine", "onecycle", "none"] | None, Opt(rich_help_panel=OPTIM)
    ] = None,
    step_size: Annotated[
        int | None, Opt(help="step scheduler: epochs between decays.", rich_help_panel=OPTIM)
    ] = None,
    gamma: Annotated[
        float | None, Opt(help="step scheduler: decay factor.", rich_help_panel=OPTIM)
    ] = None,
    mode: Annotated[
        Literal["single", "dp", "ddp"] | None,
        Opt(help="single device, nn.DataParallel (legacy), or DDP.", rich_help_panel=DIST),
    ] = None,
    nproc: Annotated[
        int | None,
        Opt(
            help="DDP ranks on this node (default: every visible GPU; 2 on CPU).",
            rich_help_panel=DIST,
        ),
    ] = None,
    backend: Annotated[
        Literal["nccl", "gloo"] | None,
        Opt(help="Default: nccl on CUDA, gloo on CPU.", rich_help_panel=DIST),
    ] = None,
    sync_bn: Annotated[
        bool | None, Opt("--sync-bn/--no-sync-bn", help="DDP: SyncBatchNorm.", rich_help_panel=DIST)
    ] = None,
    max_restarts: Annotated[
        int | None, Opt(help="DDP: elastic restarts after a rank failure.", rich_help_panel=DIST)
    ] = None,
    nnodes: Annotated[
        int | None, Opt(help="Nodes in the job (multi-node DDP).", rich_help_panel=DIST)
    ] = None,
    node_rank: Annotated[
        int | None, Opt(help="This node's rank (multi-node DDP).", rich_help_panel=DIST)
    ] = None,
    rdzv_endpoint: Annotated[
        str | None, Opt(help="host:port of node 0 (multi-node DDP).", rich_help_panel=DIST)
    ] = None,
    out: Annotated[
        Path | None,
        Opt(help="Run directory (default: artifacts/runs/NAME).", rich_help_panel=OUT),
    ] = None,
    name: Annotated[
        str | None, Opt(help="Run name under artifacts/runs.", rich_help_panel=OUT)
    ] = None,
    save: Annotated[
        Path | None, Opt(help="Also write the best checkpoint to this path.", rich_help_panel=OUT)
    ] = None,
    json_: Annotated[
        bool,
        Opt(
            "--json",
            help="Print the summary as one JSON object (last line of stdout).",
            rich_help_panel=OUT,
        ),
    ] = False,
    quiet: Annotated[
        bool, Opt("--quiet", "-q", help="No progress output.", rich_help_panel=OUT)
    ] = False,
    resume: Annotated[
        Path | None,
        Opt(
            metavar="RUN_DIR",
            help="Continue a stopped run from its saved state, with the settings in its "
            "config.json (no other settings flags).",
            rich_help_panel=OUT,
        ),
    ] = None,
) -> None:
    """Train a classifier (single device, DataParallel or DDP).

    Writes config.json, metrics.csv, curves.png, summary.json and best/last checkpoints into
    the run directory (artifacts/runs/NAME)."""
    from distml.config import TrainConfig, resolve_settings

    values = locals()
    flags = {TRAIN_FLAGS[name]: values[name] for name in TRAIN_FLAGS}
    if resume is not None:
        given = [FLAG_NAMES[k] for k, v in flags.items() if v is not None]
        given += ["--config"] * bool(config) + ["--set"] * bool(set_) + ["--amp"] * amp
        if given:
            fail(
                "--resume continues a run with the settings in its config.json; drop "
                f"{', '.join(given)} (or start a new run without --resume)."
            )
        from distml.train import resume_run

        emit(resume_run(resume, show_progress=not quiet), json_, train_report)
        return
    if amp:
        if precision not in (None, "16-mixed"):
            fail(f"--amp means --precision 16-mixed, but --precision {precision} was given too.")
        flags["train.precision"] = "16-mixed"
    settings = resolve_settings(TrainConfig, config, flags, set_, FLAG_NAMES)

    from distml.train import train as run_training

    summary = run_training(settings, show_progress=not quiet)
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


@app.command("eval")
@user_errors
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="A distml .safetensors checkpoint.")],
    dataset: Annotated[
        str | None, Opt(help="Default: the dataset the checkpoint was trained on.")
    ] = None,
    data_dir: Annotated[Path | None, Opt(help="Default: the checkpoint's data folder.")] = None,
    split: Annotated[Literal["test", "val", "train"], Opt()] = "test",
    device: Annotated[Literal["auto", "cuda", "cpu"], Opt()] = "auto",
    batch_size: Annotated[
        int | None, Opt(help="Default: the checkpoint's eval batch size.")
    ] = None,
    out: Annotated[Path | None, Opt(help="Folder for eval.json and confusion.png.")] = None,
    json_: Annotated[bool, Opt("--json", help="Print the result as one JSON object.")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q")] = False,
) -> None:
    """Accuracy, loss, per-class accuracy and a confusion matrix of a checkpoint."""
    from distml.config import EvalSettings, validate_settings
    from distml.evaluate import evaluate_checkpoint

    settings = validate_settings(
        EvalSettings,
        {
            "checkpoint": checkpoint,
            "dataset": dataset,
            "data_dir": data_dir,
            "split": split,
            "device": device,
            "batch_size": batch_size,
            "out": out,
        },
        {"batch_size": "--batch-size", "dataset": "--dataset"},
    )
    result = evaluate_checkpoint(settings, show_progress=not quiet)
    emit(result, json_, eval_report)


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

SI_FLAG_NAMES = {
    "fraction": "--fraction",
    "splits": "--splits",
    "batch_size": "--batch-size",
    "dataset": "--dataset",
    "tolerance": "--tolerance",
    "max_features": "--max-features",
    "head.epochs": "--head-epochs",
    "head.lr": "--lr",
    "head.batch_size": "--head-batch-size",
    "layer_tolerance": "--layer-tolerance",
    "feature_tolerance": "--feature-tolerance",
}
SI, HEAD = "Separation Index", "New classifier head"

CheckpointArg = Annotated[Path, typer.Argument(help="A distml .safetensors checkpoint.")]
DatasetOpt = Annotated[str | None, Opt(help="Default: the dataset the checkpoint was trained on.")]
DataDirOpt = Annotated[Path | None, Opt(help="Default: the checkpoint's data folder.")]
FractionOpt = Annotated[
    float,
    Opt(help="Class-balanced fraction of each split measured, in (0, 1].", rich_help_panel=SI),
]
DeviceOpt = Annotated[Literal["auto", "cuda", "cpu"], Opt()]
BatchOpt = Annotated[
    int | None, Opt(help="Images per forward pass (default: the checkpoint's eval batch).")
]
CriterionOpt = Annotated[
    Literal["si", "center-si"], Opt(help="Index the decisions use.", rich_help_panel=SI)
]
ToleranceOpt = Annotated[
    float,
    Opt(
        help="Keep the shortest prefix whose index is within this of the best (index units).",
        rich_help_panel=SI,
    ),
]
HeadEpochsOpt = Annotated[
    int,
    Opt(
        help="Train the rebuilt classifier this many epochs on frozen features (0: don't).",
        rich_help_panel=HEAD,
    ),
]
HeadLrOpt = Annotated[float, Opt(help="Head training learning rate.", rich_help_panel=HEAD)]
HeadBatchOpt = Annotated[
    int | None, Opt(help="Head training batch (default: the run's).", rich_help_panel=HEAD)
]
HeadSchedulerOpt = Annotated[
    Literal["step", "cosine", "onecycle", "none"], Opt(rich_help_panel=HEAD)
]
ModeOpt = Annotated[
    Literal["single", "dp", "ddp"], Opt(help="Head training mode.", rich_help_panel=HEAD)
]
SaveOpt = Annotated[
    Path | None,
    Opt(help="Also write the final model here (the head-trained one with --head-epochs)."),
]
JsonOpt = Annotated[bool, Opt("--json", help="Print the result as one JSON object.")]
QuietOpt = Annotated[bool, Opt("--quiet", "-q", help="No progress output.")]


# the head-training flags of prune/select-features -> keys of their `head` section
HEAD_FLAGS = {
    "head_epochs": "epochs",
    "lr": "lr",
    "head_batch_size": "batch_size",
    "scheduler": "scheduler",
    "mode": "mode",
}


def compression_settings(model: type[M], arguments: dict[str, Any]) -> M:
    """Validated prune / select-features settings from a command's arguments, the
    head-training flags gathered into the ``head`` section."""
    from distml.config import validate_settings

    values = {k: v for k, v in arguments.items() if k in model.model_fields}
    values["head"] = {key: arguments[flag] for flag, key in HEAD_FLAGS.items()}
    return validate_settings(model, values, SI_FLAG_NAMES)


@app.command("si")
@user_errors
def si_command(
    checkpoint: CheckpointArg,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    fraction: FractionOpt = 0.1,
    splits: Annotated[
        str, Opt(help="Comma-separated splits to measure: train, val, test.", rich_help_panel=SI)
    ] = "train,test",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    out: Annotated[Path | None, Opt(help="Folder for si.json and si.png.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Separation Index and Center SI of every feature layer, train and test.

    Measured on class-balanced subsets of each split; writes si.json and si.png (default
    folder: CHECKPOINT-si beside the checkpoint)."""
    from distml.config import SiSettings, validate_settings
    from distml.taps import measure_layers

    values = {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "data_dir": data_dir,
        "fraction": fraction,
        "splits": [s.strip() for s in splits.split(",") if s.strip()],
        "device": device,
        "batch_size": batch_size,
        "out": out,
    }
    settings = validate_settings(SiSettings, values, SI_FLAG_NAMES)
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


@app.command("prune")
@user_errors
def prune_command(
    checkpoint: CheckpointArg,
    criterion: CriterionOpt = "si",
    tolerance: ToleranceOpt = 0.01,
    fraction: FractionOpt = 0.1,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    head_epochs: HeadEpochsOpt = 0,
    lr: HeadLrOpt = 0.01,
    head_batch_size: HeadBatchOpt = None,
    scheduler: HeadSchedulerOpt = "cosine",
    mode: ModeOpt = "single",
    out: Annotated[Path | None, Opt(help="Result folder (default: CHECKPOINT-prune).")] = None,
    save: SaveOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Cut the tail layers that do not raise the Separation Index; rebuild the classifier.

    The layer curve is measured on the training subset; layers after the shortest prefix
    within --tolerance of the best are cut. Writes pruned.safetensors and prune.json."""
    from distml.compress import prune_checkpoint
    from distml.config import PruneSettings

    settings = compression_settings(PruneSettings, locals())
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


@app.command("select-features")
@user_errors
def select_features_command(
    checkpoint: CheckpointArg,
    layer: Annotated[
        str | None, Opt(help="Feature layer (default: the last one).", rich_help_panel=SI)
    ] = None,
    criterion: CriterionOpt = "si",
    tolerance: ToleranceOpt = 0.01,
    max_features: Annotated[
        int | None,
        Opt(help="Greedy steps (default: every channel of the layer).", rich_help_panel=SI),
    ] = None,
    fraction: FractionOpt = 0.1,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = None,
    head_epochs: HeadEpochsOpt = 0,
    lr: HeadLrOpt = 0.01,
    head_batch_size: HeadBatchOpt = None,
    scheduler: HeadSchedulerOpt = "cosine",
    mode: ModeOpt = "single",
    out: Annotated[
        Path | None, Opt(help="Result folder (default: CHECKPOINT-select-LAYER).")
    ] = None,
    save: SaveOpt = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Select a layer's channels by the Separation Index; remove the others.

    Greedy forward selection on the training subset; the unselected channels are removed from
    the weights and the classifier is rebuilt. Writes selected.safetensors, selection.json and
    selection.png."""
    from distml.compress import select_checkpoint_features
    from distml.config import SelectSettings

    settings = compression_settings(SelectSettings, locals())
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


@app.command("study")
@user_errors
def study_command(
    config: Annotated[Path, Opt(help="Training settings of step 1 (e.g. configs/vgg16.toml).")],
    set_: Annotated[
        list[str] | None,
        Opt("--set", help="dotted.key=value for the step-1 training settings; repeatable."),
    ] = None,
    out: Annotated[Path, Opt(help="Report folder (every step's outputs go inside).")] = Path(
        "artifacts/study"
    ),
    epochs: Annotated[int | None, Opt(help="Step-1 epochs (default: the config's).")] = None,
    dataset: Annotated[str | None, Opt(help="Default: the config's.")] = None,
    data_dir: Annotated[Path | None, Opt(help="Default: the config's.")] = None,
    device: Annotated[Literal["auto", "cuda", "cpu"] | None, Opt()] = None,
    mode: Annotated[
        Literal["single", "dp", "ddp"] | None, Opt(help="Mode of every training run.")
    ] = None,
    head_epochs: Annotated[
        int, Opt(help="Epochs of every new classifier head (steps 2 and 3).")
    ] = 30,
    lr: HeadLrOpt = 0.01,
    fraction: FractionOpt = 0.1,
    criterion: CriterionOpt = "si",
    layer_tolerance: Annotated[float, Opt(help="prune --tolerance.", rich_help_panel=SI)] = 0.01,
    feature_tolerance: Annotated[
        float, Opt(help="select-features --tolerance.", rich_help_panel=SI)
    ] = 0.01,
    layer: Annotated[
        str | None, Opt(help="select-features --layer (default: the last kept).")
    ] = None,
    max_features: Annotated[int | None, Opt(help="select-features --max-features.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """The VGG16 Separation-Index study (Part B) in one command, with one report.

    Train (1), new head on frozen features (2), SI per layer, prune, select features, new
    heads (3), SI per layer of every model (4); writes report.md, report.json and every plot
    into --out."""
    from distml.config import StudySettings, TrainConfig, resolve_settings, validate_settings
    from distml.study import run_study

    flags = {
        "train.epochs": epochs,
        "data.dataset": dataset,
        "data.data_dir": data_dir,
        "train.device": device,
        "dist.mode": mode,
    }
    training = resolve_settings(TrainConfig, config, flags, set_, FLAG_NAMES)
    values = {
        "training": training,
        "out": out,
        "head": {"epochs": head_epochs, "lr": lr, "mode": training.dist.mode},
        "fraction": fraction,
        "criterion": criterion,
        "layer_tolerance": layer_tolerance,
        "feature_tolerance": feature_tolerance,
        "layer": layer,
        "max_features": max_features,
    }
    settings = validate_settings(StudySettings, values, SI_FLAG_NAMES)
    emit(run_study(settings, show_progress=not quiet), json_, study_report)


def study_report(r: dict[str, Any]) -> str:
    lines = [f"{'model':<28}{'parameters':>14}{'test accuracy':>15}"]
    for row in r["models"]:
        acc = "-" if row["test_accuracy"] is None else f"{100 * row['test_accuracy']:.2f}%"
        lines.append(f"{row['name']:<28}{row['parameters']:>14,}{acc:>15}")
    lines.append(f"report: {r['report_md']}")
    return "\n".join(lines)


def main() -> None:
    app()


# ----------------------------------------------------------------------------- bench


def comma_list(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


@app.command("bench")
@user_errors
def bench_command(
    model: Annotated[Literal["cnn", "vgg16"], Opt(help="Architecture.")] = "cnn",
    width: Annotated[
        float | None, Opt(help="Channel multiplier (default: 1.0 on CUDA, 0.125 on the CPU).")
    ] = None,
    depth: Annotated[int, Opt(help="cnn: conv blocks (8 = ResNet-9).")] = 8,
    batch_size: Annotated[
        int | None, Opt(help="Images per step (default: 512 on CUDA, 32 on the CPU).")
    ] = None,
    steps: Annotated[int, Opt(help="Timed training steps per line.")] = 50,
    warmup: Annotated[int, Opt(help="Untimed steps before them.")] = 10,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str | None,
        Opt(
            help="Precisions of the distml ladder, comma-separated from 32, bf16-mixed, "
            "16-mixed (default: bf16-mixed,16-mixed on CUDA, 32 on the CPU)."
        ),
    ] = None,
    pipelines: Annotated[str, Opt(help="classic, distml, or both.")] = "classic,distml",
    compile_: Annotated[
        bool, Opt("--compile", help="Add a torch.compile line to the ladder.")
    ] = False,
    dataset: Annotated[str, Opt(help="synthetic, cifar10 or a .safetensors file.")] = "synthetic",
    data_dir: Annotated[Path, Opt(help="Dataset cache folder.")] = Path("data"),
    images: Annotated[int, Opt(help="Synthetic training images.")] = 20_000,
    workers: Annotated[
        int | None, Opt(help="Classic DataLoader workers (default: min(8, cores)).")
    ] = None,
    out: Annotated[Path, Opt(help="Folder for bench.json, bench.csv, bench.png.")] = Path(
        "artifacts/bench"
    ),
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Training images/s of distml's data path, setting by setting, against the classic
    tutorial pipeline (DataLoader of PIL images, fp32), on the same model and batch."""
    from distml.bench import run_bench
    from distml.config import BenchSettings, validate_settings

    values = {
        "model": model,
        "width": width,
        "depth": depth,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "device": device,
        "precisions": comma_list(precision),
        "pipelines": comma_list(pipelines),
        "compile": compile_,
        "dataset": dataset,
        "data_dir": data_dir,
        "images": images,
        "workers": workers,
        "out": out,
    }
    names = {key: "--" + key.replace("_", "-") for key in values}
    names |= {"precisions": "--precision", "compile": "--compile"}
    settings = validate_settings(BenchSettings, values, names)
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
