"""DDP on the CPU with gloo and 2 ranks, launched by distml itself (torch elastic)."""

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import EXACT, TINY, assert_plot, last_json, run_cli, train_json
from safetensors.torch import load_file


def final_weights(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["run_dir"]) / "last.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory):
    """A single-process run with batch 64 and DDP runs with 2 ranks x 32 (and x 4 micro-steps)."""
    root = tmp_path_factory.mktemp("ddp")
    common = [*TINY, *EXACT, "--batch-size", "64", "--epochs", "2", "--lr", "0.05"]
    return {
        "single": train_json(*common, "--out", root / "single"),
        "ddp": train_json(*common, "--mode", "ddp", "--nproc", "2", "--out", root / "ddp"),
        "ddp_accum": train_json(
            *common,
            "--mode",
            "ddp",
            "--nproc",
            "2",
            "--accum-steps",
            "4",
            "--out",
            root / "ddp_accum",
        ),
    }


def test_ddp_reproduces_the_single_process_run(exact_runs):
    single, ddp = exact_runs["single"], exact_runs["ddp"]
    assert ddp["mode"] == "ddp" and ddp["world_size"] == 2 and ddp["backend"] == "gloo"
    assert ddp["micro_batch_per_rank"] == 32
    assert_same_weights(final_weights(single), final_weights(ddp))


def test_ddp_with_accumulation_reproduces_the_full_batch(exact_runs):
    assert exact_runs["ddp_accum"]["micro_batch_per_rank"] == 8
    assert_same_weights(final_weights(exact_runs["single"]), final_weights(exact_runs["ddp_accum"]))


def test_ranks_start_identical_and_report_per_rank(exact_runs):
    ddp = exact_runs["ddp"]
    assert ddp["initial_weights_identical"] is True
    assert len(ddp["device_names"]) == 2 and len(ddp["peak_memory_mb_per_rank"]) == 2


def test_reduced_metrics_equal_a_one_process_evaluation(exact_runs, tmp_path: Path):
    ddp = exact_runs["ddp"]
    assert ddp["test_images"] == 201  # odd: the two ranks' test shards are uneven (101 + 100)
    best = Path(ddp["run_dir"]) / "best.safetensors"
    result = last_json(
        run_cli("eval", best, "--device", "cpu", "--json", "--quiet", "--out", tmp_path / "e")
    )
    assert result["accuracy"] == ddp["test_accuracy"]
    assert result["loss"] == pytest.approx(ddp["test_loss"], rel=1e-5)


def test_a_ddp_run_learns(tmp_path: Path):
    summary = train_json(
        *TINY, "--epochs", "3", "--mode", "ddp", "--nproc", "2", "--out", tmp_path / "learns"
    )
    assert summary["test_accuracy"] > 0.35  # chance is 0.1
    assert_plot(Path(summary["run_dir"]) / "curves.png")


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def is_rank(pid: int) -> bool:
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_killed_rank_stops_the_job_with_a_message(tmp_path: Path):
    import signal
    import subprocess
    import sys
    import time

    run = tmp_path / "crash"
    args = [*TINY, "--epochs", "500", "--mode", "ddp", "--nproc", "2", "--out", str(run)]
    job = subprocess.Popen(
        [sys.executable, "-m", "distml", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
        while not (run / "metrics.csv").exists():
            assert job.poll() is None, job.communicate()
            assert time.monotonic() < deadline, "the run never finished an epoch"
            time.sleep(0.2)
        ranks = [p for p in child_pids(job.pid) if is_rank(p)]
        assert len(ranks) == 2
        os.kill(ranks[-1], signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 1
    assert re.search(r"DDP rank \d failed: killed by signal 9", stderr), stderr
    assert "other ranks were stopped" in stderr
    # the last good checkpoint is intact
    assert load_file(str(run / "last.safetensors"))


def test_more_ranks_than_gpus_is_refused(monkeypatch):
    from distml.config import TrainConfig
    from distml.dist import planned_ranks
    from distml.errors import DistmlError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    config = TrainConfig.model_validate({"dist": {"mode": "ddp", "nproc": 2}})
    with pytest.raises(DistmlError, match=r"--nproc 2 asks for more ranks than the 1 visible"):
        planned_ranks(config, torch.device("cuda"))
    # gloo ranks share the one GPU (the multi-rank DDP path on a one-GPU machine)
    shared = TrainConfig.model_validate({"dist": {"mode": "ddp", "nproc": 2, "backend": "gloo"}})
    assert planned_ranks(shared, torch.device("cuda")) == 2
    every_gpu = TrainConfig.model_validate({"dist": {"mode": "ddp"}})
    assert planned_ranks(every_gpu, torch.device("cuda")) == 1  # default: every visible GPU
    assert planned_ranks(every_gpu, torch.device("cpu")) == 2
