"""Validated settings for every command.

Sources, later wins: defaults < ``--config FILE`` (TOML, YAML or JSON) < flags < ``--set
dotted.key=value``. Every model forbids unknown keys, so a typo is an error, not a silent
default. The resolved settings of a run are written to ``<run>/config.json`` and can be
fed back with ``--config`` to repeat it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from distml.choices import (
    Activation,
    Arch,
    Backend,
    Criterion,
    DeviceChoice,
    Mode,
    Norm,
    Optimizer,
    Pool,
    Precision,
    Scheduler,
    SplitName,
)
from distml.errors import SettingsError

BUILTIN_DATASETS = ("cifar10", "synthetic")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, values are re-validated."""

    # nan passes every bound check as "not comparable" and inf is never a usable setting
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelSettings(Section):
    arch: Arch = Field("cnn", description="cnn (ResNet-9 family) or vgg16 (CIFAR variant)")
    width: float = Field(1.0, gt=0, le=16, description="channel multiplier; 1.0 = standard")
    depth: int = Field(8, ge=1, le=64, description="conv blocks of the cnn (8 = ResNet-9)")
    norm: Norm = Field("batch", description="normalisation layer after each convolution")
    pool: Pool = Field(
        "max",
        description="pooling: max or avg, for every 2x2 downsampling and the cnn's global pool",
    )
    activation: Activation = Field(
        "relu",
        description="nonlinearity after every conv and hidden classifier layer: relu, gelu, "
        "silu or leaky_relu (slope 0.01)",
    )
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
    optimizer: Optimizer = Field("sgd", description="optimizer")
    lr: float = Field(0.4, gt=0, le=100, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD/RMSprop momentum; Adam beta1")
    nesterov: bool = Field(True, description="SGD: Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, lt=1, description="L2 weight decay")
    scheduler: Scheduler = Field("onecycle", description="learning-rate schedule")
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


def check_batch_split(
    batch_size: int, world_size: int, accum_steps: int, error: type[Exception]
) -> None:
    """The batch rule: every optimizer step's batch splits evenly over the ranks and their
    micro-steps. Raises ``error`` (ValueError inside a settings validator, DistmlError once
    the rank count is known)."""
    divisor = world_size * accum_steps
    if batch_size % divisor:
        raise error(
            f"batch size {batch_size} cannot be split evenly over {world_size} rank(s) x "
            f"{accum_steps} micro-step(s): it is not divisible by accum_steps x ranks = "
            f"{divisor}. --batch-size is the effective batch per optimizer step; choose a "
            f"multiple of {divisor}."
        )


def check_backend_device(backend: str | None, device: str, error: type[Exception]) -> None:
    """NCCL runs on CUDA GPUs only. ``device``: the setting or the resolved device type."""
    if backend == "nccl" and device == "cpu":
        raise error(
            "the nccl backend needs CUDA GPUs, but this run is on the CPU. Use --backend gloo "
            "(the default on CPU) or run on GPUs."
        )


class TrainSettings(Section):
    epochs: int = Field(24, ge=1, le=100_000, description="training epochs")
    batch_size: int = Field(
        512, ge=1, description="effective batch per optimizer step, over all ranks and micro-steps"
    )
    accum_steps: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    eval_batch_size: int = Field(1024, ge=1, description="images per evaluation batch")
    label_smoothing: float = Field(0.2, ge=0, lt=1, description="cross-entropy label smoothing")
    early_stop: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better val accuracy"
    )
    precision: Precision = Field(
        "32", description="32-bit, fp16 with a GradScaler, or bf16 autocast"
    )
    device: DeviceChoice = Field("auto", description="auto: CUDA when available")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of weights, split and data order")
    deterministic: bool = Field(False, description="reproducible kernels (slower)")
    channels_last: bool = Field(True, description="NHWC memory layout on CUDA (faster convs)")
    compile: bool = Field(False, description="torch.compile the model")
    nonfinite_patience: int = Field(
        20, ge=1, description="stop after this many consecutive non-finite losses"
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainSettings:
        check_batch_split(self.batch_size, 1, self.accum_steps, ValueError)
        return self


class DistSettings(Section):
    mode: Mode = Field("single", description="one device, nn.DataParallel (legacy) or DDP")
    nproc: int | None = Field(
        None, ge=1, description="ddp ranks per node (default: every GPU; 2 on CPU)"
    )
    backend: Backend | None = Field(None, description="default: nccl on CUDA, gloo on CPU")
    sync_bn: bool = Field(False, description="ddp: synchronise BatchNorm statistics")
    max_restarts: int = Field(0, ge=0, description="ddp: elastic restarts after a rank failure")
    nnodes: int = Field(1, ge=1, description="nodes in the job (multi-node ddp)")
    node_rank: int = Field(0, ge=0, description="this node's rank (multi-node ddp)")
    rdzv_endpoint: str | None = Field(None, description="host:port of the rendezvous (multi-node)")
    timeout_seconds: int = Field(600, ge=10, description="collective timeout before a rank fails")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        host, colon, port = endpoint.rpartition(":")
        if not colon or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(
                f"rdzv_endpoint must be HOST:PORT with a port from 1 to 65535, e.g. "
                f"10.0.0.1:29500, got {endpoint!r}"
            )
        return endpoint

    @model_validator(mode="after")
    def _nodes(self) -> DistSettings:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("several nodes need rdzv_endpoint (host:port of node 0)")
        if self.mode != "ddp":
            given = [name for name in DDP_ONLY if getattr(self, name) != DDP_ONLY[name]]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to mode ddp, but mode is {self.mode}: use "
                    "--mode ddp, or drop them"
                )
        return self


# settings that only a DDP launch reads, with their unset values: given with another mode
# they would be silently ignored, so they are refused
DDP_ONLY: dict[str, Any] = {
    "nproc": None,
    "backend": None,
    "sync_bn": False,
    "max_restarts": 0,
    "nnodes": 1,
    "node_rank": 0,
    "rdzv_endpoint": None,
}


class OutputSettings(Section):
    root: Path = Field(Path("artifacts/runs"), description="parent of automatically named runs")
    dir: Path | None = Field(None, description="the run directory (default: root/<name>)")
    name: str | None = Field(
        None, description="run folder name under root (default: <arch>-<mode>-<time>)"
    )
    save: Path | None = Field(None, description="also write the best checkpoint here")
    overwrite: bool = Field(
        False, description="replace an existing --save file (otherwise it is refused)"
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        if name is not None and (not PLAIN_NAME.fullmatch(name) or name in (".", "..")):
            raise ValueError(
                f"the run name must be a plain folder name (letters, digits, . _ + -, no "
                f"slashes), got {name!r}; use --out for a folder elsewhere"
            )
        return name


class TrainConfig(Section):
    """Everything ``distml train`` needs; written to ``<run>/config.json``."""

    model: ModelSettings = Field(default_factory=ModelSettings, description="the network")
    data: DataSettings = Field(default_factory=DataSettings, description="dataset and split")
    optim: OptimSettings = Field(default_factory=OptimSettings, description="optimizer")
    train: TrainSettings = Field(default_factory=TrainSettings, description="the loop")
    dist: DistSettings = Field(default_factory=DistSettings, description="devices and ranks")
    output: OutputSettings = Field(default_factory=OutputSettings, description="run folder")

    @model_validator(mode="after")
    def _cross_section(self) -> TrainConfig:
        if self.train.early_stop is not None and self.data.val_fraction == 0:
            raise ValueError("early_stop needs a validation set: set val_fraction above 0")
        check_backend_device(self.dist.backend, self.train.device, ValueError)
        return self


class EvalSettings(Section):
    """``distml eval``: which checkpoint, on which data; unset data = the checkpoint's own."""

    checkpoint: Path = Field(description="a distml .safetensors checkpoint")
    dataset: str | None = Field(None, description="default: the checkpoint's dataset")
    data_dir: Path | None = Field(None, description="default: the checkpoint's data folder")
    split: SplitName = Field("test", description="the split to evaluate")
    device: DeviceChoice = Field("auto", description="auto: CUDA when available")
    batch_size: int | None = Field(
        None, ge=1, description="images per batch (default: the checkpoint's eval batch)"
    )
    out: Path | None = Field(
        None, description="folder for eval.json and confusion.png (default: beside the checkpoint)"
    )
    overwrite: bool = Field(
        False, description="replace the results in an existing --out folder (else refused)"
    )


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
        raise SettingsError(f"config file {path} cannot be parsed: {parse_problem(exc)}.") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table/mapping of settings at the top.")
    return data


def parse_problem(exc: Exception) -> str:
    """What a TOML, YAML or JSON parser found wrong, with its line and column (1-based)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (at line {exc.lineno}, column {exc.colno})"
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        problem = exc.problem or exc.context or "syntax error"
        return f"{problem} (at line {mark.line + 1}, column {mark.column + 1})"
    # tomllib puts "(at line L, column C)" into its message itself
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return first_line.rstrip(".")


def parse_assignment(text: str, model: type[BaseModel] | None = None) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", value), the value read for the field's type: a text field
    (str, path, text choice) keeps the text, so ``output.name=2024`` stays "2024"; other
    values are read as JSON when they parse, else kept as text. ``null`` unsets a field."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SettingsError(f"--set expects dotted.key=value, got {text!r}.")
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return key, raw
    field = find_field(model, key) if model is not None else None
    if field is not None and holds_text(field[0].annotation) and value is not None:
        return key, value if isinstance(value, str) else raw
    return key, value


def holds_text(annotation: Any) -> bool:
    """Whether a field of this type takes text: str, Path or a Literal of strings (or None)."""
    if get_origin(annotation) in (Union, UnionType):
        kinds = [arg for arg in get_args(annotation) if arg is not NoneType]
        return bool(kinds) and all(holds_text(kind) for kind in kinds)
    if get_origin(annotation) is Literal:
        return all(isinstance(choice, str) for choice in get_args(annotation))
    return annotation is str or annotation is Path


def find_field(model: type[BaseModel], dotted: str) -> tuple[FieldInfo, Any] | None:
    """The field at ``a.b`` of a settings model and its default (a section's own default
    wins: the study's head trains 30 epochs); None when no such field exists."""
    *sections, leaf = dotted.split(".")
    owner: Any = model
    section_default: BaseModel | None = None
    for name in sections:
        field = owner.model_fields.get(name) if isinstance(owner, type) else None
        if field is None:
            return None
        if section_default is not None:
            value = getattr(section_default, name)
        else:
            value = field.get_default(call_default_factory=True)
        section_default = value if isinstance(value, BaseModel) else None
        owner = type(value) if section_default is not None else field.annotation
        if not (isinstance(owner, type) and issubclass(owner, BaseModel)):
            return None
    field = owner.model_fields.get(leaf)
    if field is None:
        return None
    if section_default is not None:
        return field, getattr(section_default, leaf)
    return field, field.get_default(call_default_factory=True)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``dotted = "a.b"``, creating tables as needed."""
    *parents, leaf = dotted.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parents[: i + 1])
            raise SettingsError(f"cannot set {dotted}: {where} is a single value, not a section.")
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


def known_sections(keys: list[str]) -> list[str]:
    """The dotted names of the sections (tables) that ``keys`` live in."""
    return sorted({key.rsplit(".", 1)[0] for key in keys if "." in key})


def suggest_key(loc: str, keys: list[str]) -> str | None:
    """The known key or section a mistyped ``loc`` most likely meant: the same key name in
    another section (a top-level ``lr`` -> ``optim.lr``), else the closest spelling."""
    leaf = loc.rsplit(".", 1)[-1]
    same_leaf = [key for key in keys if key.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return " or ".join(same_leaf)
    candidates = keys + known_sections(keys)
    close = difflib.get_close_matches(loc, candidates, n=1, cutoff=0.6)
    if close:
        return close[0]
    leaves = {key.rsplit(".", 1)[-1]: key for key in candidates}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


def field_problem(err: ErrorDetails, loc: str, keys: list[str]) -> str:
    """The sentence that says what is wrong with one field, in the settings' own words (no
    internal class names, nan and inf called what they are)."""
    sections = known_sections(keys)
    given = err.get("input")
    if err["type"] == "extra_forbidden":
        close = suggest_key(loc, keys)
        if close is None:
            return "unknown setting"
        kind = "the section " if close in known_sections(keys) else ""
        return f"unknown setting; did you mean {kind}{close}?"
    if loc in sections and not isinstance(given, dict):
        examples = [key for key in keys if key.rsplit(".", 1)[0] == loc][:3]
        return f"this is a section, not a value; set one of its keys, e.g. {' or '.join(examples)}"
    if isinstance(given, dict) and loc in keys:
        return f"this is a single value, not a section; set {loc}=VALUE"
    if isinstance(given, float) and not math.isfinite(given):
        return f"must be a finite number (got {given})"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "assertion_error") and "input" in err:
        message += f" (got {given!r})"
    return message


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
        lines.append(f"  - {where}: {field_problem(err, loc, keys)}")
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
        set_dotted(tree, *parse_assignment(text, model))
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


class LayerTapSettings(Section):
    """What every per-layer SI command needs: a checkpoint, its data and the subset."""

    checkpoint: Path = Field(description="a distml .safetensors checkpoint")
    dataset: str | None = Field(None, description="default: the checkpoint's dataset")
    data_dir: Path | None = Field(None, description="default: the checkpoint's data folder")
    fraction: float = Field(
        0.1, gt=0, le=1, description="class-balanced fraction of each split that is measured"
    )
    device: DeviceChoice = Field("auto", description="auto: CUDA when available")
    batch_size: int | None = Field(
        None, ge=1, description="images per forward pass (default: the checkpoint's eval batch)"
    )
    out: Path | None = Field(None, description="output folder (default: beside the checkpoint)")
    overwrite: bool = Field(
        False, description="replace the results in an existing --out folder (else refused)"
    )


class SiSettings(LayerTapSettings):
    """``distml si``: SI and Center SI of every feature layer, per split."""

    splits: list[SplitName] = Field(
        default_factory=lambda: ["train", "test"], min_length=1, description="splits to measure"
    )

    @model_validator(mode="after")
    def _unique_splits(self) -> SiSettings:
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"splits must not repeat a split, got {','.join(self.splits)}")
        return self


class HeadSettings(Section):
    """Training of a rebuilt classifier head on frozen features (the ``--head-*`` flags)."""

    epochs: int = Field(0, ge=0, le=100_000, description="0 = do not train the new head")
    lr: float = Field(0.01, gt=0, le=100, description="learning rate of the new head")
    batch_size: int | None = Field(
        None, ge=1, description="head training batch (default: the checkpoint's run)"
    )
    scheduler: Scheduler = Field("cosine", description="learning-rate schedule of the new head")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")
    mode: Mode = Field("single", description="how the new head is trained")


class PruneSettings(LayerTapSettings):
    """``distml prune``: cut the tail layers whose index does not rise by more than tolerance."""

    criterion: Criterion = Field("si", description="the index the decisions use")
    tolerance: float = Field(
        0.01,
        ge=0,
        le=1,
        description="keep the shortest prefix within this of the best index (index units)",
    )
    save: Path | None = Field(
        None, description="also write the final model here (the head-trained one, if any)"
    )
    head: HeadSettings = Field(
        default_factory=HeadSettings, description="training of the rebuilt classifier"
    )


class SelectSettings(PruneSettings):
    """``distml select-features``: greedy channel selection in one layer, then slicing."""

    layer: str | None = Field(None, description="feature layer (default: the last one)")
    max_features: int | None = Field(
        None, ge=1, description="greedy steps (default: every channel of the layer)"
    )


class StudySettings(Section):
    """``distml study``: Part B steps 1-4 from one training config, into one report folder."""

    training: TrainConfig = Field(description="the training settings of step 1")
    out: Path = Field(
        Path("artifacts/study"), description="report folder (every step's outputs go inside)"
    )
    head: HeadSettings = Field(
        default_factory=lambda: HeadSettings(epochs=30),
        description="training of every new classifier head (steps 2 and 3)",
    )
    fraction: float = Field(
        0.1, gt=0, le=1, description="class-balanced fraction of each split that is measured"
    )
    criterion: Criterion = Field("si", description="the index the decisions use")
    layer_tolerance: float = Field(0.01, ge=0, le=1, description="prune's tolerance")
    feature_tolerance: float = Field(0.01, ge=0, le=1, description="select-features' tolerance")
    layer: str | None = Field(
        None, description="select-features' layer (default: the last kept one)"
    )
    max_features: int | None = Field(
        None, ge=1, description="select-features' greedy steps (default: every channel)"
    )

    @model_validator(mode="after")
    def _head_trains(self) -> StudySettings:
        if self.head.epochs < 1:
            raise ValueError("the study trains new heads: head.epochs (--head-epochs) must be >= 1")
        return self


# ----------------------------------------------------------------------------- compare-backends
# Settings of `distml compare-backends` (distml/comm.py).

CollectiveOp = Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast"]
CollectiveDtype = Literal["float32", "float64", "float16", "bfloat16"]
COLLECTIVE_OPS: tuple[str, ...] = get_args(CollectiveOp)
# binary units as nccl-tests prints them; KB/MB/GB are decimal (1e3), as disks count
SIZE_UNITS = {
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def parse_size(text: str) -> int:
    """``"4KiB"`` -> 4096 bytes; a bare number is bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() or "b" if match else ""
    nbytes = float(match.group(1)) * SIZE_UNITS[unit] if unit in SIZE_UNITS else 0.0
    if not match or nbytes < 1 or nbytes != int(nbytes):
        raise ValueError(
            f"size {text!r} does not parse: give a positive whole number of bytes with a unit "
            "B, KiB, MiB, GiB (powers of 1024) or KB, MB, GB (powers of 1000), e.g. 4KiB"
        )
    return int(nbytes)


def parse_sizes(text: str) -> list[int]:
    """``"4KiB..256MiB"`` (doubling from the first to at most the last, as nccl-tests' -f 2)
    or a comma list ``"1KiB,1MiB"``; both in bytes."""
    if ".." in text:
        first_text, _, last_text = text.partition("..")
        first, last = parse_size(first_text), parse_size(last_text)
        if first > last:
            raise ValueError(f"size range {text!r} runs backwards: the first size must be smaller")
        sizes = [first]
        while sizes[-1] * 2 <= last:
            sizes.append(sizes[-1] * 2)
        return sizes
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError("sizes is empty: give a range like 4KiB..256MiB or a list like 1KiB,1MiB")
    return sorted(set(sizes))


class CompareBackendsSettings(Section):
    """``distml compare-backends``: collective bandwidth per backend, op and size, and
    optionally the same short DDP training once per backend."""

    backends: list[Backend] = Field(
        default_factory=lambda: ["nccl", "gloo"], min_length=1, description="backends to measure"
    )
    nproc: int | None = Field(None, ge=1, description="ranks (default: every GPU; 2 on CPU)")
    ops: list[CollectiveOp] = Field(
        default_factory=lambda: list(COLLECTIVE_OPS), min_length=1, description="collectives"
    )
    sizes: list[int] = Field(
        default_factory=lambda: parse_sizes("4KiB..256MiB"),
        min_length=1,
        description="message sizes: a doubling range FIRST..LAST or a comma list; units B, "
        "KiB, MiB, GiB (1024) or KB, MB, GB (1000); as nccl-tests counts them: all_gather's is "
        "the gathered output, reduce_scatter's its input",
        json_schema_extra={"shown_default": "4KiB..256MiB"},
    )
    iters: int = Field(20, ge=1, le=100_000, description="timed calls per op and size")
    warmup: int = Field(5, ge=0, le=100_000, description="untimed calls before the timed ones")
    dtype: CollectiveDtype = Field("float32", description="element type of the messages")
    train_epochs: int = Field(
        0, ge=0, le=1000, description="also train this many epochs with DDP per backend (0: no)"
    )
    device: DeviceChoice = Field("auto", description="where the ranks' tensors live")
    out: Path = Field(Path("artifacts/compare-backends"), description="folder of the results")
    overwrite: bool = Field(
        False, description="replace the results in an existing --out folder (else refused)"
    )
    timeout_seconds: int = Field(600, ge=10, description="collective timeout before a rank fails")
    training: TrainConfig = Field(
        default_factory=TrainConfig, description="settings of the --train-epochs runs"
    )

    @field_validator("sizes", mode="before")
    @classmethod
    def _sizes_from_text(cls, value: Any) -> Any:
        # "4KiB..256MiB" from a file or --set; ["4KiB..1MiB", "8MiB"] from the comma flag
        if isinstance(value, str):
            return parse_sizes(value)
        if isinstance(value, list) and any(isinstance(item, str) for item in value):
            return parse_sizes(",".join(str(item) for item in value))
        return value

    @field_validator("backends", "ops", mode="before")
    @classmethod
    def _list_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _distinct(self) -> CompareBackendsSettings:
        if any(size < 1 for size in self.sizes):
            raise ValueError("every size must be at least 1 byte")
        for name, values in (("backends", self.backends), ("ops", self.ops)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {','.join(values)}")
        return self


class CompareSettings(Section):
    """``distml compare``: which run folders, where the report goes."""

    runs: list[Path] = Field(min_length=1, description="run folders written by distml train")
    out: Path | None = Field(
        None, description="report folder (default: artifacts/compare/<date-time>)"
    )
    allow_unfinished: bool = Field(
        False, description="include runs without summary.json, marked unfinished"
    )
    title: str = Field("Run comparison", description="heading of report.md")
    not_compared: dict[str, str] = Field(
        default_factory=dict,
        description="runs left out, name -> why (a failed or skipped sweep run), for report.md",
    )


# ----------------------------------------------------------------------------- bench
# Settings of `distml bench` (distml/bench.py). Unset width/batch/precisions get
# device-dependent defaults there: full size on a GPU, a small model on the CPU.

BenchPipeline = Literal["classic", "distml"]


class BenchSettings(Section):
    """``distml bench``: training throughput of distml's data path against the classic one."""

    model: Arch = Field("cnn", description="architecture: cnn (ResNet-9 family) or vgg16")
    width: float | None = Field(
        None, gt=0, le=16, description="channel multiplier (default: 1.0 on CUDA, 0.125 on CPU)"
    )
    depth: int = Field(8, ge=1, le=64, description="conv blocks of the cnn (8 = ResNet-9)")
    batch_size: int | None = Field(
        None, ge=1, description="images per step (default: 512 on CUDA, 32 on CPU)"
    )
    steps: int = Field(50, ge=1, description="timed training steps per line")
    warmup: int = Field(10, ge=0, description="untimed steps first (autotuning, allocator)")
    device: DeviceChoice = Field("auto", description="where to train: auto, cuda or cpu")
    precisions: list[Literal["32", "16-mixed", "bf16-mixed"]] | None = Field(
        None,
        description="precisions of the distml ladder (default: bf16 and fp16 on CUDA, fp32 on CPU)",
    )
    pipelines: list[BenchPipeline] = Field(
        default_factory=lambda: ["classic", "distml"],
        min_length=1,
        description="which pipelines to time",
    )
    compile: bool = Field(False, description="add a torch.compile line to the ladder")
    dataset: str = Field("synthetic", description="synthetic, cifar10 or a .safetensors dataset")
    data_dir: Path = Field(Path("data"), description="dataset download/cache folder")
    images: int = Field(20_000, ge=20, description="synthetic training images")
    workers: int | None = Field(
        None, ge=0, description="classic DataLoader workers (default: min(8, cores))"
    )
    seed: int = Field(0, ge=0, description="seed of the model and the data order")
    out: Path = Field(
        Path("artifacts/bench"), description="folder for bench.json, bench.csv, bench.png"
    )
    overwrite: bool = Field(
        False, description="replace the results in an existing --out folder (else refused)"
    )

    @model_validator(mode="after")
    def _unique_lists(self) -> BenchSettings:
        for name, values in (("pipelines", self.pipelines), ("precisions", self.precisions or [])):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {','.join(values)}")
        return self


class SweepSettings(Section):
    """``distml sweep``: which plan, where its runs go, what to change in every run."""

    plan: Path = Field(description="the plan file (TOML)")
    out: Path | None = Field(
        None, description="folder of the runs (default: artifacts/sweeps/PLAN)"
    )
    assignments: list[str] = Field(
        default_factory=list, description="dotted.key=value for every run, after the plan"
    )
    dry_run: bool = Field(False, description="list and validate the runs, train nothing")

    def out_dir(self) -> Path:
        return self.out or Path("artifacts/sweeps") / self.plan.stem


class LrFindSettings(Section):
    """``distml lr-find``: the learning-rate range test on a fresh model of these settings."""

    training: TrainConfig = Field(
        default_factory=TrainConfig, description="the model, data and optimizer to test"
    )
    start_lr: float = Field(1e-7, gt=0, description="learning rate of the first step")
    end_lr: float = Field(10.0, gt=0, le=1e4, description="learning rate of the last step")
    steps: int = Field(100, ge=5, le=100_000, description="optimizer steps of the ramp")
    beta: float = Field(0.98, ge=0, lt=1, description="smoothing of the loss (moving average)")
    stop_factor: float = Field(
        4.0, gt=1, description="stop once the smoothed loss exceeds this times its best"
    )
    skip_start: int = Field(
        10, ge=0, description="first steps the suggestion ignores (the average settles)"
    )
    out: Path | None = Field(
        None, description="folder of lr_find.json and lr_find.png (default: artifacts/lr-find)"
    )
    overwrite: bool = Field(
        False, description="replace the results in an existing --out folder (else refused)"
    )

    @model_validator(mode="after")
    def _single_process(self) -> LrFindSettings:
        if self.end_lr <= self.start_lr:
            raise ValueError(f"end_lr {self.end_lr} must be above start_lr {self.start_lr}")
        if self.training.dist.mode != "single":
            raise ValueError("the range test runs in one process: use dist.mode single")
        return self

    def out_dir(self) -> Path:
        return self.out or Path("artifacts/lr-find")
