"""Shared helpers: a CLI runner, tiny-run flags, and one small trained run reused by tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from distml.cli import app

# A tiny, fast run on the synthetic set: ~2 s per epoch on one CPU core.
TINY = [
    "--dataset",
    "synthetic",
    "--set",
    "data.synthetic_train_size=1000",
    "--set",
    "data.synthetic_test_size=201",
    "--width",
    "0.125",
    "--depth",
    "4",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--lr",
    "0.2",
    "--label-smoothing",
    "0",
    "--device",
    "cpu",
    "--quiet",
]

# Exact-equivalence runs: nothing that depends on the batch split (no BatchNorm, no dropout).
EXACT = ["--norm", "none", "--no-augment", "--dropout", "0", "--scheduler", "none"]


def run_cli(*args: Any, expect: int = 0) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != expect:
        detail = result.output + (f"\n{result.exception!r}" if result.exception else "")
        raise AssertionError(f"exit code {result.exit_code}, expected {expect}:\n{detail}")
    return result


def last_json(result: Result) -> dict[str, Any]:
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_json(*args: Any) -> dict[str, Any]:
    return last_json(run_cli("train", *args, "--json"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small trained run shared by the eval/checkpoint/transfer tests."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return train_json(*TINY, "--epochs", "3", "--out", out)


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes, to prove a failed command changed nothing."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_clean_failure(result: Result, *fragments: str) -> None:
    """A user error: the CLI's one-paragraph message naming every fragment, no traceback."""
    assert "Traceback" not in result.output
    assert result.stderr.startswith("distml: error: ")
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def assert_plot(path: Path) -> None:
    """A figure a report can use: a PNG that reads back as an image of a usable size and is
    not a blank canvas (axes, lines and text give many colours; a blank one gives one)."""
    from matplotlib import image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = image.imread(path)
    height, width = pixels.shape[:2]
    assert height >= 200 and width >= 300, (path, pixels.shape)
    colours = {tuple(rgba) for rgba in pixels.reshape(-1, pixels.shape[-1])[::7].tolist()}
    assert len(colours) > 16, (path, len(colours))
