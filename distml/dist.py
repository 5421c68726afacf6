"""Process groups, collectives and device helpers.

A rank joins its process group from the torchrun environment (RANK, WORLD_SIZE, MASTER_*),
whether distml's launcher (distml.launch) or an outer ``torchrun`` started it. This module is
the only place that reads those variables; it never imports the training loop or the
launcher (they import it).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distml.config import TrainConfig, check_backend_device, check_batch_split
from distml.errors import DistmlError

NAME_BYTES = 128  # fixed width for gathering device names as tensors (no pickling)


@dataclass(frozen=True)
class RunContext:
    """Where this process runs: its rank, the world, its device and the mode."""

    mode: str
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode == "ddp" and dist.is_initialized()


@dataclass(frozen=True)
class TorchrunEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int = 1
    omp_threads_set: bool = False
    restart_count: int = 0  # > 0 when the elastic agent restarted the ranks after a failure
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    agent_store: bool = False  # the launcher hosts the rendezvous store (torchrun does)
    run_id: str | None = None  # the elastic job's id (TORCHELASTIC_RUN_ID), same on every node


def torchrun_env() -> TorchrunEnv | None:
    """The rank layout set by torchrun / the elastic launcher, if this process is a rank."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return TorchrunEnv(
        rank=int(os.environ["RANK"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        omp_threads_set="OMP_NUM_THREADS" in os.environ,
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", "29500")),
        agent_store=os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        run_id=os.environ.get("TORCHELASTIC_RUN_ID"),
    )


def resolve_device(choice: str) -> torch.device:
    """The device of a one-process command: the first GPU, or the CPU. (A DDP rank takes the
    GPU of its local rank instead, in setup_ddp.)"""
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DistmlError(
                "--device cuda was asked for, but no CUDA GPU is visible to PyTorch "
                "(torch.cuda.is_available() is False). Use --device cpu (or auto), or check the "
                "driver / `docker run --gpus all`."
            )
        return torch.device("cuda", 0)
    return torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def device_name(device: torch.device) -> str:
    """The GPU model, or the CPU model for CPU runs."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine())


# ----------------------------------------------------------------------------- checks


def planned_ranks(config: TrainConfig, device: torch.device) -> int:
    """Ranks per node that ``--mode ddp`` will start (validated against the hardware)."""
    settings = config.dist
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        nproc = settings.nproc or visible
        # NCCL refuses two ranks on one GPU; gloo ranks may share GPUs (round robin), which
        # is how a one-GPU machine exercises the multi-rank DDP path with CUDA tensors
        if nproc > visible and (settings.backend or default_backend(device)) == "nccl":
            raise DistmlError(
                f"--nproc {nproc} asks for more ranks than the {visible} visible GPU(s), and "
                f"NCCL runs one rank per GPU. Use --nproc {visible} or fewer, make more GPUs "
                "visible, or use --backend gloo (ranks then share the GPUs)."
            )
        return nproc
    return settings.nproc or 2


def check_ddp_settings(config: TrainConfig, device: torch.device, world_size: int) -> str:
    """Validate backend and batch split for a DDP world; return the backend to use."""
    backend = config.dist.backend or default_backend(device)
    if config.dist.sync_bn and device.type != "cuda":
        raise DistmlError(
            "--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernels). Drop "
            "--sync-bn on the CPU."
        )
    check_backend_device(backend, device.type, DistmlError)
    check_batch_split(config.train.batch_size, world_size, config.train.accum_steps, DistmlError)
    return backend


# ----------------------------------------------------------------------------- process group


def setup_ddp(config: TrainConfig, env: TorchrunEnv) -> RunContext:
    """Join the process group as the training rank described by ``env``."""
    backend = config.dist.backend or default_backend(resolve_device(config.train.device))
    device = rank_device(resolve_device(config.train.device), env, backend)
    backend = check_ddp_settings(config, device, env.world_size)
    return join_process_group(env, device, backend, config.dist.timeout_seconds)


def join_from_env(
    device_choice: str = "auto", backend: str | None = None, timeout_seconds: int = 600
) -> RunContext:
    """Join the process group of a rank started by distml.launch.launch_ranks (or by
    torchrun): the layout comes from the environment. For any function run in ranks."""
    env = torchrun_env()
    if env is None:
        raise DistmlError("internal: a rank started without RANK/WORLD_SIZE set.")
    device = resolve_device(device_choice)
    backend = backend or default_backend(device)
    return join_process_group(env, rank_device(device, env, backend), backend, timeout_seconds)


def rank_device(device: torch.device, env: TorchrunEnv, backend: str) -> torch.device:
    """The device of a rank: the GPU of its local rank (gloo ranks beyond the GPU count share
    them round robin), or the CPU (with its share of cores)."""
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if env.local_rank >= visible and backend == "nccl":
            raise DistmlError(
                f"local rank {env.local_rank} has no GPU: only {visible} are visible and NCCL "
                "runs one rank per GPU. Start at most one rank per GPU, or use --backend gloo."
            )
        device = torch.device("cuda", env.local_rank % visible)
        torch.cuda.set_device(device)
    elif not env.omp_threads_set:
        # CPU ranks share the cores: without this each rank spins every core's OpenMP
        # threads and throughput collapses (torchrun sets OMP_NUM_THREADS=1 for the same reason)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    return device


def join_process_group(
    env: TorchrunEnv, device: torch.device, backend: str, timeout_seconds: int
) -> RunContext:
    """Initialise the default process group (once per process) and describe this rank."""
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_seconds)
        dist.init_process_group(
            backend=backend,
            store=attempt_store(env, timeout),
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
    return RunContext("ddp", env.rank, env.local_rank, env.world_size, device, backend)


def attempt_store(env: TorchrunEnv, timeout: timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this restart attempt. After an elastic
    restart the launcher's store still holds the dead attempt's keys (such as each rank's
    address for gloo's mesh); without a fresh prefix a new rank can read an old address
    before its peer overwrites it, and fail to connect."""
    store = dist.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=not env.agent_store and env.rank == 0,
        timeout=timeout,
    )
    return dist.PrefixStore(f"distml/attempt-{env.restart_count}", store)


