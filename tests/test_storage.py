"""The study as mergesearch writes it: one trial per result, the strategy state appended."""

from __future__ import annotations

import json

import optuna
import pytest

from mergesearch.storage import LEGACY_STATE, STATE, STATE_APPEND, StorageError, TrialStore
from mergesearch.strategies import Dimension, Objective, Problem, create_strategy
from mergesearch.trial import Candidate, Result

DIMS = [Dimension("a", 0.0, 1.0, 0.5), Dimension("b", -1.0, 1.0, 0.0)]
OBJECTIVES = [Objective("score", "maximize")]


def new_store(tmp_path, name="s") -> TrialStore:
    return TrialStore.create(f"sqlite:///{tmp_path / 'study.db'}", name, OBJECTIVES, DIMS,
                             {"name": name})


def system_attrs(store: TrialStore) -> dict:
    return store._storage.get_study_system_attrs(store._study_id)


def test_a_result_is_one_finished_trial_with_everything_on_it(tmp_path):
    store = new_store(tmp_path)
    ok = Result(candidate_id=0, values={"score": 0.7}, scores={"t": {"acc": 0.7}},
                correct={"t": [True, False, True]}, timings={"merge": 0.1, "evaluate": 0.2})
    store.add(Candidate(id=0, genome=[0.25, -0.5]), ok)
    store.add(Candidate(id=1, genome=[1.0, 1.0]), Result.failed(1, "RuntimeError: boom"))
    first, second = store.trials()
    assert (first.state, first.candidate_id, first.values) == ("ok", 0, {"score": 0.7})
    assert first.params == {"a": 0.25, "b": -0.5} and first.scores == {"t": {"acc": 0.7}}
    assert first.timings == {"merge": 0.1, "evaluate": 0.2}
    assert store.study.trials[0].user_attrs["correct"] == {"t": "101"}
    assert (second.state, second.reason, second.values) == ("failed", "RuntimeError: boom", {})
    # what Optuna (and so optuna-dashboard) sees
    assert [t.state for t in store.study.trials] == [optuna.trial.TrialState.COMPLETE,
                                                     optuna.trial.TrialState.FAIL]
    assert store.study.best_trial.params == {"a": 0.25, "b": -0.5}


