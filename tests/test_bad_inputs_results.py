"""Bad inputs to the commands that read a search back (`status`, `pareto`, `export`,
`eval`): a study that does not exist, a preference vector that does not fit the
objectives, a `--format` that does not exist.  Each is refused with exit status 2 and
one line that names the fix; nothing is written.  (Tests that need the study are slow:
the two searches take a few seconds.)

The study is the digits testbed (python evaluator, milliseconds a trial) with a second
objective from the recipe, so that a preference has two entries."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from mergesearch.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """An experiment file with two finished studies: its own and ``other``."""
    root = tmp_path_factory.mktemp("results")
    data = yaml.safe_load((ROOT / "experiments" / "digits" / "pretrained.yaml").read_text())
    data["evaluator"]["objectives"].append(
        {"name": "models", "metric": "num_models", "source": "recipe", "direction": "minimize"})
    data["budget"] = {"evaluations": 4}
    data["output"] = str(root / "run")
    path = root / "digits.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(path), "-q"]) == 0
    assert main(["run", str(path), "-q", "--study", "other"]) == 0
    return path


def refused(argv: list[str], capsys) -> str:
    """The one error line of a refused command."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.slow  # the study: two digits searches
@pytest.mark.parametrize("command", [["status"], ["pareto"], ["pareto", "--format", "json"],
                                     ["export", "--out", "OUT"]])
def test_a_study_that_does_not_exist_is_named_with_the_existing_ones(study, command, capsys,
                                                                     tmp_path):
    argv = [command[0], str(study), "--study", "nope",
            *[str(tmp_path / "o") if a == "OUT" else a for a in command[1:]]]
    line = refused(argv, capsys)
    assert "no study 'nope' in sqlite:///" in line
    assert line.endswith("the studies there: digits-pretrained, other")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # the study: two digits searches
def test_a_study_in_a_storage_that_does_not_exist_says_to_run_first(study, capsys, tmp_path):
    line = refused(["status", str(study), "--set", f"output={tmp_path / 'never'}"], capsys)
    assert "no study 'digits-pretrained'" in line
    assert line.endswith("the file does not exist yet (run the experiment first)")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # the study: two digits searches
@pytest.mark.parametrize("weights, message", [
    ("1", "--weights '1': 1 weight(s) for 2 objective(s) (accuracy, models); give "
          "name=weight,... (objectives: accuracy, models) or 2 number(s) in that order"),
    ("1,2,3", "3 weight(s) for 2 objective(s)"),
    ("accuracy=1,2", "mix of name=weight and plain numbers"),
    ("speed=1", "unknown objective 'speed'"),
    ("accuracy=1,accuracy=2", "'accuracy' is given twice"),
    ("accuracy=x", "'x' is not a number"),
    ("accuracy=-1", "accuracy -1 must be a finite number >= 0"),
    ("accuracy=nan", "accuracy nan must be a finite number >= 0"),
    ("0,0", "every weight is 0"),
])
def test_a_preference_that_does_not_fit_the_objectives_is_refused(study, weights, message,
                                                                  capsys, tmp_path):
    out = tmp_path / "chosen"
    line = refused(["export", str(study), "--weights", weights, "--out", str(out)], capsys)
    assert message in line
    assert not out.exists()


@pytest.mark.slow  # the study: two digits searches
def test_a_preference_vector_in_objective_order_is_the_named_one(study, capsys, tmp_path):
    chosen = {}
    for weights in ("1,0", "accuracy=1", "0.2,1", "accuracy=0.2,models=1"):
        capsys.readouterr()
        assert main(["export", str(study), "--weights", weights,
                     "--out", str(tmp_path / weights)]) == 0
        chosen[weights] = capsys.readouterr().out.splitlines()[0].split(":")[0]
    assert chosen["1,0"] == chosen["accuracy=1"]
    assert chosen["0.2,1"] == chosen["accuracy=0.2,models=1"]


def _format_commands() -> dict[str, tuple[list[str], list[str]]]:
    """Every subcommand with a --format option: (its positional placeholders, choices)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, p in sub.choices.items():
        fmt = next((a for a in p._actions if "--format" in a.option_strings), None)
        if fmt is not None:
            positionals = [a for a in p._actions if not a.option_strings]
            out[name] = (["x"] * len(positionals), list(fmt.choices))
    return out


def test_every_format_option_lists_its_choices():
    found = _format_commands()
    assert {"status", "pareto", "eval"} <= set(found)


@pytest.mark.parametrize("command", sorted(_format_commands()))
def test_a_format_that_does_not_exist_is_refused_with_the_choices(command, capsys):
    positionals, choices = _format_commands()[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *positionals, "--format", "xml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --format: invalid choice: 'xml' (choose from " in err
    assert all(repr(c) in err for c in choices)


@pytest.mark.parametrize(("command", "missing"), [("report", "plotly"),
                                                  ("dashboard", "optuna_dashboard")])
def test_a_missing_extra_is_named_with_the_pip_line(command, missing, monkeypatch, capsys):
    import importlib.util

    from mergesearch.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == missing else real(name, *a))
    assert main([command, "experiments/toy.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: mergesearch {command} needs {missing}: pip install "
                   "'mergesearch[dashboard]'"]
