"""distml.launch: starting ranks for any function, rank failures, run folders under torchrun,
and the resume paths that CPU runs of the whole CLI cannot reach (several GPUs or nodes)."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, train_json

from distml.checkpoint import STATE_FILE, TrainingState, local_rng_states, save_training_state
from distml.config import DistSettings, TrainConfig
from distml.dist import RunContext, all_reduce_sum, join_from_env, teardown
from distml.errors import (
    DistmlError,
    Interrupted,
    RankFailure,
    TrainingDiverged,
    user_exit_codes,
)
from distml.launch import launch_ranks, outer_torchrun_run_dir
from distml.train import prepare, shared_training_state

TWO_RANKS = DistSettings(mode="ddp", nproc=2)

# ----------------------------------------------------------------------------- rank functions
# (module level: launched ranks are spawned and import them)


def sum_of_ranks() -> tuple[int, int, float]:
    ctx = join_from_env("cpu", "gloo")
    try:
        total = all_reduce_sum(torch.tensor([float(ctx.rank)]), ctx)
        return ctx.rank, ctx.world_size, float(total.item())
    finally:
        teardown(ctx)


def diverge_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise TrainingDiverged("the loss is NaN: lower --lr")


def crash_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("boom: a bug in rank one")


def weights_identical_same_seed_and_seed_per_rank() -> tuple[bool, bool]:
    ctx = join_from_env("cpu", "gloo")
    try:
        same = prepare(tiny_config(seed=0), ctx, None).initial_weights_identical
        differ = prepare(tiny_config(seed=ctx.rank), ctx, None).initial_weights_identical
        return same, differ
    finally:
        teardown(ctx)


def state_seen_by_rank(folders: list[str]) -> tuple[int, float, list[str]]:
    """Each rank reads the state of its own folder; only rank 0's holds one."""
    ctx = join_from_env("cpu", "gloo")
    try:
        state = shared_training_state(Path(folders[ctx.rank]) / STATE_FILE, ctx)
        assert state is not None
        weight_sum = float(sum(t.double().sum() for t in state.model.values()))
        return state.loop["epoch"], weight_sum, sorted(state.rng)
    finally:
        teardown(ctx)


def tiny_config(seed: int = 0) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"dataset": "synthetic", "synthetic_train_size": 64, "synthetic_test_size": 10},
            "model": {"width": 0.125, "depth": 4},
            "train": {"batch_size": 16, "device": "cpu", "seed": seed},
            "dist": {"mode": "ddp"},
        }
    )


# ----------------------------------------------------------------------------- the launcher


def test_launch_ranks_runs_a_function_in_gloo_ranks():
    results = launch_ranks(sum_of_ranks, (), nproc=2, dist=TWO_RANKS)
    assert results == {0: (0, 2, 1.0), 1: (1, 2, 1.0)}


def test_a_user_error_in_a_rank_comes_back_as_the_same_error():
    with pytest.raises(TrainingDiverged, match=r"^the loss is NaN: lower --lr$") as caught:
        launch_ranks(diverge_on_rank_one, (), nproc=2, dist=TWO_RANKS)
    assert caught.value.exit_code == 3


def test_a_crashed_rank_is_named_and_the_logger_level_is_restored():
    logger = logging.getLogger("torch.distributed.elastic")
    logger.setLevel(logging.INFO)
    try:
        with pytest.raises(RankFailure, match=r"rank 1 failed: .*boom: a bug in rank one"):
            launch_ranks(crash_on_rank_one, (), nproc=2, dist=TWO_RANKS)
        assert logger.level == logging.INFO  # study trains several times in one process
    finally:
        logger.setLevel(logging.NOTSET)


def test_user_exit_codes_come_from_the_error_classes():
    assert user_exit_codes() == (2, 3, 130, 143)
    assert {DistmlError.exit_code, TrainingDiverged.exit_code} < set(user_exit_codes())
    assert RankFailure.exit_code not in user_exit_codes()
    assert set(Interrupted.signal_exit_codes) < set(user_exit_codes())


# ----------------------------------------------------------------------------- bug fixes


def test_initial_weights_identical_sees_ranks_that_differ():
    results = launch_ranks(
        weights_identical_same_seed_and_seed_per_rank, (), nproc=2, dist=TWO_RANKS
    )
    assert results == {0: (True, False), 1: (True, False)}


