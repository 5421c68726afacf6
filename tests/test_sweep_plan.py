"""Sweep plans: parsing, expansion, names, precedence and validation before anything trains;
the lr range test's pure rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from distml.config import SettingsError
from distml.lrfind import lr_at, should_stop, smoothed, steepest_index
from distml.sweep import plan_runs, read_plan

PLANS = sorted(Path(__file__).resolve().parents[1].joinpath("plans").glob("*.toml"))


def write_plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


def runs_of(tmp_path: Path, text: str, *assignments: str):
    path = write_plan(tmp_path, text)
    return plan_runs(read_plan(path), path, tmp_path / "out", list(assignments))


@pytest.mark.parametrize("plan", PLANS, ids=lambda p: p.name)
def test_every_shipped_plan_expands_and_validates(plan: Path) -> None:
    runs = plan_runs(read_plan(plan), plan, Path("/nonexistent/out"), ["train.epochs=1"])
    assert runs, f"{plan} expands to no runs"
    names = [run.name for run in runs]
    assert len(set(names)) == len(names)
    assert all(run.config.train.epochs == 1 for run in runs)  # --set reaches every run


def test_part_a_plan_covers_every_study() -> None:
    plan = Path(__file__).resolve().parents[1] / "plans" / "part-a.toml"
    runs = plan_runs(read_plan(plan), plan, Path("/x"), [])
    settings = [run.config for run in runs]
    assert {c.dist.mode for c in settings} == {"single", "dp", "ddp"}
    assert {c.train.precision for c in settings} == {"32", "16-mixed", "bf16-mixed"}
    assert {c.optim.optimizer for c in settings} == {"sgd", "adam", "adamw", "rmsprop"}
    assert {c.model.norm for c in settings} == {"batch", "layer", "instance", "group", "none"}
    assert {c.train.accum_steps for c in settings} >= {1, 2, 4, 8}
    assert "gloo" in {c.dist.backend for c in settings}


def test_variants_times_grid_times_seeds_in_order(tmp_path: Path) -> None:
    runs = runs_of(
        tmp_path,
        """
seeds = [0, 1]
[grid]
"train.batch_size" = [16, 32]
[[variants]]
name = "fp32"
[[variants]]
name = "bf16"
set = { "train.precision" = "bf16-mixed" }
seeds = [5]
""",
    )
    assert [r.name for r in runs] == [
        "fp32-bs-16-seed0",
        "fp32-bs-16-seed1",
        "fp32-bs-32-seed0",
        "fp32-bs-32-seed1",
        "bf16-bs-16-seed5",
        "bf16-bs-32-seed5",
    ]
    assert runs[-1].config.train.precision == "bf16-mixed"
    assert runs[-1].config.train.batch_size == 32
    assert runs[-1].config.train.seed == 5
    assert runs[0].config.output.dir == tmp_path / "out" / "fp32-bs-16-seed0"


def test_precedence_base_then_set_then_variant_then_grid_then_cli(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text("[optim]\nlr = 0.1\nmomentum = 0.5\n[train]\nepochs = 7\n")
    runs = runs_of(
        tmp_path,
        """
base = "base.toml"
[set]
"optim.lr" = 0.2
"train.label_smoothing" = 0.05
[grid]
"train.label_smoothing" = [0.1]
[[variants]]
name = "v"
set = { "optim.lr" = 0.3 }
""",
        "train.epochs=2",
    )
    (run,) = runs
    assert run.config.optim.momentum == 0.5  # base (found next to the plan)
    assert run.config.optim.lr == 0.3  # variant beats [set]
    assert run.config.train.label_smoothing == 0.1  # grid beats [set]
    assert run.config.train.epochs == 2  # --set beats the base


def test_base_output_paths_are_not_inherited(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('[output]\nsave = "important.safetensors"\nname = "x"\n')
    (run,) = runs_of(tmp_path, 'base = "base.toml"\n')
    assert run.config.output.save is None
    assert run.config.output.dir == tmp_path / "out" / "run"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[grid]\n"train.batchsize" = [1]\n', "did you mean 'train.batch_size'"),
        ('[grid]\n"train.batch_size" = []\n', "is empty"),
        ("colour = 1\n", "colour"),
        ('[set]\n"optim.lrr" = 1\n', "unknown setting 'optim.lrr'"),
        ('[[variants]]\nname = "a/b"\n', "plain folder name"),
        ('[[variants]]\nname = "a"\n[[variants]]\nname = "a"\n', "unique"),
        ("seeds = []\n", "non-empty"),
        ("[grid\n", "not valid TOML"),
    ],
)
def test_bad_plans_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(SettingsError, match=expected):
        runs_of(tmp_path, text)


def test_a_bad_value_in_a_late_run_fails_before_any_run(tmp_path: Path) -> None:
    with pytest.raises(SettingsError) as info:
        runs_of(tmp_path, '[grid]\n"train.batch_size" = [16, 32, 0]\n')
    assert "run bs-0" in str(info.value)
    assert "bs-16" not in str(info.value)


def test_runs_this_machine_cannot_do_are_marked_skipped(tmp_path: Path) -> None:
    runs = runs_of(
        tmp_path,
        '[set]\n"train.device" = "cpu"\n[grid]\n"dist.mode" = ["single", "dp"]\n',
    )
    assert runs[0].skip_reason is None
    assert "DataParallel needs at least 2 GPUs" in (runs[1].skip_reason or "")


def test_lr_ramp_is_exponential_from_start_to_end() -> None:
    lrs = [lr_at(i, 5, 1e-4, 1.0) for i in range(5)]
    assert lrs == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])


def test_smoothing_is_bias_corrected() -> None:
    # a constant loss stays constant from the first step (no pull towards zero)
    assert smoothed([2.0, 2.0, 2.0], 0.98) == pytest.approx([2.0, 2.0, 2.0])
    assert smoothed([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / 0.75])


def test_stop_rule() -> None:
    assert not should_stop(3.9, 1.0, 4.0)
    assert should_stop(4.1, 1.0, 4.0)
    assert should_stop(math.nan, 1.0, 4.0)


def test_suggestion_is_the_steepest_descent_after_the_skipped_start() -> None:
    lrs = [10.0**e for e in range(-6, 2)]
    #            0    1    2    3    4    5    6    7
    smooth = [0.1, 9.0, 9.0, 8.0, 5.0, 4.5, 4.4, 9.0]
    # the drop 0 -> 1 is a rise; the steepest fall is 3 -> 4 (-3 per decade)
    assert steepest_index(lrs, smooth, skip_start=2) == 3
    assert steepest_index(lrs, [1.0] * 8, skip_start=2) is None  # flat: no suggestion
