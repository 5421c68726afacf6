"""What a user reads when a setting is wrong: every bad field on its own line, named by its
dotted key (and its flag), with what is wrong and what was given."""

import json
import math
from pathlib import Path

import pytest
import yaml

from distml.config import (
    LrFindSettings,
    SweepSettings,
    TrainConfig,
    check_backend_device,
    field_problem,
    known_sections,
    parse_problem,
    resolve_settings,
    suggest_key,
)
from distml.errors import SettingsError


def settings_error(**sources) -> str:
    with pytest.raises(SettingsError) as caught:
        resolve_settings(TrainConfig, **sources)
    return str(caught.value)


def test_each_bad_value_is_named_with_its_flag_and_what_was_given():
    message = settings_error(
        flags={"optim.lr": -1, "train.epochs": 0}, flag_names={"optim.lr": "--lr"}
    )
    assert message == (
        "invalid settings:\n"
        "  - optim.lr (--lr): Input should be greater than 0 (got -1)\n"
        "  - train.epochs: Input should be greater than or equal to 1 (got 0)"
    )


def test_unknown_keys_suggest_a_close_one_only():
    message = settings_error(assignments=["optim.lrr=1", "zzz.qqq=2"])
    assert message == (
        "invalid settings:\n"
        "  - optim.lrr: unknown setting; did you mean optim.lr?\n"
        "  - zzz: unknown setting"
    )


def test_rules_between_fields_read_as_sentences():
    assert settings_error(assignments=["model.freeze_features=true"]) == (
        "invalid settings:\n"
        "  - model: freeze_features needs init: a checkpoint to take the features from"
    )
    assert settings_error(assignments=["train.early_stop=2", "data.val_fraction=0"]) == (
        "invalid settings:\n"
        "  - settings: early_stop needs a validation set: set val_fraction above 0"
    )


@pytest.mark.parametrize(
    ("assignments", "message"),
    [
        (
            ["optim.lr=1", "optim.lr.x=2"],
            "cannot set optim.lr.x: optim.lr is a single value, not a section.",
        ),
        (
            ["train.seed=1", "train.seed.a.b=2"],
            "cannot set train.seed.a.b: train.seed is a single value, not a section.",
        ),
        (["noequals"], "--set expects dotted.key=value, got 'noequals'."),
        (["=3"], "--set expects dotted.key=value, got '=3'."),
    ],
)
def test_set_assignments_that_cannot_apply(assignments: list[str], message: str):
    assert settings_error(assignments=assignments) == message


def test_set_value_may_hold_an_equals_sign():
    config = resolve_settings(TrainConfig, assignments=["output.root = a=b "])
    assert config.output.root == Path("a=b")


def test_yml_files_and_bytes_that_are_not_utf8(tmp_path: Path):
    yml = tmp_path / "settings.YML"
    yml.write_text("train:\n  seed: 4\noutput:\n  root: café\n", encoding="utf-8")
    config = resolve_settings(TrainConfig, yml)
    assert config.train.seed == 4 and config.output.root == Path("café")
    latin1 = tmp_path / "settings.toml"
    latin1.write_bytes(b"# caf\xe9 (latin-1)\n[train]\nseed = 3\n")
    assert resolve_settings(TrainConfig, latin1).train.seed == 3


def test_a_parse_error_names_the_file_the_problem_and_its_place(tmp_path: Path):
    path = tmp_path / "bad.json"
    path.write_text('{"train": }')
    with pytest.raises(json.JSONDecodeError) as parser:
        json.loads('{"train": }')
    message = settings_error(config_file=path)
    place = f"line {parser.value.lineno}, column {parser.value.colno}"
    assert message == f"config file {path} cannot be parsed: {parser.value.msg} (at {place})."
    broken_yaml = tmp_path / "bad.yaml"
    broken_yaml.write_text("train: [1, 2\nseed: 3\n")
    message = settings_error(config_file=broken_yaml)
    assert message.startswith(f"config file {broken_yaml} cannot be parsed: ")
    assert "\n" not in message and len(message) > len(
        f"config file {broken_yaml} cannot be parsed: "
    )


def test_a_config_file_of_another_type_names_the_types_read(tmp_path: Path):
    path = tmp_path / "settings.ini"
    path.write_text("[train]\nseed = 3\n")
    assert settings_error(config_file=path) == (
        f"config file {path} has an unknown type '.ini': use .toml, .yaml/.yml or .json."
    )


KEYS = ["train.epochs", "train.seed", "optim.lr", "sched.lr", "model.width", "data.data_dir"]


@pytest.mark.parametrize(
    ("loc", "meant"),
    [
        ("epochs", "train.epochs"),  # the key name alone: the section it lives in
        ("lr", "optim.lr or sched.lr"),  # in two sections: both, in the settings' order
        ("train.sub.epochs", "train.epochs"),  # the last part of the dotted name is the key
        ("train.epohcs", "train.epochs"),  # the closest spelling of the whole key
        ("trian", "train"),  # or of a section
        ("optim.l", "optim.lr"),  # the whole key is close where its name alone ("l") is not
        ("x.y.widht", "model.width"),  # else the closest key name, at a higher bar
        ("q.widxx", None),  # 0.6 alike: below that bar
        ("zzzz", None),
    ],
)
def test_suggest_key_says_what_a_mistyped_key_most_likely_meant(loc, meant):
    assert suggest_key(loc, KEYS) == meant


