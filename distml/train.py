"""The training loop: one readable path for single-device, DataParallel and DDP runs.

``train(config)`` is what the CLI calls. For ``--mode ddp`` outside torchrun it launches the
ranks (dist.launch_ddp), each of which runs ``run_rank``; otherwise ``run_rank`` runs here.
``fit`` is the loop itself: data -> model -> epochs (train, validate, checkpoint) -> test
of the best model -> summary, curves and checkpoints in the run directory (rank 0 only).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from distml import __version__
from distml.checkpoint import (
    STATE_FILE,
    Checkpoint,
    TrainingState,
    atomic_write,
    atomic_write_json,
    bare_model,
    load_checkpoint,
    load_training_state,
    model_from_checkpoint,
    save_checkpoint,
    save_training_state,
    split_prefix,
)
from distml.config import TrainConfig, format_validation_error
from distml.data import (
    ImageDataset,
    Normalize,
    TrainBatches,
    channel_stats,
    eval_batches,
    load_dataset,
    make_splits,
    to_device_nchw,
)
from distml.dist import (
    RunContext,
    all_gather_floats,
    all_gather_strings,
    all_gather_tensor,
    all_reduce_sum,
    barrier,
    check_ddp_settings,
    device_name,
    launch_ddp,
    planned_ranks,
    resolve_device,
    setup_ddp,
    stopped_by_signal,
    teardown,
    torchrun_env,
)
from distml.errors import DistmlError
from distml.evaluate import check_input_shape
from distml.metrics import autocast_context, evaluate, overfitting_verdict, write_metrics
from distml.models import Classifier, ModelSpec, build_model, count_parameters, describe
from distml.plots import plot_curves
from distml.progress import Reporter

CHECK_EVERY = 25  # optimizer steps between host syncs (progress, non-finite check)


class TrainingDiverged(DistmlError):
    """The loss stayed non-finite: lower the learning rate or use bf16 / fp32."""

    exit_code = 3


# ----------------------------------------------------------------------------- entry points


def train(config: TrainConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Run ``config`` in a new run directory; return the summary (as in ``summary.json``)."""
    return start_run(config, None, show_progress=show_progress)