def test_rng_states_are_keyed_by_global_rank_and_restored_on_the_ranks_own_gpu(monkeypatch):
    """Rank 1 of two (GPU 1) must restore its own generator, on cuda:1, never GPU 0's."""
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index]))
    restored = []
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda tensor, device: restored.append((tensor, device))
    )
    rank0 = local_rng_states(torch.device("cuda", 0))
    rank1 = local_rng_states(torch.device("cuda", 1))
    assert rank0.keys() == rank1.keys() == {"cpu", "cuda"}  # the same names: gathers line up
    rng = {
        f"{name}.{rank}": states[name]
        for rank, states in enumerate([rank0, rank1])
        for name in states
    }
    state = TrainingState(
        model={},
        best=None,
        optimizer={},
        scheduler={},
        scaler=None,
        rng=rng,
        loop={},
        world_size=2,
    )
    cpu_state = torch.get_rng_state()
    state.restore_rng(rank=1, device=torch.device("cuda", 1))
    torch.set_rng_state(cpu_state)
    assert [(int(t.item()), device) for t, device in restored] == [(1, torch.device("cuda", 1))]


def test_resume_without_a_shared_filesystem(tmp_path: Path):
    """Only rank 0's folder holds the state: rank 0 sends it to rank 1 over the group."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rng = {"cpu.0": torch.get_rng_state(), "cpu.1": torch.get_rng_state()}

    class Loop:
        def state_dict(self) -> dict:
            return {"epoch": 3}

    state = TrainingState.capture(
        model=model,
        best=None,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loop=Loop(),
        rng=rng,
        world_size=2,
    )
    save_training_state(node0 / STATE_FILE, state)
    expected = float(sum(t.double().sum() for t in model.state_dict().values()))
    results = launch_ranks(state_seen_by_rank, ([str(node0), str(node1)],), nproc=2, dist=TWO_RANKS)
    assert results[0] == results[1] == (3, pytest.approx(expected), ["cpu.0", "cpu.1"])


def test_a_restarted_outer_torchrun_finds_its_run_folder(tmp_path: Path, monkeypatch):
    """torchrun --max-restarts: the restart names the same folder from TORCHELASTIC_RUN_ID and
    resumes there, even when the first attempt died before its first epoch ended."""
    config = TrainConfig.model_validate(
        {
            "data": {"dataset": "synthetic", "synthetic_train_size": 64, "synthetic_test_size": 10},
            "train": {"batch_size": 16},
            "dist": {"mode": "ddp"},
            "output": {"root": str(tmp_path)},
        }
    )
    ctx = RunContext("ddp", 0, 0, 1, torch.device("cpu"))
    env = {"RANK": "0", "WORLD_SIZE": "1", "TORCHELASTIC_RUN_ID": "job42"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first, resume_first = outer_torchrun_run_dir(config, ctx)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again, resume_again = outer_torchrun_run_dir(config, ctx)
    assert first == again == tmp_path / "cnn-ddp-job42"
    assert (first / "config.json").exists()
    assert (resume_first, resume_again) == (False, True)


def test_few_batchnorm_steps_get_a_note_with_a_batch_size(tmp_path: Path):
    flags = [*TINY, "--set", "data.synthetic_train_size=300", "--epochs", "1"]
    summary = train_json(*flags, "--batch-size", "100", "--out", tmp_path / "few")
    note = next(n for n in summary["notes"] if "BatchNorm" in n)
    assert "2 optimizer step(s) per epoch" in note
    assert "--batch-size 13 or smaller" in note  # 270 training images / 20 steps
    plain = train_json(*flags, "--batch-size", "10", "--out", tmp_path / "enough")
    assert not any("BatchNorm" in n for n in plain["notes"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_localhost_meet_and_train(tmp_path: Path):
    """distml's own multi-node launch: every node must derive the same rendezvous run id."""
    endpoint = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "distml",
        "train",
        *TINY,
        *("--set", "data.synthetic_train_size=200", "--set", "data.synthetic_test_size=20"),
        "--epochs",
        "1",
        "--mode",
        "ddp",
        "--nproc",
        "1",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        endpoint,
        "--json",
    ]
    nodes = [
        subprocess.Popen(
            [*command, "--node-rank", str(rank), "--out", str(tmp_path / f"node{rank}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]  # a hang guard
    finally:
        for node in nodes:
            node.kill()
    for node, (_, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, stderr[-2000:]
    summary = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert summary["world_size"] == 2
    assert (tmp_path / "node0" / "summary.json").exists()
