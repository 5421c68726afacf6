"""Benchmark distml.si against the naive ways of computing the same numbers.

1. Separation Index and Center SI on synthetic ReLU-like features shaped like every VGG16
   (CIFAR variant, 32x32 input) feature-layer output, against the naive recipe: a full
   torch.cdist N x N matrix, then masked minima (skipped where it would not fit in memory).
2. Greedy channel selection over the 512 channels of a 512x1x1 and a 512x2x2 layer:
   incremental distance updates against recomputing the index for every candidate. The naive
   selection runs only its first few steps and is extrapolated (said so in the table).

Examples:
    python scripts/bench_si.py --quick                      # CPU smoke run, under 2 minutes
    python scripts/bench_si.py --device cuda --n 5000 --json si_bench.json
    python scripts/bench_si.py --n 2000 --only 256x8x8 --skip-selection --threads 2

Each layer's row also times one x @ x.T of the same features and gives the ratio SI / x@x.T.
On a shared CPU wall times are noisy: compare ratios from the same run.

The full sizes are meant for a GPU: on a laptop CPU the 64x32x32 layers at N = 5000 take
about a minute per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from distml.si import (
    center_separation_index,
    select_features,
    select_features_naive,
    separation_index,
    tf32_disabled,
)

# VGG16 feature outputs at 32x32 input: (layer names, channels, height/width).
VGG16_LAYERS: list[tuple[str, int, int]] = [
    ("conv1_1, conv1_2", 64, 32),
    ("pool1", 64, 16),
    ("conv2_1, conv2_2", 128, 16),
    ("pool2", 128, 8),
    ("conv3_1, conv3_2, conv3_3", 256, 8),
    ("pool3", 256, 4),
    ("conv4_1, conv4_2, conv4_3", 512, 4),
    ("pool4", 512, 2),
    ("conv5_1, conv5_2, conv5_3", 512, 2),
    ("pool5", 512, 1),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--n", type=int, default=5000, help="samples for the index timings")
    parser.add_argument("--sel-n", type=int, default=None, help="samples for selection (--n)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--naive-steps", type=int, default=2, help="naive selection steps run")
    parser.add_argument("--naive-max-gb", type=float, default=8.0, help="memory cap for cdist")
    parser.add_argument("--skip-selection", action="store_true")
    parser.add_argument(
        "--only", nargs="+", default=None, help="layer shapes to run, e.g. 256x8x8 (all)"
    )
    parser.add_argument("--quick", action="store_true", help="small N: a CPU smoke run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.naive_steps = min(args.n, 400), min(args.repeats, 2), 1
        args.sel_n = min(args.sel_n or 160, 160)
        # Tiny ops on a small, possibly shared CPU: one thread avoids thread-sync stalls.
        args.threads = args.threads or 1
    args.sel_n = args.sel_n or args.n
    return args


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` runs after one warm-up run, and the last result."""
    result = fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def once(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of a single run (for runs too long to repeat), and its result."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def synthetic_features(
    n: int, shape: tuple[int, ...], classes: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced, ReLU-like (non-negative, sparse) features with class structure.

    The class signal shrinks like dims^-1/4 so that the SI stays well inside (0, 1) at
    every layer size instead of saturating at 1 for the wide layers.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.arange(n, device=device) % classes
    strength = 1.5 * math.prod(shape) ** -0.25
    signal = torch.randn(classes, *shape, generator=gen, device=device)[labels]
    noise = torch.randn(n, *shape, generator=gen, device=device)
    return (strength * signal + noise - 0.5).clamp_(min=0.0), labels


# ----------------------------------------------------------------------------- naive indices


def naive_si(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Full cdist matrix, masked minima: the way not to do it for large N."""
    flat = features.reshape(features.shape[0], -1)
    dist = torch.cdist(flat, flat)
    dist.fill_diagonal_(float("inf"))
    same = labels[:, None] == labels[None, :]
    nearest_same = dist.masked_fill(~same, float("inf")).amin(1)
    nearest_other = dist.masked_fill(same, float("inf")).amin(1)
    return (nearest_same < nearest_other).double().mean().item()


def naive_center_si(features: torch.Tensor, labels: torch.Tensor) -> float:
    flat = features.reshape(features.shape[0], -1)
    classes = int(labels.max()) + 1
    centres = torch.stack([flat[labels == k].mean(0) for k in range(classes)])
    return (torch.cdist(flat, centres).argmin(1) == labels).double().mean().item()


def gram(features: torch.Tensor) -> torch.Tensor:
    """One x @ x.T of the flattened features (TF32 off, as in SI): the yardstick for SI."""
    flat = features.reshape(features.shape[0], -1)
    with tf32_disabled():
        return flat @ flat.T


def naive_fits(n: int, dims: int, device: torch.device, cap_gb: float) -> bool:
    """cdist keeps about four N x N float32 matrices (distances, masks, two masked copies)."""
    need = 4 * n * n * 4 + n * dims * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < min(0.8 * free, cap_gb * 2**30)
    return need < cap_gb * 2**30


# ----------------------------------------------------------------------------- benchmarks


def bench_indices(args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    rows = []
    for name, channels, size in VGG16_LAYERS:
        shape = (channels, size, size)
        if args.only and "x".join(map(str, shape)) not in args.only:
            continue
        x, y = synthetic_features(args.n, shape, args.classes, device, args.seed)
        row: dict[str, object] = {"layer": name, "shape": "x".join(map(str, shape))}
        row["matmul_s"], _ = timed(lambda x=x: gram(x), device, args.repeats)
        row["si_s"], row["si"] = timed(
            lambda x=x, y=y: separation_index(x, y), device, args.repeats
        )
        row["csi_s"], row["csi"] = timed(
            lambda x=x, y=y: center_separation_index(x, y), device, args.repeats
        )
        row["si_f64"] = separation_index(x, y, dtype=torch.float64)  # reference, untimed
        if naive_fits(args.n, x[0].numel(), device, args.naive_max_gb):
            row["naive_si_s"], row["naive_si"] = timed(
                lambda x=x, y=y: naive_si(x, y), device, args.repeats
            )
            row["naive_csi_s"], row["naive_csi"] = timed(
                lambda x=x, y=y: naive_center_si(x, y), device, args.repeats
            )
        rows.append(row)
        ratio = row["si_s"] / row["matmul_s"]
        print(f"  {name}: SI {row['si_s']:.3f} s = {ratio:.2f} x@x.T", file=sys.stderr, flush=True)
        del x, y
    return rows


def bench_selection(args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    rows = []
    for size in (1, 2):
        x, y = synthetic_features(args.sel_n, (512, size, size), args.classes, device, args.seed)
        for criterion in ("si", "center-si"):
            rows.append(_bench_one_selection(x, y, criterion, args, device))
        del x, y
    return rows


def _bench_one_selection(
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: str,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, object]:
    channels, steps = x.shape[1], args.naive_steps
    select_features(x, y, criterion=criterion, max_features=2)  # warm-up
    fast_s, fast = once(lambda: select_features(x, y, criterion=criterion), device)
    naive_s, naive = once(
        lambda: select_features_naive(x, y, criterion=criterion, max_features=steps), device
    )
    # Candidates scored: C + (C - 1) + ... ; the naive cost per candidate grows with the
    # selected set, so scaling the first steps' cost per candidate underestimates the total.
    scored = sum(channels - s for s in range(steps))
    naive_total = naive_s / scored * channels * (channels + 1) / 2
    print(f"  selection {x.shape[1:]} {criterion}: {fast_s:.2f} s", file=sys.stderr, flush=True)
    return {
        "shape": "x".join(map(str, x.shape[1:])),
        "criterion": criterion,
        "n": x.shape[0],
        "incremental_s": fast_s,
        "steps": len(fast.order),
        "kept": fast.kept,
        "best": fast.best,
        "naive_steps_run": steps,
        "naive_steps_s": naive_s,
        "naive_extrapolated_s": naive_total,
        "same_first_steps": fast.order[:steps] == naive.order,
    }


# ----------------------------------------------------------------------------- report


def _fmt(value: object, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def index_table(rows: list[dict[str, object]], n: int) -> str:
    lines = [
        f"### Separation Index, N = {n} (median seconds; naive = full cdist + masked min; "
        "x@x.T = one Gram matrix of the same features)",
        "",
        "| layer | C x H x W | SI | SI s | x@x.T s | SI / x@x.T | naive s | speed-up | "
        "Center SI | CSI s | naive s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        naive = r.get("naive_si_s")
        speedup = f"{naive / r['si_s']:.1f}x" if naive else "-"
        naive_csi = _fmt(r.get("naive_csi_s")) if naive else "(memory)"
        lines.append(
            f"| {r['layer']} | {r['shape']} | {_fmt(r['si'])} | {_fmt(r['si_s'])} | "
            f"{_fmt(r['matmul_s'])} | {r['si_s'] / r['matmul_s']:.2f} | "
            f"{_fmt(naive) if naive else '(memory)'} | {speedup} | {_fmt(r['csi'])} | "
            f"{_fmt(r['csi_s'])} | {naive_csi} |"
        )
    lines.append("")
    lines.append("Accuracy (float32 runs against a float64 distml.si run): " + _agreement(rows))
    return "\n".join(lines)


def _agreement(rows: list[dict[str, object]]) -> str:
    ours = max(abs(r["si"] - r["si_f64"]) for r in rows)
    text = f"max |SI - SI(float64)|: distml.si {ours:.4f}"
    naive = [abs(r["naive_si"] - r["si_f64"]) for r in rows if "naive_si" in r]
    csi = [abs(r["naive_csi"] - r["csi"]) for r in rows if "naive_csi" in r]
    if naive:
        text += f", naive cdist {max(naive):.4f}; max |Center SI - naive| {max(csi):.4f}"
    return text


def selection_table(rows: list[dict[str, object]]) -> str:
    lines = [
        "### Greedy selection over all 512 channels (seconds)",
        "",
        "| layer | criterion | N | incremental (all steps) | naive (first steps, run) | "
        "naive (all steps, extrapolated) | speed-up | kept | best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['criterion']} | {r['n']} | {_fmt(r['incremental_s'], 2)} | "
            f"{_fmt(r['naive_steps_s'], 2)} ({r['naive_steps_run']} steps) | "
            f"~{_fmt(r['naive_extrapolated_s'], 0)} | "
            f"~{r['naive_extrapolated_s'] / r['incremental_s']:.0f}x | {r['kept']} | "
            f"{_fmt(r['best'])} |"
        )
    lines.append("")
    lines.append(
        "Naive = recompute the index from scratch for every candidate; only its first steps "
        "run, the total is extrapolated per scored candidate (an underestimate: later "
        "candidates carry more channels). Same channels in those first steps: "
        + str(all(r["same_first_steps"] for r in rows))
    )
    return "\n".join(lines)


def environment(device: torch.device) -> dict[str, object]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": str(device),
        "device_name": name or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(device)
    print(f"# distml SI benchmark: {env}\n")
    results: dict[str, object] = {"environment": env, "args": vars(args) | {"json": None}}
    results["indices"] = bench_indices(args, device)
    print(index_table(results["indices"], args.n) + "\n")
    if not args.skip_selection:
        results["selection"] = bench_selection(args, device)
        print(selection_table(results["selection"]))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
