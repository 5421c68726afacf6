#!/usr/bin/env python3
"""Every CUDA path of distml in one command: a pass/fail table and gpu-check.json.

    python3 scripts/gpu_check.py [--out DIR] [--quick]

Runs from a checkout with the machine's own Python (torch, typer, rich, safetensors,
matplotlib, pyyaml and pydantic importable; no nox, no network). Each check runs the real
CLI in a subprocess (``python3 -m distml ...``) on tiny models and the synthetic set, with a
timeout, and is recorded as pass, fail or skip with its reason and seconds. With no CUDA GPU
visible every GPU check is skipped and the script exits 0. Exit 1 when a check failed.
Outputs (logs of every command, bench tables) go next to gpu-check.json in --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# Loss curves of two runs that differ only in kernels (memory layout, compiled or fused code)
# agree to float rounding, amplified over a few epochs: 2% relative per epoch is far below
# what a real bug (a wrong layout, a skipped step) does to the curve.
CURVE_RTOL = 0.02
# fused vs foreach SGD: the same arithmetic in another order, over 20 steps in which the
# backward pass's atomic adds (max pooling) also differ from run to run
FUSED_RTOL = 1e-3
TINY = [
    "--dataset",
    "synthetic",
    "--set",
    "data.synthetic_train_size=2000",
    "--set",
    "data.synthetic_test_size=500",
    "--width",
    "0.125",
    "--depth",
    "4",
    "--batch-size",
    "64",
    "--lr",
    "0.1",
    "--label-smoothing",
    "0",
    "--quiet",
    "--json",
]


class Skip(Exception):
    """The check does not apply here (the reason says why)."""


class Fail(Exception):
    """The check ran and distml misbehaved (the reason says how)."""


@dataclass
class Context:
    out: Path
    quick: bool
    gpus: int
    timeout: int = 300
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # summaries by name


@dataclass
class Outcome:
    name: str
    status: str  # pass, fail or skip
    reason: str
    seconds: float


# ----------------------------------------------------------------------------- helpers


def curves_close(a: list[float], b: list[float], rtol: float) -> tuple[bool, float]:
    """Two loss curves agree epoch by epoch within ``rtol`` (relative); also the worst gap."""
    if len(a) != len(b) or not a:
        return False, math.inf
    gaps = [abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(a, b, strict=True)]
    worst = max(gaps)
    return all(math.isfinite(x) and math.isfinite(y) for x, y in zip(a, b, strict=True)) and (
        worst <= rtol
    ), worst


def differing_tensors(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Names whose tensors are not bitwise identical (or that only one side has)."""
    import torch

    names = sorted(set(a) | set(b))
    return [
        n
        for n in names
        if n not in a
        or n not in b
        or a[n].dtype != b[n].dtype
        or a[n].shape != b[n].shape
        or not torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8))
    ]


def loss_curve(run_dir: Path) -> list[float]:
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train_loss")
    return [float(row.split(",")[column]) for row in rows[1:]]


def command_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This checkout's distml first on the path, plus ``extra``."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def run_command(
    ctx: Context,
    log_name: str,
    args: list[str],
    timeout: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a command in its own process group (a DDP launch's ranks die with it on a
    timeout); its command line and output go to logs/<log_name>.log."""
    limit = timeout or ctx.timeout
    job = subprocess.Popen(
        args,
        cwd=ROOT,
        env=command_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = job.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        write_log(ctx, log_name, args, stdout, stderr + f"\n[killed after {limit} s]")
        raise Fail(f"timed out after {limit} s (hang?): {' '.join(args[2:6])} ...") from None
    write_log(ctx, log_name, args, stdout, stderr)
    return subprocess.CompletedProcess(args, job.returncode, stdout, stderr)


def write_log(ctx: Context, name: str, args: list[str], stdout: str, stderr: str) -> None:
    logs = ctx.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(args)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n\n")


def distml(
    ctx: Context,
    log_name: str,
    *args: Any,
    expect: int = 0,
    timeout: int | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``python3 -m distml ARGS``; Fail unless it exits with ``expect``."""
    command = [sys.executable, "-m", "distml", *map(str, args)]
    done = run_command(ctx, log_name, command, timeout, env)
    if done.returncode != expect:
        raise Fail(f"exit {done.returncode}, expected {expect}: {error_line(done.stderr)}")
    return done


