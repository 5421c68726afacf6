"""distml lr-find: the range test finds a learning rate that trains the synthetic set,
writes its plot and JSON and no weights, and refuses bad ranges."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from conftest import assert_plot, last_json, run_cli

SMALL = [
    "--dataset",
    "synthetic",
    "--set",
    "data.synthetic_train_size=1000",
    "--width",
    "0.125",
    "--depth",
    "4",
    "--batch-size",
    "32",
    "--label-smoothing",
    "0",
    "--device",
    "cpu",
    "-q",
]


def test_range_test_suggests_a_learning_rate_that_lowers_the_loss(tmp_path: Path) -> None:
    out = tmp_path / "lr"
    args = ("lr-find", *SMALL, "--steps", "70", "--skip-start", "5", "--start-lr", "1e-4")
    result = last_json(run_cli(*args, "--out", out, "--json"))
    lrs, smooth = result["lrs"], result["smoothed_losses"]
    assert lrs[0] == pytest.approx(1e-4)
    assert all(b > a for a, b in itertools.pairwise(lrs))  # increasing ramp
    index = result["suggestion_index"]
    assert index is not None and 5 <= index < len(lrs) - 1
    suggested = result["suggested_lr"]
    assert suggested == lrs[index]
    # a learning rate SGD trains this net with: the smoothed loss falls there, and goes on
    # to fall below everything the first (too small) learning rates reached
    assert 1e-2 <= suggested <= 5
    assert smooth[index + 1] < smooth[index]
    assert min(smooth[index:]) < min(smooth[:10]) - 0.01
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]
    assert_plot(out / "lr_find.png")
    assert not list(tmp_path.rglob("*.safetensors"))  # never writes weights


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--start-lr", "1", "--end-lr", "0.1"], "must be above start_lr"),
        (["--set", "dist.mode=ddp"], "runs in one process"),
        (["--steps", "2"], "steps"),
    ],
)
def test_bad_ranges_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "lr"
    result = run_cli("lr-find", *SMALL, *args, "--out", out, expect=2)
    assert message in " ".join(result.output.split())
    assert not out.exists()
