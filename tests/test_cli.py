"""The thin CLI: every command parses, calls the library and prints."""

from __future__ import annotations

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.mergekit_config import from_mergekit
from mergesearch.recipe import Recipe


def test_methods_lists_every_registered_method(capsys):
    from mergesearch.merging import methods

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in methods():
        assert name in out
    assert "density*" in out and "weight*!" in out


def test_convert_both_ways(tmp_path, capsys):
    recipe = Recipe.from_dict({"method": "ties", "base": "b", "models": [
        {"model": "x", "parameters": {"weight": [0.2, 1.0], "density": 0.5}}]})
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert main(["convert", str(path), "--to", "mergekit"]) == 0
    as_mergekit = yaml.safe_load(capsys.readouterr().out)
    assert as_mergekit["merge_method"] == "ties" and from_mergekit(as_mergekit) == recipe
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump(as_mergekit))
    assert main(["convert", str(mk), "--to", "recipe", "-o", str(tmp_path / "back.yaml")]) == 0
    assert Recipe.load(tmp_path / "back.yaml") == recipe


def test_convert_reports_what_mergekit_cannot_express(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(Recipe.from_dict({"method": "global_slerp", "base": "a", "models": [
        {"model": "b"}], "parameters": {"t": 0.5}}).to_yaml())
    assert main(["convert", str(path)]) == 2
    assert "global_slerp" in capsys.readouterr().err


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["merge", "--help"], ["convert", "--help"], ["zoo", "build", "--help"],
                 ["run", "--help"], ["status", "--help"], ["pareto", "--help"],
                 ["export", "--help"], ["strategies", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    assert "mergekit" in capsys.readouterr().out
