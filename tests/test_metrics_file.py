"""metrics.csv as a user opens it, and the precision the forward passes run in."""

import csv
from pathlib import Path

import pytest
import torch

from distml.metrics import METRIC_COLUMNS, autocast_context, write_metrics


def test_metrics_csv_has_one_row_per_epoch_in_the_documented_columns(tmp_path: Path):
    history = [
        {"epoch": 1, "train_loss": 2.5, "val_loss": 2.0, "val_accuracy": 0.25, "lr": 0.1},
        {"epoch": 2, "train_loss": 1.5, "val_loss": None, "lr": 0.05, "not_a_column": 9},
    ]
    path = tmp_path / "deep" / "metrics.csv"
    write_metrics(path, history)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == list(METRIC_COLUMNS) == [
        "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
        "epoch_seconds", "images_per_second", "peak_memory_mb",
    ]  # fmt: skip
    # a value not measured (None or absent) is an empty cell; other keys are left out
    assert rows[1] == ["1", "2.5", "", "2.0", "0.25", "0.1", "", "", ""]
    assert rows[2] == ["2", "1.5", "", "", "", "0.05", "", "", ""]
    assert len(rows) == 3
    assert path.read_bytes().count(b"\n") == 3 and b"\r" not in path.read_bytes()  # plain \n
    write_metrics(path, history[:1])  # rewritten whole, not appended
    with open(path, newline="", encoding="utf-8") as handle:
        assert len(list(csv.reader(handle))) == 2
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("32", torch.float32), ("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)],
)
def test_forward_passes_run_in_the_chosen_precision(precision: str, dtype: torch.dtype):
    layer = torch.nn.Linear(4, 3)
    with autocast_context(torch.device("cpu"), precision):
        assert layer(torch.randn(2, 4)).dtype == dtype


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)]
)
def test_cuda_autocast_is_built_for_the_chosen_precision(precision: str, dtype: torch.dtype):
    # CUDA's autocast defaults to float16 (the CPU's to bfloat16): the dtype must be explicit.
    # Built, not entered, so no GPU is needed to check it.
    context = autocast_context(torch.device("cuda"), precision)
    assert (context.device, context.fast_dtype) == ("cuda", dtype)
