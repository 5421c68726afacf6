"""distml compare on real tiny runs, and a gelu/avg-pool model through eval, prune and
select-features (the runs are trained once per session)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY, assert_plot, last_json, run_cli, train_json, tree_snapshot

# smaller still than TINY: one epoch on 300 images
SMALL = [*TINY, "--epochs", "1", "--set", "data.synthetic_train_size=300"]
COMPARE_FILES = {"report.md", "compare.csv", "compare.json", "curves.png", "time_memory.png"}


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """seed0 and seed1 differ only in the seed; gelu differs from seed0 in pool and
    activation; unfinished is seed0 without its summary.json."""
    root = tmp_path_factory.mktemp("compare-runs")
    variants = {
        "seed0": [],
        "seed1": ["--seed", "1"],
        "gelu": ["--activation", "gelu", "--pool", "avg"],
    }
    paths = {}
    for name, flags in variants.items():
        train_json(*SMALL, *flags, "--out", root / name)
        paths[name] = root / name
    shutil.copytree(paths["seed0"], root / "unfinished")
    (root / "unfinished" / "summary.json").unlink()
    paths["unfinished"] = root / "unfinished"
    return paths


def compare_json(*args: Any, expect: int = 0) -> dict[str, Any]:
    return last_json(run_cli("compare", *args, "--json", expect=expect))


def compare_text(*args: Any) -> tuple[dict[str, Any], str]:
    """compare's JSON result and its interpretation as one text."""
    result = compare_json(*args)
    return result, "\n".join(result["interpretation"])


def summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_seeds_are_grouped_with_mean_and_std(runs: dict[str, Path], tmp_path: Path):
    result = compare_json(runs["seed0"], runs["seed1"], runs["gelu"], "--out", tmp_path / "c")
    groups = {tuple(g["runs"]): g for g in result["groups"]}
    assert set(groups) == {("seed0", "seed1"), ("gelu",)}
    pair = groups[("seed0", "seed1")]
    assert pair["seeds"] == [0, 1] and pair["count"] == 2
    for key in ("test_accuracy", "mean_epoch_seconds", "peak_memory_mb"):
        values = [summary(runs[name])[key] for name in ("seed0", "seed1")]
        assert pair["mean"][key] == pytest.approx(statistics.fmean(values))
        assert pair["std"][key] == pytest.approx(statistics.stdev(values))
    single = groups[("gelu",)]
    assert single["std"]["test_accuracy"] is None
    assert single["mean"]["test_accuracy"] == pytest.approx(summary(runs["gelu"])["test_accuracy"])
    report = (tmp_path / "c" / "report.md").read_text()
    assert "## Runs that differ only in the seed" in report and pair["label"] in report


def test_the_diff_view_lists_exactly_the_differing_settings(runs: dict[str, Path], tmp_path: Path):
    result = compare_json(runs["seed0"], runs["seed1"], runs["gelu"], "--out", tmp_path / "c")
    # output.dir differs too, but says where files went, not how the run trained
    assert result["differing_settings"] == ["model.activation", "model.pool", "train.seed"]
    by_label = {r["label"]: r for r in result["runs"]}
    assert by_label["gelu"]["settings"]["model.pool"] == "avg"
    assert by_label["seed1"]["settings"]["train.seed"] == 1
    assert "optim.lr" in by_label["seed0"]["settings"]  # every setting is in the JSON
    table = run_cli("compare", runs["seed0"], runs["gelu"], "--out", tmp_path / "d").stdout
    first_lines = [line.split()[0] for line in table.splitlines()[1:3]]
    assert first_lines == ["model.activation", "model.pool"]


def test_a_run_from_before_a_setting_existed_reads_its_default(
    runs: dict[str, Path], tmp_path: Path
):
    old = tmp_path / "old"
    shutil.copytree(runs["seed0"], old)
    config = json.loads((old / "config.json").read_text())
    del config["model"]["pool"], config["model"]["activation"]
    (old / "config.json").write_text(json.dumps(config))
    result = compare_json(runs["seed0"], old, "--out", tmp_path / "c")
    assert result["differing_settings"] == []


