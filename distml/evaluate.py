"""``distml eval``: a checkpoint on a split of its dataset (or another with the same classes).

It goes through the same ``metrics.evaluate`` as training, with the checkpoint's
normalisation, precision, split seed and eval batch size, so on the same device it
reproduces the run summary's test accuracy exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distml.checkpoint import Checkpoint, load_checkpoint, model_from_checkpoint
from distml.config import DataSettings, EvalSettings, validate_settings
from distml.data import (
    ImageDataset,
    Normalize,
    Splits,
    eval_batches,
    load_dataset,
    make_splits,
    to_device_nchw,
)
from distml.dist import RunContext, device_name, resolve_device
from distml.errors import DistmlError
from distml.files import atomic_write_json, check_out_dir, default_out
from distml.metrics import evaluate
from distml.plots import plot_confusion
from distml.progress import Reporter


def checkpoint_data(
    ckpt: Checkpoint, dataset: str | None = None, data_dir: Path | None = None
) -> tuple[ImageDataset, Splits]:
    """The checkpoint's dataset (or the one named) split exactly as in its training run,
    after checking that classes and image shape match the checkpoint."""
    values = dict(ckpt.settings.get("data") or {})
    if dataset is not None:
        values["dataset"] = dataset
    if data_dir is not None:
        values["data_dir"] = data_dir
    if "dataset" not in values:
        raise DistmlError(
            f"checkpoint {ckpt.path} does not record its dataset; pass --dataset "
            "(cifar10, synthetic or a dataset file)."
        )
    data = load_dataset(validate_settings(DataSettings, values))
    check_compatible(ckpt, data)
    return data, make_splits(data, float(values.get("val_fraction", 0.1)), ckpt.seed)


def check_input_shape(ckpt: Checkpoint, data: ImageDataset) -> None:
    spec = ckpt.spec
    if (spec.image_size, spec.in_channels) != (data.image_size, data.channels):
        raise DistmlError(
            f"checkpoint {ckpt.path} takes {spec.image_size}x{spec.image_size}x"
            f"{spec.in_channels} images but dataset {data.name} has {data.image_size}x"
            f"{data.image_size}x{data.channels}. Use data of the checkpoint's input shape."
        )


def check_compatible(ckpt: Checkpoint, data: ImageDataset) -> None:
    """Same input shape and the same classes, in the same order."""
    check_input_shape(ckpt, data)
    if list(ckpt.classes) != list(data.classes):
        raise DistmlError(
            f"checkpoint {ckpt.path} was trained on {len(ckpt.classes)} classes "
            f"({', '.join(ckpt.classes[:5])}{', ...' if len(ckpt.classes) > 5 else ''}) but "
            f"dataset {data.name} has {len(data.classes)} ({', '.join(data.classes[:5])}"
            f"{', ...' if len(data.classes) > 5 else ''}). Use a dataset with the same classes."
        )


def run_label(checkpoint: Path) -> str:
    """A checkpoint named with its run: ``<run folder>/best.safetensors``, since every run's
    checkpoint has the same file name."""
    folder = checkpoint.resolve().parent.name
    return f"{folder}/{checkpoint.name}" if folder else checkpoint.name


def evaluate_checkpoint(settings: EvalSettings, *, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate, write ``eval.json`` and ``confusion.png``; return the result."""
    out = settings.out or default_out(settings.checkpoint, f"eval-{settings.split}")
    check_out_dir(out, overwrite=settings.overwrite)
    ckpt = load_checkpoint(settings.checkpoint)
    device = resolve_device(settings.device)
    data, splits = checkpoint_data(ckpt, settings.dataset, settings.data_dir)
    images, labels = splits.split(settings.split)
    if len(labels) == 0:
        raise DistmlError(
            f"the {settings.split} split is empty (the checkpoint was trained with "
            "val_fraction 0); use --split test or train."
        )
    precision = str(ckpt.train_setting("precision", "32"))
    batch_size = settings.batch_size or int(ckpt.train_setting("eval_batch_size", 1024))
    channels_last = device.type == "cuda" and bool(ckpt.train_setting("channels_last", True))
    model = model_from_checkpoint(ckpt).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    normalize = Normalize(ckpt.normalization, device)
    batches = eval_batches(
        to_device_nchw(images, device),
        labels,
        normalize=normalize,
        batch_size=batch_size,
        channels_last=channels_last,
    )
    criterion = torch.nn.CrossEntropyLoss(
        label_smoothing=float(ckpt.train_setting("label_smoothing", 0.0))
    )
    reporter = Reporter(show_progress)
    reporter.line(
        f"evaluating {settings.checkpoint} on {data.name} {settings.split} "
        f"({len(labels)} images) on {device_name(device)}"
    )
    ctx = RunContext("single", 0, 0, 1, device)
    result = evaluate(
        model,
        batches,
        criterion,
        ctx,
        precision=precision,
        num_classes=len(ckpt.classes),
        confusion=True,
    )
    matrix = result.confusion or []
    per_class = {
        name: (row[i] / sum(row) if sum(row) else 0.0)
        for i, (name, row) in enumerate(zip(ckpt.classes, matrix, strict=True))
    }
    out.mkdir(parents=True, exist_ok=True)
    confusion_png = out / "confusion.png"
    plot_confusion(
        matrix,
        list(ckpt.classes),
        confusion_png,
        f"{run_label(settings.checkpoint)}: {settings.split} accuracy {100 * result.accuracy:.2f}%",
    )
    report = {
        "checkpoint": str(settings.checkpoint),
        "dataset": data.name,
        "split": settings.split,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "correct": result.correct,
        "count": result.count,
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix,
        "classes": list(ckpt.classes),
        "precision": precision,
        "device_name": device_name(device),
        "confusion_png": str(confusion_png),
    }
    atomic_write_json(out / "eval.json", report)
    return report
