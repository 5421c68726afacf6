"""Starting and resuming runs: the run folder, signals, and the process layout of a run.

``start_training`` / ``resume_training`` are what the CLI calls. A single or dp run trains in
this process; ``--mode ddp`` starts its ranks with torch's elastic launcher (the engine behind
``torchrun``) through ``launch_ranks``, which runs any given function in every rank, so other
commands can start ranks the same way. Under an outer ``torchrun`` the ranks already exist:
each process just runs ``run_rank``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from distml.checkpoint import STATE_FILE, load_checkpoint, model_from_checkpoint
from distml.config import DistSettings, TrainConfig, format_validation_error
from distml.data import ImageDataset, load_dataset, stratified_split
from distml.dist import (
    RunContext,
    check_ddp_settings,
    planned_ranks,
    resolve_device,
    setup_ddp,
    teardown,
    torchrun_env,
)
from distml.errors import (
    DistmlError,
    Interrupted,
    RankFailure,
    error_for_exit_code,
    user_exit_codes,
)
from distml.evaluate import check_input_shape
from distml.files import atomic_write_json, check_save_target, check_writable
from distml.progress import Reporter
from distml.train import fit, initial_model

ELASTIC_LOGGER = "torch.distributed.elastic"

# ----------------------------------------------------------------------------- entry points


def start_training(config: TrainConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Run ``config`` in a new run directory; return the summary (as in ``summary.json``).
    Empty on the nodes of a multi-node job that do not hold rank 0."""
    return start_run(config, None, show_progress=show_progress)


def resume_training(run_dir: Path, *, show_progress: bool = True) -> dict[str, Any]:
    """Continue a stopped run from its saved state, with its own settings."""
    config = read_run_config(run_dir)
    summary = run_dir / "summary.json"
    if summary.exists():
        Reporter(show_progress).line(f"{run_dir} already finished; nothing to resume.")
        return {**json.loads(summary.read_text()), "already_finished": True}
    if not (run_dir / STATE_FILE).exists():
        raise DistmlError(missing_state_message(run_dir))
    return start_run(config, run_dir, show_progress=show_progress)


def missing_state_message(run_dir: Path) -> str:
    """Why a run without its training state cannot resume, from what the folder shows."""
    metrics = run_dir / "metrics.csv"
    epochs = max(0, len(metrics.read_text().splitlines()) - 1) if metrics.is_file() else 0
    if epochs == 0:
        return (
            f"{run_dir} has no saved training state ({STATE_FILE}): it stopped before its first "
            "epoch ended, so there is nothing to resume. Start it again with the same command "
            "(a folder left by a start that failed is reused)."
        )
    return (
        f"{run_dir} finished {epochs} epoch(s) (metrics.csv) but its training state {STATE_FILE} "
        "is missing (deleted or moved?), so it cannot resume exactly. Put the file back, or "
        "continue from its weights in a new run: distml train --init "
        f"{run_dir / 'last.safetensors'} --out NEW_DIR"
    )


def start_run(config: TrainConfig, run_dir: Path | None, *, show_progress: bool) -> dict:
    """Start (``run_dir`` None) or resume a run in the process layout of its mode. A new run
    that fails before its first durable result leaves no folder behind."""
    device = resolve_device(config.train.device)
    resume = run_dir is not None
    if config.dist.mode == "ddp" and torchrun_env() is None:
        nproc = planned_ranks(config, device)
        check_ddp_settings(config, device, nproc * config.dist.nnodes)
        if run_dir is not None:
            return launch_training(config, run_dir, nproc, show_progress, resume)
        check_inputs(config)  # once, here, rather than in every rank
        if config.dist.node_rank != 0:
            return launch_training(config, Path("."), nproc, show_progress, resume)
        run_dir = create_run_dir(config)
        with removed_if_not_durable(run_dir):
            return launch_training(config, run_dir, nproc, show_progress, resume)
    if run_dir is not None:
        return run_rank(config, run_dir, show_progress=show_progress, resume=True) or {}
    dataset = None
    if config.dist.mode != "ddp":
        dataset = check_inputs(config)  # one process: the checked dataset is the one it trains on
    run_dir = create_run_dir(config)
    with removed_if_not_durable(run_dir):
        return run_rank(config, run_dir, show_progress=show_progress, dataset=dataset) or {}


def durable(run_dir: Path) -> bool:
    """A run holds a result worth keeping once an epoch finished or a state was saved."""
    return any((run_dir / name).exists() for name in (STATE_FILE, "metrics.csv"))