def resume_run(run_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Continue a stopped run from its saved state, with its own settings."""
    config = read_run_config(run_dir)
    summary = run_dir / "summary.json"
    if summary.exists():
        Reporter(show_progress).line(f"{run_dir} already finished; nothing to resume.")
        return {**json.loads(summary.read_text()), "already_finished": True}
    if not (run_dir / STATE_FILE).exists():
        raise DistmlError(
            f"{run_dir} has no saved training state ({STATE_FILE}): it stopped before its first "
            "epoch ended. Start it again: distml train --config "
            f"{run_dir / 'config.json'} --out NEW_DIR"
        )
    return start_run(config, run_dir, show_progress=show_progress)


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not run_dir.is_dir() or not path.is_file():
        raise DistmlError(
            f"{run_dir} is not a distml run directory (no config.json). Give the folder that "
            "`distml train` created, e.g. artifacts/runs/<name>."
        )
    try:
        return TrainConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise DistmlError(
            f"{path} is not a valid distml config, so the run cannot be resumed; "
            + format_validation_error(exc, TrainConfig)
        ) from None


def start_run(config: TrainConfig, run_dir: Path | None, *, show_progress: bool) -> dict:
    """Start (``run_dir`` None) or resume a run in the process layout of its mode."""
    device = resolve_device(config.train.device)
    resume = run_dir is not None
    if config.dist.mode == "ddp" and torchrun_env() is None:
        nproc = planned_ranks(config, device)
        check_ddp_settings(config, device, nproc * config.dist.nnodes)
        if run_dir is None:
            check_inputs(config)  # fail here, once, rather than in every rank
            run_dir = create_run_dir(config) if config.dist.node_rank == 0 else Path(".")
        return launch_ddp(config, run_dir, nproc, show_progress, resume)
    dataset = None
    if config.dist.mode != "ddp" and run_dir is None:
        dataset = check_inputs(config)  # one process: the checked dataset is the one it trains on
        run_dir = create_run_dir(config)
    return (
        run_rank(config, run_dir, show_progress=show_progress, resume=resume, dataset=dataset) or {}
    )


def run_rank(
    config: TrainConfig,
    run_dir: Path | None,
    *,
    show_progress: bool,
    resume: bool = False,
    dataset: ImageDataset | None = None,
) -> dict | None:
    """One process's part of a run; returns the summary on rank 0, None elsewhere.
    ``dataset``: already loaded by this process (single and dp runs only: DDP ranks load it
    in turn, behind a barrier every rank must reach)."""
    if config.dist.mode == "ddp":
        env = torchrun_env()
        if env is None:
            raise DistmlError("internal: a DDP rank started without RANK/WORLD_SIZE set.")
        ctx = setup_ddp(config, env)
        if run_dir is None and env.restart_count > 0:  # restarted by an outer torchrun
            named = run_directory(config)
            if (named / STATE_FILE).exists():
                run_dir, resume = named, True
    else:
        ctx = local_context(config)
    try:
        if ctx.is_main and run_dir is None:  # under an outer torchrun: rank 0 names the run
            check_inputs(config)
            run_dir = create_run_dir(config)
        reporter = Reporter(show_progress and ctx.is_main)
        with torch_settings(config, ctx.device), StopRequest(escalate=ctx.mode != "ddp") as stop:
            return fit(
                config, ctx, run_dir or Path("."), reporter, stop, resume=resume, dataset=dataset
            )
    finally:
        teardown(ctx)


class StopRequest:
    """SIGINT / SIGTERM during training ask for a clean stop: the loop finishes the step, all
    ranks agree, the state is saved, and the run exits 130 / 143, ready for ``--resume``.
    In a single process a second Ctrl-C stops at once; DDP ranks leave that to the launcher,
    which forwards its own signal to them."""

    def __init__(self, escalate: bool):
        self.escalate = escalate
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum and self.escalate and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def local_context(config: TrainConfig) -> RunContext:
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = torch.cuda.device_count() if config.dist.mode == "dp" and device.type == "cuda" else 1
    return RunContext(config.dist.mode, 0, 0, world, device, None)


@contextlib.contextmanager
def torch_settings(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Determinism and cuDNN autotuning for the run; global flags restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if config.train.deterministic:
        # cuBLAS needs a fixed workspace for reproducible results; must precede CUDA init
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


# ----------------------------------------------------------------------------- run directory


def default_run_name(config: TrainConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.model.arch}-{config.dist.mode}-{stamp}"


def run_directory(config: TrainConfig) -> Path:
    out = config.output
    if out.dir is not None:
        return out.dir
    if out.name is not None:
        return out.root / out.name
    path = out.root / default_run_name(config)
    suffix = 2
    while path.exists():
        path = out.root / f"{default_run_name(config)}-{suffix}"
        suffix += 1
    return path


def check_inputs(config: TrainConfig) -> ImageDataset:
    """Problems that need no GPU work to find: output paths, the dataset, the init file.
    Returns the (checked) dataset."""
    path = run_directory(config)
    if path.exists() and not path.is_dir():
        raise DistmlError(f"the run directory {path} is a file. Choose another --out.")
    if (path / "config.json").exists():
        raise DistmlError(
            f"{path} already holds a run (it has a config.json). Choose another --out or "
            "--set output.name=..., or delete that directory first."
        )
    save = config.output.save
    if save is not None and save.is_dir():
        raise DistmlError(f"--save {save} is a directory; give a file path ending in .safetensors.")
    dataset = load_dataset(config.data)
    if config.model.init is not None:
        ckpt = load_checkpoint(config.model.init)
        check_input_shape(ckpt, dataset)
        model_from_checkpoint(ckpt)  # its tensors must fit its spec
    return dataset


def create_run_dir(config: TrainConfig) -> Path:
    """Create the run directory and write the resolved settings first, as config.json."""
    path = run_directory(config)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistmlError(f"cannot create the run directory {path}: {exc.strerror}.") from None
    atomic_write_json(path / "config.json", config.model_dump(mode="json"))
    return path


# ----------------------------------------------------------------------------- model set-up


def initial_model(
    config: TrainConfig, dataset: ImageDataset
) -> tuple[Classifier, ModelSpec, Checkpoint | None]:
    """A fresh model from the settings, or one started from ``--init`` (with a new classifier
    head when the features are frozen or the classes differ)."""
    settings = config.model
    if settings.init is None:
        spec = ModelSpec(
            arch=settings.arch,
            num_classes=len(dataset.classes),
            in_channels=dataset.channels,
            image_size=dataset.image_size,
            width=settings.width,
            depth=settings.depth,
            norm=settings.norm,
            pool=settings.pool,
            activation=settings.activation,
            dropout=settings.dropout,
            head_hidden=tuple(settings.head_hidden),
        )
        return build_model(spec), spec, None
    ckpt = load_checkpoint(settings.init)
    check_input_shape(ckpt, dataset)
    if not settings.freeze_features and ckpt.classes == dataset.classes:
        return model_from_checkpoint(ckpt), ckpt.spec, ckpt
    spec = ckpt.spec.model_copy(
        update={
            "num_classes": len(dataset.classes),
            "head_hidden": tuple(settings.head_hidden),
            "dropout": settings.dropout,
        }
    )
    model = build_model(spec)
    features = split_prefix(ckpt.state, "features.")
    model.features.load_state_dict(features, strict=True)
    if settings.freeze_features:
        model.features.requires_grad_(False)
    return model, spec, ckpt


def wrap_model(model: nn.Module, config: TrainConfig, ctx: RunContext) -> nn.Module:
    """Move to the device and wrap for the mode: DataParallel, DDP, torch.compile."""
    model = model.to(ctx.device)
    if ctx.device.type == "cuda" and config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ctx.mode == "dp" and ctx.world_size > 1:
        model = nn.DataParallel(model)
    elif ctx.mode == "ddp":
        if config.dist.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
    if config.train.compile:
        model = torch.compile(model)
    return model


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device):
    o = config.optim
    fused = {"fused": True} if device.type == "cuda" else {}
    if o.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            weight_decay=o.weight_decay,
            **fused,
        )
    if o.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=o.lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay, **fused
        )
    if o.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=o.lr, betas=(o.momentum, 0.999), weight_decay=o.weight_decay, **fused
        )
    return torch.optim.RMSprop(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (schedules run per step)."""
    o = config.optim
    total = config.train.epochs * steps_per_epoch
    if o.scheduler == "step":
        return o.gamma ** ((step // steps_per_epoch) // o.step_size)
    if o.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if o.scheduler == "onecycle":  # linear warm-up to the peak, then linear decay to zero
        warm = max(1, round(o.warmup_fraction * total))
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    return 1.0


# ----------------------------------------------------------------------------- the loop


@dataclass
class LoopState:
    """Where the loop stands; saved in the training state, so a resumed run continues at
    exactly this point (the epoch in progress and the optimizer steps done in it)."""

    epoch: int = 1
    step: int = 0
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss, correct, seen
    seconds: float = 0.0  # training seconds spent in this epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val: float = -1.0
    best_is_current: bool = False
    nonfinite_run: int = 0
    peaks: list[float] = field(default_factory=list)
    elapsed: float = 0.0  # wall seconds of the earlier sessions of this run
    resumes: int = 0


def peak_memory_mb(ctx: RunContext) -> float:
    if ctx.device.type == "cuda":
        return max(torch.cuda.max_memory_allocated(d) for d in cuda_devices(ctx)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # host RSS (Linux: KiB)


def cuda_devices(ctx: RunContext) -> list[int]:
    """The GPUs this process drives: all of them under DataParallel, else its own."""
    if ctx.device.type != "cuda":
        return []
    return list(range(ctx.world_size)) if ctx.mode == "dp" else [ctx.device.index]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteWatch:
    """Counts consecutive optimizer steps whose loss (summed over ranks) is not finite."""

    def __init__(self, patience: int, run: int = 0):
        self.patience = patience
        self.run = run

    def check(self, losses: list[float], epoch: int, first_step: int) -> None:
        for offset, value in enumerate(losses):
            self.run = 0 if math.isfinite(value) else self.run + 1
            if self.run >= self.patience:
                step = first_step + offset + 1
                raise TrainingDiverged(
                    f"the training loss was not finite for {self.run} consecutive steps (up to "
                    f"step {step} of epoch {epoch}). The run stopped; the last good checkpoint "
                    "is kept. Lower --lr, add warm-up, or use --precision bf16-mixed / 32."
                )


@dataclass
class Session:
    """Everything one process trains with, built once by ``prepare``."""

    spec: ModelSpec
    classes: list[str]
    normalization: dict[str, list[float]]
    batches: TrainBatches
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]]  # uint8 NCHW on the device, labels
    normalize: Normalize
    net: nn.Module  # wrapped for the mode
    bare: Classifier
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    criterion: nn.Module
    meta: Checkpoint
    initial_checksums: list[list[float]]


def prepare(
    config: TrainConfig,
    ctx: RunContext,
    state: TrainingState | None,
    dataset: ImageDataset | None = None,
) -> Session:
    """Data on the device, the model (resumed weights loaded before wrapping, so DDP
    broadcasts them), optimizer, schedule and scaler."""
    t = config.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts)
    if dataset is None:
        dataset = load_dataset_for_rank(config, ctx)
    splits = make_splits(dataset, config.data.val_fraction, t.seed)
    model, spec, init = initial_model(config, dataset)
    stats = init.normalization if init else channel_stats(splits.train_images)
    normalize = Normalize(stats, ctx.device)
    batches = TrainBatches(
        splits.train_images,
        splits.train_labels,
        normalize=normalize,
        batch_size=t.batch_size,
        accum_steps=t.accum_steps,
        rank=ctx.rank,
        world_size=ctx.world_size if ctx.mode == "ddp" else 1,
        augment=config.data.augment,
        seed=t.seed,
        device=ctx.device,
        channels_last=ctx.device.type == "cuda" and t.channels_last,
    )
    if state is not None:
        model.load_state_dict(state.model)
    net = wrap_model(model, config, ctx)
    bare = bare_model(net)
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, ctx.device)
    steps = batches.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, steps)
    )
    scaler = torch.amp.GradScaler(ctx.device.type) if t.precision == "16-mixed" else None
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in bare.parameters()))
    return Session(
        spec=spec,
        classes=list(dataset.classes),
        normalization=stats,
        batches=batches,
        splits={
            name: (to_device_nchw(images, ctx.device), labels)
            for name in ("train", "val", "test")
            for images, labels in [splits.split(name)]
            if len(labels)
        },
        normalize=normalize,
        net=net,
        bare=bare,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        criterion=nn.CrossEntropyLoss(label_smoothing=t.label_smoothing),
        meta=Checkpoint(
            spec=spec,
            state={},
            classes=list(dataset.classes),
            normalization=stats,
            settings=config.model_dump(mode="json"),
            extra={"init": str(config.model.init) if init else None},
        ),
        initial_checksums=all_gather_floats([checksum], ctx),
    )


