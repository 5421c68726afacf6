"""scripts/gpu_check.py on a machine without a GPU: every GPU check skipped, the JSON
written, exit 0; and its comparison helpers, runner and timeouts on their own."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


def test_without_a_gpu_every_gpu_check_is_skipped(tmp_path: Path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU" in done.stdout
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    statuses = {check["name"]: check for check in report["checks"]}
    assert statuses.pop("environment")["status"] == "pass"
    assert len(statuses) >= 14
    for check in statuses.values():
        assert check["status"] == "skip" and check["reason"] == "no CUDA GPU", check
    assert report["gpus"] == 0 and report["counts"]["fail"] == 0


def test_loss_curves_compare_within_a_relative_tolerance(gpu_check):
    close, worst = gpu_check.curves_close([2.0, 1.5, 1.0], [2.01, 1.5, 0.99], rtol=0.02)
    assert close and worst == pytest.approx(0.01)
    assert not gpu_check.curves_close([2.0, 1.0], [2.0, 1.1], rtol=0.02)[0]
    assert not gpu_check.curves_close([2.0, 1.0], [2.0], rtol=0.02)[0]  # a run cut short
    assert not gpu_check.curves_close([2.0, float("nan")], [2.0, float("nan")], rtol=0.02)[0]


def test_weights_compare_bitwise(gpu_check):
    weights = {"a": torch.tensor([1.0, -0.0, float("nan")]), "b": torch.ones(2, 2)}
    assert gpu_check.differing_tensors(weights, {k: v.clone() for k, v in weights.items()}) == []
    one_ulp = {**weights, "b": torch.nextafter(torch.ones(2, 2), torch.tensor(2.0))}
    assert gpu_check.differing_tensors(weights, one_ulp) == ["b"]
    signed_zero = {**weights, "a": torch.tensor([1.0, 0.0, float("nan")])}
    assert gpu_check.differing_tensors(weights, signed_zero) == ["a"]
    assert gpu_check.differing_tensors(weights, {"a": weights["a"]}) == ["b"]
    assert gpu_check.differing_tensors(weights, {**weights, "b": torch.ones(2, 2).double()}) == [
        "b"
    ]


def test_the_runner_records_pass_skip_and_fail(gpu_check, tmp_path: Path):
    def passes(ctx):
        return "fine"

    def skips(ctx):
        raise gpu_check.Skip("not here")

    def fails(ctx):
        raise gpu_check.Fail("wrong")

    def crashes(ctx):
        raise ValueError("a bug in the check")

    ctx = gpu_check.Context(out=tmp_path, quick=True, gpus=0)
    checks = [("p", passes), ("s", skips), ("f", fails), ("c", crashes)]
    outcomes = gpu_check.run_checks(ctx, checks)
    assert [(o.status, o.reason) for o in outcomes] == [
        ("pass", "fine"),
        ("skip", "not here"),
        ("fail", "wrong"),
        ("fail", "ValueError: a bug in the check"),
    ]
    assert "| f | FAIL |" in gpu_check.table(outcomes)


def test_a_hanging_command_is_killed_at_its_timeout(gpu_check, tmp_path: Path):
    ctx = gpu_check.Context(out=tmp_path, quick=True, gpus=0)
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(gpu_check.Fail, match="timed out after 1 s"):
        gpu_check.run_command(ctx, "hang", hang, timeout=1)
    assert "killed after 1 s" in (tmp_path / "logs" / "hang.log").read_text()


def test_the_error_line_is_the_one_naming_the_error(gpu_check):
    stderr = "Traceback\n  File x\nRuntimeError: no deterministic kernel, but you set\nsupport.\n"
    assert gpu_check.error_line(stderr) == "RuntimeError: no deterministic kernel, but you set"
    assert gpu_check.error_line("distml: error: --nproc 2 asks for more\n").startswith("distml:")
