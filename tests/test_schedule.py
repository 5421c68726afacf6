"""The learning rate a run reports in metrics.csv, epoch by epoch, follows the schedule the
README documents. Expected values are written out from the formulas, not computed by distml.

The run: 400 training images (500 synthetic, 20% held out), batch 40: 10 optimizer steps an
epoch, 4 epochs, 40 steps in all. The rate of an epoch's row is the one in effect after its
last step: the rate after 10, 20, 30 and 40 steps.
"""

import csv
import math
from pathlib import Path

import pytest
from conftest import run_cli

PEAK = 0.2
RUN = [
    "--dataset", "synthetic",
    "--set", "data.synthetic_train_size=500",
    "--set", "data.synthetic_test_size=20",
    "--set", "data.val_fraction=0.2",
    "--width", "0.125", "--depth", "2",
    "--batch-size", "40", "--epochs", "4", "--lr", str(PEAK),
    "--label-smoothing", "0", "--device", "cpu", "--quiet",
]  # fmt: skip

STEPS_AFTER_EPOCH = [10, 20, 30, 40]
TOTAL = 40


def onecycle(step: int, warmup: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then linear decay to 0 at the end."""
    if step < warmup:
        return PEAK * (step + 1) / warmup
    return PEAK * (TOTAL - step) / (TOTAL - warmup)


CASES = {
    # warm-up over half the steps (20): still warming after epoch 1
    "onecycle": (
        ["--scheduler", "onecycle", "--set", "optim.warmup_fraction=0.5"],
        [onecycle(step, 20) for step in STEPS_AFTER_EPOCH],  # 0.11, 0.2, 0.1, 0
    ),
    "cosine": (
        ["--scheduler", "cosine"],
        [PEAK * 0.5 * (1 + math.cos(math.pi * step / TOTAL)) for step in STEPS_AFTER_EPOCH],
    ),
    # halve every 2 epochs
    "step": (
        ["--scheduler", "step", "--step-size", "2", "--gamma", "0.5"],
        [PEAK, PEAK * 0.5, PEAK * 0.5, PEAK * 0.25],
    ),
    "none": (["--scheduler", "none"], [PEAK] * 4),
}


@pytest.mark.parametrize("schedule", list(CASES))
def test_metrics_csv_learning_rate_follows_the_schedule(tmp_path: Path, schedule: str):
    flags, expected = CASES[schedule]
    run_cli("train", *RUN, *flags, "--out", tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected, rel=1e-9, abs=1e-12)
