"""Validated settings for every command.

Sources, later wins: defaults < ``--config FILE`` (TOML, YAML or JSON) < flags < ``--set
dotted.key=value``. Every model forbids unknown keys, so a typo is an error, not a silent
default. The resolved settings of a run are written to ``<run>/config.json`` and can be
fed back with ``--config`` to repeat it.
"""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from distml.errors import SettingsError

Arch = Literal["cnn", "vgg16"]
Norm = Literal["batch", "group", "layer", "instance", "none"]
Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Scheduler = Literal["step", "cosine", "onecycle", "none"]
Precision = Literal["32", "16-mixed", "bf16-mixed"]
DeviceChoice = Literal["auto", "cuda", "cpu"]
Mode = Literal["single", "dp", "ddp"]
Backend = Literal["nccl", "gloo"]

BUILTIN_DATASETS = ("cifar10", "synthetic")
M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(Section):
    arch: Arch = Field("cnn", description="cnn (ResNet-9 family) or vgg16 (CIFAR variant)")
    width: float = Field(1.0, gt=0, le=16, description="channel multiplier; 1.0 = standard")
    depth: int = Field(8, ge=1, le=64, description="conv blocks of the cnn (8 = ResNet-9)")
    norm: Norm = "batch"
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout before each classifier layer")
    head_hidden: list[int] = Field(
        default_factory=list, description="hidden sizes of the classifier (vgg16: [] = 512->10)"
    )
    init: Path | None = Field(None, description="start from this checkpoint's weights")
    freeze_features: bool = Field(
        False, description="with init: freeze the feature extractor, train a new classifier"
    )

    @model_validator(mode="after")
    def _freeze_needs_init(self) -> ModelSettings:
        if self.freeze_features and self.init is None:
            raise ValueError("freeze_features needs init: a checkpoint to take the features from")
        if any(h <= 0 for h in self.head_hidden):
            raise ValueError("head_hidden sizes must be positive")
        return self


class DataSettings(Section):
    dataset: str = Field(
        "cifar10", description="cifar10, synthetic, or the path of a distml .safetensors dataset"
    )
    data_dir: Path = Field(Path("data"), description="where datasets are downloaded and cached")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="class-balanced validation split")
    augment: bool = Field(True, description="random crop (4 px padding) and horizontal flip")
    synthetic_train_size: int = Field(5000, ge=20, description="synthetic training images")
    synthetic_test_size: int = Field(1000, ge=10, description="synthetic test images")

    @model_validator(mode="after")
    def _dataset_name(self) -> DataSettings:
        if self.dataset not in BUILTIN_DATASETS and not self.dataset.endswith(".safetensors"):
            raise ValueError(
                f"dataset must be one of {', '.join(BUILTIN_DATASETS)} or a path ending in "
                f".safetensors, got {self.dataset!r}"
            )
        return self


class OptimSettings(Section):
    optimizer: Optimizer = "sgd"
    lr: float = Field(0.4, gt=0, le=100)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/RMSprop momentum; Adam beta1")
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0, lt=1)
    scheduler: Scheduler = "onecycle"
    step_size: int = Field(30, ge=1, description="step scheduler: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="step scheduler: decay factor")
    warmup_fraction: float = Field(
        0.2, ge=0, lt=1, description="onecycle: fraction of the steps spent warming up"
    )

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimSettings:
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0 (set nesterov to false or momentum > 0)")
        return self


class TrainSettings(Section):
    epochs: int = Field(24, ge=1, le=100_000)
    batch_size: int = Field(
        512, ge=1, description="effective batch per optimizer step, over all ranks and micro-steps"
    )
    accum_steps: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    eval_batch_size: int = Field(1024, ge=1)
    label_smoothing: float = Field(0.2, ge=0, lt=1)
    early_stop: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val accuracy"
    )
    precision: Precision = "32"
    device: DeviceChoice = "auto"
    seed: int = Field(0, ge=0)
    deterministic: bool = False
    channels_last: bool = Field(True, description="NHWC memory layout on CUDA (faster convs)")
    compile: bool = Field(False, description="torch.compile the model")
    nonfinite_patience: int = Field(
        20, ge=1, description="stop after this many consecutive non-finite losses"
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSettings:
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by accum_steps "
                f"{self.accum_steps}: each micro-batch is batch_size / accum_steps"
            )
        return self