def test_files_are_written_and_consistent(runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "c"
    result = compare_json(runs["seed0"], runs["seed1"], runs["gelu"], "--out", out)
    assert {p.name for p in out.iterdir()} == COMPARE_FILES
    assert json.loads((out / "compare.json").read_text())["runs"] == result["runs"]
    with (out / "compare.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run"] for r in rows] == ["seed0", "seed1", "gelu"]
    assert [r["model.activation"] for r in rows] == ["relu", "relu", "gelu"]
    assert float(rows[2]["test_accuracy"]) == pytest.approx(summary(runs["gelu"])["test_accuracy"])
    for png in ("curves.png", "time_memory.png"):
        assert_plot(out / png)
    report = (out / "report.md").read_text()
    assert "![loss and accuracy](curves.png)" in report
    assert "| test accuracy |" in report


def test_interpretation_names_the_fastest_and_judges_the_seed_spread(
    runs: dict[str, Path], tmp_path: Path
):
    result, text = compare_text(runs["seed0"], runs["seed1"], runs["gelu"], "--out", tmp_path / "c")
    groups = result["groups"]
    fastest = min(groups, key=lambda g: g["mean"]["mean_epoch_seconds"])
    slowest = max(groups, key=lambda g: g["mean"]["mean_epoch_seconds"])
    factor = slowest["mean"]["mean_epoch_seconds"] / fastest["mean"]["mean_epoch_seconds"]
    assert f"Fastest: {fastest['label']} at" in text
    assert f"{factor:.2f}x faster than the slowest, {slowest['label']}" in text
    assert "Seed spread:" in text and "seed spread)" in text
    assert "Best test accuracy:" in text


def edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(json.dumps(data))


def test_interpretation_reports_the_memory_saved_by_mixed_precision(
    runs: dict[str, Path], tmp_path: Path
):
    # a bf16 twin of seed0 with half its memory and epoch time (CPU bf16 runs say little)
    twin = tmp_path / "bf16"
    shutil.copytree(runs["seed0"], twin)
    base = summary(runs["seed0"])
    edit_json(twin / "config.json", train__precision="bf16-mixed")
    memory, seconds = base["peak_memory_mb"] / 2, base["mean_epoch_seconds"] / 2
    edit_json(
        twin / "summary.json",
        precision="bf16-mixed",
        peak_memory_mb=memory,
        peak_memory_mb_per_rank=[memory],
        mean_epoch_seconds=seconds,
    )
    result, text = compare_text(runs["seed0"], twin, "--out", tmp_path / "c")
    assert result["differing_settings"] == ["train.precision"]
    assert "Mixed precision: bf16 (bf16-mixed) uses 50% less peak memory per rank than" in text
    assert "2.00x faster per epoch" in text
    assert "Fastest: bf16 at" in text


def test_interpretation_says_where_overfitting_set_in(runs: dict[str, Path], tmp_path: Path):
    run = tmp_path / "overfit"
    shutil.copytree(runs["unfinished"], run)
    lines = [
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,epoch_seconds,"
        "images_per_second,peak_memory_mb"
    ]
    for epoch, (train_loss, val_loss) in enumerate(
        [(2.0, 1.5), (1.5, 1.0), (1.0, 1.2), (0.5, 1.4), (0.2, 1.6)], start=1
    ):
        lines.append(f"{epoch},{train_loss},0.5,{val_loss},0.4,0.1,2.0,100,500")
    (run / "metrics.csv").write_text("\n".join(lines) + "\n")
    result, text = compare_text(run, "--out", tmp_path / "c", "--allow-unfinished")
    assert result["runs"][0]["overfitting"]["detected"] is True
    assert "overfit overfits: validation loss was lowest at epoch 2" in text
    assert "set in after epoch 2" in text
    assert "overfit is unfinished: 5 of" in text


