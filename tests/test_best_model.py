"""A run whose validation accuracy peaks before its last epoch keeps the peak's weights as
best.safetensors, apart from last.safetensors.

The run: a small CNN at a constant learning rate of 1.0 on 500 synthetic images (100 held
out); its validation accuracy peaks at epoch 3 of 4 (seeded, on the CPU).
"""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import last_json, run_cli

from distml.checkpoint import load_checkpoint

RUN = [
    "--dataset", "synthetic",
    "--set", "data.synthetic_train_size=500",
    "--set", "data.synthetic_test_size=50",
    "--width", "0.125", "--depth", "2",
    "--batch-size", "50", "--epochs", "4", "--lr", "1.0", "--scheduler", "none",
    "--label-smoothing", "0", "--device", "cpu", "--quiet",
]  # fmt: skip


def val_accuracy(checkpoint: Path, out: Path) -> float:
    args = ["eval", checkpoint, "--split", "val", "--device", "cpu", "--json", "--quiet"]
    return last_json(run_cli(*args, "--out", out))["accuracy"]


@pytest.fixture(scope="module")
def early_peak(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("peak") / "run"
    run_cli("train", *RUN, "--out", run_dir)
    return run_dir


def test_best_is_the_peak_epoch_not_the_last(early_peak: Path, tmp_path: Path):
    summary = json.loads((early_peak / "summary.json").read_text())
    with open(early_peak / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    accuracies = [float(row["val_accuracy"]) for row in rows]
    peak = accuracies.index(max(accuracies)) + 1
    assert peak < len(rows), f"the run no longer peaks early: {accuracies}; pick another RUN"
    assert summary["best_epoch"] == peak
    assert summary["best_val_accuracy"] == max(accuracies)
    assert accuracies[-1] < max(accuracies)

    best = load_checkpoint(early_peak / "best.safetensors")
    last = load_checkpoint(early_peak / "last.safetensors")
    assert best.epoch == peak and last.epoch == len(rows)
    assert any(not torch.equal(best.state[k], last.state[k]) for k in best.state)
    # the weights in best.safetensors give the peak's accuracy again, last's the last one
    assert val_accuracy(early_peak / "best.safetensors", tmp_path / "b") == pytest.approx(
        summary["best_val_accuracy"], abs=1e-12
    )
    assert val_accuracy(early_peak / "last.safetensors", tmp_path / "l") == pytest.approx(
        accuracies[-1], abs=1e-12
    )
