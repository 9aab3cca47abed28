"""Seeing and shipping a search's results: trial durations, fronts per study, the hints
`run` prints, `status` and `pareto` formats, what `export` picks by default.

Searches here are the digits testbed (python evaluator, milliseconds a trial)."""

from __future__ import annotations

import csv
import io
import json
import shlex
from pathlib import Path

import optuna
import pytest
import yaml

from mergesearch.cli import main
from mergesearch.report import choose
from mergesearch.storage import TrialStore
from mergesearch.strategies import Dimension, Objective
from mergesearch.trial import Candidate, Result

ROOT = Path(__file__).resolve().parents[1]


def digits(tmp_path: Path, evaluations: int = 10) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "digits" / "pretrained.yaml").read_text())
    data["budget"] = {"evaluations": evaluations}
    data["output"] = str(tmp_path / "run")
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'run' / 'study.db'}"


def test_trials_last_as_long_as_their_evaluation(tmp_path):
    exp = digits(tmp_path, evaluations=6)
    assert main(["run", str(exp), "-q"]) == 0
    study = optuna.load_study(study_name="digits-pretrained", storage=url(tmp_path))
    assert len(study.trials) == 6
    for t in study.trials:
        took = (t.datetime_complete - t.datetime_start).total_seconds()
        worked = sum(t.user_attrs["timings"].values())
        assert took > 0 and worked > 0
        # dispatched -> result: the evaluation's phases, and little else
        assert worked - 0.01 <= took <= worked + 0.5, (took, t.user_attrs["timings"])


@pytest.mark.parametrize("direct", [True, False])
def test_both_insert_paths_record_start_and_end(tmp_path, direct):
    store = TrialStore.create(f"sqlite:///{tmp_path / 's.db'}", "s", [Objective("y")],
                              [Dimension("a", 0.0, 1.0, 0.5)], {"name": "s"})
    store._direct = direct
    ok = Result(candidate_id=0, values={"y": 0.5}, timings={"merge": 0.25, "evaluate": 0.5})
    store.add(Candidate(0, [0.5]), ok, started=1_700_000_000.0, finished=1_700_000_002.5)
    store.add(Candidate(1, [0.5]), Result(candidate_id=1, values={"y": 0.5},
                                          timings={"merge": 0.25, "evaluate": 0.5}))
    given, derived = optuna.load_study(study_name="s", storage=store.url).trials
    assert given.datetime_start.timestamp() == pytest.approx(1_700_000_000.0)
    assert given.datetime_complete.timestamp() == pytest.approx(1_700_000_002.5)
    # no dispatch time: it ended when written and began its timings' total earlier
    took = (derived.datetime_complete - derived.datetime_start).total_seconds()
    assert took == pytest.approx(0.75)


def test_two_studies_of_one_experiment_keep_their_fronts_and_hints(tmp_path, capsys):
    exp = digits(tmp_path, evaluations=4)
    assert main(["run", str(exp), "-q"]) == 0
    default_out = capsys.readouterr().out
    assert main(["run", str(exp), "-q", "--study", "other", "--set", "seed=3"]) == 0
    other_out = capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "front").is_dir() and (run / "other" / "front").is_dir()
    fronts = {}
    for name, folder in (("digits-pretrained", run / "front"),
                         ("other", run / "other" / "front")):
        front = TrialStore.open(url(tmp_path), name).pareto_front()
        assert sorted(p.name for p in folder.iterdir()) == \
            sorted(f"trial-{t.number}" for t in front)
        fronts[name] = [(p / "recipe.json").read_text() for p in sorted(folder.iterdir())]
    assert fronts["digits-pretrained"] != fronts["other"]
    assert f"recipes of the front: {run / 'other' / 'front'}/trial-N/" in other_out

    # the closing hints name the study (and overrides) the run used: copied, they work
    hint = next(line for line in other_out.splitlines() if line.startswith("merged checkpoint"))
    assert "--study other --set seed=3" in hint
    assert "--study" not in next(line for line in default_out.splitlines()
                                 if line.startswith("merged checkpoint"))
    argv = shlex.split(hint.removeprefix("merged checkpoint: mergesearch "))
    argv = [a for a in argv if a not in ("--checkpoint", "[--trial", "N]")]
    argv[argv.index("DIR")] = str(tmp_path / "exported")
    assert main(argv) == 0
    chosen = choose(TrialStore.open(url(tmp_path), "other").pareto_front(),
                    [Objective("accuracy")])
    assert json.loads((tmp_path / "exported" / "scores.json").read_text())["trial"] == \
        chosen.number


