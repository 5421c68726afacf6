"""``distml compare-backends``: collective bandwidth per backend, op and size, the way
nccl-tests measures it, and optionally the same short DDP training once per backend.

Sizes follow nccl-tests: ``size`` is the bytes of the largest buffer of the call. all_reduce
and broadcast move a ``size`` buffer on every rank; all_gather's ``size`` is the gathered
output (each rank sends size / n); reduce_scatter's is the input (each rank keeps size / n).
The element count is size / element size, rounded down to a multiple of the ranks for
all_gather and reduce_scatter. Bandwidths are in GB/s (1e9 B/s): algbw = size / time and
busbw = algbw x the nccl-tests factor (all_reduce 2(n-1)/n, all_gather and reduce_scatter
(n-1)/n, broadcast 1), which makes every op comparable with the link's bandwidth.

Every result is checked against its exact value (nccl-tests' ``#wrong``): inputs are small
integers that depend on the rank and the index, so sums stay exact in every dtype offered.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distml.config import CompareBackendsSettings, DistSettings, TrainConfig, validate_settings
from distml.dist import (
    all_gather_floats,
    attempt_store,
    barrier,
    device_name,
    resolve_device,
    setup_ddp,
    teardown,
    torchrun_env,
)
from distml.errors import DistmlError
from distml.files import atomic_write_json, atomic_write_text, check_out_dir
from distml.launch import launch_ranks
from distml.metrics import autocast_context
from distml.plots import plot_backend_training, plot_bandwidth, plot_latency
from distml.progress import Reporter
from distml.train import prepare, synchronize

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
EXACT_INTEGERS = {"float32": 2**24, "float64": 2**53, "float16": 2**11, "bfloat16": 2**8}
PATTERN = 7  # input values cycle through rank + 1 + (0..6): small integers, exact sums
BUFFERS_PER_SIZE = 3  # the largest buffer held three times: input, output, expected result
WITHIN = 0.10  # "Gloo is within 10% of NCCL"
TRAIN_PROBE_STEPS = 12  # synced and unsynced steps each in the exposed-communication probe


@dataclass(frozen=True)
class Variant:
    """One row group of the report: a backend with tensors on one kind of device."""

    label: str  # "nccl", "gloo", "gloo (cuda tensors)"
    backend: str
    tensor_device: str  # "cuda" or "cpu"
    skipped: str | None = None  # why it cannot run here


@dataclass(frozen=True)
class Plan:
    """What every rank measures, in the same order on every rank."""

    variants: list[Variant]
    ops: list[str]
    sizes: list[int]
    dtype: str
    iters: int
    warmup: int
    ranks: int
    timeout_seconds: int


# ----------------------------------------------------------------------------- arithmetic


def bus_factor(op: str, ranks: int) -> float:
    """nccl-tests' busbw / algbw: the share of the data each link carries."""
    if op == "all_reduce":
        return 2 * (ranks - 1) / ranks
    if op in ("all_gather", "reduce_scatter"):
        return (ranks - 1) / ranks
    return 1.0


