"""Time one mutmut worker the way `nox -s mutate` runs it, to see what a mutant costs.

Run it in a module's mutants folder after `nox -s mutate -- MODULE` has made it, with the
pytest arguments to try after `--`:

    cd .nox/mutmut/mutate-data/mutants
    OMP_NUM_THREADS=1 python ../../../../scripts/time_mutmut_worker.py -- \\
        -p no:cacheprovider -p no:unraisableexception -p mutmut_warmup

Like mutmut's fork server, it collects the module's tests (the selection in ../setup.cfg, or
the test ids given with --tests) without running them, then forks a worker that runs them on
the unmutated code; it prints the worker's wall-clock and CPU seconds, three times.
"""

from __future__ import annotations

import argparse
import configparser
import os
import sys
import time

import pytest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", nargs="+", help="test ids (default: setup.cfg's selection)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("pytest_args", nargs="*", help="pytest arguments, after --")
    args = parser.parse_args()
    tests = args.tests
    if not tests:
        cfg = configparser.ConfigParser()
        cfg.read("../setup.cfg")
        tests = cfg["mutmut"]["pytest_add_cli_args_test_selection"].split()
    sys.path.insert(0, os.getcwd())  # mutmut puts the mutants folder first
    os.environ["MUTANT_UNDER_TEST"] = ""  # the trampolines run the original functions
    common = ["--rootdir=.", "--tb=native", *args.pytest_args]
    pytest.main([*common, "--collect-only", "-qqq", *tests])
    for _ in range(args.repeat):
        started = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os._exit(int(pytest.main([*common, "-x", "-q", "-p", "no:randomly", *tests])))
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - started
        cpu = usage.ru_utime + usage.ru_stime
        code = os.waitstatus_to_exitcode(status)
        print(f"worker: {wall:.2f} s wall, {cpu:.2f} s CPU, pytest exit code {code}")


if __name__ == "__main__":
    main()
