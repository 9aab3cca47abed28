"""Ray Tune drives mergesearch strategies: end to end on the zoo, failures, generations, state."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from pathlib import Path

import pytest
from helpers import zoo_experiment

ray = pytest.importorskip("ray")

from ray import tune  # noqa: E402

from mergesearch.controller import BoundExperiment  # noqa: E402
from mergesearch.execution.worker import Worker  # noqa: E402
from mergesearch.experiment import Experiment  # noqa: E402
from mergesearch.integrations.ray_tune import (  # noqa: E402
    CANDIDATE_ID,
    RECIPE_FILE,
    WEIGHTED_LOSS,
    CandidateFailed,
    MergeSearcher,
    MergeTrainable,
    candidate_config,
    metrics_result,
    space_data,
    tune_search,
)
from mergesearch.strategies import CMAES, Problem  # noqa: E402
from mergesearch.trial import Candidate  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BAD = 5  # the candidate that asks for an impossible fidelity, so its evaluation fails


class _FailOne:
    """Candidate BAD reaches the worker with fidelity 2 (set after the ask-time checks, which
    would refuse it): the evaluator refuses it, as it would a real bug."""

    def ask(self, n=1):
        out = super().ask(n)
        for cand in out:
            if cand.id == BAD:
                cand.fidelity = 2.0
        return out


class FailingCMAES(_FailOne, CMAES):
    pass


def experiment(tmp_path, **changes) -> Experiment:
    """A small search over the zoo: 16 items per skill, two objectives."""
    return zoo_experiment(tmp_path, **({"name": "rt", "budget": {"evaluations": 7}} | changes))


def told(strategy) -> dict[int, dict]:
    """Every result the strategy was told, by candidate id (each id told once)."""
    records = [r for kind, payload, *_ in strategy.state_dict()["log"] if kind == "tell"
               for r in payload]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), "a candidate was told twice"
    return {r["id"]: r for r in records}


def check_against_worker(search: BoundExperiment, results) -> None:
    """Each reported trial scores what an in-process worker scores for its decoded recipe."""
    worker = Worker(search.worker_spec)
    for r in results:
        cfg = r.config
        genome = [cfg[n] for n in search.space.names]
        cand = Candidate(cfg[CANDIDATE_ID], genome, cfg["fidelity"],
                         recipe=search.space.decode(genome))
        ref = worker.evaluate(cand)
        assert ref.ok, ref.reason
        for o in search.problem.objectives:
            assert r.metrics[o.name] == pytest.approx(ref.values[o.name], rel=1e-6, abs=1e-9)
        assert r.metrics[WEIGHTED_LOSS] == pytest.approx(search.problem.scalar_loss(ref.values))
        assert r.metrics["scores"].keys() == ref.scores.keys()
        # Tune's checkpoint of the trial is the recipe it scored
        saved = json.loads(Path(r.checkpoint.path, RECIPE_FILE).read_text())
        assert saved == cand.recipe.to_dict()
        for task, scores in ref.scores.items():
            assert r.metrics["scores"][task] == pytest.approx(scores, rel=1e-6, abs=1e-9)


def test_tune_drives_cmaes_and_every_result_is_the_workers(zoo, ray_cluster, tmp_path):
    """One Tune run (actors are the slow part): two cmaes generations through the
    None-suggestion path, reused actors, a failing candidate, Tune's searcher checkpoint."""
    exp = experiment(tmp_path, strategy={"name": "cmaes", "options": {"popsize": 3}},
                     budget={"evaluations": 6})
    search = BoundExperiment(exp, progress=False)
    search.strategy = strategy = FailingCMAES(search.problem, {"popsize": 3}, seed=0)
    grid = tune_search(search, tune_config=tune.TuneConfig(max_concurrent_trials=2),
                       run_config=tune.RunConfig(name="b", storage_path=str(tmp_path / "tune"),
                                                 verbose=0))

    assert len(grid) == 6
    assert sorted(r.config[CANDIDATE_ID] for r in grid) == list(range(6))
    errored = [r for r in grid if r.error is not None]
    ok = [r for r in grid if r.error is None]
    assert [r.config[CANDIDATE_ID] for r in errored] == [BAD]
    assert "fidelity must be in (0, 1]" in str(errored[0].error)
    # the strategy heard every trial: two whole generations, the failure as failed
    assert strategy.pending == [] and strategy.generation == 2
    log = told(strategy)
    assert sorted(log) == list(range(6))
    assert log[BAD]["status"] == "failed" and log[BAD]["values"] == {}
    for r in ok:
        rec = log[r.config[CANDIDATE_ID]]
        assert rec["status"] == "ok"
        assert rec["values"] == {o.name: r.metrics[o.name] for o in search.problem.objectives}
    # at the generation boundary ask() came back empty and suggest() made Tune wait
    asks = [event[1] for event in strategy.state_dict()["log"] if event[0] == "ask"]
    assert len(asks) > 6
    check_against_worker(search, ok)
    # actors were reused: fewer worker processes than trials
    assert len({r.metrics["pid"] for r in ok}) < len(ok)
    # Tune ranks by the weighted loss the searcher chose for two objectives
    best = grid.get_best_result()
    assert best.metrics[WEIGHTED_LOSS] == min(r.metrics[WEIGHTED_LOSS] for r in ok)
    # Tune checkpointed the searcher as JSON; restoring it gives back the strategy's state
    again = MergeSearcher(CMAES(search.problem, {"popsize": 3}, seed=0))
    again.restore_from_dir(str(tmp_path / "tune" / "b"))
    assert again.strategy.state_dict() == strategy.state_dict()


