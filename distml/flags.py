"""Command-line options generated from the settings fields: each setting is declared once,
in distml/config.py, with its type, choices, default and description.

A command lists its settings flags in an ``OptionTable`` (help panel -> flag -> dotted
settings key) and is decorated with ``setting_options(Model, TABLE)``: every row becomes a
Typer option whose type, choices, help text and shown default come from the field, and the
command receives the flags the user gave as ``flags: dict[dotted key, value]``, ready for
``config.resolve_settings``. ``PanelCommand`` prints the options grouped by panel with
click's plain formatter, which wraps on words at the terminal width.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel
from typer.core import TyperCommand

from distml.config import find_field

if TYPE_CHECKING:  # types only: recent typer releases carry their own click (typer._click)
    import click

F = TypeVar("F", bound=Callable[..., Any])
OptionTable = dict[str, dict[str, str]]  # help panel -> {"--flag": "dotted.settings.key"}
PARAM_PREFIX = "setting_"  # generated parameter names cannot collide with hand-written ones
METAVARS = {int: "N", float: "NUMBER", str: "TEXT", Path: "PATH"}


class PanelCommand(TyperCommand):
    """A command whose ``--help`` lists its options grouped by their help panel."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        # Typer writes a required argument as {NAME}; the usual spelling is NAME
        return [
            piece.replace("{", "").replace("}", "") for piece in super().collect_usage_pieces(ctx)
        ]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = "Arguments" if param.param_type_name == "argument" else "Options"
                if title == "Arguments":  # the metavar names it; Typer appends a <type>
                    record = (record[0].split(" ")[0], record[1])
                panels.setdefault(getattr(param, "rich_help_panel", None) or title, []).append(
                    record
                )
        first = [title for title in ("Arguments", "Options") if title in panels]
        for title in first + [title for title in panels if title not in first]:
            records = panels[title]
            with formatter.section(title):
                formatter.write_dl(records)


def flag_names(table: OptionTable) -> dict[str, str]:
    """Dotted settings key -> its flag, for error messages that name the flag too."""
    return {key: flag for flags in table.values() for flag, key in flags.items()}


def setting_options(
    model: type[BaseModel], table: OptionTable, from_config: str = ""
) -> Callable[[F], F]:
    """Add one option per table row to a command that takes ``flags: dict[str, Any]``.
    Keys starting with ``from_config`` show "the --config file's" as their default."""

    def decorate(command: F) -> F:
        rows = [(flag, key, panel) for panel, flags in table.items() for flag, key in flags.items()]
        generated = {param_name(flag): key for flag, key, _ in rows}
        lists = {name for name, key in generated.items() if is_list(model, key)}

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            flags = {}
            for name, key in generated.items():
                value = kwargs.pop(name)
                if value is not None:
                    flags[key] = split_list(value) if name in lists else value
            return command(*args, **kwargs, flags=flags)

        options = [
            option_parameter(model, flag, key, panel, from_config_file(key, from_config))
            for flag, key, panel in rows
        ]
        # the command's own options after the generated ones, so that e.g. --amp joins the end
        # of the Training panel; Typer passes every parameter by keyword
        own = [
            param.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for param in inspect.signature(command, eval_str=True).parameters.values()
            if param.name != "flags"
        ]
        params = options + own
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


def from_config_file(key: str, prefix: str) -> bool:
    return bool(prefix) and key.startswith(prefix)


def param_name(flag: str) -> str:
    return PARAM_PREFIX + flag.removeprefix("--").replace("-", "_")


def split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def without_none(annotation: Any) -> Any:
    kinds = [arg for arg in get_args(annotation) if arg is not type(None)]
    return kinds[0] if type(None) in get_args(annotation) and len(kinds) == 1 else annotation


def is_list(model: type[BaseModel], key: str) -> bool:
    found = find_field(model, key)
    return found is not None and get_origin(without_none(found[0].annotation)) is list


def option_parameter(
    model: type[BaseModel], flag: str, key: str, panel: str, from_config: bool
) -> inspect.Parameter:
    """The keyword parameter Typer turns into ``flag``: type, help and default from the field."""
    found = find_field(model, key)
    if found is None:
        raise KeyError(f"{flag}: {model.__name__} has no setting {key}")
    field, default = found
    kind = without_none(field.annotation)
    help_text = (field.description or "") + "."
    declarations = [flag]
    if kind is bool:
        declarations = [f"{flag}/--no-{flag.removeprefix('--')}"]
    elif get_origin(kind) is list:
        choices = get_args(get_args(kind)[0])  # list[Literal[...]]: its choices
        help_text += " Comma-separated" + (f": {', '.join(choices)}." if choices else ".")
        kind = str
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    shown = str(extra.get("shown_default", "")) or shown_default(flag, default, from_config)
    option = typer.Option(
        None,
        *declarations,
        help=help_text + (f"  [default: {shown}]" if shown else ""),
        metavar=METAVARS.get(kind),
        rich_help_panel=panel,
    )
    return inspect.Parameter(
        param_name(flag), inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None
    )


def shown_default(flag: str, default: Any, from_config: bool) -> str:
    """The default as ``--help`` shows it; empty hides it (the help says what unset means)."""
    if from_config:
        return "the --config file's"
    if default is None:
        return ""
    if isinstance(default, bool):
        return flag.removeprefix("--") if default else "no-" + flag.removeprefix("--")
    if isinstance(default, list):
        return ",".join(str(item) for item in default)
    return str(default)
