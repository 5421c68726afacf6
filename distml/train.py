"""The training loop: one readable path for single-device, DataParallel and DDP runs.

``fit`` is the loop itself: data -> model -> epochs (train, validate, checkpoint) -> test of
the best model -> summary, curves and checkpoints in the run directory (rank 0 only). It runs
in a process whose layout distml.launch has set up (one process, or one DDP rank); nothing
here starts processes or reads the environment.
"""

from __future__ import annotations

import contextlib
import math
import resource
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from distml import __version__
from distml.checkpoint import (
    STATE_FILE,
    Checkpoint,
    TrainingState,
    bare_model,
    error_lines,
    load_checkpoint,
    local_rng_states,
    model_from_checkpoint,
    save_checkpoint,
    save_training_state,
    split_prefix,
    training_state_from_bytes,
)
from distml.config import TrainConfig
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
    broadcast_bytes,
    device_name,
)
from distml.errors import DistmlError, Interrupted, TrainingDiverged
from distml.evaluate import check_input_shape
from distml.files import atomic_write_json, copy_file
from distml.metrics import autocast_context, evaluate, overfitting_verdict, write_metrics
from distml.models import Classifier, ModelSpec, build_model, count_parameters, describe
from distml.plots import plot_curves
from distml.progress import Reporter

CHECK_EVERY = 25  # optimizer steps between host syncs (progress, non-finite check)
# BatchNorm's running statistics (momentum 0.1) follow the weights over roughly the last ten
# updates; with fewer than this many optimizer steps per epoch they lag the weights they are
# used with at validation, and validation accuracy can sit near chance while training climbs
BATCHNORM_MIN_STEPS_PER_EPOCH = 20


class StopFlag(Protocol):
    """What the loop needs of a stop request (distml.launch.StopRequest): the signal number
    received, or 0."""

    signum: int


# ----------------------------------------------------------------------------- model set-up


def initial_model(
    config: TrainConfig, dataset: ImageDataset
) -> tuple[Classifier, ModelSpec, Checkpoint | None]:
    """A fresh model from the settings, or one started from ``--init`` (with a new classifier
    head when the features are frozen or the classes differ)."""
    settings = config.model
    if settings.init is None:
        spec = ModelSpec.from_settings(
            settings, len(dataset.classes), dataset.channels, dataset.image_size
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
    optim = config.optim
    fused = {"fused": True} if device.type == "cuda" else {}
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=optim.nesterov,
            weight_decay=optim.weight_decay,
            **fused,
        )
    if optim.optimizer == "adam":
        return torch.optim.Adam(
            params,
            lr=optim.lr,
            betas=(optim.momentum, 0.999),
            weight_decay=optim.weight_decay,
            **fused,
        )
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(
            params,
            lr=optim.lr,
            betas=(optim.momentum, 0.999),
            weight_decay=optim.weight_decay,
            **fused,
        )
    return torch.optim.RMSprop(
        params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
    )


