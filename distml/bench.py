"""``distml bench``: training throughput of distml's path against the classic tutorial one.

One run times, on the same model, batch and data, first the "classic" pipeline (a Dataset of
PIL images, torchvision transforms, a DataLoader with workers and pinned memory, fp32, NCHW,
the default optimizer implementation), then distml's path with one speed setting added per
line: uint8 batches made on the device, channels_last, mixed precision, the fused optimizer,
torch.compile. Each line: warm-up steps first, then timed steps (CUDA events on a GPU), their
median and p10/p90, images/s, peak memory and, on a GPU in the peak table, the model FLOPs
utilisation (FLOPs counted by FlopCounterMode, not by hand).
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distml.config import BenchSettings, DataSettings, TrainConfig
from distml.data import Normalize, TrainBatches, channel_stats, load_dataset
from distml.dist import device_name, resolve_device
from distml.errors import DistmlError
from distml.files import atomic_write_json, atomic_write_text, check_out_dir
from distml.metrics import autocast_context
from distml.models import ModelSpec, build_model
from distml.plots import plot_throughput
from distml.train import make_optimizer, synchronize

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, matched
# against torch.cuda.get_device_name; the first pattern that matches wins, so the specific
# variants come before the general ones. A GPU not listed gets no MFU rather than a guess.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100.*PCIe", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}),
    (r"H100.*NVL", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}),
    (r"H100|H200|GH200", {"bf16": 989, "fp16": 989, "tf32": 495, "fp32": 67}),
    (r"A100", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}),
    (r"L40S", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}),
    (r"V100", {"fp16": 125, "fp32": 15.7}),
    (r"\bT4\b", {"fp16": 65, "fp32": 8.1}),
)
PRECISION_PEAK = {"bf16-mixed": "bf16", "16-mixed": "fp16"}
PRECISION_LABEL = {"32": "fp32", "bf16-mixed": "bf16", "16-mixed": "fp16"}
CLASSIC = "classic (DataLoader, PIL, fp32)"
Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def gpu_peaks(name: str) -> dict[str, float] | None:
    """The dense peaks of a GPU by its name, or None for a GPU not in the table."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, name):
            return peaks
    return None


def peak_tflops(peaks: dict[str, float] | None, precision: str) -> float | None:
    """The peak a line is measured against: fp32 convolutions run on TF32 tensor cores
    while cuDNN's allow_tf32 is on (PyTorch's default), so fp32 lines count against TF32."""
    if peaks is None:
        return None
    if precision == "32":
        tf32 = torch.backends.cudnn.allow_tf32 and "tf32" in peaks
        return peaks["tf32" if tf32 else "fp32"]
    return peaks.get(PRECISION_PEAK[precision])


def training_flops_per_image(model: nn.Module, image_shape: tuple[int, ...]) -> float:
    """FLOPs of one forward and backward pass per image, counted by PyTorch's FlopCounterMode
    on a CPU copy of the model (the count does not depend on device or precision)."""
    probe = build_copy(model)
    batch = 2  # BatchNorm needs more than one image in training mode
    images = torch.randn(batch, *image_shape)
    labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(probe(images), labels).backward()
    return counter.get_total_flops() / batch


def build_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cpu().float().train()


# ----------------------------------------------------------------------------- the lines


@dataclass(frozen=True)
class Line:
    """One benchmark line: a pipeline and the speed settings it has on."""

    label: str
    pipeline: str
    precision: str = "32"
    channels_last: bool = False
    fused: bool = False
    compile: bool = False


@dataclass(frozen=True)
class Resolved:
    """The settings with their device-dependent defaults filled in."""

    width: float
    batch_size: int
    precisions: list[str]
    workers: int


def resolve(settings: BenchSettings, device: torch.device) -> Resolved:
    cuda = device.type == "cuda"
    width = settings.width if settings.width is not None else (1.0 if cuda else 0.125)
    batch = settings.batch_size if settings.batch_size is not None else (512 if cuda else 32)
    # On a CPU fp16 autocast is ~10x slower than fp32 and bf16 autocast with channels_last
    # was ~3x slower (docs/benchmarks.md): the CPU ladder is fp32 unless asked
    default_precisions = ["bf16-mixed", "16-mixed"] if cuda else ["32"]
    precisions = list(settings.precisions or default_precisions)
    workers = settings.workers if settings.workers is not None else min(8, os.cpu_count() or 1)
    return Resolved(width, batch, precisions, workers)


