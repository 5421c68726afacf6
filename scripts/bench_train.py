"""Time training epochs: CNN and VGG16, single vs DDP (one rank: the launcher's overhead),
fp32 vs 16-mixed vs bf16-mixed. Each case is a real `distml train` process on the synthetic
set at CIFAR-10 size (CIFAR-10 itself cannot be downloaded on an offline machine; the shapes,
and so the speed, are the same). Epoch 1 (cuDNN autotuning, allocator warm-up) is reported
apart; the figure is the median of the later epochs.

    python scripts/bench_train.py --out bench.json                 # the full matrix (GPU)
    python scripts/bench_train.py --quick --device cpu             # a small CPU smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_case(model: str, mode: str, precision: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable,
            "-m",
            "distml",
            "train",
            "--dataset",
            "synthetic",
            "--set",
            f"data.synthetic_train_size={args.train_size}",
            "--set",
            "data.synthetic_test_size=1000",
            "--model",
            model,
            "--width",
            str(args.width),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
            "--precision",
            precision,
            "--mode",
            mode,
            "--device",
            args.device,
            "--out",
            f"{tmp}/run",
            "--quiet",
            "--json",
            "--label-smoothing",
            "0",
            "--lr",
            "0.05",
        ]
        if mode == "ddp":
            command += ["--nproc", "1"]
        if args.compile:
            command += ["--set", "train.compile=true"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            return {
                "model": model,
                "mode": mode,
                "precision": precision,
                "error": done.stderr.strip().splitlines()[-1],
            }
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        rows = (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = [dict(zip(header, r.split(","), strict=True)) for r in rows[1:]]
    later = [float(e["epoch_seconds"]) for e in epochs[1:]] or [float(epochs[0]["epoch_seconds"])]
    seconds = statistics.median(later)
    steps_images = (args.train_size - round(args.train_size * 0.1)) // args.batch_size
    return {
        "model": model,
        "mode": mode,
        "precision": precision,
        "epoch_seconds": seconds,
        "first_epoch_seconds": float(epochs[0]["epoch_seconds"]),
        "images_per_second": steps_images * args.batch_size / seconds,
        "peak_memory_mb": summary["peak_memory_mb"],
        "device": summary["device_name"],
        "parameters": summary["parameters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,vgg16")
    parser.add_argument("--modes", default="single,ddp")
    parser.add_argument("--precisions", default="32,16-mixed,bf16-mixed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.width, args.epochs, args.batch_size = 2000, 0.125, 2, 128
    cases = itertools.product(
        args.models.split(","), args.modes.split(","), args.precisions.split(",")
    )
    results = []
    print("| model | mode | precision | s/epoch | images/s | peak MiB | first epoch s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for model, mode, precision in cases:
        r = run_case(model, mode, precision, args)
        results.append(r)
        if "error" in r:
            print(f"| {model} | {mode} | {precision} | failed: {r['error']} | | | |")
        else:
            print(
                f"| {model} | {mode} | {precision} | {r['epoch_seconds']:.2f} | "
                f"{r['images_per_second']:,.0f} | {r['peak_memory_mb']:,.0f} | "
                f"{r['first_epoch_seconds']:.2f} |",
                flush=True,
            )
    if results and "device" in results[0]:
        print(
            f"\ndevice: {results[0]['device']}; {args.train_size} images, batch "
            f"{args.batch_size}, width {args.width}, median of epochs 2..{args.epochs}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