def evaluate_split(s: Session, name: str, config: TrainConfig, ctx: RunContext):
    images, labels = s.splits[name]
    shard = eval_batches(
        images,
        labels,
        normalize=s.normalize,
        batch_size=config.train.eval_batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size if ctx.mode == "ddp" else 1,
        channels_last=ctx.device.type == "cuda" and config.train.channels_last,
    )
    return evaluate(
        s.bare,
        shard,
        s.criterion,
        ctx,
        precision=config.train.precision,
        num_classes=s.spec.num_classes,
    )


def train_epoch(
    s: Session,
    loop: LoopState,
    config: TrainConfig,
    ctx: RunContext,
    watch: NonFiniteWatch,
    stop: StopRequest,
    task: Any,
) -> bool:
    """Train from ``loop.step`` to the end of ``loop.epoch``; update ``loop``. Returns False
    when a stop was requested (the loop is then at the last finished step)."""
    s.net.train()
    if config.model.freeze_features:  # frozen features keep their BatchNorm statistics too
        s.bare.features.eval()
    steps, accum = s.batches.steps_per_epoch, s.batches.accum_steps
    # running sums stay on the device: no host sync inside a step. A resumed epoch's earlier
    # (already summed over ranks) totals are carried by rank 0 alone.
    carried = loop.totals if ctx.is_main else [0.0, 0.0, 0.0]
    totals = torch.tensor(carried, dtype=torch.float64, device=ctx.device)
    step_losses = torch.zeros(steps, dtype=torch.float32, device=ctx.device)
    checked = loop.step
    stop_agreed = False

    def sync(upto: int) -> bool:
        """One host sync: non-finite check, progress, and the stop flag, summed over ranks."""
        nonlocal checked
        flag = torch.tensor([float(stop.signum > 0)], device=ctx.device)
        window = torch.cat([step_losses[checked:upto], totals.float(), flag])
        values = all_reduce_sum(window, ctx).tolist()
        watch.check(values[: upto - checked], loop.epoch, checked)
        task.advance(upto - checked, status=progress_status(values[-4:-1]))
        checked = upto
        return values[-1] > 0

    for i in range(len(cuda_devices(ctx))):
        torch.cuda.reset_peak_memory_stats(cuda_devices(ctx)[i])
    synchronize(ctx.device)
    started = time.perf_counter()
    for step, micro_batches in enumerate(s.batches.epoch(loop.epoch, loop.step), loop.step):
        for k, (images, labels) in enumerate(micro_batches):
            # DDP: all-reduce gradients only on the last micro-step of the accumulation
            skip_sync = ctx.mode == "ddp" and k < accum - 1
            with s.net.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast_context(ctx.device, config.train.precision):
                    logits = s.net(images)
                    loss = s.criterion(logits, labels)
                scaled = loss / accum
                (s.scaler.scale(scaled) if s.scaler else scaled).backward()
            step_losses[step] += scaled.detach().float()
            totals[0] += loss.detach().double() * len(labels)
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += len(labels)
        if s.scaler:
            s.scaler.step(s.optimizer)
            s.scaler.update()
        else:
            s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
        s.scheduler.step()
        done = step + 1
        # a single process stops right after this step; DDP ranks agree at the next sync
        local_stop = stop.signum > 0 and not ctx.distributed
        if done % CHECK_EVERY == 0 or done == steps or local_stop:
            stop_agreed = sync(done)
            if stop_agreed and done < steps:
                break
    synchronize(ctx.device)
    loop.seconds += time.perf_counter() - started
    loop.step = checked
    loop.totals = all_reduce_sum(totals, ctx).tolist()
    loop.nonfinite_run = watch.run
    return not (stop_agreed and checked < steps)