def test_state_saves_append_and_read_back_whole(tmp_path):
    store = new_store(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    strategy = create_strategy("random", Problem(tuple(DIMS), tuple(OBJECTIVES)), seed=3)
    sizes = []
    for i in range(30):
        (cand,) = strategy.ask(1)
        store.save_state(strategy.state_dict(), in_flight=[cand.id])
        if i < 29:
            strategy.tell([Result(candidate_id=cand.id, values={"score": float(i)})])
        sizes.append(len(json.dumps(system_attrs(store)[STATE])))
    assert len(set(sizes)) == 1  # the whole state was written once, then only appended to
    assert sum(k.startswith(STATE_APPEND) for k in system_attrs(store)) == 29
    reopened = TrialStore.open(url, "s")
    assert reopened.load_state() == json.loads(json.dumps(strategy.state_dict()))
    assert reopened.in_flight() == [29]
    store.add(cand, Result(candidate_id=29, values={"score": 1.0}))
    assert reopened.in_flight() == []  # recorded since the checkpoint
    # a resumed writer appends after what is there
    strategy.tell([Result(candidate_id=29, values={"score": 1.0})])
    reopened.load_state()
    reopened.save_state(strategy.state_dict())
    assert TrialStore.open(url, "s").load_state() == json.loads(json.dumps(strategy.state_dict()))


def test_a_state_that_does_not_extend_the_saved_one_is_written_whole(tmp_path):
    store = new_store(tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    problem = Problem(tuple(DIMS), tuple(OBJECTIVES))
    a = create_strategy("random", problem, seed=1)
    for _ in range(3):
        a.ask(1)
        store.save_state(a.state_dict())
    b = create_strategy("random", problem, seed=2)  # another head: a new epoch
    b.ask(1)
    store.save_state(b.state_dict())
    assert TrialStore.open(url, "s").load_state() == json.loads(json.dumps(b.state_dict()))
    b.ask(1)
    store.save_state(b.state_dict())
    # the first epoch's appends are still there, and ignored
    attrs = system_attrs(store)
    assert attrs[STATE]["epoch"] == 2 and f"{STATE_APPEND}1.2" in attrs
    assert TrialStore.open(url, "s").load_state() == json.loads(json.dumps(b.state_dict()))


def test_a_missing_append_is_an_error_not_a_silently_shorter_state(tmp_path):
    store = new_store(tmp_path)
    strategy = create_strategy("random", Problem(tuple(DIMS), tuple(OBJECTIVES)), seed=1)
    for _ in range(3):
        strategy.ask(1)
        store.save_state(strategy.state_dict())
    store._storage.set_study_system_attr(store._study_id, f"{STATE_APPEND}1.5", {"log": [],
                                                                               "in_flight": []})
    with pytest.raises(StorageError, match="incomplete"):
        store.load_state()


def test_trials_left_running_by_other_writers_are_failed_on_request(tmp_path):
    store = new_store(tmp_path)
    trial = store.study.ask()  # e.g. an Optuna user, or a crashed older writer
    trial.set_user_attr("candidate_id", 7)
    assert [t.state for t in store.trials()] == ["running"]
    assert store.fail_running("interrupted") == 1
    (rec,) = store.trials()
    assert (rec.state, rec.reason) == ("failed", "interrupted")


def test_a_study_written_before_appended_checkpoints_still_resumes(tmp_path):
    store = new_store(tmp_path)
    strategy = create_strategy("random", Problem(tuple(DIMS), tuple(OBJECTIVES)), seed=1)
    strategy.ask(2)
    store._storage.set_study_user_attr(store._study_id, LEGACY_STATE, strategy.state_dict())
    reopened = TrialStore.open(f"sqlite:///{tmp_path / 'study.db'}", "s")
    assert reopened.load_state() == json.loads(json.dumps(strategy.state_dict()))
    strategy.ask(1)
    reopened.save_state(strategy.state_dict())  # from here on in the new form
    assert system_attrs(reopened)[STATE]["epoch"] == 1
    assert TrialStore.open(f"sqlite:///{tmp_path / 'study.db'}", "s").load_state() == \
        json.loads(json.dumps(strategy.state_dict()))


def test_the_direct_trial_insert_writes_what_optuna_writes(tmp_path):
    """The few-statement insert and Optuna's own create_new_trial give identical trials,
    numbered in one sequence, for every variable kind, values, attrs and failures."""
    import math

    import optuna
    from optuna.trial import TrialState, create_trial

    from mergesearch.storage import insert
    from mergesearch.strategies.optuna_samplers import distribution

    dims = [Dimension("w", 0.0, 2.0, 1.0), Dimension.integer("k", 1, 5, 2),
            Dimension.categorical("src", ["a", "b"], "b"), Dimension.binary("on", 1)]
    store = TrialStore.create(f"sqlite:///{tmp_path / 'study.db'}", "s",
                              [Objective("y"), Objective("z", "minimize")], dims, {"name": "s"})
    assert insert.supported(store._storage)
    dists = {d.name: distribution(d) for d in dims}
    templates = [
        create_trial(state=TrialState.COMPLETE, values=[0.25, -math.inf],
                     params={"w": 1.5, "k": 3, "src": "b", "on": 0}, distributions=dists,
                     user_attrs={"recipe": {"method": "linear"}, "n": 3}),
        create_trial(state=TrialState.FAIL, params={"w": 0.0, "k": 1, "src": "a", "on": 1},
                     distributions=dists, user_attrs={"fail_reason": "boom"}),
        create_trial(state=TrialState.FAIL, user_attrs={"genome": [9.0]}),
    ]
    for t in templates:  # each written both ways, alternating
        store._storage.create_new_trial(store._study_id, template_trial=t)
        insert.insert_trial(store._storage.engine, store._study_id, t)
    fresh = optuna.load_study(study_name="s", storage=store.url).get_trials(deepcopy=False)
    assert [t.number for t in fresh] == list(range(6))
    for a, b in zip(fresh[::2], fresh[1::2], strict=True):
        assert (a.state, a.values, a.params, a.distributions, a.user_attrs) == \
            (b.state, b.values, b.params, b.distributions, b.user_attrs)
        assert a.datetime_complete == b.datetime_complete