def test_trainable_reports_or_raises_a_failed_candidate(zoo, tmp_path):
    """The trainable's step, run in process: a good candidate, then a failing one either
    raised (Tune marks the trial ERROR) or reported (status failed, objectives NaN)."""
    search = BoundExperiment(experiment(tmp_path), progress=False)
    problem = search.problem
    trainable = object.__new__(MergeTrainable)  # no Tune actor: call setup/step directly
    trainable.setup({}, worker_spec=dataclasses.asdict(search.worker_spec),
                    space=space_data(search.space), raise_on_failure=False)
    good = Candidate(0, list(search.space.x0))
    trainable.config = candidate_config(problem, good)
    assert trainable.reset_config(trainable.config) is True
    metrics = trainable.step()
    assert metrics["done"] and metrics["status"] == "ok" and metrics[CANDIDATE_ID] == 0
    assert metrics_result(0, metrics, problem).values == {
        o.name: metrics[o.name] for o in problem.objectives}
    trainable.config = candidate_config(problem, Candidate(1, list(search.space.x0), 2.0))
    metrics = trainable.step()
    assert metrics["status"] == "failed" and "fidelity" in metrics["reason"]
    assert math.isnan(metrics["rev"]) and math.isnan(metrics[WEIGHTED_LOSS])
    told = metrics_result(1, metrics, problem)
    assert told.status == "failed" and "fidelity" in told.reason
    trainable.raise_on_failure = True
    with pytest.raises(CandidateFailed, match="candidate 1: EvaluationError"):
        trainable.step()
    trainable.config = {CANDIDATE_ID: 2}
    with pytest.raises(CandidateFailed, match="suggested by a MergeSearcher"):
        trainable.step()


def test_searcher_state_round_trips_as_json_and_by_pickle(zoo, tmp_path):
    search = BoundExperiment(experiment(tmp_path), progress=False)
    problem = search.problem
    searcher = MergeSearcher("cmaes", problem, options={"popsize": 4}, seed=1)
    configs = {f"t{i}": searcher.suggest(f"t{i}") for i in range(4)}
    assert searcher.suggest("t4") is None  # generation boundary: Tune asks again later
    values = {"rev": 0.5, "mean": 0.25, "weighted_loss": -0.375}
    searcher.on_trial_complete("t0", values)
    searcher.on_trial_complete("t1", error=True)
    searcher.on_trial_complete("t2", {"rev": math.nan, "mean": 0.1})
    path = tmp_path / "searcher.json"
    searcher.save(str(path))
    state = json.loads(path.read_text())
    assert state["trials"] == {"t3": 3}
    restored = MergeSearcher(CMAES(problem, {"popsize": 4}, seed=1))
    restored.restore(str(path))
    copied = pickle.loads(pickle.dumps(searcher))
    for other in (restored, copied):
        assert other.strategy.state_dict() == searcher.strategy.state_dict()
        assert [c.id for c in other.strategy.pending] == [3]
        other.on_trial_complete("t3", values)  # the generation completes: same next proposal
    searcher.on_trial_complete("t3", values)
    nxt = searcher.suggest("t5")
    assert restored.suggest("t5") == nxt == copied.suggest("t5")
    assert nxt[CANDIDATE_ID] == 4 and configs["t0"][CANDIDATE_ID] == 0
    records = told(searcher.strategy)
    assert [records[i]["status"] for i in range(4)] == ["ok", "failed", "failed", "ok"]
    assert searcher.strategy.generation == 1
    # metric and mode follow the objectives
    single = MergeSearcher("random", Problem(problem.dims, problem.objectives[:1]))
    assert (single.metric, single.mode) == ("rev", "max")
    assert MergeSearcher.from_search(search, metric="mean").mode == "max"