def bandwidths(op: str, nbytes: int, seconds: float, ranks: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s (1e9 B/s) of one call that moved ``nbytes`` (nccl-tests size)."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * bus_factor(op, ranks)


def element_count(op: str, nbytes: int, element_size: int, ranks: int) -> int:
    count = nbytes // element_size
    if op in ("all_gather", "reduce_scatter"):
        count -= count % ranks
    return count


def pattern(count: int, offset: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``offset + (i % PATTERN)`` for i < count, built in the dtype (no int64 temporary)."""
    cycle = torch.arange(PATTERN, dtype=dtype, device=device) + offset
    return cycle.repeat(-(-count // PATTERN))[:count].contiguous()


def rank_input(op: str, count: int, rank: int, ranks: int, dtype, device) -> torch.Tensor:
    """What this rank contributes: its chunk (all_gather) or its whole buffer."""
    local = count // ranks if op == "all_gather" else count
    return pattern(local, rank + 1, dtype, device)


def expected_result(op: str, count: int, rank: int, ranks: int, dtype, device) -> torch.Tensor:
    """The exact result this rank must hold after the call."""
    rank_sum = ranks * (ranks + 1) // 2  # sum over q of (q + 1)
    if op == "all_reduce":
        return pattern(count, 0, dtype, device) * ranks + rank_sum
    if op == "all_gather":
        return torch.cat([pattern(count // ranks, q + 1, dtype, device) for q in range(ranks)])
    if op == "reduce_scatter":
        chunk = count // ranks
        whole = pattern(count, 0, dtype, device)[rank * chunk : (rank + 1) * chunk]
        return whole * ranks + rank_sum
    return pattern(count, 1, dtype, device)  # broadcast from rank 0


def count_wrong(result: torch.Tensor, expected: torch.Tensor) -> int:
    """Elements that differ from the exact result (NaN counts as wrong)."""
    return int((result != expected).sum())


def largest_value(ranks: int) -> int:
    return ranks * (ranks + 1) // 2 + ranks * (PATTERN - 1)


# ----------------------------------------------------------------------------- planning


def plan_variants(
    backends: list[str],
    device_type: str,
    ranks: int,
    gpus: int,
    available: Callable[[str], bool],
) -> list[Variant]:
    """The rows to measure, and those that cannot run here with the reason."""
    variants = []
    for backend in backends:
        if not available(backend):
            reason = f"this PyTorch build has no {backend} backend"
            variants.append(Variant(backend, backend, device_type, reason))
        elif backend == "nccl" and device_type != "cuda":
            reason = "NCCL needs CUDA GPUs and this run is on the CPU"
            variants.append(Variant("nccl", "nccl", "cpu", reason))
        elif backend == "nccl" and ranks > gpus:
            reason = f"NCCL needs one GPU per rank: {ranks} ranks, {gpus} GPU(s)"
            variants.append(Variant("nccl", "nccl", "cuda", reason))
        elif backend == "nccl":
            variants.append(Variant("nccl", "nccl", "cuda"))
        else:
            variants.append(Variant("gloo", "gloo", "cpu"))
            if device_type == "cuda":  # the GPU fallback: CUDA tensors staged through the host
                variants.append(Variant("gloo (cuda tensors)", "gloo", "cuda"))
    return variants


def backend_available(backend: str) -> bool:
    return bool(dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_plan(plan: Plan, gpus: int) -> None:
    """Refuse sizes that cannot hold one element per rank, fit in memory, or stay exact."""
    element = DTYPES[plan.dtype].itemsize
    smallest, largest = min(plan.sizes), max(plan.sizes)
    if smallest < element * plan.ranks:
        raise DistmlError(
            f"--sizes {smallest} B is below one {plan.dtype} element per rank "
            f"({element * plan.ranks} B for {plan.ranks} ranks); start the sizes higher."
        )
    measured = [v for v in plan.variants if v.skipped is None]
    host = sum(v.tensor_device == "cpu" or v.backend == "gloo" for v in measured)
    needed = BUFFERS_PER_SIZE * largest * plan.ranks  # ranks on one host share its memory
    if host and needed > available_host_bytes():
        raise DistmlError(
            f"--sizes up to {format_bytes(largest)} need about {format_bytes(needed)} of host "
            f"memory for {plan.ranks} ranks, but {format_bytes(available_host_bytes())} is "
            "available; give a smaller largest size."
        )
    if any(v.tensor_device == "cuda" for v in measured) and gpus:
        per_gpu = BUFFERS_PER_SIZE * largest * math.ceil(plan.ranks / gpus)
        free = min(torch.cuda.mem_get_info(i)[0] for i in range(gpus))
        if per_gpu > free:
            raise DistmlError(
                f"--sizes up to {format_bytes(largest)} need about {format_bytes(per_gpu)} per "
                f"GPU, but {format_bytes(free)} is free; give a smaller largest size."
            )
    if largest_value(plan.ranks) > EXACT_INTEGERS[plan.dtype]:
        raise DistmlError(
            f"with {plan.ranks} ranks the checked sums exceed the integers {plan.dtype} holds "
            "exactly; use --dtype float32."
        )


def make_plan(settings: CompareBackendsSettings, ranks: int, device_type: str) -> Plan:
    gpus = torch.cuda.device_count() if device_type == "cuda" else 0
    variants = plan_variants(settings.backends, device_type, ranks, gpus, backend_available)
    plan = Plan(
        variants,
        list(settings.ops),
        list(settings.sizes),
        settings.dtype,
        settings.iters,
        settings.warmup,
        ranks,
        settings.timeout_seconds,
    )
    check_plan(plan, gpus)
    return plan


def default_ranks(settings: CompareBackendsSettings, device: torch.device) -> int:
    """One rank per visible GPU, else 2 CPU ranks (``--nproc`` wins)."""
    if settings.nproc is not None:
        return settings.nproc
    return torch.cuda.device_count() if device.type == "cuda" else 2


def format_bytes(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes:.0f} B"


# ----------------------------------------------------------------------------- one rank

ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Buffers:
    source: torch.Tensor  # this rank's input, never written
    output: torch.Tensor  # the result (the working buffer of the in-place ops)
    expected: torch.Tensor
    in_place: bool  # all_reduce and broadcast overwrite their input: refill before each call


def make_buffers(op: str, count: int, rank: int, ranks: int, dtype, device) -> Buffers:
    expected = expected_result(op, count, rank, ranks, dtype, device)
    return Buffers(
        source=rank_input(op, count, rank, ranks, dtype, device),
        output=torch.empty_like(expected),
        expected=expected,
        in_place=op in ("all_reduce", "broadcast"),
    )


def call_collective(op: str, buffers: Buffers, group: Any) -> None:
    if op == "all_reduce":
        dist.all_reduce(buffers.output, group=group)
    elif op == "all_gather":
        ALL_GATHER(buffers.output, buffers.source, group=group)
    elif op == "reduce_scatter":
        REDUCE_SCATTER(buffers.output, buffers.source, group=group)
    else:
        dist.broadcast(buffers.output, src=0, group=group)


def timed_call(op: str, buffers: Buffers, group: Any, control: Any, device: torch.device) -> float:
    """Seconds of one call, from a barrier to its completion on this rank."""
    if buffers.in_place:
        buffers.output.copy_(buffers.source)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=control)
    if device.type != "cuda":  # gloo's CPU calls return when their result is there
        started = time.perf_counter()
        call_collective(op, buffers, group)
        return time.perf_counter() - started
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call_collective(op, buffers, group)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure_size(
    op: str, nbytes: int, plan: Plan, group: Any, control: Any, device: torch.device
) -> dict[str, Any]:
    """Every rank's timed calls of one op and size, gathered as one tensor; the row."""
    dtype = DTYPES[plan.dtype]
    rank = dist.get_rank()
    count = element_count(op, nbytes, dtype.itemsize, plan.ranks)
    buffers = make_buffers(op, count, rank, plan.ranks, dtype, device)
    times = torch.zeros(plan.iters, dtype=torch.float64)
    wrong = 0
    for call in range(plan.warmup + plan.iters):
        seconds = timed_call(op, buffers, group, control, device)
        wrong += count_wrong(buffers.output, buffers.expected)  # every call, warm-up too
        if call >= plan.warmup:
            times[call - plan.warmup] = seconds
    local = torch.cat([times, torch.tensor([float(wrong)], dtype=torch.float64)])
    gathered = torch.empty(plan.ranks * local.numel(), dtype=torch.float64)
    ALL_GATHER(gathered, local, group=control)  # tensors, not pickled objects
    per_rank = gathered.view(plan.ranks, -1)
    checked = (plan.warmup + plan.iters) * buffers.output.numel() * plan.ranks
    return size_row(
        op, nbytes, count * dtype.itemsize, per_rank[:, :-1], per_rank[:, -1], checked, plan
    )


def size_row(
    op: str,
    requested: int,
    nbytes: int,
    seconds: torch.Tensor,
    wrong: torch.Tensor,
    checked: int,
    plan: Plan,
) -> dict[str, Any]:
    """One report row from the per-rank times (ranks x iters) and wrong counts."""
    quantiles = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    p10, median, p90 = torch.quantile(seconds.flatten(), quantiles).tolist()
    algbw, busbw = bandwidths(op, nbytes, median, plan.ranks)
    return {
        "op": op,
        "bytes": nbytes,
        "requested_bytes": requested,
        "count": nbytes // DTYPES[plan.dtype].itemsize,
        "dtype": plan.dtype,
        "ranks": plan.ranks,
        "time_us": median * 1e6,
        "time_us_p10": p10 * 1e6,
        "time_us_p90": p90 * 1e6,
        "algbw_gbps": algbw,
        "busbw_gbps": busbw,
        "wrong": int(wrong.sum()),
        "checked": checked,
    }


def tensor_device(variant: Variant, local_rank: int) -> torch.device:
    if variant.tensor_device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def measure_variant(
    variant: Variant, plan: Plan, control: Any, local_rank: int, reporter: Reporter
) -> list[dict[str, Any]]:
    device = tensor_device(variant, local_rank)
    timeout = timedelta(seconds=plan.timeout_seconds)
    group = dist.new_group(backend=variant.backend, timeout=timeout)
    rows = []
    for op in plan.ops:
        reporter.line(f"{variant.label}: {op}, {len(plan.sizes)} sizes")
        for nbytes in plan.sizes:
            row = measure_size(op, nbytes, plan, group, control, device)
            rows.append({"backend": variant.label, "status": "ok", "reason": None, **row})
    dist.destroy_process_group(group)
    return rows


def collective_rank(plan_json: str, show_progress: bool) -> dict[str, Any] | None:
    """Entry point of every rank (module level so it can be spawned): join a gloo control
    group, measure each variant in its own group, return the rows on rank 0."""
    plan = plan_from_json(plan_json)
    env = torchrun_env()
    if env is None:
        raise DistmlError("internal: a compare-backends rank started without RANK/WORLD_SIZE.")
    if not env.omp_threads_set:  # ranks share the cores (as torchrun's OMP_NUM_THREADS=1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    timeout = timedelta(seconds=plan.timeout_seconds)
    dist.init_process_group(
        "gloo",
        store=attempt_store(env, timeout),
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
    )
    control = dist.group.WORLD
    reporter = Reporter(show_progress and env.rank == 0)
    rows = []
    for variant in plan.variants:
        if variant.skipped is None:
            rows += measure_variant(variant, plan, control, env.local_rank, reporter)
    dist.destroy_process_group()
    return {"rows": rows} if env.rank == 0 else None


def plan_from_json(text: str) -> Plan:
    values = json.loads(text)
    values["variants"] = [Variant(**variant) for variant in values["variants"]]
    return Plan(**values)


def plan_to_json(plan: Plan) -> str:
    return json.dumps(asdict(plan))


def run_on_ranks(function: Callable[..., Any], args: tuple[Any, ...], nproc: int) -> Any:
    """Rank 0's result of ``function(*args)`` on every rank: launched here, or (under an
    outer torchrun) run in this process, which is one of the ranks already."""
    if torchrun_env() is not None:
        return function(*args)
    # the ranks' own collective timeout guards every call; the launcher needs only a node
    return launch_ranks(function, args, nproc=nproc, dist=DistSettings()).get(0)


# ----------------------------------------------------------------------------- training


TrainRun = Callable[[TrainConfig], dict[str, Any] | None]  # e.g. launch.start_training


def training_config(settings: CompareBackendsSettings, backend: str, ranks: int) -> TrainConfig:
    """The ``--train-epochs`` run of one backend: the given training settings, as DDP."""
    values = settings.training.model_dump()
    values["train"].update(epochs=settings.train_epochs, device=settings.device)
    values["dist"].update(mode="ddp", backend=backend, nproc=ranks)
    values["output"].update(dir=settings.out / f"train-{backend}", name=None, save=None)
    return validate_settings(TrainConfig, values)


def timed_backward(session: Any, images, labels, sync: bool, config: TrainConfig, ctx) -> float:
    """Seconds of one forward + backward, with DDP's gradient all-reduce or under no_sync."""
    barrier(ctx)  # rank skew is not communication
    synchronize(ctx.device)
    started = time.perf_counter()
    with contextlib.nullcontext() if sync else session.net.no_sync():
        with autocast_context(ctx.device, config.train.precision):
            loss = session.criterion(session.net(images), labels)
        loss.backward()
    synchronize(ctx.device)
    seconds = time.perf_counter() - started
    session.optimizer.zero_grad(set_to_none=True)
    return seconds


def sync_probe_rank(config_json: str) -> dict[str, Any] | None:
    """The exposed (not overlapped) gradient all-reduce of one DDP step: the same batches
    timed with gradient sync and under ``no_sync``, alternating, weights unchanged; the
    difference of the medians is the time a step waits for the all-reduce. No hooks."""
    config = TrainConfig.model_validate_json(config_json)
    env = torchrun_env()
    if env is None:
        raise DistmlError("internal: a probe rank started without RANK/WORLD_SIZE.")
    ctx = setup_ddp(config, env)
    try:
        session = prepare(config, ctx, None)
        session.net.train()
        times: dict[bool, list[float]] = {True: [], False: []}
        batches = session.batches.epoch(0, 0)
        for step, micro_batches in zip(range(TRAIN_PROBE_STEPS + 2), batches, strict=False):
            images, labels = next(iter(micro_batches))
            for sync in (True, False) if step % 2 else (False, True):
                seconds = timed_backward(session, images, labels, sync, config, ctx)
                if step >= 2:  # the first steps build DDP's buckets and warm the allocator
                    times[sync].append(seconds)
        local = [statistics.median(times[True]), statistics.median(times[False])]
        per_rank = all_gather_floats(local, ctx)
    finally:
        teardown(ctx)
    if env.rank != 0:
        return None
    return {
        "step_seconds_synced": statistics.median(r[0] for r in per_rank),
        "step_seconds_no_sync": statistics.median(r[1] for r in per_rank),
        "steps_per_epoch": session.batches.steps_per_epoch,
    }


def training_row(backend: str, summary: dict[str, Any], probe: dict[str, Any]) -> dict[str, Any]:
    """Epoch time and throughput of the run, and its exposed all-reduce time per epoch."""
    exposed_step = max(0.0, probe["step_seconds_synced"] - probe["step_seconds_no_sync"])
    exposed_epoch = exposed_step * probe["steps_per_epoch"]
    epoch = summary["mean_epoch_seconds"]
    return {
        "backend": backend,
        "status": "ok",
        "reason": None,
        "epochs": summary["epochs_run"],
        "epoch_seconds": epoch,
        "images_per_second": summary["images_per_second"],
        "step_seconds_synced": probe["step_seconds_synced"],
        "step_seconds_no_sync": probe["step_seconds_no_sync"],
        "steps_per_epoch": probe["steps_per_epoch"],
        "allreduce_wait_seconds_per_epoch": exposed_epoch,
        "allreduce_wait_fraction": exposed_epoch / epoch if epoch > 0 else 0.0,
        "test_accuracy": summary.get("test_accuracy"),
        "run_dir": summary.get("run_dir"),
    }


def compare_training(
    settings: CompareBackendsSettings, plan: Plan, run_training: TrainRun, reporter: Reporter
) -> list[dict[str, Any]]:
    """The same short DDP training once per backend, and the exposed-all-reduce probe."""
    rows = []
    for backend in dict.fromkeys(variant.backend for variant in plan.variants):
        variant = next(v for v in plan.variants if v.backend == backend)
        if variant.skipped is not None:
            rows.append({"backend": backend, "status": "skipped", "reason": variant.skipped})
            continue
        config = training_config(settings, backend, plan.ranks)
        reporter.line(f"training {settings.train_epochs} epoch(s) with {backend}")
        summary = run_training(config)
        probe = run_on_ranks(sync_probe_rank, (config.model_dump_json(),), plan.ranks)
        if summary and probe:  # rank 0 (under an outer torchrun the others return nothing)
            rows.append(training_row(backend, summary, probe))
    return rows


# ----------------------------------------------------------------------------- the command


def compare_backends(
    settings: CompareBackendsSettings,
    *,
    show_progress: bool = True,
    run_training: TrainRun | None = None,
) -> dict[str, Any] | None:
    """Measure, write backends.json/.csv and the plots into ``settings.out``, return the
    result (None on the ranks other than 0 under an outer torchrun). Bad input fails before
    any rank starts and before anything is written."""
    check_out_dir(settings.out, overwrite=settings.overwrite)
    device = resolve_device(settings.device)
    env = torchrun_env()
    ranks = env.world_size if env is not None else default_ranks(settings, device)
    plan = make_plan(settings, ranks, device.type)
    if settings.train_epochs and run_training is None:
        raise DistmlError("internal: --train-epochs needs a training function.")
    measured = run_on_ranks(collective_rank, (plan_to_json(plan), show_progress), ranks)
    reporter = Reporter(show_progress and (env is None or env.rank == 0))
    training = []
    if settings.train_epochs and run_training is not None:
        training = compare_training(settings, plan, run_training, reporter)
    if env is not None and env.rank != 0:
        return None
    rows = skipped_rows(plan) + measured["rows"]
    result = {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "ranks": ranks,
        "dtype": plan.dtype,
        "iters": plan.iters,
        "warmup": plan.warmup,
        "ops": plan.ops,
        "sizes": plan.sizes,
        "rows": rows,
        "training": training,
        "interpretation": interpret(rows, training),
    }
    result["files"] = write_outputs(result, settings.out)
    return result


def skipped_rows(plan: Plan) -> list[dict[str, Any]]:
    return [
        {"backend": v.label, "status": "skipped", "reason": v.skipped}
        for v in plan.variants
        if v.skipped is not None
    ]


CSV_FIELDS = [
    "backend",
    "status",
    "op",
    "bytes",
    "count",
    "dtype",
    "ranks",
    "time_us",
    "time_us_p10",
    "time_us_p90",
    "algbw_gbps",
    "busbw_gbps",
    "wrong",
    "checked",
    "reason",
]


def rows_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_outputs(result: dict[str, Any], out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in ("backends.json", "backends.csv")}
    measured = [row for row in result["rows"] if row["status"] == "ok"]
    title = f"{result['ranks']} ranks on {result['device_name']}, {result['dtype']}"
    files["bandwidth.png"] = out / "bandwidth.png"
    plot_bandwidth(measured, files["bandwidth.png"], title)
    files["latency.png"] = out / "latency.png"
    plot_latency(measured, files["latency.png"], title)
    trained = [row for row in result["training"] if row["status"] == "ok"]
    if trained:
        files["training.png"] = out / "training.png"
        training_title = f"DDP training, {result['ranks']} ranks on {result['device_name']}"
        plot_backend_training(trained, files["training.png"], training_title)
    names = {name: str(path) for name, path in files.items()}
    atomic_write_text(files["backends.csv"], rows_csv(result["rows"]))
    atomic_write_json(files["backends.json"], {**result, "files": names})
    return names


# ----------------------------------------------------------------------------- reading it


def size_span(sizes: list[int]) -> str:
    if len(sizes) == 1:
        return format_bytes(sizes[0])
    return f"{format_bytes(sizes[0])}-{format_bytes(sizes[-1])}"


def compare_op(op: str, label: str, rows: list[dict], reference: list[dict]) -> str | None:
    """Where ``label`` is within 10% of the reference (nccl) for one op, and where it falls
    behind, from the median times of the sizes both measured."""
    nccl = {r["requested_bytes"]: r["time_us"] for r in reference if r["op"] == op}
    ratios = {
        r["requested_bytes"]: nccl[r["requested_bytes"]] / r["time_us"]
        for r in rows
        if r["op"] == op and r["requested_bytes"] in nccl and r["time_us"] > 0
    }
    if not ratios:
        return None
    within = [size for size, ratio in ratios.items() if ratio >= 1 - WITHIN]
    behind = [size for size, ratio in ratios.items() if ratio < 1 - WITHIN]
    parts = []
    if within:
        parts.append(f"within 10% of nccl (or faster) at {size_span(within)}")
    if behind:
        worst = min(behind, key=lambda size: ratios[size])
        parts.append(
            f"behind at {size_span(behind)}, worst {1 / ratios[worst]:.1f}x slower at "
            f"{format_bytes(worst)}"
        )
    return f"{op}: {label} " + "; ".join(parts)


def interpret(rows: list[dict[str, Any]], training: list[dict[str, Any]]) -> list[str]:
    """A few sentences computed from the numbers."""
    measured = [row for row in rows if row["status"] == "ok"]
    labels = list(dict.fromkeys(row["backend"] for row in measured))
    lines = []
    for label in labels:
        best = max((r for r in measured if r["backend"] == label), key=lambda r: r["busbw_gbps"])
        lines.append(
            f"{label}: peak bus bandwidth {best['busbw_gbps']:.2f} GB/s ({best['op']} at "
            f"{format_bytes(best['requested_bytes'])})"
        )
    for row in rows:
        if row["status"] == "skipped":
            lines.append(f"{row['backend']} skipped: {row['reason']}")
    reference = [r for r in measured if r["backend"] == "nccl"]
    for label in (label for label in labels if label != "nccl" and reference):
        ops = dict.fromkeys(r["op"] for r in measured)
        own = [r for r in measured if r["backend"] == label]
        lines += [text for op in ops if (text := compare_op(op, label, own, reference))]
    if measured and not reference:
        lines.append("no nccl row: gloo cannot be compared with nccl on this machine")
    if measured and measured[0]["ranks"] == 1:
        lines.append(
            "one rank: no data crosses a link, so the bus bandwidths are 0 (broadcast's is a "
            "local no-op); measure with --nproc 2 or more"
        )
    lines.append(wrong_sentence(measured))
    lines += training_sentences(training)
    return lines


def wrong_sentence(measured: list[dict[str, Any]]) -> str:
    bad = [r for r in measured if r["wrong"]]
    checked = sum(r["checked"] for r in measured)
    if not bad:
        return f"every result was checked: {checked:,} values, 0 wrong"
    where = ", ".join(f"{r['backend']} {r['op']} {format_bytes(r['requested_bytes'])}" for r in bad)
    total = sum(r["wrong"] for r in bad)
    return f"WRONG RESULTS: {total:,} of {checked:,} values differ from the exact result ({where})"


def training_sentences(training: list[dict[str, Any]]) -> list[str]:
    trained = [row for row in training if row["status"] == "ok"]
    lines = [
        f"training with {r['backend']}: {r['epoch_seconds']:.2f} s/epoch, "
        f"{r['images_per_second']:,.0f} images/s, {r['allreduce_wait_seconds_per_epoch']:.2f} s "
        f"({100 * r['allreduce_wait_fraction']:.0f}%) of each epoch waiting for gradient all-reduce"
        for r in trained
    ]
    if len(trained) > 1:
        fastest = min(trained, key=lambda r: r["epoch_seconds"])
        slowest = max(trained, key=lambda r: r["epoch_seconds"])
        ratio = slowest["epoch_seconds"] / fastest["epoch_seconds"]
        lines.append(
            f"{fastest['backend']} trains fastest: {slowest['backend']} takes {ratio:.2f}x as long"
        )
    return lines


def backends_table(result: dict[str, Any]) -> str:
    """The terminal report: nccl-tests-like columns, then training and the reading."""
    head = (
        f"{'backend':<20}{'op':<15}{'size':>10}{'count':>12}{'time us':>12}{'p10':>12}"
        f"{'p90':>12}{'algbw':>9}{'busbw':>9}{'#wrong':>8}"
    )
    lines = [
        f"{result['ranks']} ranks on {result['device_name']}, {result['dtype']}, "
        f"median of {result['iters']} calls x {result['ranks']} ranks (GB/s = 1e9 B/s)",
        head,
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['backend']:<20}skipped: {r['reason']}")
            continue
        lines.append(
            f"{r['backend']:<20}{r['op']:<15}{format_bytes(r['bytes']):>10}{r['count']:>12,}"
            f"{r['time_us']:>12.1f}{r['time_us_p10']:>12.1f}{r['time_us_p90']:>12.1f}"
            f"{r['algbw_gbps']:>9.3f}{r['busbw_gbps']:>9.3f}{r['wrong']:>8}"
        )
    lines += ["", *result["interpretation"], ""]
    lines += [f"{name:<14}{path}" for name, path in result["files"].items()]
    return "\n".join(lines)
