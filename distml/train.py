"""The training loop: one readable path for single-device, DataParallel and DDP runs.

``train(config)`` is what the CLI calls. For ``--mode ddp`` outside torchrun it launches the
ranks (dist.launch_ddp), each of which runs ``run_rank``; otherwise ``run_rank`` runs here.
``fit`` is the loop itself: data -> model -> epochs (train, validate, checkpoint) -> test
of the best model -> summary, curves and checkpoints in the run directory (rank 0 only).
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distml import __version__
from distml.checkpoint import (
    Checkpoint,
    atomic_write,
    atomic_write_json,
    bare_model,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
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
    all_reduce_sum,
    barrier,
    check_ddp_settings,
    device_name,
    launch_ddp,
    planned_ranks,
    resolve_device,
    setup_ddp,
    teardown,
    torchrun_env,
)
from distml.errors import DistmlError
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
    """Run ``config`` and return the summary (the same dict as ``summary.json``)."""
    device = resolve_device(config.train.device)
    if config.dist.mode == "ddp" and torchrun_env() is None:
        nproc = planned_ranks(config, device)
        check_ddp_settings(config, device, nproc * config.dist.nnodes)
        check_inputs(config)  # fail here, once, rather than in every rank
        run_dir = create_run_dir(config) if config.dist.node_rank == 0 else Path(".")
        return launch_ddp(config, run_dir, nproc, show_progress)
    if config.dist.mode == "ddp":
        return run_rank(config, None, show_progress=show_progress) or {}
    check_inputs(config)
    return run_rank(config, create_run_dir(config), show_progress=show_progress) or {}


def run_rank(config: TrainConfig, run_dir: Path | None, *, show_progress: bool) -> dict | None:
    """One process's part of a run; returns the summary on rank 0, None elsewhere."""
    if config.dist.mode == "ddp":
        env = torchrun_env()
        if env is None:
            raise DistmlError("internal: a DDP rank started without RANK/WORLD_SIZE set.")
        ctx = setup_ddp(config, env)
    else:
        ctx = local_context(config)
    try:
        if ctx.is_main and run_dir is None:  # under an outer torchrun: rank 0 names the run
            check_inputs(config)
            run_dir = create_run_dir(config)
        reporter = Reporter(show_progress and ctx.is_main)
        with torch_settings(config, ctx.device):
            return fit(config, ctx, run_dir or Path("."), reporter)
    finally:
        teardown(ctx)


def local_context(config: TrainConfig) -> RunContext:
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
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


def check_inputs(config: TrainConfig) -> None:
    """Problems that need no GPU work to find: output paths, the dataset, the init file."""
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
        check_init_fits(load_checkpoint(config.model.init), dataset)


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


def check_init_fits(ckpt: Checkpoint, dataset: ImageDataset) -> None:
    spec = ckpt.spec
    if (spec.image_size, spec.in_channels) != (dataset.image_size, dataset.channels):
        raise DistmlError(
            f"checkpoint {ckpt.path} expects {spec.image_size}x{spec.image_size}x"
            f"{spec.in_channels} images, the dataset has {dataset.image_size}x"
            f"{dataset.image_size}x{dataset.channels}. Use a dataset of the checkpoint's shape."
        )


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
            dropout=settings.dropout,
            head_hidden=tuple(settings.head_hidden),
        )
        return build_model(spec), spec, None
    ckpt = load_checkpoint(settings.init)
    check_init_fits(ckpt, dataset)
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
    features = {
        k.removeprefix("features."): v for k, v in ckpt.state.items() if k.startswith("features.")
    }
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
class EpochStats:
    loss: float
    accuracy: float
    seconds: float
    images: int
    peak_memory_mb: float


def peak_memory_mb(ctx: RunContext) -> float:
    if ctx.device.type == "cuda":
        devices = range(ctx.world_size) if ctx.mode == "dp" else [ctx.device.index]
        return max(torch.cuda.max_memory_allocated(d) for d in devices) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # host RSS (Linux: KiB)


def reset_peak_memory(ctx: RunContext) -> None:
    if ctx.device.type == "cuda":
        devices = range(ctx.world_size) if ctx.mode == "dp" else [ctx.device.index]
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteWatch:
    """Counts consecutive optimizer steps whose loss (summed over ranks) is not finite."""

    def __init__(self, patience: int):
        self.patience = patience
        self.run = 0

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