class DistSettings(Section):
    mode: Mode = Field("single", description="single, dp (nn.DataParallel) or ddp")
    nproc: int | None = Field(None, ge=1, description="ddp ranks per node (default: every GPU)")
    backend: Backend | None = Field(None, description="default: nccl on CUDA, gloo on CPU")
    sync_bn: bool = Field(False, description="ddp: synchronise BatchNorm statistics")
    max_restarts: int = Field(0, ge=0, description="ddp: elastic restarts after a rank failure")
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (multi-node)")
    timeout_seconds: int = Field(600, ge=10, description="collective timeout before a rank fails")

    @model_validator(mode="after")
    def _nodes(self) -> DistSettings:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint (host:port of node 0)")
        return self


class OutputSettings(Section):
    root: Path = Field(Path("artifacts/runs"), description="parent of automatically named runs")
    dir: Path | None = Field(None, description="the run directory (default: root/<name>)")
    name: str | None = Field(None, description="run name (default: <arch>-<mode>-<time>)")
    save: Path | None = Field(None, description="also write the best checkpoint here")


class TrainConfig(Section):
    """Everything ``distml train`` needs; written to ``<run>/config.json``."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    dist: DistSettings = Field(default_factory=DistSettings)
    output: OutputSettings = Field(default_factory=OutputSettings)

    @model_validator(mode="after")
    def _cross_section(self) -> TrainConfig:
        if self.train.early_stop is not None and self.data.val_fraction == 0:
            raise ValueError("early_stop needs a validation set: set val_fraction above 0")
        if self.dist.backend == "nccl" and self.train.device == "cpu":
            raise ValueError("the nccl backend needs CUDA devices; use backend gloo on the CPU")
        return self


class EvalSettings(Section):
    """``distml eval``: which checkpoint, on which data; unset data = the checkpoint's own."""

    checkpoint: Path
    dataset: str | None = None
    data_dir: Path | None = None
    split: Literal["test", "val", "train"] = "test"
    device: DeviceChoice = "auto"
    batch_size: int | None = Field(None, ge=1)
    out: Path | None = None


# ----------------------------------------------------------------------------- sources


def read_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON settings file into a nested dict."""
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist (or is not a file).")
    text = path.read_text(encoding="utf-8", errors="replace")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise SettingsError(
                f"config file {path} has an unknown type {suffix!r}: use .toml, .yaml/.yml "
                "or .json."
            )
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SettingsError(f"config file {path} cannot be parsed: {first_line}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table/mapping of settings at the top.")
    return data


def parse_assignment(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value); the value is read as JSON when it parses, else a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(f"--set expects dotted.key=value, got {text!r}.")
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``dotted = "a.b"``, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise SettingsError(f"cannot set {dotted}: {where} is a value, not a table.")
        node = child
    node[leaf] = value


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key a settings model accepts (used for 'did you mean' hints)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def format_validation_error(
    exc: ValidationError, model: type[BaseModel], flag_names: dict[str, str] | None = None
) -> str:
    """One line per bad field: the dotted key (and its flag), what is wrong, what was given."""
    flag_names = flag_names or {}
    keys = known_keys(model)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        flag = flag_names.get(loc)
        where = f"{loc} ({flag})" if flag else (loc or "settings")
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, keys, n=1, cutoff=0.6)
            message = "unknown setting" + (f"; did you mean {close[0]}?" if close else "")
        elif err["type"] not in ("value_error", "assertion_error") and "input" in err:
            message += f" (got {err['input']!r})"
        lines.append(f"  - {where}: {message}")
    return "invalid settings:\n" + "\n".join(lines)


def resolve_settings(
    model: type[M],
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    assignments: list[str] | None = None,
    flag_names: dict[str, str] | None = None,
) -> M:
    """Merge defaults < config file < flags < ``--set`` assignments and validate."""
    tree: dict[str, Any] = read_config_file(config_file) if config_file else {}
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    for text in assignments or []:
        set_dotted(tree, *parse_assignment(text))
    return validate_settings(model, tree, flag_names)


def validate_settings(
    model: type[M], values: dict[str, Any], flag_names: dict[str, str] | None = None
) -> M:
    """``model.model_validate(values)``, with a SettingsError that names every bad field."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise SettingsError(format_validation_error(exc, model, flag_names)) from None


# ----------------------------------------------------------------------------- SI study
# Settings of `distml si`, `prune`, `select-features` and `study` (distml/taps.py,
# distml/compress.py, distml/study.py). Unset data fields mean "the checkpoint's own".

Criterion = Literal["si", "center-si"]
SplitName = Literal["train", "val", "test"]


