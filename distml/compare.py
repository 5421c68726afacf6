"""``distml compare``: finished training runs side by side, with plots and an interpretation.

Each run folder is read, never changed: ``config.json`` (the resolved settings),
``summary.json`` (written when a run finishes) and ``metrics.csv`` (one row per epoch).

* Settings are compared flattened to dotted keys (``train.seed``), a run's missing keys read
  as today's defaults (a run made before a setting existed ran with its default). The
  ``output.*`` keys say where files went, not how a run trained: they are never compared.
* Runs whose settings differ only in ``train.seed`` form a group: mean and sample standard
  deviation (n - 1) of their numbers. Every other run is a group of one.
* A folder without ``summary.json`` is an error, or with ``allow_unfinished`` a run marked
  "unfinished" whose numbers come from its ``metrics.csv`` (no test accuracy).
* Output, all in ``out``: ``report.md``, ``compare.csv`` (one row per run), ``compare.json``
  (everything, with every run's full settings), ``curves.png`` and ``time_memory.png``.
  The files are drawn in a staging folder beside ``out`` and moved in only when all exist:
  an error leaves nothing behind. ``out`` may hold other things (a sweep keeps its runs
  there); compare replaces only its own files, and only those of an earlier compare.

The interpretation is computed from the numbers: the fastest and slowest configuration by
mean time per epoch; each mixed-precision configuration against the most similar fp32 one
(peak memory per rank, time per epoch); test-accuracy differences against the best, judged
against ``SPREAD_FACTOR`` (2) times the pooled seed standard deviation when some
configuration was repeated over seeds; each run's overfitting verdict
(``metrics.overfitting_verdict``: where the validation loss was lowest).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from distml.config import CompareSettings, TrainConfig
from distml.errors import DistmlError
from distml.files import atomic_write_json, atomic_write_text, current_umask
from distml.metrics import METRIC_COLUMNS, overfitting_verdict
from distml.plots import plot_bar_panels, plot_overlaid_curves

COMPARE_FORMAT = "distml-compare"
OUTPUT_FILES = ("report.md", "compare.csv", "compare.json", "curves.png", "time_memory.png")
SEED_KEY = "train.seed"
IGNORED_PREFIX = "output."
# a difference in test accuracy counts as real when larger than this many seed deviations
SPREAD_FACTOR = 2.0
GROUP_METRICS = (
    "test_accuracy",
    "best_val_accuracy",
    "mean_epoch_seconds",
    "images_per_second",
    "peak_memory_mb",
)


@dataclass(frozen=True)
class RunFiles:
    """What one run folder holds (summary is None for an unfinished run)."""

    path: Path
    settings: dict[str, Any]
    summary: dict[str, Any] | None
    history: list[dict[str, Any]]


# ----------------------------------------------------------------------------- reading


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DistmlError(f"{what} {path} cannot be read: {exc}.") from None
    if not isinstance(data, dict):
        raise DistmlError(f"{what} {path} does not hold a JSON object.")
    return data


def read_history(path: Path) -> list[dict[str, Any]]:
    """metrics.csv as a list of rows, numbers as floats (epoch as int), blanks as None."""
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key in METRIC_COLUMNS:
                text = (raw.get(key) or "").strip()
                row[key] = None if not text else float(text)
            row["epoch"] = int(row["epoch"] or len(rows) + 1)
            rows.append(row)
    return rows


def read_run(path: Path, allow_unfinished: bool) -> RunFiles:
    """A run folder's files, or a DistmlError naming the folder and what to do."""
    if not path.is_dir():
        raise DistmlError(f"{path} is not a folder; give the run folders written by distml train.")
    if not (path / "config.json").is_file():
        raise DistmlError(
            f"{path} is not a distml run folder (it has no config.json); give folders written "
            "by distml train (artifacts/runs/NAME)."
        )
    defaults = flatten(TrainConfig().model_dump(mode="json"))
    settings = {**defaults, **flatten(read_json_file(path / "config.json", "run settings"))}
    summary = None
    if (path / "summary.json").is_file():
        summary = read_json_file(path / "summary.json", "run summary")
    elif not allow_unfinished:
        raise DistmlError(
            f"{path} is not a finished run (it has no summary.json: still training, stopped or "
            f"failed). Finish it with `distml train --resume {path}`, leave it out, or pass "
            "--allow-unfinished to include it as unfinished."
        )
    try:
        history = read_history(path / "metrics.csv")
    except (OSError, ValueError, csv.Error) as exc:
        raise DistmlError(f"{path / 'metrics.csv'} cannot be read: {exc}.") from None
    return RunFiles(path, settings, summary, history)


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Folder names, with as many parent folders as it takes to tell them apart."""
    resolved = [p.resolve() for p in paths]
    for depth in range(1, max(len(p.parts) for p in resolved) + 1):
        labels = ["/".join(p.parts[-depth:]) for p in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in resolved]


# ----------------------------------------------------------------------------- one row per run


# the table's settings lines: name in the row -> dotted setting
ROW_SETTINGS = {
    "mode": "dist.mode",
    "precision": "train.precision",
    "batch_size": "train.batch_size",
    "accum_steps": "train.accum_steps",
    "optimizer": "optim.optimizer",
    "lr": "optim.lr",
    "norm": "model.norm",
    "weight_decay": "optim.weight_decay",
    "dropout": "model.dropout",
    "augment": "data.augment",
    "label_smoothing": "train.label_smoothing",
    "early_stop": "train.early_stop",
    "epochs_planned": "train.epochs",
    "seed": SEED_KEY,
}
# the numbers of a run, as summary.json names them
RUN_NUMBERS = (
    "world_size",
    "micro_batch_per_rank",
    "epochs_run",
    "mean_epoch_seconds",
    "images_per_second",
    "peak_memory_mb",
    "peak_memory_mb_per_rank",
    "memory_kind",
    "best_val_accuracy",
    "best_epoch",
    "test_accuracy",
    "overfitting",
    "device_name",
)


def mean_of(history: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in history if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def unfinished_numbers(run: RunFiles) -> dict[str, Any]:
    """RUN_NUMBERS of a run without summary.json, as far as its metrics.csv tells them."""
    history, flat = run.history, run.settings
    with_val = [r for r in history if r["val_accuracy"] is not None]
    best = max(with_val, key=lambda r: r["val_accuracy"], default=None)
    peaks = [r["peak_memory_mb"] for r in history if r["peak_memory_mb"] is not None]
    world = 1 if flat["dist.mode"] == "single" else None
    return {
        "world_size": world,
        "micro_batch_per_rank": (
            flat["train.batch_size"] // flat["train.accum_steps"] if world == 1 else None
        ),
        "epochs_run": len(history),
        "mean_epoch_seconds": mean_of(history, "epoch_seconds"),
        "images_per_second": mean_of(history, "images_per_second"),
        "peak_memory_mb": max(peaks) if peaks else None,
        "peak_memory_mb_per_rank": [max(peaks)] if peaks else [],
        "memory_kind": None,
        "best_val_accuracy": best["val_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "test_accuracy": None,
        "overfitting": overfitting_verdict(history) if history else None,
        "device_name": None,
    }


def run_row(run: RunFiles, label: str) -> dict[str, Any]:
    """The numbers compare shows for one run (from summary.json, else from metrics.csv)."""
    if run.summary is None:
        numbers = unfinished_numbers(run)
    else:
        numbers = {key: run.summary.get(key) for key in RUN_NUMBERS}
    return {
        "label": label,
        "path": str(run.path),
        "status": "finished" if run.summary is not None else "unfinished",
        **{name: run.settings[key] for name, key in ROW_SETTINGS.items()},
        **numbers,
    }


def differing_settings(runs: Sequence[RunFiles]) -> list[str]:
    """Dotted keys whose value is not the same in every run (output.* never counts)."""
    keys = sorted({key for run in runs for key in run.settings})
    return [
        key
        for key in keys
        if not key.startswith(IGNORED_PREFIX)
        and len({json.dumps(run.settings.get(key), sort_keys=True) for run in runs}) > 1
    ]


# ----------------------------------------------------------------------------- seed groups


def compared_settings(run: RunFiles) -> dict[str, Any]:
    """The settings that make a configuration: not the seed, not where the files went."""
    return {
        k: v for k, v in run.settings.items() if k != SEED_KEY and not k.startswith(IGNORED_PREFIX)
    }


def group_key(run: RunFiles) -> str:
    alone = str(run.path) if run.summary is None else ""  # an unfinished run is never averaged
    return json.dumps([compared_settings(run), alone], sort_keys=True, default=str)


def group_label(labels: Sequence[str], seeds: Sequence[int]) -> str:
    if len(labels) == 1:
        return labels[0]
    stem = labels[0]
    for label in labels[1:]:
        while not label.startswith(stem):
            stem = stem[:-1]
    stem = stem.rstrip("-_.").removesuffix("seed").rstrip("-_.")
    if len(stem) < 3:  # no telling common part: name the runs
        stem = " + ".join(labels) if len(labels) < 4 else f"{labels[0]} + {len(labels) - 1} more"
    return f"{stem} (seeds {', '.join(str(s) for s in seeds)})"


def spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for fewer than two values)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std


def seed_groups(runs: Sequence[RunFiles], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that differ only in the seed, with mean and std of their numbers; in run order."""
    members: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        members.setdefault(group_key(run), []).append(index)
    groups = []
    for indices in members.values():
        group_rows = [rows[i] for i in indices]
        labels, seeds = [r["label"] for r in group_rows], [r["seed"] for r in group_rows]
        stats = {key: spread([r[key] for r in group_rows]) for key in GROUP_METRICS}
        groups.append(
            {
                "label": group_label(labels, seeds),
                "runs": labels,
                "seeds": seeds,
                "count": len(indices),
                "finished": all(r["status"] == "finished" for r in group_rows),
                "mean": {key: mean for key, (mean, _) in stats.items()},
                "std": {key: std for key, (_, std) in stats.items()},
                "members": indices,
                "memory_kind": group_rows[0]["memory_kind"],
            }
        )
    return groups