def ladder(settings: BenchSettings, precisions: list[str]) -> list[Line]:
    """The classic line, then distml's lines, each adding one setting to the one before
    (fp16 is a sibling of bf16: the fused and compile lines build on the first precision)."""
    lines = [Line(CLASSIC, "classic")] if "classic" in settings.pipelines else []
    if "distml" not in settings.pipelines:
        return lines
    base = Line("distml: uint8 batches on the device", "distml")
    layout = replace(base, label="+ channels_last", channels_last=True)
    lines += [base, layout]
    mixed = [p for p in precisions if p != "32"]
    for precision in mixed:
        scaler = " + GradScaler" if precision == "16-mixed" else ""
        label = f"+ {PRECISION_LABEL[precision]} autocast{scaler}"
        lines.append(replace(layout, label=label, precision=precision))
    best = replace(layout, precision=mixed[0]) if mixed else layout
    fused = replace(
        best, label=f"+ fused optimizer ({PRECISION_LABEL[best.precision]})", fused=True
    )
    lines.append(fused)
    if settings.compile:
        lines.append(replace(fused, label="+ torch.compile", compile=True))
    return lines


# ----------------------------------------------------------------------------- data pipelines


class ClassicDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does: uint8 arrays in memory, a PIL image per item, then
    the per-sample transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def classic_batches(
    images: torch.Tensor, labels: torch.Tensor, stats: dict, batch: int, workers: int, device
) -> Batches:
    """The tutorial pipeline, epoch after epoch; batches copied to the device as they come."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(stats["mean"], stats["std"]),
        ]
    )
    loader = torch.utils.data.DataLoader(
        ClassicDataset(images.numpy(), labels.numpy(), transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    for _ in itertools.count():
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def distml_batches(
    images: torch.Tensor, labels: torch.Tensor, stats: dict, batch: int, seed: int, device, line
) -> Batches:
    """distml's training batches (data.TrainBatches), epoch after epoch."""
    batches = TrainBatches(
        images,
        labels,
        normalize=Normalize(stats, device),
        batch_size=batch,
        accum_steps=1,
        rank=0,
        world_size=1,
        augment=True,
        seed=seed,
        device=device,
        channels_last=line.channels_last,
    )
    for epoch in itertools.count(1):
        for micro_batches in batches.epoch(epoch):
            yield micro_batches[0]


# ----------------------------------------------------------------------------- timing


def time_steps(
    step: Callable[[], None], warmup: int, steps: int, device: torch.device
) -> list[float]:
    """Seconds of each timed step, after ``warmup`` untimed ones. On a GPU, CUDA events
    between step ends: no host sync inside the timed steps, and stalls waiting for data count."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type != "cuda":
        seconds = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
        return seconds
    marks = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    marks[0].record()
    for mark in marks[1:]:
        step()
        mark.record()
    synchronize(device)
    return [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]


def spread(seconds: list[float]) -> tuple[float, float, float]:
    """Median, 10th and 90th percentile."""
    if len(seconds) < 2:
        return seconds[0], seconds[0], seconds[0]
    deciles = statistics.quantiles(seconds, n=10, method="inclusive")
    return statistics.median(seconds), deciles[0], deciles[-1]


def peak_memory_mib(device: torch.device) -> float:
    """GPU: the peak allocated since the line started. CPU: the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def largest_fitting_batch(fits: Callable[[int], bool], batch: int) -> int | None:
    """Halve ``batch`` until ``fits(batch)``; None when not even one image fits."""
    while batch >= 1:
        if fits(batch):
            return batch
        batch //= 2
    return None


# ----------------------------------------------------------------------------- one line


@dataclass(frozen=True)
class Workload:
    """What every line shares: device, data, model shape and optimizer settings."""

    device: torch.device
    images: torch.Tensor  # uint8 N x H x W x C, on the host
    labels: torch.Tensor
    stats: dict[str, list[float]]
    spec: ModelSpec
    config: TrainConfig  # the optimizer settings make_optimizer reads
    workers: int
    seed: int


def build_optimizer(params: list[nn.Parameter], work: Workload, fused: bool):
    """distml's optimizer (train.make_optimizer) with the implementation asked for: fused,
    or PyTorch's default (foreach where it applies), which is what tutorials get."""
    optimizer = make_optimizer(params, work.config, work.device)
    if bool(optimizer.defaults.get("fused")) == fused:
        return optimizer
    defaults = {**optimizer.defaults, "fused": True if fused else None, "foreach": None}
    return type(optimizer)(params, **defaults)


def make_model(work: Workload, line: Line) -> nn.Module:
    torch.manual_seed(work.seed)  # every line starts from the same weights
    model = build_model(work.spec).to(work.device)
    if line.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if line.compile:
        model = torch.compile(model)
    return model


