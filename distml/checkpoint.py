"""safetensors checkpoints with a metadata schema, and atomic file writes.

A model checkpoint holds the bare model's ``state_dict`` tensors and string metadata:
``format`` (``distml-checkpoint``), ``format_version``, ``distml_version``, ``model_spec``,
``classes``, ``normalization``, ``settings``, ``epoch``, ``metrics`` and ``extra`` (JSON).
Nothing is ever unpickled: loading a checkpoint cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save_file

from distml import __version__
from distml.errors import DistmlError
from distml.files import atomic_write
from distml.models import Classifier, ModelSpec, build_model

CHECKPOINT_FORMAT = "distml-checkpoint"
CHECKPOINT_VERSION = 1


def save_tensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write a safetensors file (tensors copied to contiguous CPU memory)."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def read_tensors(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the metadata of a safetensors file; ``what`` names it in errors."""
    path = Path(path)
    if not path.exists():
        raise DistmlError(f"{what} {path} does not exist. Check the path.")
    if not path.is_file():
        raise DistmlError(f"{what} {path} is not a file.")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise DistmlError(
            f"{what} {path} cannot be read as safetensors ({exc}). The file is damaged, "
            "truncated or of another format; write it again (or restore it from a copy)."
        ) from None
    return tensors, metadata