# ----------------------------------------------------------------------------- interpretation


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def settings_between(first: RunFiles, second: RunFiles, ignore: str = "") -> list[str]:
    a, b = compared_settings(first), compared_settings(second)
    return sorted(k for k in a.keys() | b.keys() if k != ignore and a.get(k) != b.get(k))


def speed_sentence(groups: Sequence[dict[str, Any]]) -> str | None:
    timed = [g for g in groups if g["mean"]["mean_epoch_seconds"] is not None]
    if len(timed) < 2:
        return None
    fastest = min(timed, key=lambda g: g["mean"]["mean_epoch_seconds"])
    slowest = max(timed, key=lambda g: g["mean"]["mean_epoch_seconds"])
    fast, slow = fastest["mean"]["mean_epoch_seconds"], slowest["mean"]["mean_epoch_seconds"]
    images = fastest["mean"]["images_per_second"]
    rate = f", {images:,.0f} images/s" if images is not None else ""
    return (
        f"Fastest: {fastest['label']} at {fast:.2f} s per epoch{rate}, {slow / fast:.2f}x "
        f"faster than the slowest, {slowest['label']} ({slow:.2f} s per epoch)."
    )


def precision_sentences(groups: Sequence[dict[str, Any]], runs: Sequence[RunFiles]) -> list[str]:
    """Each mixed-precision group against the most similar fp32 group: memory and time."""
    first = {id(g): runs[g["members"][0]] for g in groups}
    full = [g for g in groups if first[id(g)].settings["train.precision"] == "32"]
    sentences = []
    for mixed in groups:
        precision = first[id(mixed)].settings["train.precision"]
        if precision == "32" or not full:
            continue
        others = {
            id(g): settings_between(first[id(mixed)], first[id(g)], "train.precision") for g in full
        }
        base = min(full, key=lambda g: len(others[id(g)]))
        memory, base_memory = mixed["mean"]["peak_memory_mb"], base["mean"]["peak_memory_mb"]
        time, base_time = mixed["mean"]["mean_epoch_seconds"], base["mean"]["mean_epoch_seconds"]
        if None in (memory, base_memory, time, base_time):
            continue
        saved, speedup = 1 - memory / base_memory, base_time / time
        kind = " (host memory: runs on the CPU)" if mixed["memory_kind"] == "host RSS" else ""
        sentence = (
            f"Mixed precision: {mixed['label']} ({precision}) uses {100 * abs(saved):.0f}% "
            f"{'less' if saved >= 0 else 'more'} peak memory per rank than {base['label']} "
            f"(32): {memory:,.0f} vs {base_memory:,.0f} MiB{kind}, and is "
            f"{max(speedup, 1 / speedup):.2f}x {'faster' if speedup >= 1 else 'slower'} per epoch."
        )
        if others[id(base)]:
            sentence += f" These runs also differ in {', '.join(others[id(base)])}."
        sentences.append(sentence)
    return sentences