@contextmanager
def removed_if_not_durable(run_dir: Path) -> Iterator[None]:
    """Remove the run folder this start created if the run fails before its first durable
    result: a lone config.json is not a run, and must not block a retry."""
    try:
        yield
    except BaseException:
        if run_dir.is_dir() and not durable(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not run_dir.is_dir() or not path.is_file():
        raise DistmlError(
            f"{run_dir} is not a distml run directory (no config.json). Give the folder that "
            "`distml train` created, e.g. artifacts/runs/<name>."
        )
    try:
        return TrainConfig.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise DistmlError(
            f"{path} is not a valid distml config, so the run cannot be resumed; "
            + format_validation_error(exc, TrainConfig)
        ) from None


# ----------------------------------------------------------------------------- run directory


def default_run_name(config: TrainConfig, elastic_run_id: str | None = None) -> str:
    """``<arch>-<mode>-<time>``; under an elastic job ``<arch>-<mode>-<run id>`` instead, so
    a restarted job finds the folder of its first attempt."""
    tag = elastic_run_id or datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{config.model.arch}-{config.dist.mode}-{tag}"


def run_directory(config: TrainConfig, elastic_run_id: str | None = None) -> Path:
    """The run's folder: --out, or --set output.name, or a new name under the output root."""
    out = config.output
    if out.dir is not None:
        return out.dir
    if out.name is not None:
        return out.root / out.name
    if elastic_run_id is not None:
        return out.root / default_run_name(config, elastic_run_id)
    path = out.root / default_run_name(config)
    suffix = 2
    while path.exists():
        path = out.root / f"{default_run_name(config)}-{suffix}"
        suffix += 1
    return path


def check_inputs(config: TrainConfig, run_dir: Path | None = None) -> ImageDataset:
    """Everything that needs no training to find, before the run folder exists: output paths
    (writable, not another run's), the dataset, the init file, and the model and batch plan.
    Returns the (checked) dataset. ``run_dir``: the folder the run will use, when known."""
    path = run_dir or run_directory(config)
    if path.exists() and not path.is_dir():
        raise DistmlError(f"the run directory {path} is a file. Choose another --out.")
    if (path / "config.json").exists() and durable(path):
        raise DistmlError(
            f"{path} already holds a run. Continue it with distml train --resume {path}, or "
            "choose another --out or --name, or delete that folder first."
        )
    check_save_target(config.output.save, overwrite=config.output.overwrite)
    check_writable(path, "the run directory")
    dataset = load_dataset(config.data)
    if config.model.init is not None:
        ckpt = load_checkpoint(config.model.init)
        check_input_shape(ckpt, dataset)
        model_from_checkpoint(ckpt)  # its tensors must fit its spec
    else:
        check_model_plan(config, dataset)
    check_batch_plan(config, dataset)
    return dataset


def check_model_plan(config: TrainConfig, dataset: ImageDataset) -> None:
    """Build the model on the meta device (no memory, no time) and pass one image through:
    a network too deep for the image size fails here, not after the run folder exists."""
    size = dataset.image_size
    with torch.device("meta"):
        try:  # the spec itself may already refuse the size; else the forward pass does
            model, _, _ = initial_model(config, dataset)
            model(torch.empty(1, dataset.channels, size, size))
        except (RuntimeError, ValueError) as exc:
            raise DistmlError(
                f"the model {config.model.arch} cannot take the dataset's {size}x{size} images: "
                f"{str(exc).splitlines()[0]}. Every 2x2 pooling halves the image; use a "
                "shallower model (--depth), or images of at least 32x32 for vgg16."
            ) from None


def check_batch_plan(config: TrainConfig, dataset: ImageDataset) -> None:
    """The effective batch must fit the training split at least once per epoch (counted from
    the split's indices: no copy of the images)."""
    val = config.data.val_fraction
    train_images = len(stratified_split(dataset.train_labels, val, config.train.seed)[0])
    if config.train.batch_size > train_images:
        raise DistmlError(
            f"--batch-size {config.train.batch_size} is larger than the {train_images} training "
            f"images ({dataset.train_labels.numel()} minus the {val:.0%} validation split), so "
            f"an epoch would have no step. Use --batch-size {train_images} or less."
        )


def create_run_dir(config: TrainConfig, run_dir: Path | None = None) -> Path:
    """Create the run directory and write the resolved settings first, as config.json."""
    path = run_dir or run_directory(config)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistmlError(f"cannot create the run directory {path}: {exc.strerror}.") from None
    atomic_write_json(path / "config.json", config.model_dump(mode="json"))
    return path


# ----------------------------------------------------------------------------- one rank


def run_rank(
    config: TrainConfig,
    run_dir: Path | None,
    *,
    show_progress: bool,
    resume: bool = False,
    dataset: ImageDataset | None = None,
) -> dict | None:
    """One process's part of a run; returns the summary on rank 0, None elsewhere.
    ``run_dir`` None: started by an outer torchrun, rank 0 names the run. ``dataset``: already
    loaded by this process (single and dp runs only: DDP ranks load it in turn, behind a
    barrier every rank must reach)."""
    if config.dist.mode == "ddp":
        env = torchrun_env()
        if env is None:
            raise DistmlError("internal: a DDP rank started without RANK/WORLD_SIZE set.")
        ctx = setup_ddp(config, env)
    else:
        ctx = local_context(config)
    try:
        if run_dir is None:  # under an outer torchrun
            run_dir, resume = outer_torchrun_run_dir(config, ctx)
        reporter = Reporter(show_progress and ctx.is_main)
        with torch_settings(config, ctx.device), StopRequest(escalate=ctx.mode != "ddp") as stop:
            return fit(config, ctx, run_dir, reporter, stop, resume=resume, dataset=dataset)
    finally:
        teardown(ctx)


def outer_torchrun_run_dir(config: TrainConfig, ctx: RunContext) -> tuple[Path, bool]:
    """The run folder of a rank started by an outer torchrun, and whether to resume. The
    folder is named after the elastic run id, so that a restarted job (``torchrun
    --max-restarts``) finds the folder of its first attempt and resumes there."""
    env = torchrun_env()
    run_id = env.run_id if env is not None and env.run_id not in (None, "none") else None
    restarted = env is not None and env.restart_count > 0
    path = run_directory(config, run_id)
    if ctx.is_main:
        if restarted and (path / "config.json").exists():
            return path, True  # a restart before the first epoch simply starts over there
        check_inputs(config, path)
        create_run_dir(config, path)
    return path, restarted


def local_context(config: TrainConfig) -> RunContext:
    device = resolve_device(config.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    world = torch.cuda.device_count() if config.dist.mode == "dp" and device.type == "cuda" else 1
    return RunContext(config.dist.mode, 0, 0, world, device, None)


@contextmanager
def torch_settings(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Determinism and cuDNN autotuning for the run; global flags restored afterwards."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if config.train.deterministic:
        # cuBLAS needs a fixed workspace for reproducible results; must precede CUDA init
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0])
        torch.backends.cudnn.benchmark = saved[1]


# ----------------------------------------------------------------------------- signals


class StopRequest:
    """SIGINT / SIGTERM during training ask for a clean stop: the loop finishes the step, all
    ranks agree, the state is saved, and the run exits 130 / 143, ready for ``--resume``.
    In a single process a second Ctrl-C stops at once; DDP ranks leave that to the launcher,
    which forwards its own signal to them. ``signum``: the first signal received, or 0."""

    def __init__(self, escalate: bool):
        self.escalate = escalate
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: Any) -> None:
        if self.signum and self.escalate and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def stopped_by_signal(signum: int, run_dir: Path, where: str = "") -> Interrupted:
    """The error of a run stopped by a signal with its state saved (exit 128 + signum)."""
    return Interrupted.after_signal(signum, run_dir, where)