class LayerTapSettings(Section):
    """What every per-layer SI command needs: a checkpoint, its data and the subset."""

    checkpoint: Path
    dataset: str | None = Field(None, description="default: the checkpoint's dataset")
    data_dir: Path | None = Field(None, description="default: the checkpoint's data folder")
    fraction: float = Field(
        0.1, gt=0, le=1, description="class-balanced fraction of each split that is measured"
    )
    device: DeviceChoice = "auto"
    batch_size: int | None = Field(
        None, ge=1, description="images per forward pass (default: the checkpoint's eval batch)"
    )
    out: Path | None = Field(None, description="output folder (default: beside the checkpoint)")


class SiSettings(LayerTapSettings):
    """``distml si``: SI and Center SI of every feature layer, per split."""

    splits: list[SplitName] = Field(default_factory=lambda: ["train", "test"], min_length=1)

    @model_validator(mode="after")
    def _unique_splits(self) -> SiSettings:
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must not repeat a split, got {','.join(self.splits)}")
        return self


class HeadSettings(Section):
    """Training of a rebuilt classifier head on frozen features (the ``--head-*`` flags)."""

    epochs: int = Field(0, ge=0, le=100_000, description="0 = do not train the new head")
    lr: float = Field(0.01, gt=0, le=100)
    batch_size: int | None = Field(None, ge=1, description="default: the checkpoint's run")
    scheduler: Scheduler = "cosine"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mode: Mode = "single"


class PruneSettings(LayerTapSettings):
    """``distml prune``: cut the tail layers whose index does not rise by more than tolerance."""

    criterion: Criterion = "si"
    tolerance: float = Field(0.01, ge=0, le=1, description="index units (a fraction of samples)")
    save: Path | None = Field(None, description="also write the compressed checkpoint here")
    head: HeadSettings = Field(default_factory=HeadSettings)


class SelectSettings(PruneSettings):
    """``distml select-features``: greedy channel selection in one layer, then slicing."""

    layer: str | None = Field(None, description="default: the last feature layer")
    max_features: int | None = Field(None, ge=1, description="greedy steps (default: all)")


class StudySettings(Section):
    """``distml study``: Part B steps 1-4 from one training config, into one report folder."""

    training: TrainConfig
    out: Path = Path("artifacts/study")
    head: HeadSettings = Field(default_factory=lambda: HeadSettings(epochs=30))
    fraction: float = Field(0.1, gt=0, le=1)
    criterion: Criterion = "si"
    layer_tolerance: float = Field(0.01, ge=0, le=1)
    feature_tolerance: float = Field(0.01, ge=0, le=1)
    layer: str | None = None
    max_features: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _head_trains(self) -> StudySettings:
        if self.head.epochs < 1:
            raise ValueError("the study trains new heads: head.epochs (--head-epochs) must be >= 1")
        return self


# ----------------------------------------------------------------------------- bench
# Settings of `distml bench` (distml/bench.py). Unset width/batch/precisions get
# device-dependent defaults there: full size on a GPU, a small model on the CPU.

BenchPipeline = Literal["classic", "distml"]


class BenchSettings(Section):
    """``distml bench``: training throughput of distml's data path against the classic one."""

    model: Arch = "cnn"
    width: float | None = Field(None, gt=0, le=16, description="default: 1.0 on CUDA, 0.125 on CPU")
    depth: int = Field(8, ge=1, le=64, description="conv blocks of the cnn")
    batch_size: int | None = Field(None, ge=1, description="default: 512 on CUDA, 32 on CPU")
    steps: int = Field(50, ge=1, description="timed training steps per line")
    warmup: int = Field(10, ge=0, description="untimed steps first (autotuning, allocator)")
    device: DeviceChoice = "auto"
    precisions: list[Literal["32", "16-mixed", "bf16-mixed"]] | None = Field(
        None,
        description="precisions of the distml ladder (default: bf16 and fp16 on CUDA, fp32 on CPU)",
    )
    pipelines: list[BenchPipeline] = Field(
        default_factory=lambda: ["classic", "distml"], min_length=1
    )
    compile: bool = Field(False, description="add a torch.compile line to the ladder")
    dataset: str = Field("synthetic", description="synthetic, cifar10 or a .safetensors dataset")
    data_dir: Path = Path("data")
    images: int = Field(20_000, ge=20, description="synthetic training images")
    workers: int | None = Field(
        None, ge=0, description="classic DataLoader workers (default: min(8, cores))"
    )
    seed: int = Field(0, ge=0)
    out: Path = Field(
        Path("artifacts/bench"), description="folder for bench.json, bench.csv, bench.png"
    )

    @model_validator(mode="after")
    def _unique_lists(self) -> BenchSettings:
        for name, values in (("pipelines", self.pipelines), ("precisions", self.precisions or [])):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {','.join(values)}")
        return self