def pooled_seed_std(groups: Sequence[dict[str, Any]]) -> float | None:
    """Pooled sample standard deviation of test accuracy over the groups repeated over seeds
    (variances weighted by their n - 1); None when no group was repeated."""
    repeated = [g for g in groups if g["std"]["test_accuracy"] is not None]
    if not repeated:
        return None
    weights = [g["count"] - 1 for g in repeated]
    variance = sum(
        w * g["std"]["test_accuracy"] ** 2 for w, g in zip(weights, repeated, strict=True)
    )
    return math.sqrt(variance / sum(weights))


def accuracy_sentences(groups: Sequence[dict[str, Any]]) -> list[str]:
    scored = [g for g in groups if g["mean"]["test_accuracy"] is not None]
    if not scored:
        return ["No run has a test accuracy (none finished)."]
    ranked = sorted(scored, key=lambda g: -g["mean"]["test_accuracy"])
    best, noise = ranked[0], pooled_seed_std(groups)
    std = best["std"]["test_accuracy"]
    spread_text = f" ± {100 * std:.2f}" if std is not None else ""
    sentences = [
        f"Best test accuracy: {best['label']} ({pct(best['mean']['test_accuracy'])}{spread_text})."
    ]
    if noise is None:
        if len(ranked) > 1:
            sentences.append(
                "No configuration was repeated with other seeds, so whether these accuracy "
                "differences exceed run-to-run noise cannot be told (repeat a run with another "
                "train.seed)."
            )
    else:
        limit = SPREAD_FACTOR * noise
        sentences.append(
            f"Seed spread: the test accuracy of runs that differ only in the seed has a standard "
            f"deviation of {100 * noise:.2f} points; a difference counts as real above "
            f"{SPREAD_FACTOR:g}x that ({100 * limit:.2f} points)."
        )
    gaps = []
    for group in ranked[1:]:
        gap = best["mean"]["test_accuracy"] - group["mean"]["test_accuracy"]
        verdict = (
            ""
            if noise is None
            else (
                " (beyond the seed spread)"
                if gap > SPREAD_FACTOR * noise
                else " (within the seed spread)"
            )
        )
        gaps.append(f"{group['label']} {100 * gap:.2f} points lower{verdict}")
    if gaps:
        sentences.append("Against the best: " + "; ".join(gaps) + ".")
    return sentences


