"""Process groups, reductions and launching DDP ranks the torchrun way.

``distml train --mode ddp`` starts its ranks through torch's elastic launcher (the engine
behind ``torchrun``); under an outer ``torchrun`` the ranks already exist and each process
just joins the group. This module is the only place that reads the torchrun environment
variables.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from distml.config import TrainConfig
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
        if nproc > visible:
            raise DistmlError(
                f"--nproc {nproc} asks for more ranks than the {visible} visible GPU(s). "
                f"Use --nproc {visible} or fewer (one rank per GPU), or make more GPUs visible."
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
    if backend == "nccl" and device.type != "cuda":
        raise DistmlError(
            "the nccl backend needs CUDA GPUs, but this run is on the CPU. Use --backend gloo "
            "(the default on CPU) or run on GPUs."
        )
    divisor = world_size * config.train.accum_steps
    if config.train.batch_size % divisor:
        raise DistmlError(
            f"batch size {config.train.batch_size} cannot be split evenly over {world_size} "
            f"rank(s) x {config.train.accum_steps} micro-step(s). --batch-size is the effective "
            f"batch per optimizer step; choose a multiple of {divisor}."
        )
    return backend


# ----------------------------------------------------------------------------- process group


def setup_ddp(config: TrainConfig, env: TorchrunEnv) -> RunContext:
    """Join the process group as the rank described by ``env``."""
    device = resolve_device(config.train.device)
    backend = check_ddp_settings(config, device, env.world_size)
    if device.type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise DistmlError(
                f"local rank {env.local_rank} has no GPU: only {torch.cuda.device_count()} are "
                "visible. Start one rank per GPU (--nproc-per-node at most the GPU count)."
            )
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    elif not env.omp_threads_set:
        # CPU ranks share the cores: without this each rank spins every core's OpenMP
        # threads and throughput collapses (torchrun sets OMP_NUM_THREADS=1 for the same reason)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    if not dist.is_initialized():
        timeout = timedelta(seconds=config.dist.timeout_seconds)
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
    return [t.cpu() for t in gathered]


def all_gather_floats(values: list[float], ctx: RunContext) -> list[list[float]]:
    """Every rank's list of floats (same length on every rank), in rank order."""
    local = torch.tensor(values, dtype=torch.float64)
    return [t.tolist() for t in all_gather_tensor(local, ctx)]


def all_gather_strings(text: str, ctx: RunContext) -> list[str]:
    """Every rank's short string, as fixed-width byte tensors (nothing is pickled)."""
    raw = text.encode("utf-8")[:NAME_BYTES].ljust(NAME_BYTES, b"\0")
    local = torch.tensor(list(raw), dtype=torch.uint8)
    gathered = all_gather_tensor(local, ctx)
    return [bytes(t.tolist()).rstrip(b"\0").decode("utf-8", "replace") for t in gathered]


# ----------------------------------------------------------------------------- launching


USER_EXIT_CODES = (2, 3, 130, 143)  # DistmlError codes a rank hands back unchanged


class Interrupted(DistmlError):
    """SIGINT / SIGTERM: the run saved its state and stopped; it can be resumed."""

    label = "stopped"


def stopped_by_signal(signum: int, run_dir: Path, where: str = "") -> Interrupted:
    import signal

    error = Interrupted(
        f"{signal.Signals(signum).name} received{where}: the training state is saved. "
        f"Resume with: distml train --resume {run_dir}"
    )
    error.exit_code = 128 + signum
    return error


class RankFailure(DistmlError):
    """A rank died: the message names it and its error. Not a settings problem: exit 1."""

    exit_code = 1


@record  # writes the rank's exception to an error file the launcher reads back
def ddp_worker(
    config_json: str, run_dir: str, show_progress: bool, resume: bool
) -> dict[str, Any] | None:
    """Entry point of every launched rank (module level so it can be spawned). After an
    elastic restart the ranks resume from the run's saved state, if there is one."""
    from distml.checkpoint import STATE_FILE
    from distml.train import run_rank  # imported here: train imports this module

    config = TrainConfig.model_validate_json(config_json)
    env = torchrun_env()
    restarted = env is not None and env.restart_count > 0
    resume = resume or (restarted and (Path(run_dir) / STATE_FILE).exists())
    try:
        return run_rank(config, Path(run_dir), show_progress=show_progress, resume=resume)
    except DistmlError as exc:
        # a problem the user can fix: hand the message to the launcher, exit without a traceback
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)
        sys.exit(exc.exit_code)


def launch_ddp(
    config: TrainConfig, run_dir: Path, nproc: int, show_progress: bool, resume: bool = False
) -> dict[str, Any]:
    """Start ``nproc`` ranks on this node with torch's elastic launcher and wait for them.
    Returns rank 0's summary (on node 0). A failed rank stops the whole job: the agent
    tears the others down and this raises RankFailure naming the rank and its error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    settings = config.dist
    if settings.nnodes == 1:  # what `torchrun --standalone` does
        backend, endpoint, rdzv_configs = "c10d", "localhost:0", {}
    else:  # static rendezvous: node ranks are fixed by --node-rank
        backend, endpoint = "static", settings.rdzv_endpoint or ""
        rdzv_configs = {"rank": settings.node_rank}
    launch = LaunchConfig(
        min_nodes=settings.nnodes,
        max_nodes=settings.nnodes,
        nproc_per_node=nproc,
        run_id=f"distml-{uuid.uuid4().hex[:12]}",
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=settings.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    # the agent logs every failure with its traceback; distml reports it once, below
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(launch, ddp_worker)(
            config.model_dump_json(), str(run_dir), show_progress, resume
        )
    except ChildFailedError as exc:
        raise rank_failure(exc) from None
    except SignalException as exc:  # the launcher itself was signalled; the ranks saved state
        raise stopped_by_signal(int(exc.sigval), run_dir) from None
    summary = results.get(0)
    if summary is None and settings.node_rank == 0:
        raise RankFailure("rank 0 finished without a summary; see the messages above.")
    return summary or {}


def rank_failure(exc: Any) -> DistmlError:
    """Turn the elastic launcher's ChildFailedError into one readable error: the first rank
    that failed, and its exception. A rank that stopped on a DistmlError (exit 2 or 3) gives
    that error back unchanged."""
    rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", str(message))
    text = str(message).strip()
    if failure.exitcode in USER_EXIT_CODES and ": " in text:
        kind = Interrupted if failure.exitcode in (130, 143) else DistmlError
        error = kind(text.split(": ", 1)[1])
        error.exit_code = failure.exitcode
        return error
    if failure.exitcode < 0:
        text = f"killed by signal {-failure.exitcode}" + (f" ({text})" if text else "")
    elif not text or text.startswith("To enable traceback"):
        text = f"exit code {failure.exitcode} (see its output above)"
    return RankFailure(
        f"DDP rank {rank} failed: {text.splitlines()[0] if text else 'no message'}. "
        "The other ranks were stopped."
    )