def error_line(stderr: str) -> str:
    """The line of stderr that names the error (a traceback's last line can be the tail of
    a wrapped message), cut to 300 characters."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or line.startswith("distml:")]
    return ((named or lines or ["(no stderr)"])[-1])[:300]


def last_json(done: subprocess.CompletedProcess) -> dict[str, Any]:
    return json.loads(done.stdout.strip().splitlines()[-1])


def train(ctx: Context, name: str, *args: Any, epochs: int = 3, **kwargs: Any) -> dict[str, Any]:
    """A tiny CUDA training run into out/runs/<name>; its summary."""
    run_dir = ctx.out / "runs" / name
    done = distml(
        ctx,
        name,
        "train",
        *TINY,
        "--device",
        "cuda",
        "--epochs",
        epochs,
        "--out",
        run_dir,
        *args,
        **kwargs,
    )
    summary = last_json(done)
    ctx.runs[name] = summary
    return summary


def needs_gpu(ctx: Context, count: int = 1) -> None:
    if ctx.gpus < count:
        raise Skip("no CUDA GPU" if ctx.gpus == 0 else f"needs {count} GPUs, {ctx.gpus} visible")


def needs_run(ctx: Context, name: str) -> dict[str, Any]:
    needs_gpu(ctx)
    if name not in ctx.runs:
        raise Skip(f"needs the run of check {name!r}, which did not finish")
    return ctx.runs[name]


# ----------------------------------------------------------------------------- the checks
# Each check returns a one-line result, or raises Skip or Fail with the reason.


def check_environment(ctx: Context) -> str:
    import torch

    version = distml(ctx, "environment", "--version").stdout.strip()
    cuda = torch.version.cuda or "none"
    names = [torch.cuda.get_device_name(i) for i in range(ctx.gpus)]
    return f"{version}, torch {torch.__version__} (CUDA {cuda}), GPUs: {names or 'none'}"


def check_train_precisions(ctx: Context) -> str:
    needs_gpu(ctx)
    results = []
    for precision in ("32", "16-mixed", "bf16-mixed"):
        summary = train(ctx, f"train-{precision}", "--precision", precision)
        if summary["device_name"].startswith("CPU") or not math.isfinite(summary["test_loss"]):
            raise Fail(f"{precision}: ran on {summary['device_name']}, loss {summary['test_loss']}")
        results.append(f"{precision} acc {100 * summary['test_accuracy']:.1f}%")
    return "; ".join(results)


def check_channels_last(ctx: Context) -> str:
    needs_run(ctx, "train-32")  # channels_last is the default on CUDA
    train(
        ctx,
        "train-32-nchw",
        "--precision",
        "32",
        "--set",
        "train.channels_last=false",
    )
    return compare_curves(ctx, "train-32", "train-32-nchw")


def check_compile(ctx: Context) -> str:
    needs_run(ctx, "train-32")
    train(
        ctx,
        "train-compile",
        "--precision",
        "32",
        "--set",
        "train.compile=true",
        timeout=600,
    )
    return compare_curves(ctx, "train-32", "train-compile")


def compare_curves(ctx: Context, first: str, second: str) -> str:
    a = loss_curve(Path(ctx.runs[first]["run_dir"]))
    b = loss_curve(Path(ctx.runs[second]["run_dir"]))
    close, worst = curves_close(a, b, CURVE_RTOL)
    text = f"train loss per epoch {first} {a} vs {second} {b}: worst gap {100 * worst:.3f}%"
    if not close:
        raise Fail(f"{text} > {100 * CURVE_RTOL:g}%")
    return f"{text} (tolerance {100 * CURVE_RTOL:g}%)"


FUSED_SNIPPET = """
import json, os
import torch
from distml.config import TrainConfig
from distml.models import ModelSpec, build_model
from distml.train import make_optimizer
torch.backends.cudnn.deterministic = True  # same conv algorithms in both runs
torch.backends.cudnn.benchmark = False
device = torch.device("cuda")
weights, flags = [], []
for fused in (True, False):
    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="cnn", num_classes=10, width=0.125, depth=4)).to(device)
    params = list(model.parameters())
    optimizer = make_optimizer(params, TrainConfig(optim={"lr": 0.05}), device)
    if not fused:
        defaults = {**optimizer.defaults, "fused": None, "foreach": None}
        optimizer = type(optimizer)(params, **defaults)
    flags.append(bool(optimizer.defaults.get("fused")))
    data = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(32, 3, 32, 32, generator=data).to(device)
        y = torch.randint(0, 10, (32,), generator=data).to(device)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    weights.append([p.detach().double().cpu() for p in params])