def overfitting_sentences(rows: Sequence[dict[str, Any]]) -> list[str]:
    sentences, clean, unassessed = [], [], []
    for row in rows:
        verdict = row["overfitting"] or {}
        if verdict.get("detected") is None:
            unassessed.append(row["label"])
        elif not verdict["detected"]:
            clean.append(row["label"])
        elif verdict["val_loss_rise"] > 0:
            sentences.append(
                f"{row['label']} overfits: validation loss was lowest at epoch "
                f"{verdict['val_loss_min_epoch']} and {100 * verdict['val_loss_rise']:.0f}% higher "
                f"by the end; overfitting set in after epoch {verdict['val_loss_min_epoch']} "
                f"(train/validation accuracy gap {verdict['gap_points']:.1f} points)."
            )
        else:
            sentences.append(
                f"{row['label']} overfits by the accuracy gap ({verdict['gap_points']:.1f} points "
                f"train over validation), while its validation loss is still at its lowest "
                f"(epoch {verdict['val_loss_min_epoch']})."
            )
    if clean:
        sentences.append(f"No clear overfitting in: {', '.join(clean)}.")
    if unassessed:
        sentences.append(
            f"Overfitting not assessed (no validation set or no epoch): {', '.join(unassessed)}."
        )
    return sentences


