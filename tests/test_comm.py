"""``distml compare-backends`` on the CPU: 2 gloo ranks, nccl skipped, exact-value checks."""

import csv
import json
import socket
from pathlib import Path

import pytest
import torch
from conftest import assert_plot, last_json, run_cli

from distml import comm
from distml.config import CompareBackendsSettings, parse_sizes

OPS = ["all_reduce", "all_gather", "reduce_scatter", "broadcast"]
SMALL = ["--sizes", "4KiB,8KiB", "--iters", "2", "--warmup", "1", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def two_gloo_ranks(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("backends") / "out"
    return last_json(run_cli("compare-backends", *SMALL, "--nproc", "2", "--out", out, "--json"))


def test_two_gloo_ranks_measure_every_op_and_size_with_exact_results(two_gloo_ranks):
    rows = [r for r in two_gloo_ranks["rows"] if r["status"] == "ok"]
    assert {(r["op"], r["requested_bytes"]) for r in rows} == {
        (op, size) for op in OPS for size in (4096, 8192)
    }
    for row in rows:
        assert row["backend"] == "gloo" and row["ranks"] == 2
        assert 0 < row["time_us_p10"] <= row["time_us"] <= row["time_us_p90"]
        assert row["busbw_gbps"] > 0 and row["wrong"] == 0
        # every call's result is checked: 3 calls x 2 ranks x the elements each rank receives
        received = row["count"] // 2 if row["op"] == "reduce_scatter" else row["count"]
        assert row["checked"] == 3 * 2 * received
    assert any("0 wrong" in line for line in two_gloo_ranks["interpretation"])


def test_nccl_is_a_skipped_row_with_its_reason_on_the_cpu(two_gloo_ranks):
    skipped = [r for r in two_gloo_ranks["rows"] if r["status"] == "skipped"]
    assert [r["backend"] for r in skipped] == ["nccl"]
    assert "CUDA" in skipped[0]["reason"]
    assert any(line.startswith("nccl skipped") for line in two_gloo_ranks["interpretation"])


def test_outputs_are_written(two_gloo_ranks):
    files = {name: Path(path) for name, path in two_gloo_ranks["files"].items()}
    assert set(files) == {"backends.json", "backends.csv", "bandwidth.png", "latency.png"}
    assert all(path.stat().st_size > 0 for path in files.values())
    assert_plot(files["bandwidth.png"])
    assert_plot(files["latency.png"])
    with files["backends.csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 + len(OPS) * 2  # the skipped nccl row, then every op and size
    assert json.loads(files["backends.json"].read_text())["rows"] == two_gloo_ranks["rows"]


@pytest.mark.parametrize(
    ("op", "factor"),
    [("all_reduce", 1.5), ("all_gather", 0.75), ("reduce_scatter", 0.75), ("broadcast", 1.0)],
)
def test_bus_bandwidth_uses_the_nccl_tests_factors(op, factor):
    # 2 GB moved in 0.5 s by 4 ranks: algbw 4 GB/s
    algbw, busbw = comm.bandwidths(op, 2_000_000_000, 0.5, 4)
    assert algbw == pytest.approx(4.0)
    assert busbw == pytest.approx(4.0 * factor)


def test_a_row_reports_the_median_and_spread_over_iterations_and_ranks():
    plan = comm.Plan([], ["all_reduce"], [4000], "float32", 3, 0, 2, 60)
    seconds = torch.tensor([[1e-3, 2e-3, 3e-3], [4e-3, 5e-3, 6e-3]], dtype=torch.float64)
    row = comm.size_row("all_reduce", 4000, 4000, seconds, torch.tensor([0.0, 2.0]), 24, plan)
    assert row["time_us"] == pytest.approx(3500)
    assert row["time_us_p10"] < row["time_us"] < row["time_us_p90"]
    assert row["algbw_gbps"] == pytest.approx(4000 / 3.5e-3 / 1e9)
    assert row["busbw_gbps"] == pytest.approx(row["algbw_gbps"])  # 2(n-1)/n = 1 for 2 ranks
    assert row["wrong"] == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_one_torchrun_rank(monkeypatch) -> None:
    """This process becomes rank 0 of a 1-rank torchrun job (the path of an outer torchrun)."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)


def test_a_wrong_result_is_flagged_not_hidden(monkeypatch, tmp_path):
    as_one_torchrun_rank(monkeypatch)
    exact = comm.expected_result

    def one_off(op, count, rank, ranks, dtype, device):
        expected = exact(op, count, rank, ranks, dtype, device)
        if op == "all_gather":
            expected[5] += 1  # the check now sees one wrong element per call
        return expected

    monkeypatch.setattr(comm, "expected_result", one_off)
    settings = CompareBackendsSettings(
        backends=["gloo"],
        ops=["all_reduce", "all_gather"],
        sizes=[1024],
        iters=3,
        warmup=1,
        device="cpu",
        out=tmp_path / "out",
    )
    result = comm.compare_backends(settings, show_progress=False)
    wrong = {row["op"]: row["wrong"] for row in result["rows"]}
    assert wrong == {"all_reduce": 0, "all_gather": 4}  # 1 warm-up + 3 timed calls
    assert any(line.startswith("WRONG RESULTS: 4 of") for line in result["interpretation"])
    assert "#wrong" in comm.backends_table(result)


def test_every_op_expects_the_exact_sum_of_the_rank_inputs():
    ranks, count, f32 = 3, 30, torch.float32
    total = sum(comm.rank_input("all_reduce", count, r, ranks, f32, "cpu") for r in range(ranks))
    gathered = [comm.rank_input("all_gather", count, r, ranks, f32, "cpu") for r in range(ranks)]
    for rank in range(ranks):
        assert torch.equal(
            comm.expected_result("all_reduce", count, rank, ranks, f32, "cpu"), total
        )
        scattered = comm.expected_result(
            "reduce_scatter", count, rank, ranks, torch.bfloat16, "cpu"
        )
        assert torch.equal(scattered, total[rank * 10 : (rank + 1) * 10].bfloat16())
        assert torch.equal(
            comm.expected_result("all_gather", count, rank, ranks, f32, "cpu"), torch.cat(gathered)
        )
    assert comm.count_wrong(total, total + torch.eye(1, count).flatten()) == 1


def test_backends_that_cannot_run_are_skipped_with_a_reason():
    def available(backend):
        return backend == "gloo"

    cpu = comm.plan_variants(["nccl", "gloo"], "cpu", 2, 0, lambda backend: True)
    assert [(v.label, v.skipped is None) for v in cpu] == [("nccl", False), ("gloo", True)]
    assert "CUDA" in cpu[0].skipped
    too_many = comm.plan_variants(["nccl"], "cuda", 2, 1, lambda backend: True)
    assert "2 ranks, 1 GPU" in too_many[0].skipped
    missing = comm.plan_variants(["nccl", "gloo"], "cuda", 1, 1, available)
    assert "no nccl backend" in missing[0].skipped
    assert [v.label for v in missing[1:]] == ["gloo", "gloo (cuda tensors)"]


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        ("4KiB..32KiB", [4096, 8192, 16384, 32768]),
        ("1KiB,1MiB", [1024, 2**20]),
        ("1MB, 1KB, 1KB", [1000, 10**6]),
        ("512", [512]),
        ("1.5KiB", [1536]),
        ("2GiB", [2**31]),
    ],
)
def test_sizes_parse(text, sizes):
    assert parse_sizes(text) == sizes


@pytest.mark.parametrize(
    ("text", "sizes"),
    [
        (" 2 MiB ", [2**21]),  # spaces around the number and the unit
        ("1kib,1Mb,3gb", [1024, 10**6, 3 * 10**9]),  # units in any case
        ("1B", [1]),
        ("4KiB..20KiB", [4096, 8192, 16384]),  # doubling up to at most the last
        ("1KiB..1KiB", [1024]),
        ("1KiB..2KiB", [1024, 2048]),  # the last size itself when the doubling reaches it
        ("2KiB,1KiB,", [1024, 2048]),  # sorted; an empty item is skipped
    ],
)
def test_sizes_parse_forgivingly(text, sizes):
    assert parse_sizes(text) == sizes


@pytest.mark.parametrize(
    "text", ["4XB", "0", "1.3B", "0.5B", "1.0001KiB", "KiB", "-1KiB", "4 K iB", "1e3B"]
)
def test_a_size_that_does_not_parse_is_named(text):
    with pytest.raises(ValueError) as err:
        parse_sizes(text)
    assert str(err.value) == (
        f"size {text!r} does not parse: give a positive whole number of bytes with a unit B, "
        "KiB, MiB, GiB (powers of 1024) or KB, MB, GB (powers of 1000), e.g. 4KiB"
    )


def test_a_backwards_range_and_no_sizes_are_named():
    with pytest.raises(ValueError) as err:
        parse_sizes("64KiB..4KiB")
    assert str(err.value) == (
        "size range '64KiB..4KiB' runs backwards: the first size must be smaller"
    )
    with pytest.raises(ValueError) as err:
        parse_sizes(" , ")
    assert str(err.value) == (
        "sizes is empty: give a range like 4KiB..256MiB or a list like 1KiB,1MiB"
    )
    with pytest.raises(ValueError, match="size '4XB' does not parse"):
        parse_sizes("1KiB..4XB")


@pytest.mark.parametrize(
    "args",
    [
        ["--nproc", "0"],
        ["--sizes", "4XB"],
        ["--sizes", "64KiB..4KiB"],
        ["--sizes", "1.3B"],
        ["--sizes", "1B"],  # below one element per rank
        ["--sizes", "1000GiB"],  # more than this machine's memory
        ["--ops", "all_reduce,alltoall"],
        ["--backends", "mpi"],
        ["--backends", "gloo,gloo"],
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args):
    out = tmp_path / "out"
    result = run_cli("compare-backends", "--device", "cpu", *args, "--out", out, expect=2)
    assert "distml: error:" in result.output
    assert not out.exists()


def test_interpretation_says_where_gloo_keeps_up_and_where_it_falls_behind():
    def row(backend, size, time_us):
        return {
            "backend": backend,
            "status": "ok",
            "op": "all_reduce",
            "ranks": 2,
            "bytes": size,
            "requested_bytes": size,
            "time_us": time_us,
            "busbw_gbps": size / time_us / 1e3,
            "wrong": 0,
            "checked": 10,
        }

    rows = [row("nccl", 4096, 20), row("nccl", 2**20, 50), row("nccl", 2**28, 2000)]
    rows += [row("gloo", 4096, 21), row("gloo", 2**20, 500), row("gloo", 2**28, 80000)]
    lines = comm.interpret(rows, [])
    assert "nccl: peak bus bandwidth 134.22 GB/s (all_reduce at 256 MiB)" in lines
    assert (
        "all_reduce: gloo within 10% of nccl (or faster) at 4 KiB; behind at 1 MiB-256 MiB, "
        "worst 40.0x slower at 256 MiB" in lines
    )


def test_training_row_measures_the_exposed_allreduce_from_sync_minus_no_sync():
    summary = {"mean_epoch_seconds": 10.0, "images_per_second": 5000, "epochs_run": 1}
    probe = {"step_seconds_synced": 0.05, "step_seconds_no_sync": 0.04, "steps_per_epoch": 100}
    row = comm.training_row("gloo", summary, probe)
    assert row["allreduce_wait_seconds_per_epoch"] == pytest.approx(1.0)
    assert row["allreduce_wait_fraction"] == pytest.approx(0.1)
    lines = comm.training_sentences([row, {**row, "backend": "nccl", "epoch_seconds": 5.0}])
    assert lines[-1] == "nccl trains fastest: gloo takes 2.00x as long"


def test_train_epochs_runs_the_training_and_the_sync_probe_once_per_backend(monkeypatch, tmp_path):
    as_one_torchrun_rank(monkeypatch)
    trained = []

    def fake_training(config):  # the real one is distml.train.train (tested in test_ddp.py)
        trained.append(config)
        return {"mean_epoch_seconds": 2.0, "images_per_second": 100.0, "epochs_run": 1}

    settings = CompareBackendsSettings(
        sizes=[1024],
        ops=["broadcast"],
        iters=1,
        warmup=0,
        device="cpu",
        out=tmp_path / "out",
        train_epochs=1,
        training={
            "data": {"dataset": "synthetic", "synthetic_train_size": 200, "val_fraction": 0},
            "model": {"width": 0.125, "depth": 2},
            "train": {"batch_size": 16},
        },
    )
    result = comm.compare_backends(settings, show_progress=False, run_training=fake_training)
    assert [(c.dist.mode, c.dist.backend, c.train.epochs) for c in trained] == [("ddp", "gloo", 1)]
    skipped, gloo = result["training"]
    assert skipped["backend"] == "nccl" and skipped["status"] == "skipped"
    assert gloo["step_seconds_synced"] > 0 and gloo["step_seconds_no_sync"] > 0
    assert gloo["steps_per_epoch"] == 200 // 16
    exposed = max(0.0, gloo["step_seconds_synced"] - gloo["step_seconds_no_sync"])
    assert gloo["allreduce_wait_seconds_per_epoch"] == pytest.approx(exposed * (200 // 16))
    assert_plot(Path(result["files"]["training.png"]))