def progress_status(totals: list[float]) -> str:
    loss_sum, correct, seen = totals
    return f"loss {loss_sum / max(seen, 1):.3f} acc {100 * correct / max(seen, 1):.1f}%"


def fit(
    config: TrainConfig,
    ctx: RunContext,
    run_dir: Path,
    reporter: Reporter,
    stop: StopRequest,
    *,
    resume: bool = False,
    dataset: ImageDataset | None = None,
) -> dict | None:
    """Train, validate, checkpoint, test the best model, write the report (rank 0)."""
    started = time.perf_counter()
    t = config.train
    state = load_training_state(run_dir / STATE_FILE) if resume else None
    if state is not None and state.world_size != ctx.world_size:
        raise DistmlError(
            f"{run_dir} was saved by {state.world_size} rank(s); resume it with the same number "
            f"(--nproc {state.world_size}), not {ctx.world_size}."
        )
    s = prepare(config, ctx, state, dataset)
    loop = LoopState()
    best_state: dict[str, torch.Tensor] | None = None
    if state is not None:
        loop = LoopState(**state.loop)
        loop.resumes += 1
        best_state = state.best or (state.model if loop.best_epoch else None)
        restore_rng(state.rng, ctx)
        reporter.line(f"resuming {run_dir} at epoch {loop.epoch}, step {loop.step}")
    notes = mode_notes(ctx, t.precision)
    for note in notes:
        reporter.line(f"note: {note}")
    reporter.line(
        f"distml train: {describe(s.spec)} | {count_parameters(s.bare):,} parameters | "
        f"{ctx.mode} x{ctx.world_size} on {device_name(ctx.device)} | precision {t.precision} | "
        f"{s.batches.images.shape[0]} train / "
        f"{len(s.splits['val'][1]) if 'val' in s.splits else 0} val images"
    )
    watch = NonFiniteWatch(t.nonfinite_patience, loop.nonfinite_run)
    stopped_early = False
    while loop.epoch <= t.epochs:
        if t.early_stop and loop.history and loop.epoch - 1 - loop.best_epoch >= t.early_stop:
            stopped_early = True
            reporter.line(f"early stop: no better validation accuracy for {t.early_stop} epochs")
            break
        with reporter.task(f"epoch {loop.epoch}/{t.epochs}", s.batches.steps_per_epoch) as task:
            task.advance(loop.step)
            finished = train_epoch(s, loop, config, ctx, watch, stop, task)
        if not finished:
            loop.elapsed += time.perf_counter() - started
            save_state(run_dir, s, loop, best_state, ctx)
            raise stopped_by_signal(
                stop.signum or signal.SIGTERM,
                run_dir,
                f" at step {loop.step} of epoch {loop.epoch}",
            )
        row = finish_epoch(s, loop, config, ctx)
        improved = row["val_loss"] is None or row["val_accuracy"] > loop.best_val
        if improved:
            loop.best_epoch = loop.epoch
            loop.best_val = row["val_accuracy"] if row["val_loss"] is not None else -1.0
            best_state = {k: v.detach().clone() for k, v in s.bare.state_dict().items()}
        loop.best_is_current = improved
        check_weights_finite(s, loop.epoch)
        completed = loop.epoch
        loop.epoch, loop.step, loop.totals, loop.seconds = completed + 1, 0, [0.0, 0.0, 0.0], 0.0
        loop.elapsed += time.perf_counter() - started
        started = time.perf_counter()
        save_state(run_dir, s, loop, best_state, ctx)  # the commit point of the epoch
        if ctx.is_main:
            ckpt = meta_with(s.meta, completed, row)
            if improved:
                save_checkpoint(run_dir / "best.safetensors", s.bare, ckpt)
            save_checkpoint(run_dir / "last.safetensors", s.bare, ckpt)
            write_metrics(run_dir / "metrics.csv", loop.history)
            reporter.line(epoch_line(row, t.epochs, improved))
        if stop_requested_everywhere(stop, ctx):
            raise stopped_by_signal(
                stop.signum or signal.SIGTERM, run_dir, f" after epoch {completed}"
            )
    loop.elapsed += time.perf_counter() - started
    return finish_run(s, loop, best_state, config, ctx, run_dir, notes, stopped_early)


