"""The search loop on the zoo: recording, resume at every crash point, failures, cache."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from contract_strategies import Repeat
from helpers import zoo_experiment

from mergesearch.controller import BoundExperiment, SearchLoop, run
from mergesearch.execution import Worker
from mergesearch.experiment import Experiment
from mergesearch.storage import TrialStore
from mergesearch.strategies import Strategy


def experiment(tmp_path, **changes) -> Experiment:
    return zoo_experiment(tmp_path, **changes)


def completed(exp: Experiment, study: str = "t"):
    store = TrialStore.open(exp.storage_url, study)
    return store, [t for t in store.trials() if t.state == "ok"]


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_every_trial_is_recorded_with_its_recipe_scores_and_state(zoo, tmp_path):
    exp = experiment(tmp_path)
    summary = run(exp, progress=False)
    assert (summary.finished, summary.ok, summary.failed, summary.stopped) == (6, 6, 0, "budget")
    store, trials = completed(exp)
    assert len(trials) == 6
    assert sorted(t.candidate_id for t in trials) == list(range(6))
    for t in trials:
        assert set(t.params) == {f"weight[{s}]" for s in ("rev", "srt", "dup", "evn")}
        assert t.recipe["method"] == "task_arithmetic"
        # the stored params are the weights of the stored recipe
        weights = {m["model"]: m["parameters"]["weight"] for m in t.recipe["models"]}
        assert sorted(weights.values()) == pytest.approx(sorted(t.params.values()))
        assert set(t.scores) == {"zoo_rev", "zoo_srt", "zoo_dup", "zoo_evn"}
        assert t.values["rev"] == pytest.approx(t.scores["zoo_rev"]["char_accuracy"])
        assert t.values["mean"] == pytest.approx(
            np.mean([s["char_accuracy"] for s in t.scores.values()]))
        assert t.timings["merge"] > 0 and t.timings["evaluate"] > 0
    raw = store.study.trials[0].user_attrs["correct"]
    assert set(raw) == set(trials[0].scores)
    for packed in raw.values():  # per-item correctness, with the ids of the items scored
        assert len(packed["correct"]) == 16 and set(packed["correct"]) <= {"0", "1"}
    for t in trials:
        assert all(len(t.items[task]) == len(t.correct[task]) == 16 for task in t.scores)
        assert len(set(t.items["zoo_rev"])) == 16  # 16 distinct items of the task
        assert t.cost == 64  # items scored: 16 per task
    state = store.load_state()
    assert state["strategy"] == "random" and json.loads(json.dumps(state)) == state
    # the first random candidate is the space's start: the uniform merge
    first = min(trials, key=lambda t: t.candidate_id)
    assert set(first.params.values()) == {0.5}


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
def test_rerun_resumes_and_a_larger_budget_continues(zoo, tmp_path):
    exp = experiment(tmp_path, budget={"evaluations": 4})
    run(exp, progress=False)
    again = run(exp, progress=False)  # same experiment: resumes, nothing left to do
    assert again.evaluated_now == 0 and again.finished == 4
    more = run(experiment(tmp_path, budget={"evaluations": 7}), progress=False, resume=True)
    assert more.evaluated_now == 3 and more.finished == 7
    _, trials = completed(exp)
    assert sorted(t.candidate_id for t in trials) == list(range(7))
    # the continued run proposes what one uninterrupted run would have
    straight = experiment(tmp_path, budget={"evaluations": 7}, output=str(tmp_path / "straight"))
    run(straight, progress=False)
    _, reference = completed(straight)
    assert [t.params for t in sorted(trials, key=lambda t: t.candidate_id)] == \
        [t.params for t in sorted(reference, key=lambda t: t.candidate_id)]


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing in the loop catches it."""


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("where", ["add", "save_state", "tell"])
def test_resume_after_a_crash_at_each_step(zoo, tmp_path, monkeypatch, where):
    """Crash on the 4th call of a step (writing a trial, checkpointing, telling the strategy
    a recorded result), resume, and end with the budget exactly: every candidate evaluated
    once (or again only if it never was recorded)."""
    exp = experiment(tmp_path, strategy={"name": "cmaes", "options": {"popsize": 4}},
                     budget={"evaluations": 10})
    calls = {"n": 0}
    owner = Strategy if where == "tell" else TrialStore
    original = getattr(owner, where)

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise Crash
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, where, crashing)
    with pytest.raises(Crash):
        run(exp, progress=False)
    monkeypatch.setattr(owner, where, original)
    summary = run(exp, progress=False)
    assert summary.finished == 10 and summary.failed == 0
    store, trials = completed(exp)
    assert len(trials) == 10 and len(store.trials()) == 10  # no leftovers, no duplicates
    assert sorted(t.candidate_id for t in trials) == list(range(10))
    genomes = [tuple(t.params.values()) for t in trials]
    assert len(set(genomes)) == 10
    # and the search is the one an uninterrupted run makes
    straight = experiment(tmp_path, strategy={"name": "cmaes", "options": {"popsize": 4}},
                          budget={"evaluations": 10}, output=str(tmp_path / "straight"))
    run(straight, progress=False)
    _, reference = completed(straight)
    key = lambda t: t.candidate_id  # noqa: E731
    assert [t.params for t in sorted(trials, key=key)] == \
        [t.params for t in sorted(reference, key=key)]


