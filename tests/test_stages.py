"""Experiments in stages: one command runs them in order, each into its own study; a later
stage merges with an earlier stage's chosen trial, rebuilt in memory from its recipe; a kill
inside a later stage resumes there without redoing the earlier ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import kill_mid_run, zoo_experiment

from mergesearch.controller import run_stages
from mergesearch.experiment import Experiment, ExperimentError
from mergesearch.models.recipe_model import ref_recipe
from mergesearch.report import choose
from mergesearch.storage import TrialStore

ROOT = Path(__file__).resolve().parents[1]


def staged(tmp_path: Path, second: int = 6) -> Experiment:
    base = zoo_experiment(tmp_path).model_dump(mode="json", exclude={"space", "strategy"})
    data = base | {
        "budget": {"evaluations": 5},
        "stages": [
            {"name": "ps", "space": "search_spaces/task_arithmetic.yaml",
             "strategy": {"name": "random"}},
            {"name": "more", "space": "search_spaces/task_arithmetic.yaml",
             "strategy": {"name": "random"}, "budget": {"evaluations": second},
             "sources_from": {"ps": "ps"}}]}
    return Experiment.from_dict(data)


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_a_later_stage_merges_with_the_trial_the_earlier_one_chose(zoo, tmp_path):
    exp = staged(tmp_path)
    first, second = run_stages(exp, progress=False)
    assert (first.study, first.finished, second.study, second.finished) == \
        ("t.ps", 5, "t.more", 6)
    chosen = choose(first.front, first.objectives)
    trials = TrialStore.open(exp.storage_url, "t.more").trials()
    for t in trials:
        refs = [m["model"] for m in t.recipe["models"]]
        assert len(refs) == 5 and refs[-1].startswith("recipe:")
        assert ref_recipe(refs[-1]) == chosen.recipe  # the chosen trial, as it was scored
        assert set(t.params) == {f"weight[{s}]" for s in ("rev", "srt", "dup", "evn", "ps")}
    # run again: both stages are done, nothing is evaluated, no model is loaded for ps
    again = run_stages(exp, progress=False)
    assert [s.evaluated_now for s in again] == [0, 0]


def test_stages_are_validated(tmp_path):
    data = staged(tmp_path).model_dump(mode="json")
    data["stages"][1]["sources_from"] = {"ps": "later"}
    with pytest.raises(ExperimentError, match=r"'later' is not an earlier stage"):
        Experiment.from_dict(data)
    data["stages"][1]["sources_from"] = {"rev": "ps"}
    with pytest.raises(ExperimentError, match="a source of that name exists already"):
        Experiment.from_dict(data)
    del data["stages"]
    with pytest.raises(ExperimentError, match="space and strategy missing"):
        Experiment.from_dict(data)


@pytest.mark.slow
def test_killed_in_the_second_stage_it_resumes_there(zoo, tmp_path):
    exp = staged(tmp_path, second=12)
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True),
                                   sort_keys=False))
    db = Path(exp.storage_url.removeprefix("sqlite:///"))
    kill_mid_run(path, db, 5 + 3)  # all of stage 1 and three trials of stage 2
    first = TrialStore.open(exp.storage_url, "t.ps").trials()
    assert len(first) == 5
    from mergesearch.cli import main

    assert main(["run", str(path), "--resume", "-q"]) == 0
    assert [(t.number, t.params) for t in TrialStore.open(exp.storage_url, "t.ps").trials()] \
        == [(t.number, t.params) for t in first]  # stage 1 untouched
    second = TrialStore.open(exp.storage_url, "t.more").trials()
    assert sorted(t.candidate_id for t in second) == list(range(12))

@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_status_reads_the_stage_asked_for(zoo, tmp_path, capsys):
    from mergesearch.cli import main

    exp = staged(tmp_path)
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True),
                                   sort_keys=False))
    run_stages(exp, progress=False)
    capsys.readouterr()
    assert main(["status", str(path), "--stage", "ps"]) == 0
    out = capsys.readouterr().out
    assert "study 't.ps'" in out and "5 ok" in out
    assert main(["status", str(path)]) == 0  # the last stage that ran
    assert "study 't.more'" in capsys.readouterr().out
    assert main(["status", str(path), "--stage", "nope"]) == 2


def test_overrides_reach_a_stage_by_name_or_index():
    exp = Experiment.load(ROOT / "experiments/hard/sakana_ps_dfs.yaml",
                          ["stages.dfs.budget.evaluations=3",
                           "stages.0.strategy.options={popsize: 6}"])
    assert exp.stages[1].budget.evaluations == 3
    assert exp.stages[0].strategy.options == {"popsize": 6}
    with pytest.raises(ExperimentError, match=r"stages has no item 'nope' .* a name: ps, dfs"):
        Experiment.load(ROOT / "experiments/hard/sakana_ps_dfs.yaml",
                        ["stages.nope.budget.evaluations=3"])
    with pytest.raises(ExperimentError, match="stages is a list: name one of its items"):
        Experiment.load(ROOT / "experiments/hard/sakana_ps_dfs.yaml", ["stages.x=1"])