def interpretation(
    groups: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], runs: Sequence[RunFiles]
) -> list[str]:
    """The report's sentences, each computed from the numbers in the table."""
    sentences = [speed_sentence(groups), *precision_sentences(groups, runs)]
    sentences += accuracy_sentences(groups) + overfitting_sentences(rows)
    for row in rows:
        if row["status"] == "unfinished":
            sentences.append(
                f"{row['label']} is unfinished: {row['epochs_run']} of {row['epochs_planned']} "
                "epochs in its metrics.csv, no test accuracy."
            )
    return [s for s in sentences if s]


# ----------------------------------------------------------------------------- tables

Field = tuple[str, Callable[[dict[str, Any]], str]]


def value_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def number_text(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def overfitting_text(verdict: dict[str, Any] | None) -> str:
    if not verdict or verdict.get("detected") is None:
        return "n/a"
    if not verdict["detected"]:
        return "no"
    return f"yes, after epoch {verdict['val_loss_min_epoch']}"


def memory_text(row: dict[str, Any]) -> str:
    per_rank = row["peak_memory_mb_per_rank"] or []
    return " / ".join(f"{m:,.0f}" for m in per_rank) + " MiB" if per_rank else "-"


def table_fields(diff: Sequence[str], rows: Sequence[dict[str, Any]]) -> list[Field]:
    """The table's lines, top to bottom: the differing settings, then the standard ones."""
    times = [r["mean_epoch_seconds"] for r in rows if r["mean_epoch_seconds"] is not None]
    fastest = min(times) if times else None

    def relative(r: dict[str, Any]) -> str:
        seconds = r["mean_epoch_seconds"]
        return "-" if seconds is None or not fastest else f"{seconds / fastest:.2f}x"

    def best_val(r: dict[str, Any]) -> str:
        epoch = f" (epoch {r['best_epoch']})" if r["best_epoch"] is not None else ""
        return pct(r["best_val_accuracy"]) + epoch * (r["best_val_accuracy"] is not None)

    settings: list[Field] = [
        (key, lambda r, key=key: value_text(r["settings"][key])) for key in diff
    ]
    standard: list[Field] = [
        ("status", lambda r: r["status"]),
        ("mode", lambda r: r["mode"]),
        ("world size", lambda r: value_text(r["world_size"])),
        ("precision", lambda r: r["precision"]),
        ("batch (effective)", lambda r: value_text(r["batch_size"])),
        ("batch per rank", lambda r: value_text(r["micro_batch_per_rank"])),
        ("accumulation steps", lambda r: value_text(r["accum_steps"])),
        ("optimizer", lambda r: f"{r['optimizer']} lr {r['lr']:g}"),
        ("norm", lambda r: r["norm"]),
        ("weight decay", lambda r: value_text(r["weight_decay"])),
        ("dropout", lambda r: value_text(r["dropout"])),
        ("augment", lambda r: value_text(r["augment"])),
        ("label smoothing", lambda r: value_text(r["label_smoothing"])),
        ("early stop", lambda r: value_text(r["early_stop"])),
        ("epochs", lambda r: f"{r['epochs_run']}/{r['epochs_planned']}"),
        ("time per epoch", lambda r: number_text(r["mean_epoch_seconds"], "{:.2f} s")),
        ("time vs fastest", relative),
        ("images/s", lambda r: number_text(r["images_per_second"], "{:,.0f}")),
        ("peak memory per rank", memory_text),
        ("best val accuracy", best_val),
        ("test accuracy", lambda r: pct(r["test_accuracy"])),
        ("overfitting", lambda r: overfitting_text(r["overfitting"])),
    ]
    return settings + standard


def side_by_side(result: dict[str, Any]) -> list[list[str]]:
    """The table as cells: a header line of run labels, then one line per field."""
    rows = result["runs"]
    lines = [["", *[r["label"] for r in rows]]]
    for title, cell in table_fields(result["differing_settings"], rows):
        lines.append([title, *[cell(r) for r in rows]])
    return lines


def text_table(cells: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell (for the terminal)."""
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()
        for line in cells
    )


def markdown_table(cells: Sequence[Sequence[str]], align: str = "---:") -> list[str]:
    header, *body = cells
    lines = ["| " + " | ".join(header) + " |", "| --- |" + f" {align} |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in body]


# compare.csv: the row's settings and every plain number (lists and verdicts are spelled out)
CSV_COLUMNS = (
    *ROW_SETTINGS,
    *(key for key in RUN_NUMBERS if key not in ("peak_memory_mb_per_rank", "overfitting")),
)


def compare_csv(result: dict[str, Any]) -> str:
    """One line per run: label, folder, status, group, the differing settings, the numbers."""
    diff = result["differing_settings"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [
            "run",
            "path",
            "status",
            "group",
            *diff,
            *CSV_COLUMNS,
            "peak_memory_mb_per_rank",
            "overfitting",
            "overfitting_after_epoch",
        ]
    )
    for row in result["runs"]:
        verdict = row["overfitting"] or {}
        after = verdict.get("val_loss_min_epoch") if verdict.get("detected") else None
        writer.writerow(
            [row["label"], row["path"], row["status"], row["group"]]
            + [value_text(row["settings"][key]) for key in diff]
            + ["" if row[key] is None else row[key] for key in CSV_COLUMNS]
            + [
                ";".join(f"{m:g}" for m in row["peak_memory_mb_per_rank"] or []),
                value_text(verdict.get("detected")),
                value_text(after),
            ]
        )
    return buffer.getvalue()


GROUP_COLUMNS = (  # title, number, scale, format
    ("test accuracy (%)", "test_accuracy", 100, "{:.2f}"),
    ("best val accuracy (%)", "best_val_accuracy", 100, "{:.2f}"),
    ("time per epoch (s)", "mean_epoch_seconds", 1, "{:.2f}"),
    ("images/s", "images_per_second", 1, "{:,.0f}"),
    ("peak memory (MiB)", "peak_memory_mb", 1, "{:,.0f}"),
)


def mean_std_text(group: dict[str, Any], key: str, scale: float, pattern: str) -> str:
    mean, std = group["mean"][key], group["std"][key]
    if mean is None:
        return "-"
    deviation = "" if std is None else " ± " + pattern.format(scale * std)
    return pattern.format(scale * mean) + deviation


def group_table(groups: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown table of the seed groups (mean ± std), empty when no run was repeated."""
    repeated = [g for g in groups if g["count"] > 1]
    if not repeated:
        return []
    cells = [["group", "runs", *[column[0] for column in GROUP_COLUMNS]]]
    for g in repeated:
        numbers = [mean_std_text(g, *column[1:]) for column in GROUP_COLUMNS]
        cells.append([g["label"], str(g["count"]), *numbers])
    return [
        "## Runs that differ only in the seed",
        "",
        "Mean ± sample standard deviation (n - 1) over the seeds.",
        "",
        *markdown_table(cells),
        "",
    ]


def report_markdown(result: dict[str, Any], out: Path) -> str:
    """report.md: the side-by-side table, seed groups, interpretation, plots and verdicts."""
    rows = result["runs"]
    devices = sorted({r["device_name"] for r in rows if r["device_name"]})
    diff = result["differing_settings"]
    lines = [
        f"# {result['title']}",
        "",
        f"{result['created']}: {len(rows)} runs on {', '.join(devices) or 'unknown devices'}. "
        + (
            f"Settings that differ (first lines of the table): {', '.join(diff)}."
            if diff
            else "All runs have the same settings (output folders aside)."
        ),
        "",
        "## Runs side by side",
        "",
        *markdown_table(side_by_side(result)),
        "",
        *group_table(result["groups"]),
        "## Interpretation",
        "",
        *[f"- {sentence}" for sentence in result["interpretation"]],
        "",
        "## Curves, time and memory",
        "",
        "![loss and accuracy](curves.png)",
        "",
        "![time per epoch and peak memory](time_memory.png)",
        "",
        "## Runs",
        "",
    ]
    for row in rows:
        verdict = (row["overfitting"] or {}).get("verdict", "not assessed")
        folder = os.path.relpath(row["path"], out)
        lines.append(
            f"- **{row['label']}** ([folder]({folder}), [curves]({folder}/curves.png)): {verdict}"
        )
    if result["not_compared"]:
        lines += ["", "## Not compared", ""]
        lines += [f"- **{name}**: {why}" for name, why in result["not_compared"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- the command


def default_compare_out() -> Path:
    return Path("artifacts/compare") / datetime.now().strftime("%Y%m%d-%H%M%S")


def is_compare_output(out: Path) -> bool:
    try:
        return json.loads((out / "compare.json").read_text("utf-8")).get("format") == COMPARE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_inputs(settings: CompareSettings, out: Path) -> None:
    """Every problem compare can see before it writes: repeated runs, a bad --out."""
    resolved = [p.resolve() for p in settings.runs]
    repeated = sorted({str(p) for p in settings.runs if resolved.count(p.resolve()) > 1})
    if repeated:
        raise DistmlError(f"run folder given more than once: {', '.join(repeated)}.")
    if out.exists() and not out.is_dir():
        raise DistmlError(f"--out {out} is a file; give a folder for the comparison.")
    if out.resolve() in resolved:
        raise DistmlError(f"--out {out} is one of the runs compared; give another folder.")
    present = [name for name in OUTPUT_FILES if (out / name).exists()]
    if present and not is_compare_output(out):
        raise DistmlError(
            f"--out {out} already holds {', '.join(present)}, not written by distml compare; "
            "choose another --out or move those files away."
        )


def draw_plots(result: dict[str, Any], runs: Sequence[RunFiles], folder: Path) -> None:
    histories = {row["label"]: run.history for row, run in zip(result["runs"], runs, strict=True)}
    plot_overlaid_curves(
        {label: h for label, h in histories.items() if h}, folder / "curves.png", result["title"]
    )
    groups = result["groups"]
    host = any(g["memory_kind"] == "host RSS" for g in groups)
    memory = "peak memory per rank (MiB" + (", host RSS)" if host else ")")
    panels = [
        ("time per epoch (s)", "mean_epoch_seconds"),
        ("images/s", "images_per_second"),
        (memory, "peak_memory_mb"),
    ]
    bars = [
        (ylabel, [g["mean"][key] for g in groups], [g["std"][key] for g in groups])
        for ylabel, key in panels
    ]
    plot_bar_panels(
        [g["label"] for g in groups],
        bars,
        folder / "time_memory.png",
        f"{result['title']}: time and memory (mean ± std over seeds)",
    )


def write_outputs(result: dict[str, Any], runs: Sequence[RunFiles], out: Path) -> None:
    """Draw every file in a staging folder beside ``out``, then move them in: either all of
    them land or none (a new ``out`` is the renamed staging folder itself)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.compare-", dir=out.parent))
    try:
        draw_plots(result, runs, staging)
        atomic_write_text(staging / "report.md", report_markdown(result, out))
        atomic_write_text(staging / "compare.csv", compare_csv(result))
        atomic_write_json(staging / "compare.json", result)
        if not out.exists():
            os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it private (0700)
            os.replace(staging, out)
            return
        for name in OUTPUT_FILES:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def compare_runs(settings: CompareSettings) -> dict[str, Any]:
    """Read the runs, group the seeds, interpret, write report.md, compare.csv, compare.json,
    curves.png and time_memory.png into ``out``; return compare.json's content."""
    out = settings.out or default_compare_out()
    check_inputs(settings, out)
    runs = [read_run(path, settings.allow_unfinished) for path in settings.runs]
    rows = [
        {**run_row(run, label), "settings": run.settings}
        for run, label in zip(runs, run_labels(settings.runs), strict=True)
    ]
    groups = seed_groups(runs, rows)
    for group in groups:
        for index in group["members"]:
            rows[index]["group"] = group["label"]
    result = {
        "format": COMPARE_FORMAT,
        "format_version": 1,
        "created": datetime.now().isoformat(timespec="seconds"),
        "title": settings.title,
        "out": str(out),
        "differing_settings": differing_settings(runs),
        "runs": rows,
        "groups": groups,
        "interpretation": interpretation(groups, rows, runs),
        "not_compared": settings.not_compared,
        "files": {name: str(out / name) for name in OUTPUT_FILES},
    }
    write_outputs(result, runs, out)
    return result