# ----------------------------------------------------------------------------- launching ranks


def launch_training(
    config: TrainConfig, run_dir: Path, nproc: int, show_progress: bool, resume: bool
) -> dict[str, Any]:
    """Start the ``nproc`` DDP ranks of this node and wait; rank 0's summary (on node 0)."""
    results = launch_ranks(
        train_rank,
        (config.model_dump_json(), str(run_dir), show_progress, resume),
        nproc=nproc,
        dist=config.dist,
        run_id=elastic_run_id(config.dist, nproc),
        on_signal=lambda signum: stopped_by_signal(signum, run_dir),  # the ranks saved state
    )
    summary = results.get(0)
    if summary is None and config.dist.node_rank == 0:
        raise RankFailure("rank 0 finished without a summary; see the messages above.")
    return summary or {}


def train_rank(config_json: str, run_dir: str, show_progress: bool, resume: bool) -> dict | None:
    """What every launched training rank runs. After an elastic restart the ranks resume from
    the run's saved state if rank 0 has one (``fit`` asks rank 0 and tells the others)."""
    config = TrainConfig.model_validate_json(config_json)
    env = torchrun_env()
    restarted = env is not None and env.restart_count > 0
    return run_rank(config, Path(run_dir), show_progress=show_progress, resume=resume or restarted)


def elastic_run_id(settings: DistSettings, nproc: int, name: str = "train") -> str:
    """The rendezvous run id. Every node of a multi-node job must give the same one, so it is
    derived from what the nodes share (endpoint, layout, what they run); a one-node job gets a
    fresh one."""
    if settings.nnodes == 1:
        return f"distml-{uuid.uuid4().hex[:12]}"
    shared = f"{settings.rdzv_endpoint}|{settings.nnodes}|{nproc}|{name}"
    return f"distml-{hashlib.sha256(shared.encode()).hexdigest()[:12]}"