def test_unfinished_run_is_an_error_unless_allowed(runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "c"
    failed = run_cli("compare", runs["seed0"], runs["unfinished"], "--out", out, expect=2)
    assert str(runs["unfinished"]) in failed.output and "--allow-unfinished" in failed.output
    assert not out.exists()
    result = compare_json(runs["seed0"], runs["unfinished"], "--out", out, "--allow-unfinished")
    row = {r["label"]: r for r in result["runs"]}["unfinished"]
    assert row["status"] == "unfinished" and row["test_accuracy"] is None
    assert row["epochs_run"] == 1 and row["best_val_accuracy"] is not None
    assert len(result["groups"]) == 2  # never averaged with the finished run of same settings
    assert any("unfinished is unfinished" in s for s in result["interpretation"])


def test_bad_input_is_refused_and_writes_nothing(runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "c"
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    failed = run_cli(
        "compare", runs["seed0"], not_a_run, "--out", out, "--allow-unfinished", expect=2
    )
    assert f"{not_a_run} is not a distml run folder" in failed.output
    failed = run_cli("compare", runs["seed0"], tmp_path / "missing", "--out", out, expect=2)
    assert "missing is not a folder" in failed.output
    failed = run_cli("compare", runs["seed0"], runs["seed0"], "--out", out, expect=2)
    assert "more than once" in failed.output
    assert not out.exists()
    run_cli("compare", runs["seed0"], "--out", runs["seed0"], expect=2)
    (out / "report.md").parent.mkdir()
    (out / "report.md").write_text("someone's report\n")
    before = tree_snapshot(out)
    failed = run_cli("compare", runs["seed0"], "--out", out, expect=2)
    assert "not written by distml compare" in failed.output
    assert tree_snapshot(out) == before


def test_a_previous_comparison_is_replaced_and_other_files_kept(
    runs: dict[str, Path], tmp_path: Path
):
    out = tmp_path / "c"
    compare_json(runs["seed0"], runs["gelu"], "--out", out)
    (out / "notes.txt").write_text("mine\n")
    result = compare_json(runs["seed0"], runs["seed1"], "--out", out)
    assert json.loads((out / "compare.json").read_text())["differing_settings"] == ["train.seed"]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert result["files"]["report.md"] == str(out / "report.md")


def test_default_out_is_under_artifacts(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    result = compare_json(runs["seed0"])
    out = Path(result["out"])
    assert out.parts[:2] == ("artifacts", "compare")
    assert {p.name for p in (tmp_path / out).iterdir()} == COMPARE_FILES


# ----------------------------------------------------------------------------- pool/activation


def test_gelu_avg_model_goes_through_eval_prune_and_select_features(
    runs: dict[str, Path], tmp_path: Path
):
    best = runs["gelu"] / "best.safetensors"
    evaluated = last_json(run_cli("eval", best, "--out", tmp_path / "eval", "--json", "-q"))
    assert evaluated["accuracy"] == pytest.approx(summary(runs["gelu"])["test_accuracy"])
    common = ["--fraction", "0.5", "--device", "cpu", "--json", "-q"]
    pruned = last_json(run_cli("prune", best, "--out", tmp_path / "prune", *common))
    assert pruned["model_spec"]["activation"] == "gelu" and pruned["model_spec"]["pool"] == "avg"
    selected = last_json(
        run_cli("select-features", best, "--max-features", "3", "--out", tmp_path / "sel", *common)
    )
    assert selected["channels_after"] <= 3
    assert selected["model_spec"]["activation"] == "gelu"
    again = last_json(run_cli("eval", selected["checkpoint"], "--out", tmp_path / "e2", "--json"))
    # the sliced network evaluates the whole test split, and its report adds up
    matrix = again["confusion_matrix"]
    assert again["count"] == sum(map(sum, matrix)) == 201
    assert again["correct"] == sum(matrix[i][i] for i in range(len(matrix)))
    assert again["accuracy"] == again["correct"] / again["count"]


def test_runs_left_out_by_a_sweep_are_listed_with_their_reason(
    runs: dict[str, Path], tmp_path: Path
):
    from distml.compare import CompareSettings, compare_runs

    settings = CompareSettings(
        runs=[runs["seed0"]],
        out=tmp_path / "c",
        title="Sweep: modes",
        not_compared={"ddp": "skipped: ddp needs 2 GPUs, this machine has 0"},
    )
    result = compare_runs(settings)
    report = (tmp_path / "c" / "report.md").read_text()
    assert report.startswith("# Sweep: modes\n")
    assert "- **ddp**: skipped: ddp needs 2 GPUs, this machine has 0" in report
    assert result["not_compared"] == settings.not_compared