def finish_epoch(s: Session, loop: LoopState, config: TrainConfig, ctx: RunContext) -> dict:
    """Validate, and append the epoch's row to the history."""
    loss_sum, correct, seen = loop.totals
    val = evaluate_split(s, "val", config, ctx) if "val" in s.splits else None
    peak = peak_memory_mb(ctx)
    loop.peaks.append(peak)
    row = {
        "epoch": loop.epoch,
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "val_loss": val.loss if val else None,
        "val_accuracy": val.accuracy if val else None,
        "lr": s.scheduler.get_last_lr()[0],
        "epoch_seconds": loop.seconds,
        "images_per_second": seen / loop.seconds,
        "peak_memory_mb": peak,
    }
    loop.history.append(row)
    return row


def check_weights_finite(s: Session, epoch: int) -> None:
    """Never checkpoint broken weights: NaN/inf weights end the run, the last good files stay."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in s.bare.parameters()]).all()
    if not bool(finite):
        raise TrainingDiverged(
            f"the model weights became non-finite during epoch {epoch}. The run stopped; the "
            "last good checkpoint is kept. Lower --lr, add warm-up, or use --precision "
            "bf16-mixed / 32."
        )


def stop_requested_everywhere(stop: StopRequest, ctx: RunContext) -> bool:
    flag = torch.tensor([float(stop.signum > 0)], device=ctx.device)
    return bool(all_reduce_sum(flag, ctx).item() > 0)


def mode_notes(ctx: RunContext, precision: str) -> list[str]:
    """Things about this run's set-up that a reader of the summary should know."""
    notes = []
    if ctx.mode == "dp" and ctx.world_size < 2:
        notes.append(
            "dp mode: nn.DataParallel needs at least 2 GPUs to split a batch and "
            f"{torch.cuda.device_count()} are visible, so this run used one device"
        )
    if precision == "16-mixed" and ctx.device.type == "cpu":
        notes.append(
            "fp16 autocast on the CPU is slow (about 10x slower than fp32 in "
            "docs/benchmarks.md: CPUs lack fast fp16 kernels); bf16-mixed is the fast choice "
            "on the CPU"
        )
    return notes


