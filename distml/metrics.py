"""Evaluation shared by training and ``distml eval`` (so their numbers agree exactly), the
per-epoch metrics file, and the overfitting verdict."""

from __future__ import annotations

import contextlib
import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distml.dist import RunContext, all_reduce_sum
from distml.files import atomic_write_text

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "epoch_seconds",
    "images_per_second",
    "peak_memory_mb",
)
OVERFIT_LOSS_RISE = 0.10  # validation loss this far above its minimum ...
OVERFIT_MIN_EPOCHS = 2  # ... for at least this many epochs after the minimum
OVERFIT_GAP_POINTS = 10.0  # or a train/val accuracy gap this large


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: fp16 or bf16 autocast, or nothing for fp32."""
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    correct: int
    count: int
    confusion: list[list[int]] | None = None


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    criterion: nn.Module,
    ctx: RunContext,
    *,
    precision: str,
    num_classes: int,
    confusion: bool = False,
) -> EvalResult:
    """Loss and accuracy over this rank's batches, summed over every rank from exact counts
    (so uneven shards are correct). The model is put in eval mode and left there."""
    model.eval()
    device = ctx.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, seen
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    for images, labels in batches:
        with autocast_context(device, precision):
            logits = model(images)
        loss_sum += criterion(logits.float(), labels).double() * len(labels)
        predicted = logits.argmax(1)
        counts[0] += (predicted == labels).sum()
        counts[1] += len(labels)
        if confusion:
            matrix += torch.bincount(labels * num_classes + predicted, minlength=matrix.numel())
    totals = torch.cat([loss_sum.view(1), counts.double()])
    all_reduce_sum(totals, ctx)
    if confusion:
        all_reduce_sum(matrix, ctx)
    loss_total, correct_f, seen_f = totals.tolist()  # one host sync
    seen, correct = int(seen_f), int(correct_f)
    return EvalResult(
        loss=loss_total / max(seen, 1),
        accuracy=correct / max(seen, 1),
        correct=correct,
        count=seen,
        confusion=matrix.view(num_classes, num_classes).tolist() if confusion else None,
    )


def metrics_csv(history: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in history:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in METRIC_COLUMNS})
    return buffer.getvalue()


def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite the whole file atomically: a killed run never leaves a torn row."""
    atomic_write_text(path, metrics_csv(history))


def overfitting_verdict(history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Judge overfitting from the curves: the validation loss rising above its minimum while
    the training loss keeps falling, and the train/validation accuracy gap (in points; train
    accuracy as measured during the epoch, i.e. on augmented data). The words of the verdict
    follow the numbers it reports."""
    rows = [r for r in history if r.get("val_loss") is not None]
    if not rows:
        return {"detected": None, "verdict": "not assessed: the run had no validation set."}
    last = rows[-1]
    best = min(rows, key=lambda r: r["val_loss"])
    rise = (last["val_loss"] - best["val_loss"]) / max(best["val_loss"], 1e-12)
    epochs_after = last["epoch"] - best["epoch"]
    train_fell = last["train_loss"] < best["train_loss"]
    gap = 100 * (last["train_accuracy"] - last["val_accuracy"])
    loss_up = rise > OVERFIT_LOSS_RISE
    loss_rising = loss_up and epochs_after >= OVERFIT_MIN_EPOCHS and train_fell
    wide_gap = gap > OVERFIT_GAP_POINTS
    where = f"lowest at epoch {best['epoch']} of {last['epoch']}"
    loss = f"validation loss is {100 * rise:.0f}% above its minimum ({where})"
    gap_text = f"train/validation accuracy gap {gap:.1f} points"
    if loss_rising:
        verdict = (
            f"Overfitting: validation loss rose {100 * rise:.0f}% above its minimum ({where}) "
            f"while the training loss kept falling; {gap_text}."
        )
    elif wide_gap and not loss_up:
        verdict = (
            f"Overfitting: training accuracy is {gap:.1f} points above validation accuracy, "
            f"although the validation loss is within {100 * OVERFIT_LOSS_RISE:.0f}% of its "
            f"minimum ({100 * rise:.0f}% above, {where})."
        )
    elif wide_gap:
        verdict = (
            f"Overfitting: training accuracy is {gap:.1f} points above validation accuracy, "
            f"and the {loss}."
        )
    elif loss_up and not train_fell:
        verdict = (
            f"Unstable training rather than overfitting: the {loss}, but the training loss "
            f"rose too; {gap_text}."
        )
    elif loss_up:
        verdict = (
            f"Possible overfitting, too early to tell: the {loss}, {epochs_after} epoch(s) "
            f"after it (the verdict needs {OVERFIT_MIN_EPOCHS}) while the training loss fell; "
            f"{gap_text}."
        )
    else:
        verdict = (
            f"No clear overfitting: validation loss is within {100 * OVERFIT_LOSS_RISE:.0f}% of "
            f"its minimum ({100 * rise:.0f}% above, {where}); {gap_text}."
        )
    return {
        "detected": loss_rising or wide_gap,
        "gap_points": round(gap, 2),
        "val_loss_min_epoch": best["epoch"],
        "val_loss_rise": round(rise, 4),
        "verdict": verdict,
    }