def launch_ranks(
    function: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    nproc: int,
    dist: DistSettings,
    run_id: str | None = None,
    on_signal: Callable[[int], DistmlError] | None = None,
) -> dict[int, Any]:
    """Run ``function(*args)`` in ``nproc`` spawned ranks on this node (and, with
    ``dist.nnodes`` > 1, in the ranks of the other nodes, which call this too) and wait.

    ``function`` must be importable at module level (ranks are spawned, not forked). Each rank
    starts with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set: it joins the
    process group with ``distml.dist.join_from_env()`` (any backend: gloo on CPU works) and
    leaves it with ``distml.dist.teardown``. Returns each local rank's return value, keyed by
    local rank. A rank that raises a DistmlError makes this raise the same error (same class
    and exit code); a rank that crashes or is killed stops the job and this raises RankFailure
    naming it; with ``dist.max_restarts`` the ranks are restarted first (the function then sees
    TORCHELASTIC_RESTART_COUNT > 0). A signal to this process (which the launcher forwards to
    the ranks) raises ``on_signal(signum)``, by default Interrupted. ``run_id``: the
    rendezvous id, by default derived by ``elastic_run_id``."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if dist.nnodes == 1:  # what `torchrun --standalone` does
        backend, endpoint, rdzv_configs = "c10d", "localhost:0", {}
    else:  # static rendezvous: node ranks are fixed by --node-rank
        backend, endpoint = "static", dist.rdzv_endpoint or ""
        rdzv_configs = {"rank": dist.node_rank}
    launch = LaunchConfig(
        min_nodes=dist.nnodes,
        max_nodes=dist.nnodes,
        nproc_per_node=nproc,
        run_id=run_id or elastic_run_id(dist, nproc, getattr(function, "__qualname__", "")),
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs=rdzv_configs,
        max_restarts=dist.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        with elastic_logging_quiet():
            return elastic_launch(launch, rank_entry)(function, *args)
    except ChildFailedError as exc:
        raise rank_failure(exc) from None
    except SignalException as exc:
        signum = int(exc.sigval)
        if on_signal is not None:
            raise on_signal(signum) from None
        error = Interrupted(f"{signal.Signals(signum).name} received: the ranks were stopped.")
        error.exit_code = 128 + signum
        raise error from None


@contextmanager
def elastic_logging_quiet() -> Iterator[None]:
    """The agent logs every failure with its traceback; distml reports it once, itself. The
    logger's level is restored afterwards (study and sweeps launch several times)."""
    logger = logging.getLogger(ELASTIC_LOGGER)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def rank_entry(function: Callable[..., Any], *args: Any) -> Any:
    """The entry point of every launched rank (module level, so it can be spawned). A
    DistmlError goes to the launcher as structured data in elastic's error file (its class,
    message and exit code) and the rank exits with that code, without a traceback; any other
    exception is recorded by elastic's ``record`` (its traceback in the same file)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        return record(function)(*args)
    except DistmlError as exc:
        write_error_file(exc)
        sys.exit(exc.exit_code)


def write_error_file(exc: DistmlError) -> None:
    """Elastic's error-file JSON, with distml's own fields under extraInfo.distml."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {
        "message": {
            "message": f"{type(exc).__name__}: {exc}",
            "extraInfo": {
                "py_callstack": "",
                "timestamp": str(int(time.time())),
                "distml": {
                    "kind": type(exc).__name__,
                    "message": str(exc),
                    "exit_code": exc.exit_code,
                },
            },
        }
    }
    Path(path).write_text(json.dumps(data))


def rank_failure(exc: Any) -> DistmlError:
    """Turn the elastic launcher's ChildFailedError into one readable error: the first rank
    that failed, and its exception. A rank that stopped on a DistmlError gives that error back
    unchanged (read from its structured error file)."""
    rank, failure = min(exc.failures.items(), key=lambda item: item[1].timestamp)
    data = failure.error_file_data.get("message")
    reported = data.get("extraInfo", {}).get("distml") if isinstance(data, dict) else None
    if reported and reported["exit_code"] in user_exit_codes():
        error = error_for_exit_code(reported["exit_code"], reported["message"])
        if error is not None:
            return error
    text = str(data.get("message", "") if isinstance(data, dict) else failure.message).strip()
    if failure.exitcode < 0:
        text = f"killed by signal {-failure.exitcode}" + (f" ({text})" if text else "")
    elif not text or text.startswith("To enable traceback"):  # elastic's no-error-file text
        text = f"exit code {failure.exitcode} (see its output above)"
    return RankFailure(
        f"DDP rank {rank} failed: {text.splitlines()[0]}. The other ranks were stopped."
    )