# ----------------------------------------------------------------------------- state and RNG


def rng_states(ctx: RunContext) -> dict[str, torch.Tensor]:
    """This rank's RNG states (dropout draws from them; the data order has its own seeds)."""
    states = {"cpu": torch.get_rng_state()}
    for index in cuda_devices(ctx):
        states[f"cuda{index}"] = torch.cuda.get_rng_state(index)
    return states


def gather_rng(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, keyed ``<name>.<rank>`` (a collective: all ranks call it)."""
    gathered = {}
    for name, local in sorted(rng_states(ctx).items()):
        for rank, tensor in enumerate(all_gather_tensor(local, ctx)):
            gathered[f"{name}.{rank}"] = tensor
    return gathered


def restore_rng(saved: dict[str, torch.Tensor], ctx: RunContext) -> None:
    for key, tensor in saved.items():
        name, rank = key.rsplit(".", 1)
        if int(rank) != ctx.rank:
            continue
        if name == "cpu":
            torch.set_rng_state(tensor)
        elif ctx.device.type == "cuda":
            torch.cuda.set_rng_state(tensor, int(name.removeprefix("cuda")))


def save_state(
    run_dir: Path,
    s: Session,
    loop: LoopState,
    best_state: dict[str, torch.Tensor] | None,
    ctx: RunContext,
) -> None:
    """Write the training state (rank 0; every rank contributes its RNG states)."""
    rng = gather_rng(ctx)
    if not ctx.is_main:
        return
    state = TrainingState(
        model=s.bare.state_dict(),
        best=None if loop.best_is_current or best_state is None else best_state,
        optimizer=s.optimizer.state_dict(),
        scheduler=s.scheduler.state_dict(),
        scaler=s.scaler.state_dict() if s.scaler else None,
        rng=rng,
        loop=asdict(loop),
        world_size=ctx.world_size,
    )
    save_training_state(run_dir / STATE_FILE, state)


# ----------------------------------------------------------------------------- the report


def finish_run(
    s: Session,
    loop: LoopState,
    best_state: dict[str, torch.Tensor] | None,
    config: TrainConfig,
    ctx: RunContext,
    run_dir: Path,
    notes: list[str],
    stopped_early: bool,
) -> dict | None:
    """Test the best model once, measure it on the unaugmented training split, and write
    summary.json, curves.png and the final best checkpoint (rank 0)."""
    assert best_state is not None
    s.bare.load_state_dict(best_state)
    # cuDNN's autotuner picks algorithms by timing; the final numbers use the same heuristic
    # choice as `distml eval`, so that eval reproduces them exactly
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        test = evaluate_split(s, "test", config, ctx)
        train_clean = evaluate_split(s, "train", config, ctx)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    devices = all_gather_strings(device_name(ctx.device), ctx)
    peak_per_rank = [p[0] for p in all_gather_floats([max(loop.peaks)], ctx)]
    if ctx.mode == "dp" and ctx.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(ctx.world_size)]
    if not ctx.is_main:
        return None
    t, history = config.train, loop.history
    train_seconds = sum(r["epoch_seconds"] for r in history)
    summary = {
        "distml_version": __version__,
        "run_dir": str(run_dir),
        "architecture": describe(s.spec),
        "model_spec": s.spec.model_dump(mode="json"),
        "parameters": count_parameters(s.bare),
        "trainable_parameters": sum(p.numel() for p in s.params),
        "mode": ctx.mode,
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "micro_batch_per_rank": s.batches.micro_size,
        "batch_size": t.batch_size,
        "accum_steps": t.accum_steps,
        "precision": t.precision,
        "device_name": devices[0],
        "device_names": devices,
        "peak_memory_mb": max(peak_per_rank),
        "peak_memory_mb_per_rank": peak_per_rank,
        "memory_kind": "cuda max_memory_allocated" if ctx.device.type == "cuda" else "host RSS",
        "initial_weights_identical": len({round(c[0], 6) for c in s.initial_checksums}) == 1,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "test_images": test.count,
        "best_val_accuracy": loop.best_val if loop.best_val >= 0 else None,
        "best_epoch": loop.best_epoch,
        "train_accuracy": train_clean.accuracy,
        "train_loss": train_clean.loss,
        "final_train_accuracy_augmented": history[-1]["train_accuracy"],
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "resumed": loop.resumes,
        "train_seconds": train_seconds,
        "mean_epoch_seconds": train_seconds / len(history),
        "images_per_second": sum(r["images_per_second"] for r in history) / len(history),
        "total_seconds": loop.elapsed,
        "overfitting": overfitting_verdict(history),
        "loss_label_smoothing": t.label_smoothing,
        "notes": notes,
        "checkpoints": {
            "best": str(run_dir / "best.safetensors"),
            "last": str(run_dir / "last.safetensors"),
        },
    }
    best_row = history[loop.best_epoch - 1]
    final = meta_with(s.meta, loop.best_epoch, {**best_row, "test_accuracy": test.accuracy})
    save_checkpoint(run_dir / "best.safetensors", s.bare, final)
    if config.output.save is not None:
        copy_file(run_dir / "best.safetensors", config.output.save)
        summary["checkpoints"]["saved"] = str(config.output.save)
    plot_curves(history, run_dir / "curves.png", f"{describe(s.spec)[:90]}", loop.best_epoch)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def load_dataset_for_rank(config: TrainConfig, ctx: RunContext) -> ImageDataset:
    """Rank 0 of each node reads (and if needed downloads and caches) first; the others
    wait, so a cold cache is never written by several processes at once."""
    if ctx.local_rank == 0:
        dataset = load_dataset(config.data)
        barrier(ctx)
        return dataset
    barrier(ctx)
    return load_dataset(config.data)


def meta_with(meta: Checkpoint, epoch: int, metrics: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        spec=meta.spec,
        state={},
        classes=meta.classes,
        normalization=meta.normalization,
        settings=meta.settings,
        epoch=epoch,
        metrics=metrics,
        extra=meta.extra,
    )


def copy_file(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def epoch_line(row: dict[str, Any], epochs: int, improved: bool) -> str:
    val = (
        f" | val loss {row['val_loss']:.4f} acc {100 * row['val_accuracy']:.2f}%"
        if row["val_loss"] is not None
        else ""
    )
    mark = " *" if improved and row["val_loss"] is not None else ""
    return (
        f"epoch {row['epoch']:>3}/{epochs} | train loss {row['train_loss']:.4f} "
        f"acc {100 * row['train_accuracy']:.2f}%{val} | {row['epoch_seconds']:.1f}s "
        f"{row['images_per_second']:,.0f} img/s{mark}"
    )
