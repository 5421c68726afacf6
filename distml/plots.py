"""Every figure distml draws (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, MaxNLocator

from distml.files import atomic_write


def save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, bbox_inches="tight", format="png"))
    plt.close(fig)


def plot_curves(
    history: Sequence[dict[str, Any]], path: Path, title: str, best_epoch: int | None
) -> None:
    """Loss and accuracy per epoch, train and validation; the best epoch is marked."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy (%)")):
        scale = 100 if metric == "accuracy" else 1
        ax.plot(epochs, [r[f"train_{metric}"] * scale for r in history], "o-", ms=3, label="train")
        val = [r[f"val_{metric}"] for r in history]
        if any(v is not None for v in val):
            ax.plot(
                epochs,
                [v * scale if v is not None else float("nan") for v in val],
                "s-",
                ms=3,
                label="validation",
            )
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    save_figure(fig, path)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix with the counts written in the cells."""
    import numpy as np

    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(5.0, 0.55 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(
                    j,
                    i,
                    int(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- SI study


def plot_layer_indices(
    layers: Sequence[str],
    series: dict[str, dict[str, Sequence[float]]],
    path: Path,
    title: str,
    cut_after: int | None = None,
) -> None:
    """Indices per feature layer: ``series[index name][split]`` = one value per layer.

    One colour per split, one line style per index; ``cut_after`` (layers kept by a cut)
    draws a line after the last kept layer."""
    styles = ["o-", "s--", "^:", "d-."]
    colours = {"train": "tab:blue", "test": "tab:orange", "val": "tab:green"}
    x = range(len(layers))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(layers) + 2), 4.5))
    for style, (index_name, per_split) in zip(styles, series.items(), strict=False):
        for split, values in per_split.items():
            ax.plot(
                x,
                list(values),
                style,
                ms=4,
                color=colours.get(split),
                label=f"{index_name} ({split})",
            )
    if cut_after is not None and cut_after < len(layers):
        ax.axvline(cut_after - 0.5, color="grey", ls=":", lw=1.5, label="cut")
    ax.set_xticks(list(x), list(layers), rotation=60, ha="right")
    ax.set_xlabel("feature layer")
    ax.set_ylabel("index (fraction of samples)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_selection_curve(
    curve: Sequence[float], kept: int, tolerance: float, path: Path, title: str, ylabel: str
) -> None:
    """Index against the number of greedily selected channels; the kept prefix is shaded and
    the band ``best - tolerance`` it had to reach is drawn."""
    counts = list(range(1, len(curve) + 1))
    best = max(curve)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axvspan(0.5, kept + 0.5, color="tab:green", alpha=0.12, label=f"kept: first {kept}")
    ax.plot(counts, list(curve), "o-", ms=3, color="tab:blue", label=ylabel)
    ax.axhline(best, color="grey", lw=1, label=f"best {best:.4f}")
    if tolerance > 0:
        ax.axhline(best - tolerance, color="grey", ls=":", lw=1, label=f"best - {tolerance:g}")
    ax.plot([kept], [curve[kept - 1]], "*", ms=14, color="tab:red", label=f"{kept} channels")
    ax.set_xlabel("selected channels")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- run comparison


def plot_overlaid_curves(
    histories: dict[str, Sequence[dict[str, Any]]], path: Path, title: str
) -> None:
    """Loss and accuracy per epoch of several runs (metrics.csv rows): one colour per run,
    training solid, validation dashed."""
    from matplotlib.lines import Line2D

    colours = plt.get_cmap("tab10" if len(histories) <= 10 else "tab20")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    handles = []
    for index, (label, history) in enumerate(histories.items()):
        colour = colours(index % colours.N)
        epochs = [row["epoch"] for row in history]
        for ax, metric, scale in ((ax_loss, "loss", 1), (ax_acc, "accuracy", 100)):
            train = [row[f"train_{metric}"] * scale for row in history]
            ax.plot(epochs, train, "-", marker="o", ms=3, color=colour)
            val = [row[f"val_{metric}"] for row in history]
            if any(v is not None for v in val):
                scaled_val = [v * scale if v is not None else float("nan") for v in val]
                ax.plot(epochs, scaled_val, "--", marker="s", ms=3, color=colour)
        handles.append(Line2D([], [], color=colour, label=label))
    handles += [
        Line2D([], [], color="grey", ls="-", label="train"),
        Line2D([], [], color="grey", ls="--", label="validation"),
    ]
    for ax, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_bar_panels(
    labels: Sequence[str],
    panels: Sequence[tuple[str, Sequence[float | None], Sequence[float | None]]],
    path: Path,
    title: str,
) -> None:
    """Side-by-side bar charts over the same labels; each panel is (y label, values, error
    bars), a value of None draws no bar and an error of None no error bar."""
    width = max(5.0, 0.55 * len(labels) + 2.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.5), squeeze=False)
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    x = list(range(len(labels)))
    for ax, (ylabel, values, errors) in zip(axes[0], panels, strict=True):
        heights = [float("nan") if v is None else v for v in values]
        bars = ax.bar(
            x,
            heights,
            yerr=[0.0 if e is None else e for e in errors],
            capsize=4 if any(e is not None for e in errors) else 0,
            color=[colours(i % colours.N) for i in x],
        )
        ax.bar_label(bars, labels=["n/a" if v is None else f"{v:,.3g}" for v in values], fontsize=8)
        ax.set_xticks(x, list(labels), rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------- compare-backends


def collective_lines(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict]]:
    """Rows grouped by (backend, op), each in size order: one line per group."""
    lines: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        lines.setdefault((row["backend"], row["op"]), []).append(row)
    return {key: sorted(group, key=lambda r: r["bytes"]) for key, group in lines.items()}


def binary_size_label(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes:g} B"


def plot_collectives(
    rows: Sequence[dict[str, Any]], path: Path, title: str, key: str, ylabel: str
) -> None:
    """``key`` against message size, log-log: colour = op, line style = backend."""
    styles = ["o-", "s--", "^:", "d-."]
    groups = collective_lines(rows)
    backends = list(dict.fromkeys(backend for backend, _ in groups))
    ops = list(dict.fromkeys(op for _, op in groups))
    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = False
    for (backend, op), group in groups.items():
        points = [(r["bytes"], r[key]) for r in group if r[key] > 0]  # 1 rank: busbw is 0
        if points:
            plotted = True
            ax.plot(
                *zip(*points, strict=True),
                styles[backends.index(backend) % len(styles)],
                ms=3,
                color=f"C{ops.index(op)}",
                label=f"{backend} {op}",
            )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: binary_size_label(value)))
    ax.set_yscale("log")
    ax.set_xlabel("message size (nccl-tests convention)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if plotted:
        ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_bandwidth(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    plot_collectives(rows, path, title, "busbw_gbps", "bus bandwidth (GB/s, median time)")


def plot_latency(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    plot_collectives(rows, path, title, "time_us", "time per call (µs, median)")


def plot_backend_training(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Epoch time per backend, the part spent waiting for gradient all-reduce stacked on top."""
    names = [row["backend"] for row in rows]
    waiting = [row["allreduce_wait_seconds_per_epoch"] for row in rows]
    rest = [max(0.0, row["epoch_seconds"] - wait) for row, wait in zip(rows, waiting, strict=True)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(rows) + 2), 4.5))
    ax.bar(names, rest, color="tab:blue", label="compute and overlapped communication")
    ax.bar(names, waiting, bottom=rest, color="tab:red", label="waiting for gradient all-reduce")
    for i, row in enumerate(rows):
        ax.text(i, row["epoch_seconds"], f"{row['epoch_seconds']:.2f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds per epoch")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_throughput(
    labels: Sequence[str], images_per_second: Sequence[float], path: Path, title: str
) -> None:
    """Horizontal bars of training images/s, one per benchmark line, each with its value."""
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    positions = range(len(labels))
    ax.barh(positions, images_per_second, color="tab:blue")
    ax.set_yticks(list(positions), labels, fontsize=8)
    ax.invert_yaxis()  # the first line (the baseline) on top
    for y, value in zip(positions, images_per_second, strict=True):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("training images / s")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)


def plot_lr_find(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    suggestion: int | None,
    path: Path,
) -> None:
    """Loss against learning rate (log x): raw and smoothed, the suggestion marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2, label="smoothed loss")
    if suggestion is not None:
        ax.plot(lrs[suggestion], smoothed[suggestion], "o", color="tab:red", ms=8)
        ax.annotate(
            f"suggested lr {lrs[suggestion]:.2e}\n(steepest descent)",
            (lrs[suggestion], smoothed[suggestion]),
            textcoords="offset points",
            xytext=(10, 10),
            color="tab:red",
        )
    finite = [v for v in smoothed if math.isfinite(v)]
    if finite:  # the diverged tail would flatten the interesting part
        low, high = min(finite), min(max(finite), 4 * min(finite) + 1e-9)
        ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Learning-rate range test")
    fig.tight_layout()
    save_figure(fig, path)