def lr_factor(step: int, config: TrainConfig, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (schedules run per step)."""
    optim = config.optim
    total = config.train.epochs * steps_per_epoch
    if optim.scheduler == "step":
        return optim.gamma ** ((step // steps_per_epoch) // optim.step_size)
    if optim.scheduler == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if optim.scheduler == "onecycle":  # linear warm-up to the peak, then linear decay to zero
        warm = max(1, round(optim.warmup_fraction * total))
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

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in LoopState(**state).state_dict().items():
            setattr(self, name, value)


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
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless precision is 16-mixed
    autocast: contextlib.AbstractContextManager  # the forward pass's precision, reusable
    criterion: nn.Module
    meta: Checkpoint
    initial_weights_identical: bool  # every rank built the same weights (before DDP's broadcast)


def prepare(
    config: TrainConfig,
    ctx: RunContext,
    state: TrainingState | None,
    dataset: ImageDataset | None = None,
) -> Session:
    """Data on the device, the model (resumed weights loaded before wrapping, so DDP
    broadcasts them), optimizer, schedule and scaler, restored from ``state`` if given."""
    settings = config.train
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    if dataset is None:
        dataset = load_dataset_for_rank(config, ctx)
    splits = make_splits(dataset, config.data.val_fraction, settings.seed)
    model, spec, init = initial_model(config, dataset)
    stats = init.normalization if init else channel_stats(splits.train_images)
    normalize = Normalize(stats, ctx.device)
    batches = TrainBatches(
        splits.train_images,
        splits.train_labels,
        normalize=normalize,
        batch_size=settings.batch_size,
        accum_steps=settings.accum_steps,
        rank=ctx.rank,
        world_size=ctx.world_size if ctx.mode == "ddp" else 1,
        augment=config.data.augment,
        seed=settings.seed,
        device=ctx.device,
        channels_last=ctx.device.type == "cuda" and settings.channels_last,
    )
    if state is not None:
        model.load_state_dict(state.model)
    # compared before wrapping: DDP broadcasts rank 0's weights, after which they always agree
    identical = weights_identical(model, ctx)
    net = wrap_model(model, config, ctx)
    bare = bare_model(net)
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, ctx.device)
    steps = batches.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, steps)
    )
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=settings.precision == "16-mixed")
    if state is not None:
        state.restore(optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        match_param_layout(optimizer)
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
        autocast=autocast_context(ctx.device, settings.precision),
        criterion=nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing),
        meta=Checkpoint(
            spec=spec,
            state={},
            classes=list(dataset.classes),
            normalization=stats,
            settings=config.model_dump(mode="json"),
            extra={"init": str(config.model.init) if init else None},
        ),
        initial_weights_identical=identical,
    )


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every restored per-parameter state tensor (momentum, Adam moments) its parameter's
    memory layout. A saved state comes back contiguous, while channels-last parameters are
    not, and CUDA's fused optimizers refuse tensors whose strides differ from the params'
    (a resumed run on a GPU failed at its first step)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            slots = optimizer.state.get(param, {})
            for key, value in slots.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == param.shape
                    and value.stride() != param.stride()
                ):
                    slots[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def weights_identical(model: nn.Module, ctx: RunContext) -> bool:
    """Whether every rank holds the same weights (compared by checksum)."""
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in model.parameters()))
    return len({round(c[0], 6) for c in all_gather_floats([checksum], ctx)}) == 1


def evaluate_split(session: Session, name: str, config: TrainConfig, ctx: RunContext):
    images, labels = session.splits[name]
    shard = eval_batches(
        images,
        labels,
        normalize=session.normalize,
        batch_size=config.train.eval_batch_size,
        rank=ctx.rank,
        world_size=ctx.world_size if ctx.mode == "ddp" else 1,
        channels_last=ctx.device.type == "cuda" and config.train.channels_last,
    )
    return evaluate(
        session.bare,
        shard,
        session.criterion,
        ctx,
        precision=config.train.precision,
        num_classes=session.spec.num_classes,
    )


class HostSync:
    """The loop's one host sync, every CHECK_EVERY steps: the losses of the steps since the
    last sync (non-finite check), the running totals (progress) and the stop flag, summed over
    the ranks in one all-reduce. Between syncs nothing leaves the device."""

    def __init__(
        self,
        ctx: RunContext,
        loop: LoopState,
        watch: NonFiniteWatch,
        stop: StopFlag,
        task: Any,
        steps: int,
    ):
        self.ctx, self.loop, self.watch, self.stop, self.task = ctx, loop, watch, stop, task
        self.checked = loop.step  # the last step whose loss was checked
        self.step_losses = torch.zeros(steps, dtype=torch.float32, device=ctx.device)
        # running sums; a resumed epoch's earlier (already summed) totals are carried by rank 0
        carried = loop.totals if ctx.is_main else [0.0, 0.0, 0.0]
        self.totals = torch.tensor(carried, dtype=torch.float64, device=ctx.device)
        self.stop_agreed = False

    def due(self, done: int) -> bool:
        # a single process stops right after this step; DDP ranks agree at the next sync
        local_stop = self.stop.signum > 0 and not self.ctx.distributed
        return done % CHECK_EVERY == 0 or done == len(self.step_losses) or local_stop

    def __call__(self, upto: int) -> bool:
        """Sync after step ``upto``; True when some rank was asked to stop."""
        flag = torch.tensor([float(self.stop.signum > 0)], device=self.ctx.device)
        window = torch.cat([self.step_losses[self.checked : upto], self.totals.float(), flag])
        values = all_reduce_sum(window, self.ctx).tolist()
        self.watch.check(values[: upto - self.checked], self.loop.epoch, self.checked)
        self.task.advance(upto - self.checked, status=progress_status(values[-4:-1]))
        self.checked = upto
        self.stop_agreed = values[-1] > 0
        return self.stop_agreed


def train_epoch(
    session: Session,
    loop: LoopState,
    config: TrainConfig,
    ctx: RunContext,
    watch: NonFiniteWatch,
    stop: StopFlag,
    task: Any,
) -> bool:
    """Train from ``loop.step`` to the end of ``loop.epoch``; update ``loop``. Returns False
    when a stop was requested (the loop is then at the last finished step)."""
    session.net.train()
    if config.model.freeze_features:  # frozen features keep their BatchNorm statistics too
        session.bare.features.eval()
    steps, accum = session.batches.steps_per_epoch, session.batches.accum_steps
    sync = HostSync(ctx, loop, watch, stop, task, steps)
    totals = sync.totals
    for device_index in cuda_devices(ctx):
        torch.cuda.reset_peak_memory_stats(device_index)
    synchronize(ctx.device)
    started = time.perf_counter()
    for step, micro_batches in enumerate(session.batches.epoch(loop.epoch, loop.step), loop.step):
        for micro_step, (images, labels) in enumerate(micro_batches):
            # DDP: all-reduce gradients only on the last micro-step of the accumulation
            skip_sync = ctx.mode == "ddp" and micro_step < accum - 1
            with session.net.no_sync() if skip_sync else contextlib.nullcontext():
                with session.autocast:
                    logits = session.net(images)
                    loss = session.criterion(logits, labels)
                scaled = loss / accum
                session.scaler.scale(scaled).backward()
            sync.step_losses[step] += scaled.detach().float()
            totals[0] += loss.detach().double() * len(labels)
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += len(labels)
        session.scaler.step(session.optimizer)
        session.scaler.update()
        session.optimizer.zero_grad(set_to_none=True)
        session.scheduler.step()
        done = step + 1
        if sync.due(done) and sync(done) and done < steps:
            break
    synchronize(ctx.device)
    loop.seconds += time.perf_counter() - started
    loop.step = sync.checked
    loop.totals = all_reduce_sum(totals, ctx).tolist()
    loop.nonfinite_run = watch.run
    return not (sync.stop_agreed and sync.checked < steps)


def progress_status(totals: list[float]) -> str:
    loss_sum, correct, seen = totals
    return f"loss {loss_sum / max(seen, 1):.3f} acc {100 * correct / max(seen, 1):.1f}%"


@dataclass
class Run:
    """What one ``fit`` call works on besides the settings: the process, its folder, its
    progress output, the stop request, and the notes for the summary."""

    config: TrainConfig
    ctx: RunContext
    run_dir: Path
    reporter: Reporter
    stop: StopFlag
    notes: list[str] = field(default_factory=list)


def fit(
    config: TrainConfig,
    ctx: RunContext,
    run_dir: Path,
    reporter: Reporter,
    stop: StopFlag,
    *,
    resume: bool = False,
    dataset: ImageDataset | None = None,
) -> dict | None:
    """Train, validate, checkpoint, test the best model, write the report (rank 0).
    ``resume``: continue from the run's saved state, if rank 0 has one."""
    started = time.perf_counter()
    run = Run(config, ctx, run_dir, reporter, stop)
    settings = config.train
    state = shared_training_state(run_dir / STATE_FILE, ctx) if resume else None
    if state is not None and state.world_size != ctx.world_size:
        raise DistmlError(
            f"{run_dir} was saved by {state.world_size} rank(s); resume it with the same number "
            f"(--nproc {state.world_size}), not {ctx.world_size}."
        )
    try:
        session = prepare(config, ctx, state, dataset)
    except (RuntimeError, ValueError, KeyError) as exc:
        if state is None:
            raise
        # the state was saved by another network or optimizer than config.json now describes
        raise DistmlError(
            f"{run_dir / STATE_FILE} does not fit the run's settings ({error_lines(exc)}): "
            f"was {run_dir / 'config.json'} edited after the run started? Restore its original "
            "settings to resume, or start a new run from the weights with --init "
            f"{run_dir / 'last.safetensors'}."
        ) from None
    loop = LoopState()
    best_state: dict[str, torch.Tensor] | None = None
    if state is not None:
        loop.load_state_dict(state.loop)
        loop.resumes += 1
        best_state = state.best or (state.model if loop.best_epoch else None)
        state.restore_rng(ctx.rank, ctx.device)
        reporter.line(f"resuming {run_dir} at epoch {loop.epoch}, step {loop.step}")
    run.notes = mode_notes(ctx, settings.precision) + batchnorm_notes(session, config, ctx)
    for note in run.notes:
        reporter.line(f"note: {note}")
    reporter.line(
        f"distml train: {describe(session.spec)} | {count_parameters(session.bare):,} parameters "
        f"| {ctx.mode} x{ctx.world_size} on {device_name(ctx.device)} | precision "
        f"{settings.precision} | {session.batches.images.shape[0]} train / "
        f"{len(session.splits['val'][1]) if 'val' in session.splits else 0} val images"
    )
    watch = NonFiniteWatch(settings.nonfinite_patience, loop.nonfinite_run)
    stopped_early = False
    while loop.epoch <= settings.epochs:
        since_best = loop.epoch - 1 - loop.best_epoch
        if settings.early_stop and loop.history and since_best >= settings.early_stop:
            stopped_early = True
            reporter.line(
                f"early stop: no better validation accuracy for {settings.early_stop} epochs"
            )
            break
        steps = session.batches.steps_per_epoch
        with reporter.task(f"epoch {loop.epoch}/{settings.epochs}", steps) as task:
            task.advance(loop.step)
            finished = train_epoch(session, loop, config, ctx, watch, stop, task)
        if not finished:
            loop.elapsed += time.perf_counter() - started
            save_state(run_dir, session, loop, best_state, ctx)
            where = f" at step {loop.step} of epoch {loop.epoch}"
            raise Interrupted.after_signal(stop.signum or signal.SIGTERM, run_dir, where)
        best_state = finish_epoch(run, session, loop, best_state, started)
        started = time.perf_counter()
        if stop_requested_everywhere(stop, ctx):
            where = f" after epoch {loop.epoch - 1}"
            raise Interrupted.after_signal(stop.signum or signal.SIGTERM, run_dir, where)
    loop.elapsed += time.perf_counter() - started
    return finish_run(run, session, loop, best_state, stopped_early)


def finish_epoch(
    run: Run,
    session: Session,
    loop: LoopState,
    best_state: dict[str, torch.Tensor] | None,
    started: float,
) -> dict[str, torch.Tensor] | None:
    """Validate, keep the best weights, move the loop to the next epoch, save the state (the
    epoch's commit point) and the checkpoints. ``started``: when this session's clock last
    started. Returns the best weights."""
    config, ctx = run.config, run.ctx
    row = epoch_row(session, loop, config, ctx)
    improved = row["val_loss"] is None or row["val_accuracy"] > loop.best_val
    if improved:
        loop.best_epoch = loop.epoch
        loop.best_val = row["val_accuracy"] if row["val_loss"] is not None else -1.0
        best_state = {k: v.detach().clone() for k, v in session.bare.state_dict().items()}
    loop.best_is_current = improved
    check_weights_finite(session, loop.epoch)
    completed = loop.epoch
    loop.epoch, loop.step, loop.totals, loop.seconds = completed + 1, 0, [0.0, 0.0, 0.0], 0.0
    loop.elapsed += time.perf_counter() - started
    save_state(run.run_dir, session, loop, best_state, ctx)
    if ctx.is_main:
        ckpt = meta_with(session.meta, completed, row)
        if improved:
            save_checkpoint(run.run_dir / "best.safetensors", session.bare, ckpt)
        save_checkpoint(run.run_dir / "last.safetensors", session.bare, ckpt)
        write_metrics(run.run_dir / "metrics.csv", loop.history)
        run.reporter.line(epoch_line(row, config.train.epochs, improved))
    return best_state


def epoch_row(session: Session, loop: LoopState, config: TrainConfig, ctx: RunContext) -> dict:
    """Validate, and append the epoch's row to the history."""
    loss_sum, correct, seen = loop.totals
    val = evaluate_split(session, "val", config, ctx) if "val" in session.splits else None
    peak = peak_memory_mb(ctx)
    loop.peaks.append(peak)
    row = {
        "epoch": loop.epoch,
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "val_loss": val.loss if val else None,
        "val_accuracy": val.accuracy if val else None,
        "lr": session.scheduler.get_last_lr()[0],
        "epoch_seconds": loop.seconds,
        "images_per_second": seen / loop.seconds,
        "peak_memory_mb": peak,
    }
    loop.history.append(row)
    return row


def check_weights_finite(session: Session, epoch: int) -> None:
    """Never checkpoint broken weights: NaN/inf weights end the run, the last good files stay."""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in session.bare.parameters()]).all()
    if not bool(finite):
        raise TrainingDiverged(
            f"the model weights became non-finite during epoch {epoch}. The run stopped; the "
            "last good checkpoint is kept. Lower --lr, add warm-up, or use --precision "
            "bf16-mixed / 32."
        )