def teardown(ctx: RunContext) -> None:
    if ctx.distributed:
        dist.destroy_process_group()


def barrier(ctx: RunContext) -> None:
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def all_reduce_sum(values: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """Sum a tensor over the ranks (in place, returned for convenience)."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_tensor(local: torch.Tensor, ctx: RunContext) -> list[torch.Tensor]:
    """Every rank's tensor (same shape and dtype on every rank), in rank order, on the CPU."""
    local = local.to(ctx.device)
    if not ctx.distributed:
        return [local.cpu()]
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    return [tensor.cpu() for tensor in gathered]


def all_gather_floats(values: list[float], ctx: RunContext) -> list[list[float]]:
    """Every rank's list of floats (same length on every rank), in rank order."""
    local = torch.tensor(values, dtype=torch.float64)
    return [tensor.tolist() for tensor in all_gather_tensor(local, ctx)]


def all_gather_strings(text: str, ctx: RunContext) -> list[str]:
    """Every rank's short string, as fixed-width byte tensors (nothing is pickled)."""
    raw = text.encode("utf-8")[:NAME_BYTES].ljust(NAME_BYTES, b"\0")
    local = torch.tensor(list(raw), dtype=torch.uint8)
    gathered = all_gather_tensor(local, ctx)
    return [bytes(tensor.tolist()).rstrip(b"\0").decode("utf-8", "replace") for tensor in gathered]


def broadcast_bytes(data: bytes | None, ctx: RunContext) -> bytes | None:
    """Rank 0's bytes (or its None) on every rank, sent as uint8 tensors (nothing pickled).
    Every rank calls it; only rank 0's ``data`` counts."""
    if not ctx.distributed:
        return data
    length = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64, device=ctx.device)
    dist.broadcast(length, src=0)
    size = int(length.item())
    if size <= 0:
        return None if size < 0 else b""
    if ctx.is_main:
        payload = torch.frombuffer(bytearray(data or b""), dtype=torch.uint8).to(ctx.device)
    else:
        payload = torch.empty(size, dtype=torch.uint8, device=ctx.device)
    dist.broadcast(payload, src=0)
    return payload.cpu().numpy().tobytes()