def test_failing_and_nan_candidates_are_recorded_and_the_search_goes_on(zoo, tmp_path,
                                                                        monkeypatch):
    from mergesearch.execution.worker import Worker

    original = Worker.evaluate

    def flaky(self, candidate):
        if candidate.id == 1:  # the merge itself raises
            def boom(recipe, **kw):
                raise RuntimeError("out of memory (simulated)")
            apply, self.merger.apply = self.merger.apply, boom
            try:
                return original(self, candidate)
            finally:
                self.merger.apply = apply
        result = original(self, candidate)
        if candidate.id == 3:
            result.values["rev"] = math.nan
            return result.check_finite()
        return result

    monkeypatch.setattr(Worker, "evaluate", flaky)
    summary = run(experiment(tmp_path), progress=False)
    assert (summary.finished, summary.ok, summary.failed) == (6, 4, 2)
    store = TrialStore.open(experiment(tmp_path).storage_url, "t")
    failed = {t.candidate_id: t.reason for t in store.trials() if t.state == "failed"}
    assert failed[1] == "RuntimeError: out of memory (simulated)"
    assert failed[3] == "non-finite objective values: rev"


def test_identical_candidates_are_served_from_the_cache(zoo, tmp_path):
    exp = experiment(tmp_path)
    search = BoundExperiment(exp, progress=False)
    search.strategy = Repeat(search.problem)
    store = search.open_store(resume=None, overwrite=False)
    summary = SearchLoop(search, store, search.make_executor(), False, None).run()
    assert (summary.finished, summary.cached, summary.evaluated_now) == (6, 4, 2)
    trials = store.trials()
    by_number = {t.number: t for t in trials}
    for t in trials:
        if t.cached_from is not None:
            source = by_number[t.cached_from]
            assert source.cached_from is None and t.values == source.values
            assert t.params == source.params


def test_a_freed_worker_gets_its_next_candidate_before_the_last_result_is_written(
        zoo, tmp_path, monkeypatch):
    """The loop's order: tell, ask + dispatch, then write + checkpoint (while workers run)."""
    exp = experiment(tmp_path)
    search = BoundExperiment(exp, progress=False)
    events = []
    executor = search.make_executor()
    submit = executor.submit

    def recording_submit(cand):
        events.append(("submit", cand.id))
        submit(cand)

    executor.submit = recording_submit
    add = TrialStore.add

    def recording_add(self, cand, result, **kw):
        events.append(("add", cand.id))
        return add(self, cand, result, **kw)

    monkeypatch.setattr(TrialStore, "add", recording_add)
    store = search.open_store(resume=None, overwrite=False)
    summary = SearchLoop(search, store, executor, False, None).run()
    assert summary.finished == 6
    for k in range(1, 6):
        assert events.index(("submit", k)) < events.index(("add", k - 1))
    assert [e for e in events if e[0] == "add"] == [("add", k) for k in range(6)]


class ClosingWorker(Worker):
    """Notes each close in the file that MERGESEARCH_TEST_CLOSED names."""

    def close(self) -> None:
        super().close()
        path = Path(os.environ["MERGESEARCH_TEST_CLOSED"])
        path.write_text((path.read_text() if path.exists() else "") + "closed\n")


@pytest.mark.slow  # seconds: kept out of the quick suite, run by CI
@pytest.mark.parametrize("interrupted", [False, True])
def test_a_run_closes_its_worker_when_it_ends(zoo, tmp_path, monkeypatch, interrupted):
    """What a worker's evaluator holds (a vLLM engine and its processes) is released when
    the run ends, also when it is interrupted, not when the process exits."""
    marker = tmp_path / "closed"
    monkeypatch.setenv("MERGESEARCH_TEST_CLOSED", str(marker))
    exp = experiment(tmp_path, execution={"worker_class": "test_controller:ClosingWorker"},
                     budget={"evaluations": 3})
    seen = []

    def on_result(result) -> None:
        assert not marker.exists()  # the worker is open while the run scores
        seen.append(result)
        if interrupted and len(seen) == 2:
            raise KeyboardInterrupt

    if interrupted:
        with pytest.raises(KeyboardInterrupt):
            run(exp, progress=False, on_result=on_result)
    else:
        assert run(exp, progress=False, on_result=on_result).ok == 3
    assert marker.read_text() == "closed\n"  # once
