"""Developer sessions: `nox -s tests` (the default), `nox -s lint`."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """Install the package with its test extras and run pytest (CPU only, small data)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session
def lint(session: nox.Session) -> None:
    """Static checks: ruff (lint and format)."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "distml", "tests", "noxfile.py", "scripts")
    session.run("ruff", "format", "--check", "distml", "tests", "noxfile.py", "scripts")
