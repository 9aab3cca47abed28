"""CMA-ES specifics: generations, the start point, unit-cube scaling, failures, stopping."""

from __future__ import annotations

import numpy as np
import pytest

from mergesearch.strategies import CMAES, Dimension, Objective, Problem, StrategyError
from mergesearch.trial import Result

from .test_conformance import MIXED, SPHERE, mixed, result, sphere

SCALES = Problem((Dimension("small", 0.0, 1.0, 0.25), Dimension("big", -100.0, 100.0, 20.0)),
                 (Objective("loss", "minimize"),))


def test_one_generation_at_a_time() -> None:
    s = CMAES(SPHERE, seed=0)
    assert s.popsize == 8  # pycma's 4 + floor(3 ln 5)
    gen = s.ask(100)
    assert len(gen) == s.popsize
    assert s.ask(1) == []
    s.tell(result(c, sphere) for c in gen[:-1])
    assert s.ask(3) == []  # one member still out
    s.tell([result(gen[-1], sphere)])
    assert s.generation == 1
    split = s.ask(5) + s.ask(5)
    assert [c.id for c in split] == list(range(8, 16))


def test_popsize_option() -> None:
    assert len(CMAES(SPHERE, {"popsize": 5}).ask(100)) == 5
    with pytest.raises(StrategyError, match="popsize"):
        CMAES(SPHERE, {"popsize": 1})


def test_starts_at_the_init_point_with_sigma0_of_each_range() -> None:
    for problem in (SPHERE, MIXED, SCALES):
        assert np.allclose(CMAES(problem).mean, problem.x0)
    s = CMAES(SCALES, {"popsize": 400, "sigma0": 0.1}, seed=1)
    x = np.array([c.genome for c in s.ask(400)])
    span = SCALES.high - SCALES.low
    assert np.all(np.abs(x.mean(axis=0) - SCALES.x0) < 0.02 * span)
    assert np.allclose(x.std(axis=0) / span, 0.1, rtol=0.15)


def test_failed_members_rank_last() -> None:
    s = CMAES(SPHERE, seed=3)
    told: list[list[float]] = []
    tell = s._es.tell
    s._es.tell = lambda X, F: (told.append(list(F)), tell(X, F))  # type: ignore[method-assign]
    gen = s.ask(100)
    s.tell([Result.failed(c.id, "oom") if c.id in (1, 4) else result(c, sphere) for c in gen])
    losses = told[0]
    ok = [v for i, v in enumerate(losses) if i not in (1, 4)]
    assert min(losses[1], losses[4]) > max(ok)


def test_whole_generations_failing_do_not_stop_it() -> None:
    s = CMAES(SPHERE, seed=3)
    for _ in range(4):
        s.tell(Result.failed(c.id, "oom") for c in s.ask(100))
    assert not s.done and s.stop_reasons == {}
    assert len(s.ask(100)) == s.popsize


def test_flat_fitness_stops_unless_told_otherwise() -> None:
    """pycma ends on a generation of equal losses (``tolfun``): ``done`` reports it."""
    s = CMAES(SPHERE, seed=0)
    s.tell(Result(c.id, {"loss": 1.0}) for c in s.ask(100))
    assert s.done and "tolfun" in s.stop_reasons
    assert s.ask(4) == []
    patient = CMAES(SPHERE, {"cma_options": {"tolfun": 0, "tolflatfitness": 10}}, seed=0)
    for _ in range(3):
        patient.tell(Result(c.id, {"loss": 1.0}) for c in patient.ask(100))
    assert not patient.done


def test_no_budget_stop_before_the_controller_budget() -> None:
    s = CMAES(SPHERE, {"popsize": 4}, seed=0)
    for _ in range(300):  # well past pycma's default maxiter would be for short runs
        s.tell(result(c, sphere) for c in s.ask(4))
        if s.done:
            break
    assert "maxiter" not in s.stop_reasons and "maxfevals" not in s.stop_reasons


def test_pycma_options() -> None:
    s = CMAES(MIXED, {"cma_options": {"CMA_diagonal": True}}, seed=0)
    s.tell(result(c, mixed) for c in s.ask(100))
    for key in ("not_a_pycma_option", "seed", "bounds"):
        with pytest.raises(StrategyError, match=key):
            CMAES(SPHERE, {"cma_options": {key: 1}})


def test_reads_and_writes_no_files(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cma_signals.in").write_text("{'tolfun': 1e10}")  # would stop it at once
    s = CMAES(SPHERE, seed=0)
    for _ in range(3):
        s.tell(result(c, sphere) for c in s.ask(100))
    assert not s.done
    assert [p.name for p in tmp_path.iterdir()] == ["cma_signals.in"]