# ----------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class Checkpoint:
    spec: ModelSpec
    state: dict[str, torch.Tensor]
    classes: list[str]
    normalization: dict[str, list[float]]
    settings: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    distml_version: str = __version__
    path: Path | None = None

    def train_setting(self, key: str, default: Any) -> Any:
        """A value of the ``train`` settings of the run that wrote this checkpoint."""
        return (self.settings.get("train") or {}).get(key, default)

    @property
    def seed(self) -> int:
        """The run's seed: it also drew the run's validation split."""
        return int(self.train_setting("seed", 0))


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DataParallel / DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.DataParallel | torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: Path, model: torch.nn.Module, ckpt: Checkpoint) -> None:
    """Write ``model``'s weights with ``ckpt``'s metadata (its ``state`` field is ignored)."""
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "distml_version": __version__,
        "model_spec": ckpt.spec.model_dump_json(),
        "classes": json.dumps(ckpt.classes),
        "normalization": json.dumps(ckpt.normalization),
        "settings": json.dumps(ckpt.settings, default=str),
        "epoch": str(ckpt.epoch),
        "metrics": json.dumps(ckpt.metrics, default=str),
        "extra": json.dumps(ckpt.extra, default=str),
    }
    save_tensors(path, bare_model(model).state_dict(), metadata)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read and validate a distml checkpoint; every problem is a DistmlError with a fix."""
    tensors, meta = read_tensors(path, "checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise DistmlError(
            f"checkpoint {path} is a safetensors file but not a distml checkpoint (its metadata "
            "has no distml model spec). Use a file written by `distml train` (best.safetensors, "
            "last.safetensors or --save)."
        )
    try:
        version = int(meta.get("format_version", "0"))
        if version > CHECKPOINT_VERSION:
            raise DistmlError(
                f"checkpoint {path} has format version {version}, newer than this distml "
                f"({__version__}) reads; upgrade distml."
            )
        spec = ModelSpec.model_validate_json(meta["model_spec"])
        return Checkpoint(
            spec=spec,
            state=tensors,
            classes=metadata_json(meta, "classes", list),
            normalization=metadata_json(meta, "normalization", dict),
            settings=metadata_json(meta, "settings", dict, "{}"),
            epoch=int(meta.get("epoch", "0")),
            metrics=metadata_json(meta, "metrics", dict, "{}"),
            extra=metadata_json(meta, "extra", dict, "{}"),
            distml_version=meta.get("distml_version", "unknown"),
            path=Path(path),
        )
    except (KeyError, ValueError, ValidationError) as exc:
        raise DistmlError(
            f"checkpoint {path} has damaged distml metadata ({type(exc).__name__}: "
            f"{error_lines(exc)}). Write it again with `distml train`."
        ) from None


def metadata_json(meta: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    """One JSON field of the metadata, of the type it must have (a null where an object
    belongs is damage, not an empty value)."""
    if key not in meta and default is None:
        raise KeyError(key)
    value = json.loads(meta.get(key, default or "null"))
    if not isinstance(value, kind):
        raise ValueError(f"metadata {key!r} must be a JSON {kind.__name__}, not {value!r:.40}")
    return value


def error_lines(exc: Exception, most: int = 2) -> str:
    """The lines of an exception's text that say what is wrong: torch's and pydantic's first
    line is only a heading ("Error(s) in loading state_dict for ...", "1 validation error for
    ..."), the offending key is on the next."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and ((len(lines) > 1 and lines[0].endswith(":")) or "validation error" in lines[0]):
        lines = lines[1:]
    return "; ".join(lines[:most]) or type(exc).__name__


def model_from_checkpoint(ckpt: Checkpoint) -> Classifier:
    """Rebuild the network from the spec and load the weights (strictly, on the CPU)."""
    model = build_model(ckpt.spec)
    try:
        model.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as exc:
        raise DistmlError(
            f"checkpoint {ckpt.path}: its tensors do not fit its own model spec "
            f"({error_lines(exc)}). "
            "The file was changed by another tool or is damaged."
        ) from None
    return model


# ----------------------------------------------------------------------------- training state

STATE_FORMAT = "distml-train-state"
STATE_FILE = "state.safetensors"


class Stateful(Protocol):
    """A part of the training state that captures and restores itself (optimizer, schedule,
    GradScaler, the loop's position), as torch.distributed.checkpoint's Stateful."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class TrainingState:
    """Everything ``--resume`` needs, in one safetensors file (tensors + JSON metadata):
    the weights now (``model``), the best weights when they differ (``best``), the optimizer,
    schedule and GradScaler state, each rank's RNG states, and the loop's own bookkeeping."""

    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, torch.Tensor]  # "<name>.<global rank>": "cpu.1", "cuda.1" (rank 1's GPU)
    loop: dict[str, Any]
    world_size: int

    @classmethod
    def capture(
        cls,
        *,
        model: torch.nn.Module,
        best: dict[str, torch.Tensor] | None,
        optimizer: Stateful,
        scheduler: Stateful,
        scaler: Stateful,
        loop: Stateful,
        rng: dict[str, torch.Tensor],
        world_size: int,
    ) -> TrainingState:
        """The state of a run now. ``rng``: every rank's states (see local_rng_states)."""
        return cls(
            model=model.state_dict(),
            best=best,
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() or None,  # {} when the scaler is disabled
            rng=rng,
            loop=loop.state_dict(),
            world_size=world_size,
        )

    def restore(self, *, optimizer: Stateful, scheduler: Stateful, scaler: Stateful) -> None:
        """Load the optimizer, schedule and scaler states (the model's weights are loaded
        before it is wrapped, the loop's and the RNG's where the loop starts)."""
        optimizer.load_state_dict(self.optimizer)
        scheduler.load_state_dict(self.scheduler)
        if self.scaler:
            scaler.load_state_dict(self.scaler)

    def restore_rng(self, rank: int, device: torch.device) -> None:
        """Set this rank's RNG states: the CPU's, and its own GPU's on ``device``."""
        for key, tensor in self.rng.items():
            name, owner = key.rsplit(".", 1)
            if int(owner) != rank:
                continue
            if name == "cpu":
                torch.set_rng_state(tensor)
            elif device.type == "cuda" and name == "cuda":
                torch.cuda.set_rng_state(tensor, device)
            elif device.type == "cuda" and name.startswith(REPLICA_RNG):
                torch.cuda.set_rng_state(tensor, int(name.removeprefix(REPLICA_RNG)))


REPLICA_RNG = "cuda-replica"  # DataParallel: the other GPUs one process drives


def local_rng_states(device: torch.device, replicas: list[int] | None = None) -> dict[str, Any]:
    """This process's RNG states (dropout draws from them; the data order has its own seeds):
    the CPU's and its own GPU's, named the same on every rank (``cpu``, ``cuda``), plus
    ``cuda-replica<i>`` for the other GPUs of a DataParallel process."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
        for index in replicas or []:
            states[f"{REPLICA_RNG}{index}"] = torch.cuda.get_rng_state(index)
    return states


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def optimizer_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as flat tensors plus JSON (nothing pickled)."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(path: Path, state: TrainingState) -> None:
    optim_tensors, optim_meta = optimizer_to_tensors(state.optimizer)
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    tensors |= {f"best.{k}": v for k, v in (state.best or {}).items()}
    tensors |= {f"optim.{k}": v for k, v in optim_tensors.items()}
    tensors |= {f"rng.{k}": v for k, v in state.rng.items()}
    metadata = {
        "format": STATE_FORMAT,
        "format_version": str(CHECKPOINT_VERSION),
        "distml_version": __version__,
        "optimizer": json.dumps(optim_meta),
        "scheduler": json.dumps(state.scheduler),
        "scaler": json.dumps(state.scaler),
        "loop": json.dumps(state.loop),
        "world_size": str(state.world_size),
    }
    save_tensors(path, tensors, metadata)


def load_training_state(path: Path) -> TrainingState:
    tensors, meta = read_tensors(path, "training state")
    return training_state_from(tensors, meta, path)


def training_state_from_bytes(data: bytes, path: Path) -> TrainingState:
    """A training state from the bytes of its file (as rank 0 sends them to the other ranks);
    ``path`` names it in errors."""
    try:
        header_size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_size]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise DistmlError(
            f"training state {path} cannot be read as safetensors ({exc}); the run cannot be "
            "resumed from it."
        ) from None
    return training_state_from(tensors, meta, path)


def training_state_from(
    tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path
) -> TrainingState:
    if meta.get("format") != STATE_FORMAT:
        raise DistmlError(f"{path} is not a distml training state (state.safetensors).")
    try:
        return TrainingState(
            model=split_prefix(tensors, "model."),
            best=split_prefix(tensors, "best.") or None,
            optimizer=optimizer_from_tensors(
                split_prefix(tensors, "optim."), json.loads(meta["optimizer"])
            ),
            scheduler=json.loads(meta["scheduler"]),
            scaler=json.loads(meta["scaler"]),
            rng=split_prefix(tensors, "rng."),
            loop=json.loads(meta["loop"]),
            world_size=int(meta["world_size"]),
        )
    except (KeyError, ValueError) as exc:
        raise DistmlError(
            f"training state {path} is damaged ({type(exc).__name__}: {exc}); the run cannot "
            "be resumed from it."
        ) from None