gap = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
          for a, b in zip(*weights))
print(json.dumps({"fused_flags": flags, "worst_relative_gap": gap}))
"""


def check_fused_optimizer(ctx: Context) -> str:
    """distml's optimizer on CUDA (train.make_optimizer: fused) against PyTorch's default
    implementation: 20 SGD steps, the same weights within FUSED_RTOL. (train has no flag to
    turn fusing off, so this runs distml's factory in a subprocess of its own.)"""
    needs_gpu(ctx)
    done = run_command(ctx, "fused-optimizer", [sys.executable, "-c", FUSED_SNIPPET])
    if done.returncode != 0:
        raise Fail(f"exit {done.returncode}: {error_line(done.stderr)}")
    result = last_json(done)
    if result["fused_flags"] != [True, False]:
        raise Fail(f"make_optimizer on CUDA is not fused: {result['fused_flags']}")
    if result["worst_relative_gap"] > FUSED_RTOL:
        raise Fail(f"weights differ by {result['worst_relative_gap']:.2e} > {FUSED_RTOL:g}")
    return f"fused vs default SGD, 20 steps: worst gap {result['worst_relative_gap']:.2e}"


def check_dp(ctx: Context) -> str:
    needs_gpu(ctx)
    summary = train(ctx, "train-dp", "--mode", "dp")
    if ctx.gpus == 1:
        fallback = [n for n in summary.get("notes", []) if "DataParallel" in n]
        if summary["world_size"] != 1 or not fallback:
            raise Fail(f"one GPU: no documented fallback note (notes: {summary.get('notes')})")
        return f"one GPU: fallback noted: {fallback[0]}"
    if summary["world_size"] != ctx.gpus:
        raise Fail(f"DataParallel used {summary['world_size']} of {ctx.gpus} GPUs")
    return f"DataParallel over {summary['world_size']} GPUs"


def check_ddp_nccl_one_rank(ctx: Context) -> str:
    needs_gpu(ctx)
    summary = train(ctx, "ddp-nccl-1", "--mode", "ddp", "--nproc", "1", "--backend", "nccl")
    return f"world size {summary['world_size']}, acc {100 * summary['test_accuracy']:.1f}%"


ONE_GPU = {"CUDA_VISIBLE_DEVICES": "0"}


def check_ddp_gloo_two_ranks_one_gpu(ctx: Context) -> str:
    """The 2-rank DDP path with CUDA tensors on one GPU (Gloo allows what NCCL refuses)."""
    needs_gpu(ctx)
    summary = train(
        ctx, "ddp-gloo-2-shared", "--mode", "ddp", "--nproc", "2", "--backend", "gloo", env=ONE_GPU
    )
    if summary["world_size"] != 2:
        raise Fail(f"world size {summary['world_size']}, expected 2")
    return f"2 Gloo ranks on one GPU, acc {100 * summary['test_accuracy']:.1f}%"


def check_nccl_two_ranks_one_gpu_is_an_error(ctx: Context) -> str:
    needs_gpu(ctx)
    done = distml(
        ctx,
        "ddp-nccl-2-one-gpu",
        "train",
        *TINY,
        "--device",
        "cuda",
        "--epochs",
        1,
        "--mode",
        "ddp",
        "--nproc",
        2,
        "--backend",
        "nccl",
        "--out",
        ctx.out / "runs" / "nccl-2-one-gpu",
        expect=2,
        timeout=180,
        env=ONE_GPU,
    )
    return "exit 2: " + error_line(done.stderr)


def check_ddp_two_gpus(ctx: Context) -> str:
    needs_gpu(ctx, 2)
    summary = train(ctx, "ddp-nccl-2", "--mode", "ddp", "--nproc", "2", "--backend", "nccl")
    return f"world size {summary['world_size']}, acc {100 * summary['test_accuracy']:.1f}%"


RESUMABLE = ["--dropout", "0.3", "--deterministic", "--epochs", "8"]


def check_resume_bitwise(ctx: Context) -> str:
    """Kill a CUDA run with SIGKILL after its first epoch, resume it: the final weights are
    bitwise those of an uninterrupted run (the CPU version: tests/test_reliability.py)."""
    needs_gpu(ctx)
    from safetensors.torch import load_file

    reference = train(ctx, "resume-reference", *RESUMABLE, epochs=8)
    run_dir = ctx.out / "runs" / "resume-killed"
    command = [
        sys.executable,
        "-m",
        "distml",
        "train",
        *TINY,
        "--device",
        "cuda",
        *RESUMABLE,
        "--out",
        str(run_dir),
    ]
    job = subprocess.Popen(
        command,
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + ctx.timeout
    while not (run_dir / "metrics.csv").exists() and job.poll() is None:
        if time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            raise Fail("the run to kill never finished an epoch")
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    if (run_dir / "summary.json").exists():
        raise Fail("the run finished before it could be killed (make it longer)")
    resumed = last_json(
        distml(ctx, "resume-killed", "train", "--resume", run_dir, "--quiet", "--json")
    )
    different = []
    for name in ("last.safetensors", "best.safetensors"):
        ours = load_file(str(run_dir / name))
        theirs = load_file(str(Path(reference["run_dir"]) / name))
        different += [f"{name}:{key}" for key in differing_tensors(ours, theirs)]
    if different:
        raise Fail(f"{len(different)} tensors differ after resume, e.g. {different[:3]}")
    return f"killed after epoch 1, resumed ({resumed['resumed']} resume): weights bitwise equal"


def checkpoint_of(ctx: Context, name: str) -> Path:
    return Path(needs_run(ctx, name)["run_dir"]) / "best.safetensors"


def check_eval(ctx: Context) -> str:
    summary = needs_run(ctx, "train-32")
    done = distml(
        ctx,
        "eval",
        "eval",
        checkpoint_of(ctx, "train-32"),
        "--device",
        "cuda",
        "--out",
        ctx.out / "eval",
        "--json",
        "--quiet",
    )
    result = last_json(done)
    gap = abs(result["accuracy"] - summary["test_accuracy"])
    if gap > 1 / result["count"]:
        raise Fail(f"eval {result['accuracy']:.4f} vs summary {summary['test_accuracy']:.4f}")
    return f"test accuracy {100 * result['accuracy']:.2f}% = summary's (gap {gap:.2g})"


def check_si_cuda_equals_cpu(ctx: Context) -> str:
    checkpoint = checkpoint_of(ctx, "train-32")
    reports = {}
    for device in ("cuda", "cpu"):
        done = distml(
            ctx,
            f"si-{device}",
            "si",
            checkpoint,
            "--device",
            device,
            "--fraction",
            "0.5",
            "--splits",
            "test",
            "--out",
            ctx.out / f"si-{device}",
            "--json",
            "--quiet",
        )
        reports[device] = last_json(done)
    samples = reports["cpu"]["samples"]["test"]
    worst = 0.0
    for gpu_row, cpu_row in zip(reports["cuda"]["layers"], reports["cpu"]["layers"], strict=True):
        for index in ("si", "center_si"):
            worst = max(worst, abs(gpu_row[index]["test"] - cpu_row[index]["test"]))
    if worst > 1 / samples:
        raise Fail(f"SI on cuda and cpu differ by {worst:.4g} > 1/N = {1 / samples:.4g}")
    return f"{len(reports['cpu']['layers'])} layers, N = {samples}: worst gap {worst:.2g} <= 1/N"


def check_prune_and_select(ctx: Context) -> str:
    checkpoint = checkpoint_of(ctx, "train-32")
    prune = last_json(
        distml(
            ctx,
            "prune",
            "prune",
            checkpoint,
            "--device",
            "cuda",
            "--out",
            ctx.out / "prune",
            "--json",
            "--quiet",
        )
    )
    select = last_json(
        distml(
            ctx,
            "select-features",
            "select-features",
            checkpoint,
            "--device",
            "cuda",
            "--max-features",
            "8",
            "--out",
            ctx.out / "select",
            "--json",
            "--quiet",
        )
    )
    return (
        f"prune kept {prune['kept_layers']} of {len(prune['layers'])} layers; select kept "
        f"{select['channels_after']} of {select['channels_before']} channels"
    )


def check_bench(ctx: Context) -> str:
    """distml bench at full size, VGG16 and the default CNN, batch 512; outputs kept."""
    needs_gpu(ctx)
    steps = ["--steps", "20", "--warmup", "5"] if ctx.quick else []
    lines = []
    for model in ("vgg16", "cnn"):
        out = ctx.out / f"bench-{model}"
        done = distml(
            ctx,
            f"bench-{model}",
            "bench",
            "--model",
            model,
            "--batch-size",
            "512",
            "--device",
            "cuda",
            *steps,
            "--out",
            out,
            "--json",
            "--quiet",
            timeout=600,
        )
        result = last_json(done)
        (out / "table.md").write_text(result["table"] + "\n")
        best = max(result["rows"], key=lambda row: row["images_per_second"])
        ratio = f", {best['vs_classic']:.1f}x classic" if best["vs_classic"] else ""
        lines.append(f"{model} {best['images_per_second']:,.0f} img/s ({best['line']}{ratio})")
    return "; ".join(lines)


def check_compare_backends(ctx: Context) -> str:
    needs_gpu(ctx)
    commands = distml(ctx, "compare-backends", "--help").stdout
    if "compare-backends" not in commands:
        raise Skip("this checkout of distml has no compare-backends command")
    out = ctx.out / "compare-backends"
    done = distml(ctx, "compare-backends", "compare-backends", "--out", out, timeout=600)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdout.txt").write_text(done.stdout)
    return f"output in {out}"


CHECKS: list[tuple[str, Callable[[Context], str]]] = [
    ("environment", check_environment),
    ("train 32 / 16-mixed / bf16-mixed", check_train_precisions),
    ("channels_last on = off", check_channels_last),
    ("--compile = eager", check_compile),
    ("fused optimizer = default", check_fused_optimizer),
    ("--mode dp", check_dp),
    ("--mode ddp, 1 NCCL rank", check_ddp_nccl_one_rank),
    ("--mode ddp, 2 Gloo ranks, 1 GPU", check_ddp_gloo_two_ranks_one_gpu),
    ("2 NCCL ranks, 1 GPU: exit 2", check_nccl_two_ranks_one_gpu_is_an_error),
    ("--mode ddp, 2 GPUs", check_ddp_two_gpus),
    ("--resume bitwise on CUDA", check_resume_bitwise),
    ("eval = summary", check_eval),
    ("si cuda = cpu", check_si_cuda_equals_cpu),
    ("prune, select-features", check_prune_and_select),
    ("bench vgg16 + cnn, batch 512", check_bench),
    ("compare-backends", check_compare_backends),
]


# ----------------------------------------------------------------------------- runner


def run_checks(ctx: Context, checks: list[tuple[str, Callable[[Context], str]]]) -> list[Outcome]:
    outcomes = []
    for name, check in checks:
        print(f"[gpu-check] {name} ...", flush=True)
        started = time.perf_counter()
        try:
            status, reason = "pass", check(ctx)
        except Skip as exc:
            status, reason = "skip", str(exc)
        except Fail as exc:
            status, reason = "fail", str(exc)
        except Exception as exc:  # a broken check is a failure to report, not a crash
            status, reason = "fail", f"{type(exc).__name__}: {exc}"
        outcomes.append(Outcome(name, status, reason, time.perf_counter() - started))
    return outcomes


def table(outcomes: list[Outcome]) -> str:
    lines = ["| check | result | seconds | details |", "| --- | --- | ---: | --- |"]
    for o in outcomes:
        reason = o.reason.replace("|", "/").replace("\n", " ")
        lines.append(f"| {o.name} | {o.status.upper()} | {o.seconds:.1f} | {reason} |")
    return "\n".join(lines)


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("artifacts/gpu-check"))
    parser.add_argument("--quick", action="store_true", help="shorter bench runs")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, quick=args.quick, gpus=visible_gpus())
    if ctx.gpus == 0:
        print("[gpu-check] no CUDA GPU visible: every GPU check is skipped", flush=True)
    outcomes = run_checks(ctx, CHECKS)
    counts = {s: sum(o.status == s for o in outcomes) for s in ("pass", "fail", "skip")}
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "gpus": ctx.gpus,
        "quick": ctx.quick,
        "tolerances": {"loss_curve_relative": CURVE_RTOL, "fused_relative": FUSED_RTOL},
        "counts": counts,
        "checks": [o.__dict__ for o in outcomes],
    }
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(outcomes))
    print(
        f"[gpu-check] {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} "
        f"skipped; {out / 'gpu-check.json'}"
    )
    if ctx.gpus == 0:
        print("[gpu-check] no CUDA GPU: nothing GPU-specific was checked (exit 0)")
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
