"""Tracked metrics (``evaluator.track``): named metrics recorded in every trial and shown by
`run`, `status`, `pareto` and the report, but not optimised; `mergesearch metrics`.

The searches are the digits testbed (python evaluator, milliseconds a trial) scored by
:func:`halves`, which splits its images into two tasks with two metrics each; the hf
checks (names against the suite, exact match beside an optimised char accuracy) read the
zoo suite, and one slow test runs the shipped experiments/zoo/tracked.yaml."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import kill_mid_run

from mergesearch.cli import main
from mergesearch.controller import check_evaluator
from mergesearch.evaluation import EvaluatorConfig
from mergesearch.evaluation.base import EvaluationError
from mergesearch.storage import TrialStore
from mergesearch.trial import split_tracked, tracked_values

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "evaluators" / "zoo"
ZOO_TASKS = ["zoo_dup", "zoo_evn", "zoo_rev", "zoo_srt"]


def halves(model, split: str = "train", *, fidelity: float = 1.0, seed: int = 0) -> dict:
    """The digits evaluator with its images split in two tasks, ``even`` and ``odd``
    positions, each with ``accuracy`` and ``errors`` (wrong answers)."""
    from mergesearch.zoo.digits import evaluate

    out = evaluate(model, split, fidelity=fidelity, seed=seed, limit=200)
    (task, correct), = out["correct"].items()
    items = out["items"][task]
    res = {"correct": {}, "items": {}, "scores": {}}
    for name, parity in (("even", 0), ("odd", 1)):
        ok = [c for i, c in enumerate(correct) if i % 2 == parity]
        res["correct"][name] = ok
        res["items"][name] = [x for i, x in enumerate(items) if i % 2 == parity]
        res["scores"][name] = {"accuracy": sum(ok) / len(ok),
                               "errors": float(len(ok) - sum(ok))}
    return res


TRACK = ["errors", "even/accuracy"]


def digits(tmp_path: Path, evaluations: int = 8, **evaluator) -> Path:
    data = yaml.safe_load((ROOT / "experiments" / "digits" / "pretrained.yaml").read_text())
    data["strategy"] = {"name": "random"}
    data["evaluator"] |= {"function": "test_tracked:halves", "track": TRACK} | evaluator
    data["budget"] = {"evaluations": evaluations}
    data["output"] = str(tmp_path / "run")
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def store_of(tmp_path: Path) -> TrialStore:
    return TrialStore.open(f"sqlite:///{tmp_path / 'run' / 'study.db'}", "digits-pretrained")


def expected(trial) -> dict[str, float]:
    """The tracked values of a trial, from its per-item correctness (not its scores)."""
    wrong = [len(c) - sum(c) for c in trial.correct.values()]
    even = trial.correct["even"]
    return {"errors": sum(wrong) / len(wrong), "even/accuracy": sum(even) / len(even)}


# -- names and values -------------------------------------------------------------------


def test_a_tracked_value_is_the_mean_over_its_tasks_and_left_out_when_one_lacks_it():
    scores = {"a": {"em": 0.5, "acc": 0.2}, "b": {"em": 1.0}, "c": {"acc": 0.4}}
    assert split_tracked("a/em") == ("a", "em") and split_tracked("em") == (None, "em")
    got = tracked_values(scores, {"em": ["a", "b"], "acc": None, "c/acc": ["c"],
                                  "b/acc": ["b"], "em_all": None})
    assert got == {"em": 0.75, "acc": pytest.approx(0.3), "c/acc": 0.4}
    # over every task of the suite that produces it: one that did not compute it hides it
    assert tracked_values(scores, {"em": ["a", "b", "c"]}) == {}


def config(**changes) -> EvaluatorConfig:
    data = {"suite": str(ZOO), "objectives": [{"name": "mean", "metric": "char_accuracy"}]}
    return EvaluatorConfig.model_validate(data | changes)


def test_tracked_names_resolve_to_the_tasks_that_produce_them(tmp_path):
    got = check_evaluator(config(track=["exact_match", "zoo_rev/greedy_match"]), ZOO)
    assert got == {"exact_match": ZOO_TASKS, "zoo_rev/greedy_match": ["zoo_rev"]}
    got = check_evaluator(config(tasks=["zoo_srt", "zoo_rev"], track=["answer_logprob"]), ZOO)
    assert got == {"answer_logprob": ["zoo_srt", "zoo_rev"]}
    # a suite of a generation task and a multiple-choice one: acc is the choice task's
    for name, extra in (("gen", {}), ("mc", {"output_type": "multiple_choice",
                                              "doc_to_choice": ["ab", "ba"]})):
        (tmp_path / f"{name}.jsonl").write_text('{"q": "rev ab=", "a": "ba"}\n')
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "test_split": "test",
            "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}},
            "doc_to_text": "{{q}}", "doc_to_target": "{{a}}"} | extra))
    mixed = config(suite=str(tmp_path), objectives=[
        {"name": "o", "metric": "char_accuracy", "tasks": ["gen"]}], track=["acc", "exact_match"])
    assert check_evaluator(mixed, tmp_path) == {"acc": ["mc"], "exact_match": ["gen"]}


BAD = {
    "unknown task": ({"track": ["zoo_mul/exact_match"]},
                     r"evaluator.track: 'zoo_mul/exact_match' names task 'zoo_mul', which the "
                     r"evaluator does not load; choose from \['zoo_dup'"),
    "a task not loaded": ({"tasks": ["zoo_rev"], "track": ["zoo_srt/exact_match"]},
                          r"names task 'zoo_srt', which the evaluator does not load; choose "
                          r"from \['zoo_rev'\]"),
    "a metric the task does not produce": (
        {"track": ["zoo_rev/acc"]},
        r"'zoo_rev/acc': task 'zoo_rev' \(generate_until\) does not produce 'acc'; it produces "
        r"\['char_accuracy', 'answer_logprob', 'greedy_match', 'exact_match'"),
    "a metric no task produces": (
        {"track": ["bleu"]},
        r"no task of the evaluator produces 'bleu'; its tasks produce \['answer_logprob'.*"
        r"mergesearch metrics EXPERIMENT"),
    "a recipe metric": ({"track": ["num_models"]},
                        r"'num_models' is a recipe metric: only evaluator metrics can be "
                        r"tracked; make it an objective with source: recipe"),
    "twice": ({"track": ["exact_match", "exact_match"]}, r"names 'exact_match' twice"),
    "an objective's name": ({"track": ["mean"]}, r"'mean' is also the name of an objective"),
    "no metric": ({"track": ["zoo_rev/"]}, r"'zoo_rev/' is not a metric name"),
    "no task": ({"track": ["/exact_match"]}, r"'/exact_match' is not a metric name"),
    # the objectives and tasks are checked as early
    "objective metric": ({"objectives": [{"name": "o", "metric": "acc"}]},
                         r"objective 'o': metric 'acc' cannot be computed for task 'zoo_dup' "
                         r"\(generate_until\)"),
    "evaluator.tasks": ({"tasks": ["zoo_mul"]}, r"evaluator.tasks names unknown tasks "
                                                r"\['zoo_mul'\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_tracked_name_is_a_clear_error(case):
    changes, match = BAD[case]
    with pytest.raises(EvaluationError, match=match):
        check_evaluator(config(**changes), ZOO)


def test_the_vllm_backend_is_checked_against_its_suite_as_hf():
    vllm = config(backend="vllm", track=["exact_match", "zoo_rev/acc"])
    with pytest.raises(EvaluationError, match="task 'zoo_rev' .* does not produce 'acc'"):
        check_evaluator(vllm, ZOO)
    assert check_evaluator(config(backend="vllm", track=["exact_match"]), ZOO) == {
        "exact_match": ZOO_TASKS}


def test_other_backends_check_the_names_and_read_bare_ones_from_the_scores():
    python = EvaluatorConfig.model_validate({
        "backend": "python", "function": "test_tracked:halves",
        "objectives": [{"name": "accuracy", "metric": "accuracy"}],
        "track": ["errors", "even/accuracy"]})
    assert check_evaluator(python, None) == {"errors": None, "even/accuracy": ["even"]}
    with pytest.raises(EvaluationError, match="'accuracy' is also the name of an objective"):
        check_evaluator(python.model_copy(update={"track": ["accuracy"]}), None)


# -- a search that tracks -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A digits search of 8 trials tracking ``errors`` and ``even/accuracy``, and what its
    `run` printed."""
    tmp = tmp_path_factory.mktemp("tracked")
    path = digits(tmp)
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        assert main(["run", str(path), "-q"]) == 0
    return tmp, path, out.getvalue()


