"""Exact resume, clean stops on signals, non-finite losses, elastic restarts, no pickle."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, last_json, run_cli, train_json
from safetensors.torch import load_file
from test_ddp import child_pids, is_rank

# dropout and augmentation on, so resuming must restore RNG states and the data order
RESUMABLE = [*TINY, "--dropout", "0.3", "--deterministic", "--epochs", "8"]
PACKAGE = Path(__file__).parent.parent / "distml"


def start(*args: object) -> subprocess.Popen:
    command = [sys.executable, "-m", "distml", "train", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epoch(job: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
    while not (run / "metrics.csv").exists():
        assert job.poll() is None, job.communicate()
        assert time.monotonic() < deadline, "the run never finished an epoch"
        time.sleep(0.02)


def assert_identical(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return train_json(*RESUMABLE, "--out", tmp_path_factory.mktemp("ref") / "run")


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path: Path):
    run = tmp_path / "killed"
    job = start(*RESUMABLE, "--out", run)
    wait_for_epoch(job, run)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    assert not (run / "summary.json").exists()
    assert load_file(str(run / "last.safetensors"))  # the last good checkpoint is readable
    resumed = last_json(run_cli("train", "--resume", run, "--json", "--quiet"))
    assert resumed["resumed"] == 1 and resumed["epochs_run"] == 8
    assert_identical(Path(uninterrupted["run_dir"]) / "last.safetensors", run / "last.safetensors")
    assert_identical(Path(uninterrupted["run_dir"]) / "best.safetensors", run / "best.safetensors")
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    reference = (Path(uninterrupted["run_dir"]) / "metrics.csv").read_text().splitlines()
    again = (run / "metrics.csv").read_text().splitlines()
    column = lambda rows, i: [r.split(",")[i] for r in rows]  # noqa: E731
    for i in range(6):  # every metric except the timings
        assert column(reference, i) == column(again, i)


def test_sigterm_stops_cleanly_and_resumes(uninterrupted, tmp_path: Path):
    run = tmp_path / "stopped"
    job = start(*RESUMABLE, "--out", run)
    wait_for_epoch(job, run)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr
    assert "Traceback" not in stderr
    stopped = r"distml: stopped: SIGTERM received (at step \d+ of|after) epoch \d+"
    assert re.search(stopped, stderr), stderr
    assert f"distml train --resume {run}" in stderr
    resumed = last_json(run_cli("train", "--resume", run, "--json", "--quiet"))
    assert resumed["epochs_run"] == 8
    assert_identical(Path(uninterrupted["run_dir"]) / "last.safetensors", run / "last.safetensors")


def test_resuming_a_finished_run_says_so(uninterrupted):
    result = run_cli("train", "--resume", uninterrupted["run_dir"], "--json")
    assert "already finished" in result.stderr
    assert last_json(result)["already_finished"] is True


def test_resume_needs_a_run_directory(tmp_path: Path):
    result = run_cli("train", "--resume", tmp_path / "nope", expect=2)
    assert "not a distml run directory" in result.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model": {"arch": "resnet"}}')
    result = run_cli("train", "--resume", tmp_path / "other", expect=2)
    assert "not a valid distml config" in result.stderr and "model.arch" in result.stderr
    result = run_cli("train", "--resume", tmp_path / "other", "--lr", "0.1", expect=2)
    assert "drop --lr" in result.stderr


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = tmp_path / "diverge"
    job = start(*RESUMABLE, "--out", run)
    wait_for_epoch(job, run)
    job.send_signal(signal.SIGKILL)
    job.communicate(timeout=60)
    good = load_file(str(run / "last.safetensors"))
    # a run gone bad: NaN in the saved weights, so every later loss is NaN
    state = run / "state.safetensors"
    with safe_open(str(state), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(state))
    tensors["model.head.fc.weight"] = torch.full_like(tensors["model.head.fc.weight"], torch.nan)
    save_file(tensors, str(state), metadata=metadata)
    config = json.loads((run / "config.json").read_text())
    config["train"]["nonfinite_patience"] = 3
    (run / "config.json").write_text(json.dumps(config))
    result = run_cli("train", "--resume", run, "--quiet", expect=3)
    assert re.search(
        r"not finite for 3 consecutive steps \(up to step 3 of epoch \d+\)", result.stderr
    ), result.stderr
    assert "last good checkpoint is kept" in result.stderr
    kept = load_file(str(run / "last.safetensors"))
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_a_killed_rank_is_restarted_and_resumes(tmp_path: Path):
    run = tmp_path / "elastic"
    job = start(
        *TINY,
        "--epochs",
        "8",
        "--mode",
        "ddp",
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        "--out",
        run,
        "--json",
    )
    try:
        wait_for_epoch(job, run)
        ranks = [p for p in child_pids(job.pid) if is_rank(p)]
        assert len(ranks) == 2
        os.kill(ranks[0], signal.SIGKILL)
        stdout, stderr = job.communicate(timeout=180)
    finally:
        job.kill()
    assert job.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["resumed"] == 1 and summary["epochs_run"] == 8
    assert summary["world_size"] == 2


def test_nothing_in_the_package_unpickles():
    """distml never unpickles what it reads: no pickle.load, no torch.load without
    weights_only=True (torchvision's own first read of the CIFAR-10 archive aside)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\bpickle\.loads?\(|\bcloudpickle\b|\bdill\b", code):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []
