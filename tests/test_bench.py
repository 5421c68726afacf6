"""distml bench: both pipelines in one run, ratios, outputs, FLOP counting and bad input."""

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_plot, last_json, run_cli
from torch import nn

from distml import bench
from distml.config import BenchSettings

# a tiny model and few steps: the machinery, not the speed
TINY_BENCH = [
    "--device",
    "cpu",
    "--width",
    "0.125",
    "--depth",
    "4",
    "--batch-size",
    "16",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--images",
    "64",
    "--workers",
    "0",
    "--quiet",
]


def test_bench_compares_both_pipelines_and_writes_its_files(tmp_path: Path):
    out = tmp_path / "bench"
    result = last_json(
        run_cli("bench", *TINY_BENCH, "--precision", "bf16-mixed", "--json", "--out", out)
    )
    lines = [row["line"] for row in result["rows"]]
    assert lines == [
        bench.CLASSIC,
        "distml: uint8 batches on the device",
        "+ channels_last",
        "+ bf16 autocast",
        "+ fused optimizer (bf16)",
    ]
    classic = result["rows"][0]
    assert classic["pipeline"] == "classic" and classic["vs_classic"] == 1.0
    for row in result["rows"]:
        assert row["images_per_second"] > 0 and row["step_ms_p10"] <= row["step_ms_p90"]
        ratio = row["images_per_second"] / classic["images_per_second"]
        assert row["vs_classic"] == pytest.approx(ratio)
        assert row["mfu"] is None  # no peak table for CPUs
    assert result["flops_per_image"] > 0
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == result["rows"]
    with open(out / "bench.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["line"] for r in rows] == lines
    assert_plot(out / "bench.png")


def test_the_terminal_table_is_the_markdown_table(tmp_path: Path):
    output = run_cli(
        "bench", *TINY_BENCH, "--pipelines", "distml", "--precision", "32", "--out", tmp_path
    ).stdout
    table = json.loads((tmp_path / "bench.json").read_text())["table"]
    assert table in output
    assert table.splitlines()[0].startswith("| line | precision | images/s |")
    assert "vs classic" in table and "| - |" in table  # no classic line: no ratio


def test_flops_are_counted_for_forward_and_backward():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5, bias=False), nn.Linear(5, 3, bias=False))
    forward = 2 * 12 * 5 + 2 * 5 * 3
    # backward: both weight gradients, and the input gradient of the second layer only (the
    # images need none)
    backward = 2 * 12 * 5 + 2 * (2 * 5 * 3)
    assert bench.training_flops_per_image(model, (3, 2, 2)) == forward + backward


@pytest.mark.parametrize(
    ("name", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
        ("NVIDIA H200", 989),
        ("NVIDIA A100-SXM4-80GB", 312),
        ("NVIDIA A10", 125),
        ("NVIDIA L4", 121),
    ],
)
def test_known_gpus_have_their_dense_peak(name: str, bf16: float):
    assert bench.gpu_peaks(name)["bf16"] == bf16


def test_an_unknown_gpu_gets_no_mfu():
    assert bench.gpu_peaks("NVIDIA GeForce GTX 1080") is None
    assert bench.peak_tflops(None, "bf16-mixed") is None


def test_fp32_lines_count_against_tf32_while_cudnn_allows_it(monkeypatch):
    peaks = bench.gpu_peaks("NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert bench.peak_tflops(peaks, "32") == 495
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert bench.peak_tflops(peaks, "32") == 67


def test_the_ladder_adds_one_setting_per_line():
    lines = bench.ladder(
        BenchSettings(pipelines=["distml"], compile=True), ["bf16-mixed", "16-mixed"]
    )
    assert [line.label for line in lines] == [
        "distml: uint8 batches on the device",
        "+ channels_last",
        "+ bf16 autocast",
        "+ fp16 autocast + GradScaler",
        "+ fused optimizer (bf16)",
        "+ torch.compile",
    ]
    fused, compiled = lines[-2], lines[-1]
    assert fused.precision == "bf16-mixed" and fused.channels_last and fused.fused
    assert compiled.fused and compiled.compile
    fp32_only = bench.ladder(BenchSettings(pipelines=["distml"]), ["32"])
    assert fp32_only[-1].label == "+ fused optimizer (fp32)"


def test_largest_fitting_batch_halves_until_it_fits():
    assert bench.largest_fitting_batch(lambda batch: batch <= 100, 512) == 64
    assert bench.largest_fitting_batch(lambda batch: False, 8) is None


def test_steps_zero_is_a_usage_error():
    result = run_cli("bench", "--steps", "0", expect=2)
    assert "--steps" in result.output


def test_out_of_memory_says_which_batch_fits(monkeypatch, tmp_path: Path):
    real = bench.run_line

    def limited(work, line, batch, warmup, steps):
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(work, line, batch, warmup, steps)

    monkeypatch.setattr(bench, "run_line", limited)
    args = [a if a != "16" else "64" for a in TINY_BENCH]
    result = run_cli("bench", *args, "--out", tmp_path / "b", expect=2)
    assert "batch of 64 does not fit" in result.output
    assert "--batch-size 16" in result.output
    assert not (tmp_path / "b" / "bench.json").exists()


def test_a_failing_compiler_is_a_usage_error(monkeypatch, tmp_path: Path):
    def broken(model, *args, **kwargs):
        raise RuntimeError("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    result = run_cli(
        "bench",
        *TINY_BENCH,
        "--pipelines",
        "distml",
        "--precision",
        "32",
        "--compile",
        "--out",
        tmp_path,
        expect=2,
    )
    assert "--compile" in result.output and "no working C++ compiler" in result.output
