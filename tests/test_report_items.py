"""An experiment's ``report`` items: the chosen trial is scored once more on items the
search never saw, kept with the study, shown by ``run`` and ``status``."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import zoo_experiment

from mergesearch import controller
from mergesearch.controller import run
from mergesearch.evaluation.rescore import rescore
from mergesearch.experiment import Experiment, ExperimentError
from mergesearch.report import choose
from mergesearch.storage import TrialStore
from mergesearch.storage.trials import REPORT

REPORT_ITEMS = {"suite": "evaluators/zoo_report", "limit": 24}


@pytest.mark.slow
def test_the_chosen_trial_is_scored_on_the_report_items_once(zoo, tmp_path, monkeypatch):
    exp = zoo_experiment(tmp_path, report=REPORT_ITEMS, budget={"evaluations": 4})
    summary = run(exp, progress=False)
    chosen = choose(summary.front, summary.objectives)
    got = summary.report
    assert got["trial"] == chosen.number
    assert got["search"] == {"rev": chosen.values["rev"], "mean": chosen.values["mean"]}
    # the same recipe scored independently with the report evaluator
    (tmp_path / "chosen.json").write_text(json.dumps(chosen.recipe))
    expected = rescore(tmp_path / "chosen.json", exp.report_experiment()).values
    assert got["values"] == pytest.approx(expected, abs=1e-9)
    assert got["values"]["mean"] != chosen.values["mean"]  # other items, another score
    assert TrialStore.open(exp.storage_url, "t").study.user_attrs[REPORT] == got

    # the same chosen trial: the stored score is kept, no worker is built for it
    monkeypatch.setattr("mergesearch.execution.make_worker",
                        lambda spec: pytest.fail("scored again"))
    assert controller.score_report(exp, summary) == got


def test_report_fields_are_checked_and_may_change_on_resume(tmp_path):
    with pytest.raises(ExperimentError, match=r"report.*limt"):
        zoo_experiment(tmp_path, report={"limt": 3})
    with pytest.raises(ExperimentError, match="report: give the evaluator fields"):
        zoo_experiment(tmp_path, report={})
    plain = zoo_experiment(tmp_path)
    assert plain.report_experiment() is None
    with_report = zoo_experiment(tmp_path, report=REPORT_ITEMS)
    assert with_report.fingerprint() == plain.fingerprint()  # adding one resumes the study
    rep = with_report.report_experiment()
    assert rep.evaluator.suite == "evaluators/zoo_report" and rep.evaluator.limit == 24
    assert rep.evaluator.objectives == plain.evaluator.objectives


@pytest.mark.slow
def test_run_and_status_print_the_report_score(zoo, tmp_path, capsys):
    from mergesearch.cli import main

    exp = zoo_experiment(tmp_path, report=REPORT_ITEMS, budget={"evaluations": 3})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp.model_dump(mode="json", exclude_none=True),
                                   sort_keys=False))
    assert main(["run", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    stored = TrialStore.open(exp.storage_url, "t").study.user_attrs[REPORT]
    line = (f"trial {stored['trial']} on the report items: rev {stored['values']['rev']:.4f}, "
            f"mean {stored['values']['mean']:.4f}")
    assert line in out
    assert main(["status", str(path)]) == 0
    assert line in capsys.readouterr().out
    assert main(["status", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] == stored


def test_shipped_report_items_load(tmp_path):
    for name in ("experiments/zoo/sakana_ps.yaml", "experiments/hard/sakana_ps_dfs.yaml"):
        exp = Experiment.load(name)
        assert exp.report_experiment().evaluator.suite.endswith("report")
