"""A pytest plugin for `nox -s mutate` only: mutmut's workers start with the modules the
tests import already imported.

mutmut forks one worker per mutant from a server that has collected the tests but run none,
so every worker imported, on its own, what the tests import on first use: torch._dynamo (the
first optimizer), torch._inductor (torch.compile), torchvision and PIL, matplotlib. That cost
1 to 5 s per mutant (scripts/time_mutmut_worker.py), for tests that take milliseconds. With
this plugin loaded (`-p mutmut_warmup` in mutmut's pytest arguments):

- the first session that runs tests (mutmut's stats run) writes the names of every module
  imported by its end to `mutmut-imports.txt` next to this file;
- every later session, the fork server's warm-up included, imports those modules when it
  loads the plugin, in the order they were first imported.

Importing runs no tensor operation, so the server starts no thread pool before it forks (a
fork taken after torch's thread pools have run can hang). A module that fails to import here
is skipped: the test that needs it imports it again and reports the error itself.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

IMPORTS = Path(__file__).with_name("mutmut-imports.txt")


def _wanted(name: str) -> bool:
    # the test modules are the collection's to import; __main__ and friends are not modules
    return not name.startswith(("__", "tests", "conftest", "mutmut_warmup"))


def _import_recorded() -> None:
    for name in IMPORTS.read_text(encoding="utf-8").split():
        if name not in sys.modules:
            try:
                importlib.import_module(name)
            except Exception:  # a warm-up only: the test that needs it reports the error
                continue


if IMPORTS.exists():
    _import_recorded()


def pytest_sessionfinish(session: Any) -> None:
    if IMPORTS.exists() or session.config.option.collectonly or not session.testscollected:
        return
    names = [name for name in list(sys.modules) if _wanted(name)]
    IMPORTS.write_text("\n".join(names) + "\n", encoding="utf-8")
