"""Every command's --help reads well in an 80-column terminal: each option says what it
does, Literal settings list their choices, defaults are shown, no bare type placeholders."""

import os
import re
import subprocess
import sys
import typing

import pytest
from typer.testing import CliRunner

from distml import config
from distml.cli import (
    BENCH_OPTIONS,
    COMPARE_BACKENDS_OPTIONS,
    COMPARE_OPTIONS,
    EVAL_OPTIONS,
    LR_FIND_OPTIONS,
    PRUNE_OPTIONS,
    SELECT_OPTIONS,
    SI_OPTIONS,
    STUDY_OPTIONS,
    SWEEP_OPTIONS,
    TRAIN_OPTIONS,
    app,
)

COMMANDS = {
    "train": (config.TrainConfig, TRAIN_OPTIONS),
    "eval": (config.EvalSettings, EVAL_OPTIONS),
    "si": (config.SiSettings, SI_OPTIONS),
    "prune": (config.PruneSettings, PRUNE_OPTIONS),
    "select-features": (config.SelectSettings, SELECT_OPTIONS),
    "study": (config.StudySettings, STUDY_OPTIONS),
    "compare-backends": (config.CompareBackendsSettings, COMPARE_BACKENDS_OPTIONS),
    "compare": (config.CompareSettings, COMPARE_OPTIONS),
    "bench": (config.BenchSettings, BENCH_OPTIONS),
    "sweep": (config.SweepSettings, SWEEP_OPTIONS),
    "lr-find": (config.LrFindSettings, LR_FIND_OPTIONS),
}


def help_text(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    return result.output


def option_entries(text: str) -> dict[str, str]:
    """Option name -> its help-list entry (the option line and its indented continuation)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        start = re.match(r"  (?:-\w, )?(--[\w-]+)", line)
        if start:
            current = start.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_help_fits_80_columns_without_placeholders(command):
    text = help_text(*command)
    too_long = [line for line in text.splitlines() if len(line) > 80]
    assert too_long == []
    for placeholder in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list"):
        assert placeholder not in text


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_says_what_it_does(command):
    entries = option_entries(help_text(command))
    assert "--json" in entries and "--help" in entries
    for flag, entry in entries.items():
        words = re.sub(r"^\s*(-\w, )?--[\w-]+( / --[\w-]+)?( \S+)?", "", entry).strip()
        assert len(words.split()) >= 2, f"{command} {flag} has no help: {entry!r}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_settings_flags_show_their_choices_and_defaults(command):
    model, table = COMMANDS[command]
    entries = option_entries(help_text(command))
    for flags in table.values():
        for flag, key in flags.items():
            field, default = config.find_field(model, key)
            entry = " ".join(entries[flag].split())
            kinds = [kind for kind in typing.get_args(field.annotation) if kind is not type(None)]
            literal = field.annotation if not kinds else kinds[0]
            if typing.get_origin(literal) is list:
                literal = typing.get_args(literal)[0]
            if typing.get_origin(literal) is typing.Literal:
                for choice in typing.get_args(literal):
                    assert choice in entry, f"{command} {flag}: choice {choice} not shown"
            # study's step-1 flags default to its --config file's values
            if default is not None or (command == "study" and key.startswith("training.")):
                assert "[default: " in entry, f"{command} {flag}: no default in {entry!r}"


def test_choices_are_never_cut_mid_word():
    entries = option_entries(help_text("train"))
    assert "--norm <batch|group|layer|instance|none>" in entries["--norm"]
    assert "[default: batch]" in entries["--norm"]
    assert "--augment / --no-augment" in entries["--augment"]
    assert "[default: augment]" in entries["--augment"]


def test_importing_the_cli_does_not_import_torch():
    # `distml --help` must stay fast: torch is imported inside the commands only
    code = "import sys, distml.cli; print('torch' in sys.modules)"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_cli_needs_no_click_package():
    # recent typer releases carry their own click and do not install the package: a fresh
    # install has no `click` to import, so distml must not need one at run time
    code = (
        "import sys; sys.modules['click'] = None\n"
        "from typer.testing import CliRunner\n"
        "from distml.cli import app\n"
        "result = CliRunner().invoke(app, ['train', '--help'])\n"
        "print(result.exit_code)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == "0"