def cli(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


def test_every_trial_records_its_tracked_values(tracked_run):
    tmp, _, printed = tracked_run
    trials = store_of(tmp).trials()
    assert len(trials) == 8 and all(t.state == "ok" for t in trials)
    for t in trials:
        assert t.tracked == pytest.approx(expected(t))
        assert t.values["accuracy"] == pytest.approx(
            (t.scores["even"]["accuracy"] + t.scores["odd"]["accuracy"]) / 2)
    assert len({t.tracked["errors"] for t in trials}) > 1  # they differ from trial to trial
    best = max(trials, key=lambda t: (t.values["accuracy"], -t.number))
    # run's front table: the tracked columns after the objective
    header = next(line for line in printed.splitlines() if "accuracy" in line
                  and "errors" in line)
    assert header.split() == ["accuracy", "errors", "even/accuracy"]
    row = next(line.split() for line in printed.splitlines()
               if line.split()[:1] == [str(best.number)])
    assert row[2:] == [f"{best.tracked['errors']:.4f}", f"{best.tracked['even/accuracy']:.4f}"]
    assert "(tracked, not optimised: errors, even/accuracy)" in printed


def test_status_shows_the_tracked_values_of_the_best_trial(tracked_run, capsys):
    tmp, path, _ = tracked_run
    best = max(store_of(tmp).trials(), key=lambda t: (t.values["accuracy"], -t.number))
    out = cli(["status", str(path)], capsys)
    assert (f"tracked at trial {best.number} (the best trial; accuracy "
            f"{best.values['accuracy']:.4f}): errors {best.tracked['errors']:.4f}, "
            f"even/accuracy {best.tracked['even/accuracy']:.4f}") in out
    data = json.loads(cli(["status", str(path), "--format", "json"], capsys))
    assert data["tracked"] == {"names": TRACK, "trial": best.number,
                               "values": pytest.approx(best.tracked)}
    rows = list(csv.DictReader(io.StringIO(cli(["status", str(path), "--format", "csv"],
                                               capsys))))
    assert int(rows[0]["tracked_trial"]) == best.number
    assert float(rows[0]["tracked_errors"]) == pytest.approx(best.tracked["errors"])


def test_with_two_objectives_status_tracks_the_point_export_chooses(tmp_path, capsys):
    from mergesearch.report import choose

    second = {"name": "l1", "metric": "delta_l1", "source": "weights",
              "direction": "minimize"}
    path = digits(tmp_path, objectives=[{"name": "accuracy", "metric": "accuracy"}, second])
    cli(["run", str(path), "-q"], capsys)
    store = store_of(tmp_path)
    chosen = choose(store.pareto_front(), store.objectives)
    out = cli(["status", str(path)], capsys)
    assert f"tracked at trial {chosen.number} (the front point export chooses; accuracy " \
        f"{chosen.values['accuracy']:.4f}, l1 {chosen.values['l1']:.4f}): errors " \
        f"{chosen.tracked['errors']:.4f}" in out
    assert f"chose trial {chosen.number}" in cli(["export", str(path), "--out",
                                                 str(tmp_path / "x")], capsys)
    exported = json.loads((tmp_path / "x" / "scores.json").read_text())
    assert exported["tracked"] == pytest.approx(chosen.tracked)


def test_pareto_shows_the_tracked_columns_in_every_format(tracked_run, capsys):
    tmp, path, _ = tracked_run
    front = store_of(tmp).pareto_front()
    table = cli(["pareto", str(path)], capsys)
    assert table.splitlines()[0].split() == ["accuracy", "errors", "even/accuracy"]
    data = json.loads(cli(["pareto", str(path), "--format", "json"], capsys))
    assert data["tracked"] == TRACK
    assert [p["tracked"] for p in data["front"]] == [pytest.approx(t.tracked) for t in front]
    rows = list(csv.reader(io.StringIO(cli(["pareto", str(path), "--format", "csv"], capsys))))
    assert rows[0][:4] == ["trial", "accuracy", "errors", "even/accuracy"]
    assert [float(r[2]) for r in rows[1:]] == pytest.approx([t.tracked["errors"]
                                                            for t in front])
    recipes = cli(["pareto", str(path), "--recipes"], capsys)
    assert f"; tracked errors {front[0].tracked['errors']:.4f}" in recipes


def test_the_report_table_has_the_tracked_columns(tracked_run, capsys):
    tmp, path, _ = tracked_run
    out = tmp / "report.html"
    cli(["report", str(path), "--out", str(out)], capsys)
    page = out.read_text()
    assert "<th>errors (tracked)</th><th>even/accuracy (tracked)</th>" in page
    for t in store_of(tmp).pareto_front():
        assert f"<td>{t.tracked['errors']:.4f}</td><td>{t.tracked['even/accuracy']:.4f}</td>" \
            in page


@pytest.mark.slow  # a search killed in a subprocess, then resumed
def test_a_killed_run_resumes_with_every_trial_tracked(tmp_path, capsys):
    path = digits(tmp_path, evaluations=60)
    db = tmp_path / "run" / "study.db"
    kill_mid_run(path, db, 5)
    store = store_of(tmp_path)
    before = {t.number: t.tracked for t in store.trials() if t.state == "ok"}
    assert 5 <= len(before) < 60
    cli(["run", str(path), "-q"], capsys)
    trials = store_of(tmp_path).trials()
    assert len(trials) == 60 and all(t.state == "ok" for t in trials)
    for t in trials:  # those of the killed run kept as written, the others recorded alike
        assert t.tracked == pytest.approx(expected(t))
        if t.number in before:
            assert t.tracked == before[t.number]
    assert "tracked at trial" in cli(["status", str(path)], capsys)


def test_a_name_the_scores_lack_is_said_once_and_left_out(tmp_path, capsys, caplog):
    path = digits(tmp_path, evaluations=3, track=["errors", "f1"])
    cli(["run", str(path), "-q"], capsys)
    trials = store_of(tmp_path).trials()
    assert all(set(t.tracked) == {"errors"} for t in trials)
    said = [r for r in caplog.records if "'f1' is not in the scores" in r.getMessage()]
    assert len(said) == 1
    assert "errors" in cli(["status", str(path)], capsys)
    table = cli(["pareto", str(path)], capsys)  # f1 is a column with no values
    assert table.splitlines()[0].split() == ["accuracy", "errors", "f1"]
    assert table.splitlines()[2].split()[-1] == "-"


def test_a_bad_tracked_name_is_refused_before_any_worker_starts(tmp_path, capsys,
                                                                monkeypatch):
    from mergesearch.execution import worker

    def never(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(worker.Worker, "__init__", never)
    path = digits(tmp_path, track=["errors", "errors"])
    assert main(["run", str(path), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: evaluator.track names 'errors' twice"]
    assert not (tmp_path / "run" / "study.db").exists()


# -- mergesearch metrics ---------------------------------------------------------------------


def test_metrics_lists_every_metric_per_task_and_what_the_experiment_reads(tmp_path, capsys):
    exp = tmp_path / "exp.yaml"
    data = yaml.safe_load((ROOT / "experiments" / "zoo" / "tracked.yaml").read_text())
    data["evaluator"]["suite"] = str(ZOO)
    exp.write_text(yaml.safe_dump(data))
    out = cli(["metrics", str(exp)], capsys)
    for task in ZOO_TASKS:
        assert f"  {task}   generate_until   char_accuracy, answer_logprob, greedy_match, " \
               "exact_match" in out
    for metric in ("num_models", "distinct_modules", "delta_l1", "delta_l2", "delta_sparsity"):
        assert metric in out
    assert "tracked   exact_match" in out and "exact_match, mean over " + ", ".join(ZOO_TASKS) \
        in out
    data = json.loads(cli(["metrics", "--suite", str(ZOO), "--format", "json"], capsys))
    assert data["tasks"]["zoo_rev"] == {"output_type": "generate_until", "metrics": [
        "char_accuracy", "answer_logprob", "greedy_match", "exact_match"]}
    assert data["every_task"] == data["tasks"]["zoo_rev"]["metrics"]
    assert "num_models" in data["recipe"] and "delta_l1" in data["weights"]
    capsys.readouterr()
    assert main(["metrics"]) == 2
    assert "give an experiment file or --suite DIR" in capsys.readouterr().err
    assert main(["metrics", "--suite", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


# -- the hf backend: exact match beside an optimised char accuracy --------------------------


@pytest.mark.slow  # a zoo search of 3 trials, then one more evaluation
def test_the_shipped_example_tracks_exact_match_as_an_objective_would_score_it(zoo, tmp_path,
                                                                               capsys):
    from mergesearch.controller import BoundExperiment
    from mergesearch.experiment import Experiment
    from mergesearch.recipe import Recipe

    overrides = ["--set", "budget.evaluations=3", "--set", "evaluator.limit=12",
                 "--set", f"output={tmp_path / 'run'}"]
    example = ROOT / "experiments" / "zoo" / "tracked.yaml"
    cli(["run", str(example), "-q", *overrides], capsys)
    exp = Experiment.load(example, [o for o in overrides if o != "--set"])
    store = TrialStore.open(exp.storage_url, exp.name)
    trials = store.trials()
    assert len(trials) == 3 and all(t.state == "ok" for t in trials)
    for t in trials:  # generation ran for every task, though no objective asked for it
        assert set(t.tracked) == {"exact_match"}
        assert t.tracked["exact_match"] == pytest.approx(
            sum(t.scores[k]["exact_match"] for k in ZOO_TASKS) / 4)
    # the same recipe scored with exact_match as its objective gives the tracked value
    first = min(trials, key=lambda t: t.number)
    scoring = Experiment.load(example, [o for o in overrides if o != "--set"] + [
        "evaluator.track=[]",
        "evaluator.objectives=[{name: em, metric: exact_match}]"])
    result = BoundExperiment(scoring, progress=False).evaluate(Recipe.from_dict(first.recipe))
    assert result.values["em"] == pytest.approx(first.tracked["exact_match"])
    assert not math.isnan(first.tracked["exact_match"])
    best = max(trials, key=lambda t: (t.values["mean"], -t.number))
    status = cli(["status", str(example), *overrides], capsys)
    assert (f"tracked at trial {best.number} (the best trial; mean {best.values['mean']:.4f}): "
            f"exact_match {best.tracked['exact_match']:.4f}") in status