def test_status_shows_the_budget_the_study_ran_with(tmp_path, capsys):
    exp = digits(tmp_path, evaluations=100)
    assert main(["run", str(exp), "-q", "--set", "budget.evaluations=3"]) == 0
    capsys.readouterr()
    assert main(["status", str(exp)]) == 0
    assert "3 ok, 0 failed, 0 in flight (budget 3)" in capsys.readouterr().out
    assert main(["status", str(exp), "--format", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["trials"] == {"ok": 3, "failed": 0, "running": 0}
    assert status["budget"] == {"evaluations": 3} and set(status["best"]) == {"accuracy"}


def test_export_by_default_takes_the_chosen_front_point_and_says_why(tmp_path, capsys):
    exp = digits(tmp_path, evaluations=10)
    assert main(["run", str(exp), "-q"]) == 0
    store = TrialStore.open(url(tmp_path), "digits-pretrained")
    chosen = choose(store.pareto_front(), store.objectives, {"accuracy": 1.0})
    assert chosen.number != 0  # the uniform start point is not the best here
    capsys.readouterr()
    assert main(["export", str(exp), "--out", str(tmp_path / "best")]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0].startswith(f"chose trial {chosen.number}: the best of the 1 front point")
    assert "accuracy=1" in said[0]
    assert json.loads((tmp_path / "best" / "scores.json").read_text())["trial"] == chosen.number
    assert main(["export", str(exp), "--trial", "0", "--out", str(tmp_path / "t0")]) == 0
    assert capsys.readouterr().out.startswith("chose trial 0: as asked (--trial)")


def test_export_the_best_of_one_objective_and_force_to_replace(tmp_path, capsys):
    exp = digits(tmp_path, evaluations=8)
    data = yaml.safe_load(exp.read_text())
    data["evaluator"]["objectives"] = [
        {"name": "accuracy", "metric": "accuracy"},
        {"name": "l2", "source": "weights", "metric": "delta_l2", "direction": "minimize"}]
    exp.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["run", str(exp), "-q"]) == 0
    trials = TrialStore.open(url(tmp_path), "digits-pretrained").trials()
    smallest = min(trials, key=lambda t: (t.values["l2"], t.number))
    most = min(trials, key=lambda t: (-t.values["accuracy"], t.number))
    capsys.readouterr()
    out = tmp_path / "best"
    assert main(["export", str(exp), "--best", "l2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(
        f"chose trial {smallest.number}: the best l2 (minimize) of 8 trial(s)")
    assert main(["export", str(exp), "--best", "accuracy", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(exp), "--best", "accuracy", "--out", str(out), "--force"]) == 0
    assert json.loads((out / "scores.json").read_text())["trial"] == most.number
    assert main(["export", str(exp), "--best", "size", "--out", str(out)]) == 2
    assert "--best 'size': the objectives are accuracy, l2" in capsys.readouterr().err


def test_pareto_formats(tmp_path, capsys):
    exp = digits(tmp_path, evaluations=6)
    assert main(["run", str(exp), "-q"]) == 0
    store = TrialStore.open(url(tmp_path), "digits-pretrained")
    front = store.pareto_front()
    capsys.readouterr()
    assert main(["pareto", str(exp), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["study"] == "digits-pretrained"
    assert data["objectives"] == [{"name": "accuracy", "direction": "maximize", "weight": 1.0}]
    assert data["front"] == [{"trial": t.number, "values": t.values, "params": t.params,
                              "recipe": t.recipe} for t in front]
    assert main(["pareto", str(exp), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["trial"]) for r in rows] == [t.number for t in front]
    assert float(rows[0]["accuracy"]) == pytest.approx(front[0].values["accuracy"])
    assert set(rows[0]) == {"trial", "accuracy", *front[0].params}
    assert main(["pareto", str(exp), "--format", "table"]) == 0
    assert f"trial {front[0].number}:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["pareto", str(exp), "--format", "xml"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_the_front_table_shows_categorical_choices_by_name():
    from mergesearch.report.pareto import format_front
    from mergesearch.storage.trials import TrialRecord

    front = [TrialRecord(number=3, candidate_id=3, state="ok", values={"mean": 0.7},
                         params={"attention@L0": "srt", "weight[rev]": 0.25}, recipe=None,
                         fidelity=1.0, scores={}, reason=None, cached_from=None, timings={})]
    text = format_front(front, [Objective("mean", "maximize")])
    assert "trial 3: attention@L0=srt, weight[rev]=0.25" in text
