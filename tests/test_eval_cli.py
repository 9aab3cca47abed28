"""`mergesearch eval`: a trial's exported checkpoint and recipe score as the trial did."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``mergesearch *args`` in this process (the zoo and torch are loaded once for the
    file, not once per command), its exit code and what it printed."""
    from mergesearch.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse
            code = exit_.code
    done = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert done.returncode == 0, done.stderr
    return done


def zoo_yaml(tmp_path: Path) -> Path:
    data = {
        "name": "t",
        "models": {"base": "zoo:base",
                   "sources": {s: f"zoo:{s}" for s in ("rev", "srt", "dup", "evn")}},
        "space": str(ROOT / "search_spaces" / "task_arithmetic.yaml"),
        "strategy": {"name": "random"},
        "evaluator": {"suite": str(ROOT / "evaluators" / "zoo"), "limit": 16,
                      "batch_size": 64, "objectives": [
                          {"name": "rev", "tasks": ["zoo_rev"], "metric": "char_accuracy"},
                          {"name": "mean", "metric": "char_accuracy"},
                          {"name": "models", "source": "recipe", "metric": "num_models",
                           "direction": "minimize"},
                          {"name": "l1", "source": "weights", "metric": "delta_l1",
                           "direction": "minimize"}]},
        "budget": {"evaluations": 3},
        "output": str(tmp_path / "run"),
        "seed": 0,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.slow  # a search, an export and evaluations
def test_export_round_trip_reproduces_the_trial(zoo, tmp_path):
    exp = str(zoo_yaml(tmp_path))
    cli("run", exp, "--quiet")
    front = json.loads(cli("pareto", exp, "--format", "json").stdout)["front"]
    trial = front[0]
    out = tmp_path / "export"
    cli("export", exp, "--out", str(out), "--trial", str(trial["trial"]), "--checkpoint")
    for target in (out / "model", out / "recipe.json"):
        got = json.loads(cli("eval", str(target), exp, "--format", "json").stdout)
        assert got["kind"] == ("checkpoint" if target.is_dir() else "recipe")
        assert got["unavailable"] == {}
        assert got["values"].keys() == trial["values"].keys()
        for name, value in trial["values"].items():
            assert got["values"][name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    table = cli("eval", str(out / "model"), exp).stdout
    assert "rev" in table and "task zoo_rev" in table


@pytest.mark.slow  # the zoo
def test_checkpoint_without_its_recipe_has_no_recipe_objectives(zoo, tmp_path):
    exp = str(zoo_yaml(tmp_path))
    got = json.loads(cli("eval", str(Path(zoo.experts["rev"])), exp, "--format",
                         "json").stdout)
    assert got["kind"] == "checkpoint"
    assert set(got["values"]) == {"rev", "mean", "l1"}
    assert set(got["unavailable"]) == {"models"}


def test_neither_a_model_nor_a_recipe_is_one_line_and_exit_2(tmp_path):
    exp = str(zoo_yaml(tmp_path))
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "empty", tmp_path / "missing.json"):
        out = cli("eval", str(bad), exp, check=False)
        assert out.returncode == 2
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("error:"), out.stderr