def batch_source(work: Workload, line: Line, batch: int) -> Batches:
    if line.pipeline == "classic":
        return classic_batches(
            work.images, work.labels, work.stats, batch, work.workers, work.device
        )
    return distml_batches(work.images, work.labels, work.stats, batch, work.seed, work.device, line)


def run_line(work: Workload, line: Line, batch: int, warmup: int, steps: int) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of ``line``; its timings and peak memory."""
    free_memory(work.device)
    model = make_model(work, line)
    params = list(model.parameters())
    optimizer = build_optimizer(params, work, line.fused)
    scaler = torch.amp.GradScaler(work.device.type) if line.precision == "16-mixed" else None
    criterion = nn.CrossEntropyLoss()
    source = batch_source(work, line, batch)

    def step() -> None:
        images, labels = next(source)
        with autocast_context(work.device, line.precision):
            loss = criterion(model(images), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad()

    try:
        seconds = time_steps(step, warmup, steps, work.device)
    finally:
        source.close()  # stops the classic DataLoader's workers now, not at garbage collection
    median, p10, p90 = spread(seconds)
    return {
        "line": line.label,
        **{k: v for k, v in asdict(line).items() if k != "label"},
        "batch_size": batch,
        "images_per_second": batch * len(seconds) / sum(seconds),
        "step_ms_median": 1000 * median,
        "step_ms_p10": 1000 * p10,
        "step_ms_p90": 1000 * p90,
        "peak_memory_mib": peak_memory_mib(work.device),
    }


def run_line_checked(work: Workload, line: Line, settings: BenchSettings, batch: int) -> dict:
    """``run_line``, turning an out-of-memory error into the batch that fits, and a failed
    torch.compile into a user-facing error (both exit 2)."""
    try:
        return run_line(work, line, batch, warmup_steps(work, line, settings), settings.steps)
    except torch.OutOfMemoryError:
        pass  # leave the handler first: its traceback holds the line's tensors
    except Exception as exc:
        if not line.compile:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistmlError(
            f"--compile: torch.compile failed on {work.device.type} ({type(exc).__name__}: "
            f"{first[:300]}). Install a working compiler tool chain (a C++ compiler on the "
            "CPU, Triton on CUDA) or run without --compile."
        ) from None
    free_memory(work.device)
    fits = largest_fitting_batch(lambda b: fits_in_memory(work, line, b), batch // 2)
    advice = f"use --batch-size {fits} or less" if fits else "not even a batch of 1 fits"
    raise DistmlError(
        f"a batch of {batch} does not fit in the memory of {device_name(work.device)} for the "
        f"line '{line.label}' ({work.spec.arch} width {work.spec.width:g}); halving, the "
        f"largest batch that fits is {fits}: {advice} (or a smaller --width). Nothing more "
        "was measured."
    )


def warmup_steps(work: Workload, line: Line, settings: BenchSettings) -> int:
    """The DataLoader holds up to 2 batches per worker ready (prefetch_factor 2): the classic
    line warms up at least that long, so a loader slower than the GPU is timed at its steady
    state, not while the GPU eats the batches prepared during warm-up."""
    if line.pipeline == "classic":
        return max(settings.warmup, 2 * work.workers)
    return settings.warmup


def fits_in_memory(work: Workload, line: Line, batch: int) -> bool:
    """One training step of ``line`` at ``batch`` runs without running out of memory."""
    try:
        run_line(work, line, batch, warmup=0, steps=1)
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    free_memory(work.device)
    return fits


# ----------------------------------------------------------------------------- the run


def run_bench(settings: BenchSettings, *, show_progress: bool = True) -> dict[str, Any]:
    """Time every line, write bench.json, bench.csv and bench.png; return the result."""
    check_out_dir(settings.out, overwrite=settings.overwrite)
    device = resolve_device(settings.device)
    check_compiler(settings, device)
    resolved = resolve(settings, device)
    work = workload(settings, resolved, device)
    height, width, channels = work.images.shape[1:]
    flops = training_flops_per_image(build_model(work.spec), (channels, height, width))
    peaks = gpu_peaks(device_name(device)) if device.type == "cuda" else None
    rows = []
    for line in ladder(settings, resolved.precisions):
        if show_progress:
            print(f"bench: {line.label} ...", flush=True, file=sys.stderr)
        row = run_line_checked(work, line, settings, resolved.batch_size)
        peak = peak_tflops(peaks, line.precision)
        achieved = row["images_per_second"] * flops / 1e12
        rows.append({**row, "tflops": achieved, "mfu": achieved / peak if peak else None})
    classic = next((r["images_per_second"] for r in rows if r["pipeline"] == "classic"), None)
    for row in rows:
        row["vs_classic"] = row["images_per_second"] / classic if classic else None
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "model": f"{work.spec.arch} width {work.spec.width:g}",
        "settings": {**settings.model_dump(mode="json"), **asdict(resolved)},
        "training_images": len(work.labels),
        "flops_per_image": flops,
        "peak_tflops": peaks,
        "mfu_note": mfu_note(device, peaks),
        "rows": rows,
    }
    return write_outputs(result, settings.out)


def check_compiler(settings: BenchSettings, device: torch.device) -> None:
    if not settings.compile or device.type != "cuda":
        return
    from torch.utils._triton import has_triton

    if not has_triton():
        raise DistmlError(
            "--compile on CUDA needs Triton (torch.compile's GPU code generator), which is not "
            "installed or does not work with this GPU. Install the triton package that matches "
            "your torch, or run without --compile."
        )


def workload(settings: BenchSettings, resolved: Resolved, device: torch.device) -> Workload:
    data = load_dataset(
        DataSettings(
            dataset=settings.dataset,
            data_dir=settings.data_dir,
            synthetic_train_size=settings.images,
            synthetic_test_size=10,
        )
    )
    if len(data.train_labels) < resolved.batch_size:
        raise DistmlError(
            f"the dataset has {len(data.train_labels)} training images, fewer than one batch of "
            f"{resolved.batch_size}; lower --batch-size or raise --images."
        )
    spec = ModelSpec(
        arch=settings.model,
        num_classes=len(data.classes),
        in_channels=data.channels,
        image_size=data.image_size,
        width=resolved.width,
        depth=settings.depth,
    )
    return Workload(
        device=device,
        images=data.train_images,
        labels=data.train_labels,
        stats=channel_stats(data.train_images),
        spec=spec,
        config=TrainConfig(optim={"lr": 0.02}),  # small: no divergence, no skipped fp16 steps
        workers=resolved.workers,
        seed=settings.seed,
    )


def mfu_note(device: torch.device, peaks: dict[str, float] | None) -> str:
    if device.type != "cuda":
        return "CPU: no MFU (no peak table for CPUs)"
    if peaks is None:
        return f"unknown GPU ({device_name(device)}): MFU left empty"
    tf32 = "TF32" if torch.backends.cudnn.allow_tf32 and "tf32" in peaks else "fp32"
    return f"MFU against the dense peak of each line's precision (fp32 lines: {tf32})"


# ----------------------------------------------------------------------------- outputs

CSV_FIELDS = (
    "line",
    "pipeline",
    "precision",
    "channels_last",
    "fused",
    "compile",
    "batch_size",
    "images_per_second",
    "step_ms_median",
    "step_ms_p10",
    "step_ms_p90",
    "peak_memory_mib",
    "tflops",
    "mfu",
    "vs_classic",
)


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "csv": out / "bench.csv", "plot": out / "bench.png"}
    result = {**result, **{key: str(path) for key, path in paths.items()}}
    result["table"] = markdown_table(result)
    csv_lines = [",".join(CSV_FIELDS)]
    for row in result["rows"]:
        csv_lines.append(",".join("" if row[f] is None else csv_cell(row[f]) for f in CSV_FIELDS))
    atomic_write_text(paths["csv"], "\n".join(csv_lines) + "\n")
    title = f"{result['model']}, batch {result['settings']['batch_size']}, {result['device']}"
    labels = [row["line"] for row in result["rows"]]
    plot_throughput(labels, [r["images_per_second"] for r in result["rows"]], paths["plot"], title)
    atomic_write_json(paths["json"], result)
    return result


def csv_cell(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text else text


def markdown_table(result: dict[str, Any]) -> str:
    """The table docs/benchmarks.md shows, one row per line."""
    lines = [
        "| line | precision | images/s | step ms median (p10-p90) | peak MiB | MFU | vs classic |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = "-" if r["vs_classic"] is None else f"{r['vs_classic']:.2f}x"
        lines.append(
            f"| {r['line']} | {PRECISION_LABEL[r['precision']]} | {r['images_per_second']:,.0f} | "
            f"{r['step_ms_median']:.1f} ({r['step_ms_p10']:.1f}-{r['step_ms_p90']:.1f}) | "
            f"{r['peak_memory_mib']:,.0f} | {mfu} | {ratio} |"
        )
    return "\n".join(lines)