def stop_requested_everywhere(stop: StopFlag, ctx: RunContext) -> bool:
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


def batchnorm_notes(session: Session, config: TrainConfig, ctx: RunContext) -> list[str]:
    """A warning when BatchNorm gets too few optimizer steps per epoch to follow the weights,
    with the batch size that would give enough (BATCHNORM_MIN_STEPS_PER_EPOCH)."""
    steps = session.batches.steps_per_epoch
    has_batchnorm = any(
        isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
        for module in session.bare.modules()
    )
    if not has_batchnorm or config.model.freeze_features or steps >= BATCHNORM_MIN_STEPS_PER_EPOCH:
        return []
    settings = config.train
    divisor = (ctx.world_size if ctx.mode == "ddp" else 1) * settings.accum_steps
    images = session.batches.images.shape[0]
    suggested = max(divisor, images // BATCHNORM_MIN_STEPS_PER_EPOCH // divisor * divisor)
    return [
        f"BatchNorm with only {steps} optimizer step(s) per epoch ({images} training images, "
        f"--batch-size {settings.batch_size}): its running statistics cannot follow the "
        "weights, so validation accuracy can stay near chance while training accuracy climbs. "
        f"--batch-size {suggested} or smaller gives at least {BATCHNORM_MIN_STEPS_PER_EPOCH} "
        "steps per epoch (or use --norm group)"
    ]


# ----------------------------------------------------------------------------- training state


def shared_training_state(path: Path, ctx: RunContext) -> TrainingState | None:
    """The run's saved training state on every rank, or None when it has none yet. Only rank 0
    reads the file and sends it to the others over the process group, so ranks on nodes
    without the run folder (no shared filesystem) resume from the same state."""
    data = None
    if ctx.is_main and path.exists():
        data = path.read_bytes()
    data = broadcast_bytes(data, ctx)
    return None if data is None else training_state_from_bytes(data, path)


def gather_rng(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, keyed ``<name>.<global rank>`` (a collective: all ranks call
    it; every rank has the same names, so the gathers line up)."""
    replicas = cuda_devices(ctx)[1:] if ctx.mode == "dp" else []
    gathered = {}
    for name, local in sorted(local_rng_states(ctx.device, replicas).items()):
        for rank, tensor in enumerate(all_gather_tensor(local, ctx)):
            gathered[f"{name}.{rank}"] = tensor
    return gathered


def save_state(
    run_dir: Path,
    session: Session,
    loop: LoopState,
    best_state: dict[str, torch.Tensor] | None,
    ctx: RunContext,
) -> None:
    """Write the training state (rank 0; every rank contributes its RNG states)."""
    rng = gather_rng(ctx)
    if not ctx.is_main:
        return
    state = TrainingState.capture(
        model=session.bare,
        best=None if loop.best_is_current else best_state,
        optimizer=session.optimizer,
        scheduler=session.scheduler,
        scaler=session.scaler,
        loop=loop,
        rng=rng,
        world_size=ctx.world_size,
    )
    save_training_state(run_dir / STATE_FILE, state)


# ----------------------------------------------------------------------------- the report


def finish_run(
    run: Run,
    session: Session,
    loop: LoopState,
    best_state: dict[str, torch.Tensor] | None,
    stopped_early: bool,
) -> dict | None:
    """Test the best model once, measure it on the unaugmented training split, and write
    summary.json, curves.png and the final best checkpoint (rank 0)."""
    config, ctx, run_dir = run.config, run.ctx, run.run_dir
    assert best_state is not None
    session.bare.load_state_dict(best_state)
    # cuDNN's autotuner picks algorithms by timing; the final numbers use the same heuristic
    # choice as `distml eval`, so that eval reproduces them exactly
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    try:
        test = evaluate_split(session, "test", config, ctx)
        train_clean = evaluate_split(session, "train", config, ctx)
    finally:
        torch.backends.cudnn.benchmark = benchmark
    devices = all_gather_strings(device_name(ctx.device), ctx)
    peak_per_rank = [p[0] for p in all_gather_floats([max(loop.peaks)], ctx)]
    if ctx.mode == "dp" and ctx.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(ctx.world_size)]
    if not ctx.is_main:
        return None
    settings, history = config.train, loop.history
    train_seconds = sum(r["epoch_seconds"] for r in history)
    summary = {
        "distml_version": __version__,
        "run_dir": str(run_dir),
        "architecture": describe(session.spec),
        "model_spec": session.spec.model_dump(mode="json"),
        "parameters": count_parameters(session.bare),
        "trainable_parameters": sum(p.numel() for p in session.params),
        "mode": ctx.mode,
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "micro_batch_per_rank": session.batches.micro_size,
        "batch_size": settings.batch_size,
        "accum_steps": settings.accum_steps,
        "precision": settings.precision,
        "device_name": devices[0],
        "device_names": devices,
        "peak_memory_mb": max(peak_per_rank),
        "peak_memory_mb_per_rank": peak_per_rank,
        "memory_kind": "cuda max_memory_allocated" if ctx.device.type == "cuda" else "host RSS",
        "initial_weights_identical": session.initial_weights_identical,
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
        "loss_label_smoothing": settings.label_smoothing,
        "notes": run.notes,
        "checkpoints": {
            "best": str(run_dir / "best.safetensors"),
            "last": str(run_dir / "last.safetensors"),
        },
    }
    best_row = history[loop.best_epoch - 1]
    final = meta_with(session.meta, loop.best_epoch, {**best_row, "test_accuracy": test.accuracy})
    save_checkpoint(run_dir / "best.safetensors", session.bare, final)
    if config.output.save is not None:
        copy_file(run_dir / "best.safetensors", config.output.save)
        summary["checkpoints"]["saved"] = str(config.output.save)
    title = describe(session.spec)[:90]
    plot_curves(history, run_dir / "curves.png", title, loop.best_epoch)
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