def train_epoch(
    model: nn.Module,
    batches: TrainBatches,
    epoch: int,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    criterion: nn.Module,
    ctx: RunContext,
    config: TrainConfig,
    watch: NonFiniteWatch,
    task: Any,
) -> EpochStats:
    frozen = config.model.freeze_features
    model.train()
    if frozen:  # frozen features keep their BatchNorm statistics too
        bare_model(model).features.eval()
    steps, accum = batches.steps_per_epoch, batches.accum_steps
    totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, seen
    step_losses = torch.zeros(steps, dtype=torch.float32, device=ctx.device)
    reset_peak_memory(ctx)
    synchronize(ctx.device)
    started = time.perf_counter()
    checked = 0
    for step, micro_batches in enumerate(batches.epoch(epoch)):
        for k, (images, labels) in enumerate(micro_batches):
            # DDP: all-reduce gradients only on the last micro-step of the accumulation
            skip_sync = ctx.mode == "ddp" and k < accum - 1
            with model.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast_context(ctx.device, config.train.precision):
                    logits = model(images)
                    loss = criterion(logits, labels)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
            # running sums stay on the device: no host sync inside the step
            step_losses[step] += scaled.detach().float()
            totals[0] += loss.detach().double() * len(labels)
            totals[1] += (logits.argmax(1) == labels).sum()
            totals[2] += len(labels)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
            window = torch.cat([step_losses[checked : step + 1], totals.float()])
            values = all_reduce_sum(window, ctx).tolist()  # one host sync per CHECK_EVERY steps
            watch.check(values[: step + 1 - checked], epoch, checked)
            task.advance(step + 1 - checked, status=progress_status(values[-3:]))
            checked = step + 1
    synchronize(ctx.device)
    seconds = time.perf_counter() - started
    all_reduce_sum(totals, ctx)
    loss_sum, correct, seen = totals.tolist()
    return EpochStats(loss_sum / seen, correct / seen, seconds, int(seen), peak_memory_mb(ctx))


def progress_status(totals: list[float]) -> str:
    loss_sum, correct, seen = totals
    return f"loss {loss_sum / max(seen, 1):.3f} acc {100 * correct / max(seen, 1):.1f}%"


