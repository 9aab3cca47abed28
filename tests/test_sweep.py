"""Sweeps: grid expansion into named searches, and several searches on one Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mergesearch.cli import main
from mergesearch.experiment import ExperimentError
from mergesearch.storage import TrialStore
from mergesearch.sweep import plan_sweep

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(tmp_path: Path, **changes) -> Path:
    data = {"name": "sw", "experiment": str(ROOT / "experiments/zoo/cmaes.yaml"),
            "grid": {"strategy": [{"name": "random"}, {"name": "cmaes",
                                                       "options": {"popsize": 4}}],
                     "seed": [0, 1]},
            "execution": {"address": "local", "workers": 2},
            "output": str(tmp_path / "runs")} | changes
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_grid_expands_to_one_named_search_per_combination(tmp_path):
    planned, pool = plan_sweep([sweep_file(tmp_path)], overrides=["budget.evaluations=3"])
    assert [p.label for p in planned] == ["random-seed0", "random-seed1", "cmaes-seed0",
                                          "cmaes-seed1"]
    names = [p.experiment.name for p in planned]
    assert names == ["sw-random-seed0", "sw-random-seed1", "sw-cmaes-seed0", "sw-cmaes-seed1"]
    assert len({p.experiment.run_dir for p in planned}) == 4
    cmaes = planned[3].experiment
    assert cmaes.strategy.options == {"popsize": 4} and cmaes.seed == 1
    assert planned[0].experiment.strategy.options == {}  # the base file's options replaced
    assert all(p.experiment.budget.evaluations == 3 for p in planned)
    assert (pool.address, pool.workers) == ("local", 2)


def test_bad_sweeps_are_clear(tmp_path):
    with pytest.raises(ExperimentError, match="gird: unknown key"):
        plan_sweep([sweep_file(tmp_path, gird={"seed": [1]})])
    with pytest.raises(ExperimentError, match="more than once"):
        exp = str(ROOT / "experiments/zoo/random.yaml")
        plan_sweep([exp, exp])
    with pytest.raises(ExperimentError, match="stratgy"):
        plan_sweep([sweep_file(tmp_path, grid={"stratgy.name": ["random"]})])


@pytest.mark.slow
@pytest.mark.ray
def test_a_sweep_runs_every_search_into_its_own_study(zoo, ray_cluster, tmp_path, capsys):
    path = sweep_file(tmp_path, grid={"strategy": [{"name": "random"}, {"name": "tpe"}]})
    assert main(["sweep", str(path), "--set", "budget.evaluations=3",
                 "--set", "evaluator.limit=8"]) == 0
    out = capsys.readouterr().out
    assert "2 search(es)" in out and "random" in out and "tpe" in out
    for label in ("random", "tpe"):
        db = tmp_path / "runs" / label / "study.db"
        trials = TrialStore.open(f"sqlite:///{db}", f"sw-{label}").trials()
        assert [t.state for t in trials] == ["ok"] * 3