# the study's keys: a whole training config as one section, and top-level values
NESTED_KEYS = ["training.train.epochs", "training.train.seed", "head.epochs", "out"]


@pytest.mark.parametrize(
    ("loc", "meant"),
    [
        ("epochs", "training.train.epochs or head.epochs"),
        ("q.sede", "training.train.seed"),  # the key name of a key two sections deep
        ("uot", "out"),
    ],
)
def test_suggest_key_reaches_keys_two_sections_deep(loc, meant):
    assert suggest_key(loc, NESTED_KEYS) == meant


def test_known_sections_are_the_first_parts_of_the_dotted_keys():
    assert known_sections([*KEYS, "toplevel"]) == ["data", "model", "optim", "sched", "train"]


def test_sweep_and_lr_find_results_go_under_artifacts_unless_told():
    assert SweepSettings(plan=Path("plans/bs.toml")).out_dir() == Path("artifacts/sweeps/bs")
    given = SweepSettings(plan=Path("plans/bs.toml"), out=Path("mine"))
    assert given.out_dir() == Path("mine")
    assert LrFindSettings().out_dir() == Path("artifacts/lr-find")
    assert LrFindSettings(out=Path("lr")).out_dir() == Path("lr")


def test_a_yaml_problem_is_named_at_its_one_based_line_and_column(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  seed: 3\n  epochs: [1, 2\nmodel: x\n")
    # the flow sequence opened on line 3 meets "model:" at line 4, column 6
    assert settings_error(config_file=path) == (
        f"config file {path} cannot be parsed: expected ',' or ']', but got ':' "
        "(at line 4, column 6)."
    )


def test_parse_problem_words_what_the_parser_left_unsaid():
    mark = yaml.Mark("f", 0, line=2, column=0, buffer=None, pointer=None)
    context_only = yaml.MarkedYAMLError(context="while scanning a quoted scalar", problem_mark=mark)
    assert parse_problem(context_only) == "while scanning a quoted scalar (at line 3, column 1)"
    assert parse_problem(yaml.MarkedYAMLError(problem_mark=mark)) == (
        "syntax error (at line 3, column 1)"
    )
    # no place known: the parser's own first line, without its closing full stop
    unplaced = yaml.MarkedYAMLError(problem="bad indent.")
    assert parse_problem(unplaced) == "bad indent"
    assert parse_problem(ValueError(".Invalid value (at line 1, column 5).\nmore")) == (
        ".Invalid value (at line 1, column 5)"
    )
    assert parse_problem(ValueError("Unknown key MAX.")) == "Unknown key MAX"
    assert parse_problem(yaml.YAMLError()) == "YAMLError"


KEYS_BY_SECTION = [
    "train.epochs",
    "x.y.a",
    "x.y.b",
    "x.y.c",
    "x.y.d",
    "x.z",
    "optim.lr",
]


@pytest.mark.parametrize(
    ("error", "loc", "problem"),
    [
        (
            {"type": "extra_forbidden", "input": 1},
            "trian",
            "unknown setting; did you mean the section train?",
        ),
        (
            {"type": "extra_forbidden", "input": 1},
            "train.epohcs",
            "unknown setting; did you mean train.epochs?",
        ),
        ({"type": "extra_forbidden", "input": 1}, "zzzz", "unknown setting"),
        # a section given a value: its first three keys as examples, the nested ones included
        (
            {"type": "model_type", "input": 3, "msg": "Input should be an object"},
            "x.y",
            "this is a section, not a value; set one of its keys, e.g. x.y.a or x.y.b or x.y.c",
        ),
        (
            {"type": "int_type", "input": {"a": 1}, "msg": "Input should be an integer"},
            "train.epochs",
            "this is a single value, not a section; set train.epochs=VALUE",
        ),
        (
            {"type": "greater_than", "input": math.nan, "msg": "Input should be greater than 0"},
            "optim.lr",
            "must be a finite number (got nan)",
        ),
        (
            {"type": "greater_than", "input": -math.inf, "msg": "Input should be greater than 0"},
            "optim.lr",
            "must be a finite number (got -inf)",
        ),
        # a finite number: pydantic's words and the value given
        (
            {"type": "greater_than", "input": -0.5, "msg": "Input should be greater than 0"},
            "optim.lr",
            "Input should be greater than 0 (got -0.5)",
        ),
        # a rule of the settings' own says what was wrong itself: no "(got ...)"
        (
            {
                "type": "value_error",
                "input": {"nesterov": True},
                "msg": "Value error, nesterov needs momentum",
            },
            "optim",
            "nesterov needs momentum",
        ),
        (
            {"type": "assertion_error", "input": {"a": 1}, "msg": "Assertion failed, odd"},
            "optim",
            "Assertion failed, odd",
        ),
        ({"type": "missing", "msg": "Field required"}, "train.epochs", "Field required"),
    ],
)
def test_field_problem_in_the_settings_own_words(error, loc, problem):
    assert field_problem(error, loc, KEYS_BY_SECTION) == problem


def test_nccl_on_the_cpu_says_what_to_use_instead():
    with pytest.raises(SettingsError) as caught:
        check_backend_device("nccl", "cpu", SettingsError)
    assert str(caught.value) == (
        "the nccl backend needs CUDA GPUs, but this run is on the CPU. Use --backend gloo "
        "(the default on CPU) or run on GPUs."
    )
    for backend, device in [("nccl", "cuda"), ("gloo", "cpu"), (None, "cpu")]:
        check_backend_device(backend, device, SettingsError)