def fit(config: TrainConfig, ctx: RunContext, run_dir: Path, reporter: Reporter) -> dict | None:
    """Train, validate, checkpoint, test the best model, write the report (rank 0)."""
    started = time.perf_counter()
    t = config.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank (DDP also broadcasts)

    # ---- data: splits on the device; normalisation from the training split
    dataset = load_dataset_for_rank(config, ctx)
    splits = make_splits(dataset, config.data.val_fraction, t.seed)
    model, spec, init = initial_model(config, dataset)
    stats = init.normalization if init else channel_stats(splits.train_images)
    normalize = Normalize(stats, ctx.device)
    loader_world = ctx.world_size if ctx.mode == "ddp" else 1
    channels_last = ctx.device.type == "cuda" and t.channels_last
    batches = TrainBatches(
        splits.train_images,
        splits.train_labels,
        normalize=normalize,
        batch_size=t.batch_size,
        accum_steps=t.accum_steps,
        rank=ctx.rank,
        world_size=loader_world,
        augment=config.data.augment,
        seed=t.seed,
        device=ctx.device,
        channels_last=channels_last,
    )
    device_splits = {
        name: (to_device_nchw(images, ctx.device), labels)
        for name in ("train", "val", "test")
        for images, labels in [splits.split(name)]
        if len(labels)
    }

    def eval_split(name: str, net: nn.Module):
        images, labels = device_splits[name]
        shard = eval_batches(
            images,
            labels,
            normalize=normalize,
            batch_size=t.eval_batch_size,
            rank=ctx.rank,
            world_size=loader_world,
            channels_last=channels_last,
        )
        return evaluate(
            net, shard, criterion, ctx, precision=t.precision, num_classes=spec.num_classes
        )

    # ---- model, optimizer, schedule
    net = wrap_model(model, config, ctx)
    bare = bare_model(net)
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, ctx.device)
    steps = batches.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, config, steps)
    )
    scaler = torch.amp.GradScaler(ctx.device.type) if t.precision == "16-mixed" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in bare.parameters()))
    checksums = all_gather_floats([checksum], ctx)
    meta = Checkpoint(
        spec=spec,
        state={},
        classes=list(dataset.classes),
        normalization=stats,
        settings=config.model_dump(mode="json"),
        extra={"init": str(config.model.init) if init else None},
    )
    notes = []
    if ctx.mode == "dp" and ctx.world_size < 2:
        notes.append(
            f"dp mode: nn.DataParallel needs at least 2 GPUs to split a batch and "
            f"{torch.cuda.device_count()} are visible, so this run used one device"
        )
    for note in notes:
        reporter.line(f"note: {note}")
    reporter.line(
        f"distml train: {describe(spec)} | {count_parameters(bare):,} parameters | "
        f"{ctx.mode} x{ctx.world_size} on {device_name(ctx.device)} | precision {t.precision} | "
        f"{len(splits.train_labels)} train / {len(splits.val_labels)} val images"
    )

    # ---- epochs
    history: list[dict[str, Any]] = []
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch, best_val, stopped_early = 0, -1.0, False
    watch = NonFiniteWatch(t.nonfinite_patience)
    peaks: list[float] = []
    for epoch in range(1, t.epochs + 1):
        with reporter.task(f"epoch {epoch}/{t.epochs}", steps) as task:
            epoch_stats = train_epoch(
                net,
                batches,
                epoch,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                criterion=criterion,
                ctx=ctx,
                config=config,
                watch=watch,
                task=task,
            )
        val = eval_split("val", bare) if "val" in device_splits else None
        peaks.append(epoch_stats.peak_memory_mb)
        row = {
            "epoch": epoch,
            "train_loss": epoch_stats.loss,
            "train_accuracy": epoch_stats.accuracy,
            "val_loss": val.loss if val else None,
            "val_accuracy": val.accuracy if val else None,
            "lr": scheduler.get_last_lr()[0],
            "epoch_seconds": epoch_stats.seconds,
            "images_per_second": epoch_stats.images / epoch_stats.seconds,
            "peak_memory_mb": epoch_stats.peak_memory_mb,
        }
        history.append(row)
        improved = val is None or val.accuracy > best_val
        if improved:
            best_epoch, best_val = epoch, val.accuracy if val else -1.0
            best_state = {k: v.detach().clone() for k, v in bare.state_dict().items()}
        if ctx.is_main:
            write_metrics(run_dir / "metrics.csv", history)
            ckpt = meta_with(meta, epoch, row)
            save_checkpoint(run_dir / "last.safetensors", bare, ckpt)
            if improved:
                save_checkpoint(run_dir / "best.safetensors", bare, ckpt)
            reporter.line(epoch_line(row, t.epochs, improved))
        if t.early_stop and val is not None and epoch - best_epoch >= t.early_stop:
            stopped_early = True
            reporter.line(f"early stop: no better validation accuracy for {t.early_stop} epochs")
            break
    train_seconds = sum(r["epoch_seconds"] for r in history)

    # ---- the best model on the test set (used once) and, unaugmented, on the training split
    assert best_state is not None
    bare.load_state_dict(best_state)
    test = eval_split("test", bare)
    train_clean = eval_split("train", bare)
    devices = all_gather_strings(device_name(ctx.device), ctx)
    peak_per_rank = [p[0] for p in all_gather_floats([max(peaks)], ctx)]
    if ctx.mode == "dp" and ctx.device.type == "cuda":
        devices = [torch.cuda.get_device_name(i) for i in range(ctx.world_size)]
    if not ctx.is_main:
        return None
    summary = {
        "distml_version": __version__,
        "run_dir": str(run_dir),
        "architecture": describe(spec),
        "model_spec": spec.model_dump(mode="json"),
        "parameters": count_parameters(bare),
        "trainable_parameters": sum(p.numel() for p in params),
        "mode": ctx.mode,
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "micro_batch_per_rank": batches.micro_size,
        "batch_size": t.batch_size,
        "accum_steps": t.accum_steps,
        "precision": t.precision,
        "device_name": devices[0],
        "device_names": devices,
        "peak_memory_mb": max(peak_per_rank),
        "peak_memory_mb_per_rank": peak_per_rank,
        "memory_kind": "cuda max_memory_allocated" if ctx.device.type == "cuda" else "host RSS",
        "initial_weights_identical": len({round(c[0], 6) for c in checksums}) == 1,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "test_images": test.count,
        "best_val_accuracy": best_val if best_val >= 0 else None,
        "best_epoch": best_epoch,
        "train_accuracy": train_clean.accuracy,
        "train_loss": train_clean.loss,
        "final_train_accuracy_augmented": history[-1]["train_accuracy"],
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "train_seconds": train_seconds,
        "mean_epoch_seconds": train_seconds / len(history),
        "images_per_second": sum(r["images_per_second"] for r in history) / len(history),
        "total_seconds": time.perf_counter() - started,
        "overfitting": overfitting_verdict(history),
        "loss_label_smoothing": t.label_smoothing,
        "notes": notes,
        "checkpoints": {
            "best": str(run_dir / "best.safetensors"),
            "last": str(run_dir / "last.safetensors"),
        },
    }
    final = meta_with(meta, best_epoch, {**history[best_epoch - 1], "test_accuracy": test.accuracy})
    save_checkpoint(run_dir / "best.safetensors", bare, final)
    if config.output.save is not None:
        copy_file(run_dir / "best.safetensors", config.output.save)
        summary["checkpoints"]["saved"] = str(config.output.save)
    plot_curves(history, run_dir / "curves.png", f"{describe(spec)[:90]}", best_epoch)
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
